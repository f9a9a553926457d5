//! Hugging Face checkpoint loading: memory-mapped safetensors shards, a var-builder with prefixes spelled
//! like the module fields, dtype cast and device placement, shape checks, and the rule that every
//! checkpoint tensor is consumed.
//!
//! A checkpoint directory holds `config.json` and either `model.safetensors` or
//! `model.safetensors.index.json` plus the shards it names. The shards are mapped, not read: a tensor is
//! copied out of the mapping only when a module asks for it (then cast and moved to the device), so a
//! 30 GB checkpoint loads with the model's own size in memory, not twice it.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use memmap2::Mmap;
use safetensors::tensor::{Dtype, SafeTensors};
use tch::{Device, Kind, Tensor};

use crate::error::{Error, Result, TorchContext};

/// The single-file checkpoint name.
pub const SINGLE_FILE: &str = "model.safetensors";
/// The shard index name.
pub const INDEX_FILE: &str = "model.safetensors.index.json";

/// One mapped safetensors file.
struct Shard {
    path: PathBuf,
    mmap: Mmap,
}

/// Where one tensor lives.
#[derive(Debug, Clone)]
struct Entry {
    shard: usize,
    dtype: Dtype,
    shape: Vec<i64>,
    /// Byte range inside the shard file (absolute).
    start: usize,
    end: usize,
}

/// A memory-mapped checkpoint: every tensor of every shard, by full name, with a record of which ones
/// the model has consumed.
pub struct Checkpoint {
    dir: PathBuf,
    shards: Vec<Shard>,
    entries: HashMap<String, Entry>,
    used: Mutex<HashSet<String>>,
}

impl std::fmt::Debug for Checkpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Checkpoint")
            .field("dir", &self.dir)
            .field("shards", &self.shards.len())
            .field("tensors", &self.entries.len())
            .finish()
    }
}

/// Map a file read-only.
#[allow(unsafe_code)]
fn map_file(path: &Path) -> Result<Mmap> {
    let file = File::open(path).map_err(|source| Error::Io { path: path.to_path_buf(), source })?;
    // SAFETY: the mapping is read-only and lives as long as the Checkpoint. As with every mmap-based
    // loader (safetensors, candle), truncating or rewriting a checkpoint file while it is loaded is
    // undefined behaviour; checkpoints are treated as immutable inputs.
    unsafe { Mmap::map(&file) }.map_err(|source| Error::Io { path: path.to_path_buf(), source })
}

/// A readable reason for a safetensors header the crate rejects (its variant names alone are cryptic).
fn describe_header_error(e: &safetensors::SafeTensorError, file_len: usize) -> String {
    use safetensors::SafeTensorError as E;
    let what = match e {
        E::HeaderTooSmall => "shorter than the 8-byte header length (empty or truncated)",
        E::InvalidHeaderLength => "its header length field points past the end of the file (truncated or not safetensors)",
        E::HeaderTooLarge => "its header length field is implausibly large (corrupted or not safetensors)",
        E::InvalidHeader | E::InvalidHeaderStart | E::InvalidHeaderDeserialization => {
            "its JSON header is corrupted (not valid UTF-8 JSON)"
        }
        E::MetadataIncompleteBuffer => "the tensor data lies outside the file, or does not fill it (truncated or corrupted)",
        E::InvalidOffset(_) | E::TensorInvalidInfo | E::ValidationOverflow => {
            "its header gives inconsistent tensor offsets, shapes or dtypes (corrupted)"
        }
        _ => "",
    };
    if what.is_empty() {
        format!("{e:?} ({file_len} bytes)")
    } else {
        format!("{what} ({e:?}, {file_len} bytes)")
    }
}

/// The shard index file's layout.
#[derive(serde::Deserialize)]
struct Index {
    weight_map: BTreeMap<String, String>,
}

