//! The fuzz smoke run of `cargo test`: replays a target's committed corpus (`fuzz/corpus/<target>/`) and
//! a few thousand seeded mutations of it through the target's entry function, failing on any panic or
//! on an input that takes over two seconds. No cargo-fuzz needed. Each crate with fuzz entry points
//! includes this file in its tests (`#[path = ".../fuzz/smoke.rs"] mod smoke;`), so there is one copy.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// The committed corpus of fuzz target `target`, sorted by file name.
pub fn corpus(target: &str) -> Vec<(PathBuf, Vec<u8>)> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus").join(target);
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .map(|rd| rd.filter_map(|e| e.ok().map(|e| e.path())).filter(|p| p.is_file()).collect())
        .unwrap_or_default();
    files.sort();
    files.into_iter().filter_map(|p| std::fs::read(&p).ok().map(|b| (p, b))).collect()
}

/// `n` deterministic mutations of `seeds` (bit flips, interesting JSON tokens inserted or replacing a
/// number or word, truncations, deletions, splices) from a fixed-seed xorshift generator.
pub fn mutations(seeds: &[Vec<u8>], n: usize, seed: u64) -> Vec<Vec<u8>> {
    const TOKENS: &[&[u8]] = &[
        b"0", b"-1", b"1e999", b"-0", b"18446744073709551615", b"9223372036854775807", b"4294967296",
        b"1000000000000", b"null", b"true", b"\"\"", b"[]", b"{}", b"\"x\"", b"NaN", b",", b":", b"\"",
        b"\\u0000", b"1.5", b"1e308", b"-1e308", b"65536",
    ];
    let mut state = seed | 1;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state as usize
    };
    let mut out = Vec::with_capacity(n);
    if seeds.is_empty() {
        return out;
    }
    for _ in 0..n {
        let mut v = seeds[next() % seeds.len()].clone();
        for _ in 0..1 + next() % 4 {
            let at = next() % (v.len() + 1);
            let token = TOKENS[next() % TOKENS.len()];
            match next() % 6 {
                0 if at < v.len() => v[at] ^= 1 << (next() % 8),
                1 => {
                    v.splice(at..at, token.iter().copied());
                }
                2 => {
                    let end = (at..v.len()).find(|&i| !(v[i].is_ascii_alphanumeric() || v[i] == b'.')).unwrap_or(v.len());
                    v.splice(at..end, token.iter().copied());
                }
                3 => v.truncate(at),
                4 => {
                    let end = (at + 1 + next() % 16).min(v.len());
                    v.drain(at.min(end)..end);
                }
                _ => {
                    let other = &seeds[next() % seeds.len()];
                    let from = next() % (other.len() + 1);
                    v.splice(at..at, other[from..].iter().take(64).copied());
                }
            }
        }
        out.push(v);
    }
    out
}

/// Replay the corpus of `target` and `n` mutations of it through `entry`: any panic, or an input
/// taking over two seconds, fails with the input named.
pub fn replay<E>(target: &str, n: usize, entry: impl Fn(&[u8]) -> Result<(), E>) {
    let files = corpus(target);
    assert!(!files.is_empty(), "fuzz/corpus/{target} is empty or missing");
    let run = |what: &dyn Fn() -> String, bytes: &[u8]| {
        let start = Instant::now();
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| entry(bytes).is_ok()));
        assert!(r.is_ok(), "{target}: {} panics", what());
        assert!(start.elapsed() < Duration::from_secs(2), "{target}: {} takes {:?}", what(), start.elapsed());
    };
    for (path, bytes) in &files {
        run(&|| path.display().to_string(), bytes);
    }
    let seeds: Vec<Vec<u8>> = files.into_iter().map(|(_, b)| b).collect();
    for (i, m) in mutations(&seeds, n, 0x5eed_f00d).iter().enumerate() {
        run(&|| format!("mutation {i} {:?}", String::from_utf8_lossy(m)), m);
    }
}
