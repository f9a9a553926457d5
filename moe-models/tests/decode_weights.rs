//! `ModelInfo::weight_bytes` counts every checkpoint tensor once, and `Model::decode_weights` splits it
//! into what a batch-1 decode step reads whatever the budget and what one routed activation adds, for
//! every family's fixtures (f32 on the CPU), with the LM head tied to the embedding table or not.

use std::path::{Path, PathBuf};

use moe_models::loader::Checkpoint;
use moe_models::tch::{Device, Kind};

fn fixtures() -> Vec<PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(&root)
        .expect("fixtures")
        .flat_map(|f| std::fs::read_dir(f.expect("family").path()).into_iter().flatten())
        .map(|d| d.expect("variant").path())
        .filter(|d| d.join("config.json").exists())
        .collect();
    dirs.sort();
    dirs
}

fn config(dir: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).expect("config")).expect("json")
}

/// Routed-expert width and count from a fixture's config, as the families read them.
fn expert_shape(c: &serde_json::Value) -> (u64, u64) {
    let width = c.get("moe_intermediate_size").and_then(|v| v.as_u64()).or_else(|| c["intermediate_size"].as_u64()).expect("width");
    let count = ["n_routed_experts", "num_experts", "num_local_experts"].iter().find_map(|k| c.get(*k).and_then(|v| v.as_u64())).expect("experts");
    (width, count)
}

#[test]
fn weight_bytes_count_every_checkpoint_tensor_once() {
    for dir in fixtures() {
        let model = moe_models::load(&dir, Device::Cpu, Kind::Float).expect("load");
        let ckpt = Checkpoint::open(&dir).expect("checkpoint");
        let on_disk: u64 = ckpt.names().iter().map(|n| ckpt.shape(n).expect("shape").iter().product::<i64>() as u64 * 4).sum();
        assert_eq!(model.info().weight_bytes, on_disk, "{}", dir.display());
    }
}

#[test]
fn decode_weights_leave_out_the_embedding_table_and_all_but_the_chosen_experts() {
    for dir in fixtures() {
        let c = config(&dir);
        let (width, count) = expert_shape(&c);
        let h = c["hidden_size"].as_u64().expect("hidden");
        let vocab = c["vocab_size"].as_u64().expect("vocab");
        let model = moe_models::load(&dir, Device::Cpu, Kind::Float).expect("load");
        let info = model.info();
        let w = model.decode_weights();
        // One expert: gate, up and down rows of width `width`, f32.
        assert_eq!(w.per_activation, 3 * h * width * 4, "{}", dir.display());
        let routed = info.moe_layers.len() as u64 * count * w.per_activation;
        assert_eq!(w.fixed, info.weight_bytes - vocab * h * 4 - routed, "{}", dir.display());
        assert_eq!(w.at(info.full_budget()), w.fixed + info.full_budget() as u64 * w.per_activation);
        assert!(w.bound(info.full_budget(), info.full_budget() / 2) > 1.0);
    }
}

#[test]
fn a_tied_lm_head_is_read_in_full() {
    let dir = fixtures().into_iter().find(|d| d.to_string_lossy().contains("mixtral")).expect("a mixtral fixture");
    let tmp = tempfile::tempdir().expect("temp dir");
    for tied in [false, true] {
        let mut c = config(&dir);
        c["tie_word_embeddings"] = tied.into();
        let path = tmp.path().join("config.json");
        std::fs::write(&path, c.to_string()).expect("write config");
        let model = moe_models::load_random(&path, Device::Cpu, Kind::Float, 0.02, 1).expect("random model");
        let (h, vocab) = (c["hidden_size"].as_u64().expect("hidden"), c["vocab_size"].as_u64().expect("vocab"));
        let (width, count) = expert_shape(&c);
        let info = model.info();
        let routed = info.moe_layers.len() as u64 * count * 3 * h * width * 4;
        // Tied: the table was loaded once and the LM head reads all of it; untied: it is left out.
        let embed_left_out = if tied { 0 } else { vocab * h * 4 };
        assert_eq!(model.decode_weights().fixed, info.weight_bytes - embed_left_out - routed, "tied {tied}");
    }
}
