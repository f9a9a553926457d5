//! The error type of moe-models: every failure names the file, tensor, config key or step it concerns.
//! Underlying causes (I/O, JSON, libtorch, policy) are reachable through `source()`, not repeated in
//! the message, so `anyhow`'s `{:#}` prints each cause once.

use std::path::PathBuf;

/// Result alias of this crate.
pub type Result<T> = std::result::Result<T, Error>;

/// What can go wrong while loading or running a model.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file could not be opened, mapped or read.
    #[error("cannot read {path}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The operating system's error.
        #[source]
        source: std::io::Error,
    },
    /// A JSON file (config.json, the shard index) does not parse.
    #[error("cannot parse {path}")]
    Json {
        /// The file.
        path: PathBuf,
        /// serde_json's error.
        #[source]
        source: serde_json::Error,
    },
    /// A JSON file parses, but the value at `key` has the wrong type or is out of range.
    #[error("{path}: key `{key}` has a bad value")]
    JsonValue {
        /// The file.
        path: PathBuf,
        /// The innermost key before the bad value (e.g. `hidden_size`, or `factor` inside `rope_scaling`).
        key: String,
        /// serde_json's error (what was expected, line and column).
        #[source]
        source: serde_json::Error,
    },
    /// A safetensors file has a malformed header or data.
    #[error("malformed safetensors file {path}: {msg}")]
    SafeTensors {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        msg: String,
    },
    /// The checkpoint lacks a tensor the model needs.
    #[error("missing tensor `{name}` (looked in {dir})")]
    MissingTensor {
        /// The full checkpoint name.
        name: String,
        /// The checkpoint directory.
        dir: PathBuf,
    },
    /// A checkpoint tensor has another shape than the config implies.
    #[error("tensor `{name}` has shape {found:?}, expected {expected:?}")]
    ShapeMismatch {
        /// The full checkpoint name.
        name: String,
        /// What the config implies.
        expected: Vec<i64>,
        /// What the file holds.
        found: Vec<i64>,
    },
    /// A checkpoint tensor has a dtype we cannot load.
    #[error("tensor `{name}` has unsupported dtype {dtype}")]
    UnsupportedDtype {
        /// The full checkpoint name.
        name: String,
        /// The safetensors dtype.
        dtype: String,
    },
    /// After loading, the checkpoint still holds tensors no module consumed.
    #[error("{} checkpoint tensor(s) not used by the model: {}", names.len(), names.join(", "))]
    UnusedTensors {
        /// The unused names, sorted.
        names: Vec<String>,
    },
    /// config.json holds a value we do not implement, or values that contradict each other.
    #[error("config key `{key}`: {msg}")]
    Config {
        /// The config.json key (dotted for nested keys, e.g. `rope_scaling.type`).
        key: String,
        /// What is wrong.
        msg: String,
    },
    /// The model type is not one this crate implements.
    #[error("unsupported model_type `{0}` (supported: deepseek_v2, qwen2_moe, mixtral)")]
    UnsupportedModel(String),
    /// The tokenizer could not be loaded or run.
    #[error("tokenizer {path}: {msg}")]
    Tokenizer {
        /// tokenizer.json.
        path: PathBuf,
        /// The tokenizers crate's message.
        msg: String,
    },
    /// A libtorch operation failed (shape, device, out of memory).
    #[error("libtorch error in {op}")]
    Torch {
        /// Which step (e.g. `layers.3.self_attn`).
        op: String,
        /// libtorch's error.
        #[source]
        source: tch::TchError,
    },
    /// The routing policy failed.
    #[error("routing policy failed at layer {layer}")]
    Policy {
        /// The model's layer index.
        layer: usize,
        /// The policy's error.
        #[source]
        source: alloc_token::device::DeviceError,
    },
    /// The caller passed inputs that do not fit the model or each other.
    #[error("invalid input: {0}")]
    Input(String),
    /// A CUDA graph could not be made, captured or replayed.
    #[error("CUDA graph decode")]
    Graph(#[from] cuda_graph::Error),
}

impl Error {
    /// A [`Error::Config`] naming `key`.
    pub(crate) fn config(key: &str, msg: impl Into<String>) -> Self {
        Error::Config { key: key.into(), msg: msg.into() }
    }
}

impl From<tch::TchError> for Error {
    fn from(source: tch::TchError) -> Self {
        Error::Torch { op: "tensor op".into(), source }
    }
}

/// Attach a step name to libtorch errors: `torch_ctx("layers.3.mlp", || ...)`.
pub(crate) trait TorchContext<T> {
    /// Wrap a libtorch error with the step it happened in.
    fn ctx(self, op: impl Into<String>) -> Result<T>;
}

impl<T> TorchContext<T> for std::result::Result<T, tch::TchError> {
    fn ctx(self, op: impl Into<String>) -> Result<T> {
        self.map_err(|source| Error::Torch { op: op.into(), source })
    }
}

impl<T> TorchContext<T> for Result<T> {
    fn ctx(self, op: impl Into<String>) -> Result<T> {
        self.map_err(|e| match e {
            Error::Torch { op: inner, source } => Error::Torch { op: format!("{}: {inner}", op.into()), source },
            other => other,
        })
    }
}
