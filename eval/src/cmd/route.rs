//! `eval route`: one layer's router probabilities in, each token's chosen experts out, with any of the
//! token-level policies (the host reference implementations of `alloc-token`).
//!
//! Input: `{"probs": [[E floats], ... T rows], "mask": [true, ...]}` (`mask` optional, false = padding).
//! Every probability must be finite and >= 0 and every valid row must sum to 1 within 1e-3, unless
//! `--normalize` divides each valid row by its sum. With `--json` the output is exactly one object
//! `{"ids": [[...], ...], "counts": [...], "total": <int>}`, each token's ids in decreasing probability.

use std::path::PathBuf;

use alloc_core::routing::{RouterBatch, RoutingPolicy, Selection};
use alloc_token::{AllocT, RandomK, Skip, Threshold, TopK, TopP};
use anyhow::{bail, Context, Result};

/// How far a valid row's sum may be from 1 before it counts as unnormalised.
const SUM_TOLERANCE: f64 = 1e-3;

/// The routing policy to apply.
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum PolicyName {
    /// Alloc-T: round(K * T_valid) pairs spread over tokens by probability (needs --k).
    #[value(name = "alloc-t")]
    AllocT,
    /// Stock top-k (needs an integer --k).
    Topk,
    /// Nucleus: smallest prefix with mass >= p (needs --p; --floor/--cap bound the count).
    Topp,
    /// Experts with probability >= tau (needs --tau; --floor/--cap bound the count).
    Threshold,
    /// NAEE skip: top-k minus experts below beta * top-1 (needs --beta and an integer --k).
    Skip,
    /// k random experts per token (needs an integer --k; --seed).
    Random,
}

/// Arguments of `eval route`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// Router probabilities JSON: {"probs": [[...], ...], "mask": [...]} (mask optional).
    #[arg(long)]
    pub probs: PathBuf,
    /// Routing policy.
    #[arg(long, value_enum)]
    pub policy: PolicyName,
    /// Experts per token: the average budget for alloc-t (may be fractional), k for topk, skip and random.
    #[arg(long)]
    pub k: Option<f64>,
    /// Fewest experts per valid token (alloc-t default 1; min k of topp and threshold, default 1).
    #[arg(long)]
    pub floor: Option<usize>,
    /// Most experts per token (alloc-t, topp, threshold; default: the number of experts E).
    #[arg(long)]
    pub cap: Option<usize>,
    /// Mass fraction of topp, in (0, 1].
    #[arg(long)]
    pub p: Option<f64>,
    /// Probability threshold of threshold.
    #[arg(long)]
    pub tau: Option<f32>,
    /// Relative threshold of skip, in [0, 1].
    #[arg(long)]
    pub beta: Option<f32>,
    /// Seed of random.
    #[arg(long)]
    pub seed: Option<u64>,
    /// Divide each valid row by its sum instead of rejecting rows that do not sum to 1.
    #[arg(long)]
    pub normalize: bool,
    /// Print exactly one JSON object on stdout.
    #[arg(long)]
    pub json: bool,
}

/// The input file's layout.
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct ProbsFile {
    probs: Vec<Vec<f64>>,
    mask: Option<Vec<bool>>,
}

/// A checked `[T, E]` batch in f32.
struct Batch {
    probs: Vec<f32>,
    tokens: usize,
    experts: usize,
    mask: Option<Vec<bool>>,
}

impl Batch {
    fn router(&self) -> Result<RouterBatch<'_>> {
        let b = RouterBatch::new(&self.probs, self.tokens, self.experts)?;
        Ok(match &self.mask {
            Some(m) => b.with_mask(m)?,
            None => b,
        })
    }

    fn valid(&self, t: usize) -> bool {
        self.mask.as_ref().is_none_or(|m| m[t])
    }
}

/// Read, parse and check the input file: shapes, values, row sums.
fn read_batch(args: &Args) -> Result<Batch> {
    let text = std::fs::read_to_string(&args.probs).with_context(|| format!("cannot read {}", args.probs.display()))?;
    parse_batch(args, &text)
}

