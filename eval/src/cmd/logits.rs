//! `eval logits`: run a checkpoint on given token ids and write the logits and every MoE layer's router
//! ids to a safetensors file, for comparison with another implementation.

use std::path::PathBuf;

use alloc_token::device::DeviceTopK;
use anyhow::{bail, Context, Result};
use moe_models::{ForwardCtx, Renormalize, RoutingTrace};
use moe_models::tch::{self, Device, Kind, Tensor};

/// Where and in which dtype a model runs (shared by `logits` and `generate`).
#[derive(clap::Args, Debug, Clone)]
pub struct RunFlags {
    /// Checkpoint directory (config.json, model.safetensors or model.safetensors.index.json).
    #[arg(long)]
    pub model: PathBuf,
    /// cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Compute dtype: f32, bf16 or f16 (CPU runs should use f32).
    #[arg(long, default_value = "f32")]
    pub dtype: String,
    /// Routing policy (only `topk` here; the sweep has the rest).
    #[arg(long, default_value = "topk")]
    pub policy: String,
    /// Experts per token for `topk` (default: the model's native k).
    #[arg(long)]
    pub k: Option<usize>,
    /// Mixing rule for the chosen experts: native, always or never.
    #[arg(long, default_value = "native")]
    pub renormalize: Renormalize,
}

impl RunFlags {
    /// The libtorch device.
    pub fn device(&self) -> Result<Device> {
        crate::device::parse_device(&self.device)
    }

    /// The libtorch dtype.
    pub fn kind(&self) -> Result<Kind> {
        crate::device::parse_kind(&self.dtype)
    }

    /// Load the model named by the flags.
    pub fn load(&self) -> Result<moe_models::Model> {
        let device = self.device()?;
        if device.is_cuda() && !tch::Cuda::is_available() {
            bail!("--device {}: CUDA is not available to this binary", self.device);
        }
        moe_models::load(&self.model, device, self.kind()?)
            .with_context(|| format!("loading {}", self.model.display()))
    }

    /// The routing policy named by the flags.
    pub fn policy(&self, model: &moe_models::Model) -> Result<DeviceTopK> {
        match self.policy.as_str() {
            "topk" => Ok(DeviceTopK { k: self.k.unwrap_or(model.info().native_k) }),
            p => bail!("--policy `{p}`: only topk is available here"),
        }
    }
}

/// Arguments of `eval logits`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// Model, device, dtype and policy.
    #[command(flatten)]
    pub run: RunFlags,
    /// Token ids, separated by spaces or commas (e.g. "1 2 3").
    #[arg(long)]
    pub tokens: String,
    /// Output safetensors: `logits` (t, v) f32 and `router_ids.layer{i}` (t, k) i64 per MoE layer i.
    #[arg(long)]
    pub out: PathBuf,
}

/// Parse "1 2 3" or "1,2,3".
pub fn parse_tokens(s: &str) -> Result<Vec<i64>> {
    let ids: Vec<i64> = s
        .split(|c: char| c.is_whitespace() || c == ',')
        .filter(|p| !p.is_empty())
        .map(|p| p.parse::<i64>().with_context(|| format!("--tokens: `{p}` is not an integer")))
        .collect::<Result<_>>()?;
    if ids.is_empty() {
        bail!("--tokens: no token ids");
    }
    Ok(ids)
}

/// Run `eval logits`.
pub fn run(args: Args) -> Result<()> {
    let ids = parse_tokens(&args.tokens)?;
    let model = args.run.load()?;
    let info = model.info();
    if let Some(bad) = ids.iter().find(|&&i| i < 0 || i as usize >= info.vocab_size) {
        bail!("--tokens: id {bad} is outside the vocabulary (0..{})", info.vocab_size);
    }
    let policy = args.run.policy(&model)?;
    let mut trace = RoutingTrace::new();
    let input = Tensor::f_from_slice(&ids)?.f_unsqueeze(0)?;
    let mut ctx = ForwardCtx::new(&policy).with_trace(&mut trace).with_renormalize(args.run.renormalize);
    let hidden = model.forward_hidden(&input, &mut ctx)?;
    let logits = model.lm_head(&hidden.f_squeeze_dim(0)?)?.f_to_kind(Kind::Float)?.f_to_device(Device::Cpu)?;
    let mut out: Vec<(String, Tensor)> = vec![("logits".into(), logits.f_contiguous()?)];
    for r in trace.take() {
        out.push((format!("router_ids.layer{}", r.layer), r.ids.f_to_device(Device::Cpu)?.f_contiguous()?));
    }
    let refs: Vec<(&str, &Tensor)> = out.iter().map(|(n, t)| (n.as_str(), t)).collect();
    let tmp = args.out.with_extension("safetensors.tmp");
    Tensor::write_safetensors(&refs, &tmp).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, &args.out).with_context(|| format!("renaming to {}", args.out.display()))?;
    eprintln!(
        "wrote {} (logits [{}, {}], router ids for {} MoE layers, policy {} k={})",
        args.out.display(),
        ids.len(),
        info.vocab_size,
        info.moe_layers.len(),
        args.run.policy,
        policy.k
    );
    Ok(())
}
