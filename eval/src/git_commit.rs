//! The git commit of the current directory's checkout: shared by the build script (the commit the binary
//! is built from) and [`crate::provenance`] (the commit of the tree a run happens in), so both read it
//! the same way.

/// `git rev-parse HEAD` (or "unknown" outside a checkout or without git) and whether tracked files have
/// uncommitted changes.
pub fn git_commit() -> (String, bool) {
    let git = |args: &[&str]| {
        std::process::Command::new("git")
            .args(args)
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
    };
    let sha = git(&["rev-parse", "HEAD"]).unwrap_or_else(|| "unknown".into());
    let dirty = git(&["status", "--porcelain", "--untracked-files=no"]).is_some_and(|s| !s.is_empty());
    (sha, dirty)
}