impl Checkpoint {
    /// Open the checkpoint in `dir`: the shard index if present, else the single file.
    pub fn open(dir: &Path) -> Result<Self> {
        let index_path = dir.join(INDEX_FILE);
        if index_path.exists() {
            let index: Index = read_json(&index_path)?;
            let mut files: Vec<String> = index.weight_map.values().cloned().collect();
            files.sort();
            files.dedup();
            let paths: Vec<PathBuf> = files.iter().map(|f| dir.join(f)).collect();
            let ckpt = Self::open_files(dir, &paths)?;
            // Every name in the index must be in the shard the index says.
            for (name, file) in &index.weight_map {
                let ok = ckpt
                    .entries
                    .get(name)
                    .is_some_and(|e| ckpt.shards[e.shard].path == dir.join(file));
                if !ok {
                    return Err(Error::SafeTensors {
                        path: dir.join(file),
                        msg: format!("{INDEX_FILE} maps `{name}` to this file, which does not hold it"),
                    });
                }
            }
            Ok(ckpt)
        } else {
            Self::open_files(dir, &[dir.join(SINGLE_FILE)])
        }
    }

    /// Open a given list of safetensors files as one checkpoint (names must be unique across them).
    pub fn open_files(dir: &Path, paths: &[PathBuf]) -> Result<Self> {
        let mut shards = Vec::with_capacity(paths.len());
        let mut entries = HashMap::new();
        for (i, path) in paths.iter().enumerate() {
            let mmap = map_file(path)?;
            let bad = |msg: String| Error::SafeTensors { path: path.clone(), msg };
            let (header_len, meta) = SafeTensors::read_metadata(&mmap).map_err(|e| bad(describe_header_error(&e, mmap.len())))?;
            let data_start = 8 + header_len;
            for (name, info) in meta.tensors() {
                let (s, e) = info.data_offsets;
                if data_start + e > mmap.len() || s > e {
                    return Err(bad(format!("tensor `{name}` lies outside the file")));
                }
                let entry = Entry {
                    shard: i,
                    dtype: info.dtype,
                    shape: info.shape.iter().map(|&d| d as i64).collect(),
                    start: data_start + s,
                    end: data_start + e,
                };
                if entries.insert(name.clone(), entry).is_some() {
                    return Err(bad(format!("tensor `{name}` appears in more than one shard")));
                }
            }
            shards.push(Shard { path: path.clone(), mmap });
        }
        tracing::debug!(dir = %dir.display(), shards = shards.len(), tensors = entries.len(), "checkpoint mapped");
        Ok(Self { dir: dir.to_path_buf(), shards, entries, used: Mutex::new(HashSet::new()) })
    }

    /// The checkpoint directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Whether the checkpoint holds `name`.
    pub fn contains(&self, name: &str) -> bool {
        self.entries.contains_key(name)
    }

    /// The stored shape of `name`, if present.
    pub fn shape(&self, name: &str) -> Option<&[i64]> {
        self.entries.get(name).map(|e| e.shape.as_slice())
    }

    /// All tensor names, sorted.
    pub fn names(&self) -> Vec<String> {
        let mut v: Vec<String> = self.entries.keys().cloned().collect();
        v.sort();
        v
    }

    /// Copy `name` out of the mapping, check its shape against `expected`, cast floating-point data to
    /// `kind` and move it to `device`. Marks the tensor consumed.
    pub fn load(&self, name: &str, expected: &[i64], kind: Kind, device: Device) -> Result<Tensor> {
        let entry = self
            .entries
            .get(name)
            .ok_or_else(|| Error::MissingTensor { name: name.to_string(), dir: self.dir.clone() })?;
        if entry.shape != expected {
            return Err(Error::ShapeMismatch {
                name: name.to_string(),
                expected: expected.to_vec(),
                found: entry.shape.clone(),
            });
        }
        let src_kind = match entry.dtype {
            Dtype::F32 => Kind::Float,
            Dtype::F16 => Kind::Half,
            Dtype::BF16 => Kind::BFloat16,
            Dtype::F64 => Kind::Double,
            other => {
                return Err(Error::UnsupportedDtype { name: name.to_string(), dtype: format!("{other:?}") })
            }
        };
        let bytes = &self.shards[entry.shard].mmap[entry.start..entry.end];
        let t = Tensor::f_from_data_size(bytes, &entry.shape, src_kind).ctx(format!("load `{name}`"))?;
        // Cast on the host before the move: it halves the transfer for f32 -> bf16, and a bf16 -> f32
        // CPU model never holds the bf16 copy longer than this one tensor.
        let t = if src_kind != kind { t.f_to_kind(kind).ctx(format!("cast `{name}`"))? } else { t };
        let t = if device != Device::Cpu { t.f_to_device(device).ctx(format!("move `{name}`"))? } else { t };
        self.mark_used(name);
        Ok(t)
    }

