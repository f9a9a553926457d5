//! `eval sweep` killed with SIGKILL at pseudo-random instants (seeded) resumes: after at least 10 kills
//! and a final uninterrupted run, every expected point is recorded exactly once, every line parses, no
//! point is left failed by an interruption, and no temporary or partial file is left in the results dir.
//!
//! libtorch's CPU thread pool spins badly when the machine is oversubscribed, so the child runs with
//! one intra-op thread (`OMP_NUM_THREADS=1`): the whole test takes about 15 s on 2 busy cores.

#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

const BUDGETS: &str = "1.0,0.9,0.83,0.75,0.67,0.6,0.5,0.42,0.34,0.25";
const METHODS: [&str; 9] = ["full", "uniform", "alloc-l", "alloc-t", "alloc-l+t", "random-l", "top-p", "threshold", "skip"];

fn fixture() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../moe-models/tests/fixtures/deepseek_v2/lite_yarn")
}

fn spawn(out: &Path, text: &Path) -> Child {
    Command::new(env!("CARGO_BIN_EXE_eval"))
        .args(["sweep", "--no-speed", "--model"])
        .arg(fixture())
        .arg("--heldout")
        .arg(text)
        .arg("--out")
        .arg(out)
        .args(["--seq-len", "32", "--calib-tokens", "512", "--eval-tokens", "8192", "--budgets", BUDGETS])
        .args(["--methods", &METHODS.join(",")])
        .env("OMP_NUM_THREADS", "1")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn eval sweep")
}

/// SplitMix64: a seeded, dependency-free source of kill instants.
struct SplitMix(u64);

impl SplitMix {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
}

#[test]
fn sweep_killed_at_random_points_resumes_without_lost_or_duplicated_records() {
    let dir = tempfile::tempdir().unwrap();
    // The fixture's tokenizer maps printable ASCII characters one to one.
    let text: String = (0..20_000).map(|i| char::from(b'a' + ((i * 7 + i / 13) % 26) as u8)).collect();
    let text_path = dir.path().join("text.txt");
    std::fs::write(&text_path, text).unwrap();
    let out = dir.path().join("res");

    let mut rng = SplitMix(0x5eed_0009);
    let (mut kills, mut attempts) = (0, 0);
    let mut lines_seen = Vec::new();
    while kills < 10 {
        attempts += 1;
        assert!(attempts <= 40, "the sweep kept finishing before it could be killed ({kills} kills)");
        let mut child = spawn(&out, &text_path);
        // Wait until this run has written a new record (so the kill lands among the points however
        // slow the machine is), then a seeded-random extra delay.
        let before = std::fs::read_to_string(out.join("results.jsonl")).map_or(0, |s| s.lines().count());
        let t0 = std::time::Instant::now();
        while child.try_wait().unwrap().is_none() && t0.elapsed() < Duration::from_secs(120) {
            let now = std::fs::read_to_string(out.join("results.jsonl")).map_or(0, |s| s.lines().count());
            if now > before {
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        // At most 150 ms: points that route like an earlier one are recorded at once (they share its
        // results), so a longer delay often let the run finish before the kill.
        std::thread::sleep(Duration::from_millis(rng.next() % 150));
        if child.try_wait().unwrap().is_none() {
            child.kill().unwrap(); // SIGKILL on Unix
            kills += 1;
        }
        child.wait().unwrap();
        let n = std::fs::read_to_string(out.join("results.jsonl")).map_or(0, |s| s.lines().count());
        lines_seen.push(n);
    }
    // Progress must survive the kills: the record count never shrinks.
    assert!(lines_seen.windows(2).all(|w| w[0] <= w[1]), "records lost between kills: {lines_seen:?}");
    // Some kills must land among the points (not only at start-up or in profiling) for the test to mean
    // anything.
    let among_points = lines_seen.windows(2).filter(|w| w[0] > 0 && w[1] > w[0]).count();
    assert!(among_points >= 3, "too few kills landed between points: {lines_seen:?}");

    let status = spawn(&out, &text_path).wait().unwrap();
    assert!(status.success(), "the final run failed");

    let text = std::fs::read_to_string(out.join("results.jsonl")).unwrap();
    let mut counts: BTreeMap<(String, String), usize> = BTreeMap::new();
    for (i, l) in text.lines().enumerate() {
        let v: serde_json::Value = serde_json::from_str(l).unwrap_or_else(|e| panic!("line {}: {e}: {l}", i + 1));
        assert_eq!(v["status"], "ok", "line {}: {l}", i + 1);
        let key = (v["method"].as_str().unwrap().to_string(), v["budget"].as_str().unwrap().to_string());
        *counts.entry(key).or_default() += 1;
    }
    let mut expected: Vec<(String, String)> = vec![("full".into(), "1.00".into())];
    for b in BUDGETS.split(',').skip(1) {
        let b: f64 = b.parse().unwrap();
        for m in &METHODS[1..] {
            expected.push(((*m).into(), format!("{b:.2}")));
        }
    }
    expected.sort();
    let got: Vec<(String, String)> = counts.keys().cloned().collect();
    assert_eq!(got, expected, "points lost or unexpected");
    let dups: Vec<_> = counts.iter().filter(|(_, &n)| n != 1).collect();
    assert!(dups.is_empty(), "duplicated records: {dups:?}");

    let leftovers: Vec<String> = std::fs::read_dir(&out)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains(".tmp") || n.contains(".partial"))
        .collect();
    assert!(leftovers.is_empty(), "temporary files left behind: {leftovers:?}");
    eprintln!("{kills} kills in {attempts} runs; records after each: {lines_seen:?}");
}
