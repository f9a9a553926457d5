//! Provenance: where a result came from (git commit, dirty tree, host, time), so a figure can be traced
//! to the run that made it.

use serde::{Deserialize, Serialize};

/// Facts about the code and machine that produced a result.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Provenance {
    /// `git rev-parse HEAD` of the working tree the binary ran in (or "unknown").
    pub git_sha: String,
    /// Whether tracked files had uncommitted changes.
    pub git_dirty: bool,
    /// The commit the binary was built from (`-dirty` when its tree had uncommitted changes); differs
    /// from `git_sha` when a binary built elsewhere runs in an older copy of the tree (the GPU recipe).
    #[serde(default)]
    pub build_sha: String,
    /// The eval crate's version.
    pub version: String,
    /// Host name (from /etc/hostname), for telling machines apart.
    pub host: String,
    /// Start of the run, UTC, RFC 3339.
    pub started_utc: String,
}

impl Provenance {
    /// Collect provenance now. Never fails: unknown facts are recorded as "unknown".
    pub fn collect() -> Self {
        let (git_sha, git_dirty) = crate::git_commit::git_commit();
        let host = std::fs::read_to_string("/etc/hostname")
            .map(|s| s.trim().to_string())
            .unwrap_or_else(|_| "unknown".into());
        Self {
            git_sha,
            git_dirty,
            build_sha: env!("ALLOC_MOE_BUILD_SHA").to_string(),
            version: env!("CARGO_PKG_VERSION").to_string(),
            host,
            started_utc: utc_now_rfc3339(),
        }
    }
}

/// The current UTC time as `YYYY-MM-DDTHH:MM:SSZ` (no external time crate needed).
pub fn utc_now_rfc3339() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    format_utc(secs)
}

/// Format Unix seconds as RFC 3339 UTC (civil-from-days, Howard Hinnant's algorithm).
pub fn format_utc(secs: u64) -> String {
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = if m <= 2 { y + 1 } else { y };
    format!("{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z", rem / 3600, rem % 3600 / 60, rem % 60)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn utc_formatting_matches_known_dates() {
        assert_eq!(format_utc(0), "1970-01-01T00:00:00Z");
        assert_eq!(format_utc(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(format_utc(1_795_894_756), "2026-11-28T19:39:16Z");
    }
}