    fn mark_used(&self, name: &str) {
        // A poisoned lock only means another thread panicked while inserting a name; the set is still
        // a valid set of names.
        let mut used = self.used.lock().unwrap_or_else(|p| p.into_inner());
        used.insert(name.to_string());
    }

    /// Names not consumed so far, sorted.
    pub fn unused(&self) -> Vec<String> {
        let used = self.used.lock().unwrap_or_else(|p| p.into_inner());
        let mut v: Vec<String> = self.entries.keys().filter(|k| !used.contains(*k)).cloned().collect();
        v.sort();
        v
    }

    /// Succeed only if every checkpoint tensor has been consumed.
    pub fn finish(&self) -> Result<()> {
        let names = self.unused();
        if names.is_empty() {
            Ok(())
        } else {
            Err(Error::UnusedTensors { names })
        }
    }
}

/// Where a [`VarBuilder`] gets its tensors.
#[derive(Clone, Copy)]
enum Source<'a> {
    /// A mapped checkpoint.
    Checkpoint(&'a Checkpoint),
    /// Fresh random tensors (speed measurements at real shapes without a checkpoint): norms are ones,
    /// everything else normal with this standard deviation. It claims to hold every name, so fused
    /// layouts (stacked experts) are chosen.
    Random { std: f64 },
}

/// Hands out checkpoint tensors under a name prefix, cast to the model's dtype and on its device.
/// Prefixes are spelled like the module fields: `vb.pp("model").pp("layers").pp(3).pp("mlp")`.
#[derive(Clone)]
pub struct VarBuilder<'a> {
    source: Source<'a>,
    prefix: String,
    kind: Kind,
    device: Device,
    /// Bytes of every tensor handed out so far, shared by the builder and every `pp` below it.
    bytes: std::rc::Rc<std::cell::Cell<u64>>,
}

impl std::fmt::Debug for VarBuilder<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VarBuilder").field("prefix", &self.prefix).field("kind", &self.kind).finish()
    }
}

impl<'a> VarBuilder<'a> {
    /// A builder at the checkpoint root producing `kind` tensors on `device`.
    pub fn new(ckpt: &'a Checkpoint, kind: Kind, device: Device) -> Self {
        Self { source: Source::Checkpoint(ckpt), prefix: String::new(), kind, device, bytes: Default::default() }
    }

    /// A builder producing random tensors (norm weights ones, others `N(0, std^2)`) instead of reading
    /// a checkpoint: real shapes for speed measurements. Seed with `tch::manual_seed`.
    pub fn random(std: f64, kind: Kind, device: Device) -> VarBuilder<'static> {
        VarBuilder { source: Source::Random { std }, prefix: String::new(), kind, device, bytes: Default::default() }
    }

    /// Succeed only if every checkpoint tensor has been consumed (always true for a random source).
    pub fn finish(&self) -> Result<()> {
        match self.source {
            Source::Checkpoint(c) => c.finish(),
            Source::Random { .. } => Ok(()),
        }
    }

    /// Descend into a sub-module (`pp` as in "push prefix").
    pub fn pp(&self, part: impl std::fmt::Display) -> Self {
        let prefix =
            if self.prefix.is_empty() { part.to_string() } else { format!("{}.{}", self.prefix, part) };
        Self { prefix, ..self.clone() }
    }

    /// The full checkpoint name of `leaf` under this prefix.
    pub fn name(&self, leaf: &str) -> String {
        if self.prefix.is_empty() {
            leaf.to_string()
        } else {
            format!("{}.{}", self.prefix, leaf)
        }
    }

    /// The model's compute dtype.
    pub fn kind(&self) -> Kind {
        self.kind
    }

    /// The model's device.
    pub fn device(&self) -> Device {
        self.device
    }

    /// Whether the checkpoint holds `leaf` under this prefix.
    pub fn contains(&self, leaf: &str) -> bool {
        match self.source {
            Source::Checkpoint(c) => c.contains(&self.name(leaf)),
            Source::Random { .. } => true,
        }
    }

    /// Load `leaf` in the model dtype, checking its shape.
    pub fn get(&self, leaf: &str, shape: &[i64]) -> Result<Tensor> {
        self.get_kind(leaf, shape, self.kind)
    }

    /// Bytes of every tensor this builder (and the builders `pp` made from it, or it from) handed out.
    pub fn bytes_loaded(&self) -> u64 {
        self.bytes.get()
    }

    /// Load `leaf` in a given dtype (router weights are kept in f32), checking its shape.
    pub fn get_kind(&self, leaf: &str, shape: &[i64], kind: Kind) -> Result<Tensor> {
        let t = self.fetch(leaf, shape, kind)?;
        self.bytes.set(self.bytes.get() + tensor_bytes(&t));
        Ok(t)
    }

    fn fetch(&self, leaf: &str, shape: &[i64], kind: Kind) -> Result<Tensor> {
        match self.source {
            Source::Checkpoint(c) => c.load(&self.name(leaf), shape, kind, self.device),
            Source::Random { std } => {
                let name = self.name(leaf);
                let t = if shape.len() == 1 && name.ends_with("norm.weight") {
                    Tensor::f_ones(shape, (kind, self.device))
                } else {
                    Tensor::f_randn(shape, (kind, self.device)).and_then(|t| t.f_mul_scalar(std))
                };
                t.ctx(format!("random `{name}`"))
            }
        }
    }
}