/// Parse and check the input text (of the file `args.probs`): shapes, values, row sums.
fn parse_batch(args: &Args, text: &str) -> Result<Batch> {
    let path = args.probs.display();
    let file: ProbsFile = serde_json::from_str(text).with_context(|| {
        format!("{path} is not {{\"probs\": [[numbers]], \"mask\": [bools]}} (NaN and Infinity are not JSON numbers)")
    })?;
    let tokens = file.probs.len();
    if tokens == 0 {
        bail!("{path}: empty batch (\"probs\" has no rows)");
    }
    let experts = file.probs[0].len();
    if experts == 0 {
        bail!("{path}: row 0 has no probabilities (zero experts)");
    }
    if let Some((t, row)) = file.probs.iter().enumerate().find(|(_, r)| r.len() != experts) {
        bail!("{path}: ragged rows: row {t} has {} probabilities but row 0 has {experts}", row.len());
    }
    if let Some(m) = &file.mask {
        if m.len() != tokens {
            bail!("{path}: \"mask\" has {} entries for {tokens} rows of \"probs\"", m.len());
        }
    }
    let mut probs = Vec::with_capacity(tokens * experts);
    for (t, row) in file.probs.iter().enumerate() {
        if let Some((e, &p)) = row.iter().enumerate().find(|(_, &p)| !(p.is_finite() && p >= 0.0 && p <= f64::from(f32::MAX))) {
            bail!("{path}: probability of token {t} expert {e} is {p} (must be finite and >= 0)");
        }
        let valid = file.mask.as_ref().is_none_or(|m| m[t]);
        let sum: f64 = row.iter().sum();
        let scale = if valid && args.normalize {
            if sum <= 0.0 {
                bail!("{path}: row {t} sums to {sum}; --normalize needs a positive sum");
            }
            1.0 / sum
        } else {
            if valid && (sum - 1.0).abs() > SUM_TOLERANCE {
                bail!(
                    "{path}: row {t} sums to {sum}, not 1 (tolerance {SUM_TOLERANCE}); pass softmax probabilities \
                     or add --normalize"
                );
            }
            1.0
        };
        probs.extend(row.iter().map(|&p| (p * scale) as f32));
    }
    Ok(Batch { probs, tokens, experts, mask: file.mask })
}

/// Reject options that the chosen policy does not read (a likely typo) and a missing required one.
fn check_flags(args: &Args) -> Result<()> {
    use PolicyName as P;
    let given = [
        ("--k", args.k.is_some(), &[P::AllocT, P::Topk, P::Skip, P::Random][..]),
        ("--floor", args.floor.is_some(), &[P::AllocT, P::Topp, P::Threshold][..]),
        ("--cap", args.cap.is_some(), &[P::AllocT, P::Topp, P::Threshold][..]),
        ("--p", args.p.is_some(), &[P::Topp][..]),
        ("--tau", args.tau.is_some(), &[P::Threshold][..]),
        ("--beta", args.beta.is_some(), &[P::Skip][..]),
        ("--seed", args.seed.is_some(), &[P::Random][..]),
    ];
    for (flag, set, used_by) in given {
        if set && !used_by.contains(&args.policy) {
            bail!("{flag} does not apply to --policy {}", policy_str(args.policy));
        }
    }
    let required = match args.policy {
        P::AllocT | P::Topk | P::Random => ("--k", args.k.is_some()),
        P::Skip => (if args.beta.is_none() { "--beta" } else { "--k" }, args.k.is_some() && args.beta.is_some()),
        P::Topp => ("--p", args.p.is_some()),
        P::Threshold => ("--tau", args.tau.is_some()),
    };
    if !required.1 {
        bail!("--policy {} needs {}", policy_str(args.policy), required.0);
    }
    Ok(())
}

fn policy_str(p: PolicyName) -> &'static str {
    match p {
        PolicyName::AllocT => "alloc-t",
        PolicyName::Topk => "topk",
        PolicyName::Topp => "topp",
        PolicyName::Threshold => "threshold",
        PolicyName::Skip => "skip",
        PolicyName::Random => "random",
    }
}

/// `--k` as a whole number of experts.
fn integer_k(args: &Args) -> Result<usize> {
    let k = args.k.unwrap_or_default();
    if !(k.is_finite() && k >= 0.0 && k.fract() == 0.0) {
        bail!("--k {k}: --policy {} needs a whole number of experts", policy_str(args.policy));
    }
    Ok(k as usize)
}

/// Build the policy and a one-line description of its resolved options.
fn build(args: &Args, experts: usize) -> Result<(Box<dyn RoutingPolicy>, String)> {
    let floor = args.floor.unwrap_or(1);
    let cap = args.cap.unwrap_or(experts);
    Ok(match args.policy {
        PolicyName::AllocT => {
            let k = args.k.unwrap_or_default();
            (Box::new(AllocT::new(k, cap).with_floor(floor)), format!("alloc-t K = {k}, floor {floor}, cap {cap}"))
        }
        PolicyName::Topk => {
            let k = integer_k(args)?;
            (Box::new(TopK::new(k)), format!("topk k = {k}"))
        }
        PolicyName::Topp => {
            let p = args.p.unwrap_or_default();
            (Box::new(TopP::new(p, floor, cap)), format!("topp p = {p}, min k {floor}, max k {cap}"))
        }
        PolicyName::Threshold => {
            let tau = args.tau.unwrap_or_default();
            (Box::new(Threshold::new(tau, floor, cap)), format!("threshold tau = {tau}, min k {floor}, max k {cap}"))
        }
        PolicyName::Skip => {
            let (k, beta) = (integer_k(args)?, args.beta.unwrap_or_default());
            (Box::new(Skip::new(beta, k)), format!("skip beta = {beta} within top-{k}"))
        }
        PolicyName::Random => {
            let (k, seed) = (integer_k(args)?, args.seed.unwrap_or(0));
            (Box::new(RandomK::new(k, seed)), format!("random k = {k}, seed {seed}"))
        }
    })
}

