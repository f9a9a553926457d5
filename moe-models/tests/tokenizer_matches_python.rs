//! The project's tokenizer (`models/tokenizer.json`, trained by `scripts/train_tokenizer.py`) must give the
//! Rust `tokenizers` crate exactly the ids Python's `tokenizers` gave when the fixture was written, or every
//! NLL the Rust models report would be measured on different tokens than the checkpoints were trained on.

use std::path::PathBuf;

use tokenizers::Tokenizer;

fn repo_path(rel: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(rel)
}

#[test]
fn rust_tokenizer_reproduces_python_ids() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let tokenizer = Tokenizer::from_file(repo_path("../models/tokenizer.json"))?;
    let fixture: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(repo_path("tests/fixtures/tokenizer_ids.json"))?)?;
    let cases = fixture["cases"].as_array().ok_or("fixture has no cases")?;
    assert!(cases.len() >= 5, "fixture too small");
    for case in cases {
        let text = case["text"].as_str().ok_or("case without text")?;
        let want: Vec<u32> = serde_json::from_value(case["ids"].clone())?;
        let got = tokenizer.encode(text, true)?;
        assert_eq!(got.get_ids(), want.as_slice(), "ids differ for {text:?}");
        let back = tokenizer.decode(got.get_ids(), false)?;
        assert_eq!(back, text, "decode does not round-trip");
    }
    assert_eq!(tokenizer.get_vocab_size(true), 8192);
    assert_eq!(tokenizer.token_to_id("<|endoftext|>"), Some(0));
    Ok(())
}
