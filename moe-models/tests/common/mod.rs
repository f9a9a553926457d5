//! Shared by the golden tests: a fixture (checkpoint + transformers' reference outputs), the tolerance
//! check, and the cached-decode check.

#![allow(dead_code)] // each test binary uses its own subset

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use alloc_token::device::DeviceTopK;
use moe_models::{ForwardCtx, KvCache, MlaPath, Model};
use tch::{Device, Kind, Tensor};

/// The golden tolerance on f32 logits.
pub const RTOL: f64 = 1e-4;
/// The golden absolute tolerance on f32 logits.
pub const ATOL: f64 = 1e-5;

/// `tests/fixtures/<family>/<case>`.
pub fn fixture_dir(family: &str, case: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(family).join(case)
}

/// A loaded fixture: the model (f32, CPU) and the tensors of `golden.safetensors`.
pub struct Golden {
    pub model: Model,
    pub dir: PathBuf,
    pub t: HashMap<String, Tensor>,
}

impl Golden {
    pub fn load(dir: &Path) -> Self {
        let model = moe_models::load(dir, Device::Cpu, Kind::Float).expect("load fixture");
        let t = Tensor::read_safetensors(dir.join("golden.safetensors")).expect("golden").into_iter().collect();
        Self { model, dir: dir.to_path_buf(), t }
    }
    pub fn get(&self, name: &str) -> &Tensor {
        self.t.get(name).unwrap_or_else(|| panic!("golden lacks {name}"))
    }
    pub fn ids(&self) -> &Tensor {
        self.get("input_ids")
    }
    pub fn mask(&self) -> &Tensor {
        self.get("attention_mask")
    }
    /// Stock top-k at the model's native k.
    pub fn policy(&self) -> DeviceTopK {
        DeviceTopK { k: self.model.info().native_k }
    }
    /// f32 logits of the fixture's ids under `ctx`.
    pub fn logits(&self, ctx: &mut ForwardCtx<'_>) -> Tensor {
        let h = self.model.forward_hidden(self.ids(), ctx).expect("forward");
        self.model.lm_head(&h).expect("lm_head").to_kind(Kind::Float)
    }
}

/// Largest violation of `|a - b| <= atol + rtol |b|` over the real tokens, as (max abs err, ok).
pub fn compare(a: &Tensor, b: &Tensor, mask: &Tensor, rtol: f64, atol: f64) -> (f64, bool) {
    let keep = mask.ne(0).unsqueeze(-1).expand_as(b);
    let a = a.masked_select(&keep);
    let b = b.masked_select(&keep);
    let err = (&a - &b).abs();
    let excess = (&err - (b.abs() * rtol + atol)).max().double_value(&[]);
    (err.max().double_value(&[]), excess <= 0.0)
}

/// Prefill the first half, then decode one token at a time; every real token's logits must equal the
/// uncached forward's, with a growing cache and with a preallocated one (three slots more than needed,
/// so unwritten slots must stay masked).
pub fn check_cached_decode(g: &Golden, name: &str, mla: MlaPath) {
    let policy = g.policy();
    let full = g.logits(&mut ForwardCtx::new(&policy).with_mask(g.mask()));
    let t = g.ids().size()[1];
    let p = t / 2;
    for (layout, mut cache) in [("growing", KvCache::new()), ("preallocated", KvCache::with_capacity(t as usize + 3))] {
        let mut steps = Vec::new();
        let mut start = 0;
        while start < t {
            let len = if start == 0 { p } else { 1 };
            let ids = g.ids().narrow(1, start, len);
            let mask = g.mask().narrow(1, start, len);
            let mut ctx = ForwardCtx::new(&policy).with_mask(&mask).with_cache(&mut cache).with_mla(mla);
            let h = g.model.forward_hidden(&ids, &mut ctx).expect("step");
            steps.push(g.model.lm_head(&h).expect("head"));
            start += len;
        }
        assert_eq!(cache.len() as i64, t);
        let cached = Tensor::cat(&steps, 1);
        let (err, ok) = compare(&cached, &full, g.mask(), RTOL, 1e-4);
        eprintln!("{name} ({mla:?}, {layout} cache): max |cached - uncached| {err:.3e}");
        assert!(ok, "{name}: {layout}-cache decode differs from the uncached forward ({err:.3e})");
    }
}