/// Check the flags and the batch, build the policy and select: the batch, the selection and a
/// one-line description of the policy.
fn route(args: &Args, batch: Batch) -> Result<(Batch, Selection, String)> {
    let (policy, desc) = build(args, batch.experts)?;
    let sel: Selection = policy.select(0, &batch.router()?)?;
    Ok((batch, sel, desc))
}

/// The fuzzing entry point of `fuzz/fuzz_targets/route_input.rs` and of the smoke test below: the
/// first 8 bytes choose the flags (policy and `--normalize`; which of `--k --floor --cap --p --tau
/// --beta --seed` are given; their values), the rest is the `--probs` file. Everything `run` does but
/// printing; must return an error, never panic. See `docs/fuzzing.md`.
#[cfg_attr(not(test), allow(dead_code))] // the eval binary itself does not call it
pub fn fuzz_input(bytes: &[u8]) -> Result<()> {
    let Some((head, text)) = bytes.split_first_chunk::<8>() else { bail!("fuzz input: shorter than 8 bytes") };
    let num = |b: u8, scale: f64| match b {
        250 => f64::NAN,
        251 => f64::INFINITY,
        252 => f64::NEG_INFINITY,
        253 => -1.0,
        254 => 1e300,
        255 => 1e-300,
        x => f64::from(x) / scale,
    };
    let count = |b: u8| if b == 255 { usize::MAX } else { usize::from(b) };
    let given = |bit: u8| head[1] & (1 << bit) != 0;
    let policies = [PolicyName::AllocT, PolicyName::Topk, PolicyName::Topp, PolicyName::Threshold, PolicyName::Skip, PolicyName::Random];
    let args = Args {
        probs: PathBuf::from("fuzz.json"),
        policy: policies[usize::from(head[0] & 7) % policies.len()],
        k: given(0).then(|| num(head[2], 8.0)),
        floor: given(1).then(|| count(head[3])),
        cap: given(2).then(|| count(head[4])),
        p: given(3).then(|| num(head[5], 200.0)),
        tau: given(4).then(|| num(head[6], 200.0) as f32),
        beta: given(5).then(|| num(head[7], 200.0) as f32),
        seed: given(6).then(|| u64::from(head[2])),
        normalize: head[0] & 8 != 0,
        json: true,
    };
    check_flags(&args)?;
    let text = std::str::from_utf8(text)?;
    let (batch, sel, _) = route(&args, parse_batch(&args, text)?)?;
    let ids: Vec<&[i64]> = (0..sel.tokens).map(|t| sel.token(t)).collect();
    let _ = (serde_json::json!({ "ids": ids, "counts": sel.counts(), "total": sel.total() }), sel.unique_experts());
    let _ = (0..batch.tokens).filter(|&t| batch.valid(t)).count();
    Ok(())
}

/// Run `eval route`.
pub fn run(args: Args) -> Result<()> {
    check_flags(&args)?;
    let (batch, sel, desc) = route(&args, read_batch(&args)?)?;
    let ids: Vec<&[i64]> = (0..sel.tokens).map(|t| sel.token(t)).collect();
    let counts = sel.counts();
    if args.json {
        println!("{}", serde_json::json!({ "ids": ids, "counts": counts, "total": sel.total() }));
        return Ok(());
    }
    let valid = (0..batch.tokens).filter(|&t| batch.valid(t)).count();
    let mean = if valid == 0 { 0.0 } else { sel.total() as f64 / valid as f64 };
    println!(
        "{desc}: {} tokens ({valid} valid) x {} experts -> {} pairs, {mean:.3} per valid token, {} distinct experts",
        batch.tokens,
        batch.experts,
        sel.total(),
        sel.unique_experts()
    );
    println!("token  valid  count  experts (decreasing probability)");
    for (t, ids) in ids.iter().enumerate() {
        let list: Vec<String> = ids.iter().map(i64::to_string).collect();
        let v = if batch.valid(t) { "yes" } else { "pad" };
        println!("{t:>5}  {v:>5}  {:>5}  {}", counts[t], list.join(" "));
    }
    Ok(())
}

#[cfg(test)]
#[path = "../../../fuzz/smoke.rs"]
mod smoke;

#[cfg(test)]
mod tests {
    #[test]
    fn fuzz_smoke_route_input_never_panics() {
        super::smoke::replay("route_input", 3000, super::fuzz_input);
    }
}