/// Bytes of `t`'s elements.
pub(crate) fn tensor_bytes(t: &Tensor) -> u64 {
    t.numel() as u64 * t.kind().elt_size_in_bytes() as u64
}

/// Read and parse a JSON file into `T`, naming the file on failure, and the key when the JSON is well
/// formed but a value has the wrong type or range.
pub fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T> {
    let text = std::fs::read_to_string(path).map_err(|source| Error::Io { path: path.to_path_buf(), source })?;
    serde_json::from_str(&text).map_err(|source| {
        // serde's "missing field `x`" and "unknown field `x`" already name the key.
        let msg = source.to_string();
        let names_key = msg.starts_with("missing field") || msg.starts_with("unknown field");
        let key = (source.classify() == serde_json::error::Category::Data && !names_key)
            .then(|| key_before(&text, source.line(), source.column()))
            .flatten();
        match key {
            Some(key) => Error::JsonValue { path: path.to_path_buf(), key, source },
            None => Error::Json { path: path.to_path_buf(), source },
        }
    })
}

/// The last object key (`"name":`) that starts before 1-based `line`, `column` of `text`: where serde
/// reports a bad value, the key it belongs to. `None` if there is none (e.g. an error at the top level).
fn key_before(text: &str, line: usize, column: usize) -> Option<String> {
    let line_start: usize = text.split_inclusive('\n').take(line.saturating_sub(1)).map(str::len).sum();
    let end = text.len().min(line_start + column);
    let head = text.get(..end)?;
    // Scan back for `"key"` followed by optional whitespace and a colon.
    let mut search = head;
    while let Some(colon) = search.rfind(':') {
        let before = search[..colon].trim_end();
        if let Some(inner) = before.strip_suffix('"') {
            if let Some(open) = inner.rfind('"') {
                return Some(inner[open + 1..].to_string());
            }
        }
        search = &search[..colon];
    }
    None
}

