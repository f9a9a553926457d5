//! The committed trained checkpoints (`models/qwen2-moe-tiny`, `models/mixtral-tiny`, bf16 hub layout) load
//! and reproduce the held-out NLL their cards report from transformers 5.17.0 (`scripts/hf_heldout_nll.py`):
//! `models/heldout.txt` tokenised whole with `models/tokenizer.json` (no special tokens), the first 8192
//! tokens as 8 independent windows of 1024, mean next-token NLL over the 8 x 1023 predictions, f32 on CPU.
//!
//! The reference is the card's own number (`card.json`, `heldout_crosscheck.transformers_nll_f32`); the
//! Rust NLL must agree within 1e-5 nats (measured: 3e-7 to 4e-7).

use std::path::PathBuf;

use alloc_token::device::DeviceTopK;
use moe_models::{ForwardCtx, Model};
use tch::{Device, Kind, Tensor};

const N_TOKENS: usize = 8192;
const WINDOW: usize = 1024;

fn repo(rel: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..").join(rel)
}

fn heldout_ids() -> Vec<i64> {
    let tok = moe_models::load_tokenizer(&repo("models")).expect("models/tokenizer.json");
    let text = std::fs::read_to_string(repo("models/heldout.txt")).expect("models/heldout.txt");
    let enc = tok.encode(text, false).expect("encode");
    let ids: Vec<i64> = enc.get_ids().iter().take(N_TOKENS).map(|&i| i64::from(i)).collect();
    assert_eq!(ids.len(), N_TOKENS);
    assert_eq!(ids[..12], [914, 263, 4326, 293, 4306, 281, 5720, 26, 398, 1087, 281, 433], "the cards' first ids");
    ids
}

fn load(dir: &str) -> Model {
    moe_models::load(&repo(dir), Device::Cpu, Kind::Float).expect("load committed checkpoint")
}

/// Mean next-token NLL over the cross-check windows at the model's native k.
fn heldout_nll(model: &Model) -> f64 {
    let policy = DeviceTopK { k: model.info().native_k };
    let ids = heldout_ids();
    let windows = Tensor::from_slice(&ids).reshape([(N_TOKENS / WINDOW) as i64, WINDOW as i64]);
    let mut total = 0.0;
    for w in 0..windows.size()[0] {
        let win = windows.narrow(0, w, 1);
        let nll = moe_models::token_nll(model, &win, &mut ForwardCtx::new(&policy), 1024).expect("nll");
        total += nll.to_kind(Kind::Double).sum(Kind::Double).double_value(&[]);
    }
    total / (N_TOKENS - N_TOKENS / WINDOW) as f64
}

#[test]
fn committed_qwen2_moe_and_mixtral_checkpoints_load_with_their_shapes() {
    let q = load("models/qwen2-moe-tiny");
    let info = q.info();
    assert_eq!((info.model_type.as_str(), info.moe_layers.len(), info.n_routed_experts, info.native_k), ("qwen2_moe", 6, 60, 4));
    assert_eq!(info.n_shared_experts, 1);
    let m = load("models/mixtral-tiny");
    let info = m.info();
    assert_eq!((info.model_type.as_str(), info.moe_layers.len(), info.n_routed_experts, info.native_k), ("mixtral", 6, 8, 2));
    assert_eq!(info.kv_values_per_token_per_layer, 2 * 2 * 48);
}

/// The card's transformers NLL at native k.
fn card_nll(dir: &str) -> f64 {
    let card: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(repo(dir).join("card.json")).expect("card.json")).expect("json");
    card["heldout_crosscheck"]["transformers_nll_f32"].as_f64().expect("transformers_nll_f32")
}

#[test]
fn heldout_nll_reproduces_the_cards_transformers_number() {
    for dir in ["models/qwen2-moe-tiny", "models/mixtral-tiny"] {
        let (got, want) = (heldout_nll(&load(dir)), card_nll(dir));
        eprintln!("{dir}: Rust NLL {got:.9} vs the card's transformers {want:.9} (diff {:+.1e})", got - want);
        assert!((got - want).abs() < 1e-5, "{dir}: {got} vs card {want}");
    }
}
