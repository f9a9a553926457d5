//! Fuzzing entry points (compiled for this crate's tests and with the `fuzzing` feature): each takes
//! arbitrary bytes as the content of one user-supplied file and must return `Ok` or `Err`, never panic,
//! abort, hang or exhaust memory. `fuzz/fuzz_targets/*.rs` are one-line calls of these; the smoke tests
//! below replay the committed corpora (`fuzz/corpus/<target>/`) and seeded mutations through the same
//! functions, so `cargo test` keeps what the fuzzers found fixed. See `docs/fuzzing.md`.
//!
//! Each call works in a fresh scratch directory under the system temp dir (removed afterwards), because
//! the loader reads files: the entries go through exactly the code a user's checkpoint goes through.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use tch::{Device, Kind};

use crate::error::{Error, Result};
use crate::loader::{Checkpoint, INDEX_FILE, SINGLE_FILE};

/// `bytes` as `config.json` of a checkpoint whose `model.safetensors` holds only a `(16, 8)` f32
/// `model.embed_tokens.weight`, through [`crate::load`]: parsing, `model_type` dispatch, each family's
/// validation and everything it derives before reading tensors (rope, shapes, the first tensor loads).
pub fn config_json(bytes: &[u8]) -> Result<()> {
    let dir = Scratch::new()?;
    dir.write(SINGLE_FILE, &safetensors_bytes(&[("model.embed_tokens.weight", "F32", &[16, 8])]))?;
    dir.write("config.json", bytes)?;
    crate::load(dir.path(), Device::Cpu, Kind::Float).map(drop)
}

/// `bytes` as a single-file `model.safetensors`: open the checkpoint (header, offsets, names), then load
/// every tensor at its stored shape as f32 and require all consumed.
pub fn safetensors_file(bytes: &[u8]) -> Result<()> {
    let dir = Scratch::new()?;
    dir.write(SINGLE_FILE, bytes)?;
    load_all(dir.path())
}

/// `bytes` as `model.safetensors.index.json` next to two valid shards, `a.safetensors`
/// (`x.weight (2, 3)` f32) and `b.safetensors` (`y.weight (4)` bf16): open the sharded checkpoint, then
/// load every tensor.
pub fn shard_index(bytes: &[u8]) -> Result<()> {
    let dir = Scratch::new()?;
    dir.write("a.safetensors", &safetensors_bytes(&[("x.weight", "F32", &[2, 3])]))?;
    dir.write("b.safetensors", &safetensors_bytes(&[("y.weight", "BF16", &[4])]))?;
    dir.write(INDEX_FILE, bytes)?;
    load_all(dir.path())
}

fn load_all(dir: &Path) -> Result<()> {
    let ckpt = Checkpoint::open(dir)?;
    for name in ckpt.names() {
        let shape = ckpt.shape(&name).map(<[i64]>::to_vec).unwrap_or_default();
        drop(ckpt.load(&name, &shape, Kind::Float, Device::Cpu)?);
    }
    ckpt.finish()
}

/// A valid safetensors file of zero-filled tensors `(name, dtype, shape)`.
pub fn safetensors_bytes(tensors: &[(&str, &str, &[usize])]) -> Vec<u8> {
    let mut header = serde_json::Map::new();
    let mut offset = 0usize;
    for (name, dtype, shape) in tensors {
        let size = match *dtype {
            "F64" | "I64" => 8,
            "F32" | "I32" => 4,
            "F16" | "BF16" => 2,
            _ => 1,
        };
        let len = size * shape.iter().product::<usize>();
        header.insert(
            (*name).to_string(),
            serde_json::json!({"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + len]}),
        );
        offset += len;
    }
    let mut json = serde_json::Value::Object(header).to_string().into_bytes();
    while json.len() % 8 != 0 {
        json.push(b' ');
    }
    let mut out = (json.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(&json);
    out.resize(out.len() + offset, 0);
    out
}

/// A fresh directory, removed on drop.
struct Scratch(PathBuf);

impl Scratch {
    fn new() -> Result<Self> {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let path = std::env::temp_dir().join(format!("moe-models-fuzz-{}-{n}", std::process::id()));
        std::fs::create_dir_all(&path).map_err(|source| Error::Io { path: path.clone(), source })?;
        Ok(Self(path))
    }

    fn path(&self) -> &Path {
        &self.0
    }

    fn write(&self, name: &str, bytes: &[u8]) -> Result<()> {
        let path = self.0.join(name);
        std::fs::write(&path, bytes).map_err(|source| Error::Io { path, source })
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[cfg(test)]
#[path = "../../fuzz/smoke.rs"]
mod smoke;

#[cfg(test)]
mod tests {
    use super::smoke::replay;
    use super::*;

    #[test]
    fn fuzz_smoke_config_json_never_panics() {
        replay("config_json", 1500, config_json);
    }

    #[test]
    fn fuzz_smoke_safetensors_file_never_panics() {
        replay("safetensors_file", 1500, safetensors_file);
    }

    #[test]
    fn fuzz_smoke_shard_index_never_panics() {
        replay("shard_index", 1500, shard_index);
    }

    #[test]
    fn implausible_config_sizes_are_errors_naming_the_key() {
        // Found by fuzz/config_json: a 10^11 rotary dim aborted on allocation, 10^17 layers reserved
        // memory for them, an OLMoE head_dim near 2^63 overflowed (fuzz/corpus/config_json/crash-*).
        for (config, key) in [
            (r#"{"model_type":"deepseek_v2","num_experts_per_tok":2,"qk_rope_head_dim":100000000000}"#, "qk_rope_head_dim"),
            (r#"{"model_type":"mixtral","hidden_size":8,"vocab_size":16,"num_hidden_layers":100000000000000000}"#, "num_hidden_layers"),
            (r#"{"model_type":"olmoe","head_dim":9223372036854775807,"num_attention_heads":4}"#, "head_dim"),
        ] {
            let e = config_json(config.as_bytes()).expect_err(config);
            assert!(matches!(&e, Error::Config { key: k, .. } if k == key), "{config}: {e}");
        }
    }

    #[test]
    fn the_scratch_checkpoints_are_valid() {
        let ok = br#"{"weight_map": {"x.weight": "a.safetensors", "y.weight": "b.safetensors"}}"#;
        shard_index(ok).expect("valid index");
        safetensors_file(&safetensors_bytes(&[("a", "F32", &[2, 2]), ("b", "F16", &[0])])).expect("valid file");
        let e = config_json(br#"{"model_type": "mixtral"}"#).expect_err("no layers in the checkpoint");
        assert!(matches!(e, Error::ShapeMismatch { .. }), "{e}");
    }
}