/// Load `tokenizer.json` from a checkpoint directory.
pub fn load_tokenizer(dir: &Path) -> Result<tokenizers::Tokenizer> {
    let path = dir.join("tokenizer.json");
    if !path.exists() {
        return Err(Error::Tokenizer { path, msg: "file not found".into() });
    }
    tokenizers::Tokenizer::from_file(&path).map_err(|e| Error::Tokenizer { path, msg: e.to_string() })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write_st(path: &Path, tensors: &[(&str, Tensor)]) {
        let refs: Vec<(&str, &Tensor)> = tensors.iter().map(|(n, t)| (*n, t)).collect();
        Tensor::write_safetensors(&refs, path).expect("write safetensors");
    }

    #[test]
    fn a_config_value_of_the_wrong_type_names_its_key() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("config.json");
        #[derive(serde::Deserialize, Debug)]
        #[allow(dead_code)]
        struct C {
            a: usize,
            inner: Inner,
        }
        #[derive(serde::Deserialize, Debug)]
        #[allow(dead_code)]
        struct Inner {
            factor: f64,
        }
        std::fs::write(&p, "{\n  \"a\": 1,\n  \"inner\": {\"factor\": \"x\"}\n}").expect("write");
        let e = read_json::<C>(&p).expect_err("bad type");
        assert!(matches!(&e, Error::JsonValue { key, .. } if key == "factor"), "{e:?}");
        std::fs::write(&p, "{\"a\": -1, \"inner\": {\"factor\": 1.0}}").expect("write");
        assert!(matches!(read_json::<C>(&p), Err(Error::JsonValue { key, .. }) if key == "a"));
        // A missing field is named by serde itself; a syntax error has no key.
        std::fs::write(&p, "{\"a\": 1}").expect("write");
        assert!(matches!(read_json::<C>(&p), Err(Error::Json { .. })));
        std::fs::write(&p, "{\"a\": ").expect("write");
        assert!(matches!(read_json::<C>(&p), Err(Error::Json { .. })));
    }

    #[test]
    fn sharded_checkpoint_resolves_names_through_the_index() {
        let dir = tempfile::tempdir().expect("tempdir");
        write_st(&dir.path().join("a.safetensors"), &[("x.weight", Tensor::ones([2, 3], (Kind::Float, Device::Cpu)))]);
        write_st(&dir.path().join("b.safetensors"), &[("y.weight", Tensor::zeros([4], (Kind::BFloat16, Device::Cpu)))]);
        std::fs::write(
            dir.path().join(INDEX_FILE),
            r#"{"metadata": {}, "weight_map": {"x.weight": "a.safetensors", "y.weight": "b.safetensors"}}"#,
        )
        .expect("write index");
        let ckpt = Checkpoint::open(dir.path()).expect("open");
        let vb = VarBuilder::new(&ckpt, Kind::Float, Device::Cpu);
        let x = vb.pp("x").get("weight", &[2, 3]).expect("x");
        assert_eq!(x.kind(), Kind::Float);
        assert!(matches!(ckpt.finish(), Err(Error::UnusedTensors { names }) if names == vec!["y.weight"]));
        let y = vb.pp("y").get("weight", &[4]).expect("y");
        assert_eq!(y.kind(), Kind::Float, "bf16 is cast to the model dtype");
        ckpt.finish().expect("all consumed");
    }

    #[test]
    fn load_names_the_tensor_on_missing_and_misshaped() {
        let dir = tempfile::tempdir().expect("tempdir");
        write_st(&dir.path().join(SINGLE_FILE), &[("x.weight", Tensor::ones([2, 3], (Kind::Float, Device::Cpu)))]);
        let ckpt = Checkpoint::open(dir.path()).expect("open");
        let vb = VarBuilder::new(&ckpt, Kind::Float, Device::Cpu).pp("x");
        let e = vb.get("weight", &[3, 2]).expect_err("shape");
        assert!(e.to_string().contains("x.weight") && e.to_string().contains("[2, 3]"), "{e}");
        let e = vb.get("bias", &[3]).expect_err("missing");
        assert!(e.to_string().contains("x.bias"), "{e}");
    }

    #[test]
    fn index_pointing_at_the_wrong_shard_is_an_error_naming_the_tensor() {
        let dir = tempfile::tempdir().expect("tempdir");
        write_st(&dir.path().join("a.safetensors"), &[("x.weight", Tensor::ones([2], (Kind::Float, Device::Cpu)))]);
        write_st(&dir.path().join("b.safetensors"), &[("y.weight", Tensor::ones([2], (Kind::Float, Device::Cpu)))]);
        std::fs::write(
            dir.path().join(INDEX_FILE),
            r#"{"weight_map": {"x.weight": "b.safetensors", "y.weight": "b.safetensors"}}"#,
        )
        .expect("write index");
        let e = Checkpoint::open(dir.path()).expect_err("bad index");
        assert!(e.to_string().contains("x.weight"), "{e}");
    }
}
