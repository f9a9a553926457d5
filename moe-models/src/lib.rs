//! Mixture-of-Experts language models on libtorch (tch), loading unmodified Hugging Face checkpoints.

#[cfg(test)]
mod tests {
    /// Proves the libtorch link works from the start: a real tensor op through tch.
    #[test]
    fn libtorch_runs_a_matmul() {
        let a = tch::Tensor::from_slice(&[1.0f32, 2.0, 3.0, 4.0]).reshape([2, 2]);
        let b = a.matmul(&a);
        let v: Vec<f32> = b.reshape([-1]).try_into().expect("f32 tensor");
        assert_eq!(v, vec![7.0, 10.0, 15.0, 22.0]);
    }
}
