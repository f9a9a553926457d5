//! Where a sweep's time goes: wall-clock and process CPU seconds per named stage (loading, profiling,
//! point evaluation, speed measurement, figures, ...), printed once at the end of a sweep.
//!
//! CPU seconds are the process's user + system time (every thread, libtorch's intra-op pool included),
//! read from `/proc/self/stat`; on a shared, loaded machine they are a far steadier measure of work than
//! wall-clock time. Where `/proc` is missing (not Linux) only wall time is reported.

use std::cell::RefCell;
use std::time::Instant;

/// Process CPU seconds (user + system, all threads) so far, if the platform reports them.
pub fn process_cpu_seconds() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // Fields after the command name (which may contain spaces, so split after its closing parenthesis):
    // state is field 3; utime and stime are fields 14 and 15, in clock ticks.
    let rest = stat.rsplit_once(')')?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let utime: f64 = fields.get(11)?.parse().ok()?;
    let stime: f64 = fields.get(12)?.parse().ok()?;
    // USER_HZ is 100 on every Linux architecture this project builds for.
    Some((utime + stime) / 100.0)
}

/// One stage's totals.
#[derive(Debug, Clone, Default)]
struct Stage {
    name: String,
    wall: f64,
    cpu: f64,
    count: u64,
}

/// Wall and CPU seconds accumulated per stage, in the order stages first ran. Interior mutability so
/// code that holds only a shared reference (the sweep's per-model context) can time its stages.
#[derive(Debug, Default)]
pub struct Timings {
    stages: RefCell<Vec<Stage>>,
}

impl Timings {
    /// Run `f`, adding its wall and CPU seconds to `stage`. Stages nest: an inner stage's time is also
    /// counted in the outer one.
    pub fn time<T>(&self, stage: &str, f: impl FnOnce() -> T) -> T {
        let (t0, c0) = (Instant::now(), process_cpu_seconds());
        let out = f();
        let wall = t0.elapsed().as_secs_f64();
        let cpu = match (c0, process_cpu_seconds()) {
            (Some(a), Some(b)) => b - a,
            _ => 0.0,
        };
        let mut stages = self.stages.borrow_mut();
        match stages.iter_mut().find(|s| s.name == stage) {
            Some(s) => {
                s.wall += wall;
                s.cpu += cpu;
                s.count += 1;
            }
            None => stages.push(Stage { name: stage.to_string(), wall, cpu, count: 1 }),
        }
        out
    }

    /// A table: one line per stage with its count, wall seconds and CPU seconds.
    pub fn report(&self) -> String {
        let stages = self.stages.borrow();
        let mut out = format!("{:<28} {:>6} {:>9} {:>9}\n", "stage", "count", "wall s", "cpu s");
        for s in stages.iter() {
            out.push_str(&format!("{:<28} {:>6} {:>9.2} {:>9.2}\n", s.name, s.count, s.wall, s.cpu));
        }
        out
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn stages_accumulate_in_first_run_order() {
        let t = Timings::default();
        assert_eq!(t.time("b", || 1), 1);
        t.time("a", || ());
        t.time("b", || ());
        let r = t.report();
        let lines: Vec<&str> = r.lines().collect();
        assert_eq!(lines.len(), 3, "{r}");
        assert!(lines[1].starts_with('b') && lines[1].contains(" 2 "), "{r}");
        assert!(lines[2].starts_with('a'), "{r}");
    }

    #[test]
    fn process_cpu_seconds_grow_on_linux() {
        if let Some(a) = process_cpu_seconds() {
            let mut x = 0u64;
            for i in 0..50_000_000u64 {
                x = x.wrapping_mul(31).wrapping_add(i);
            }
            std::hint::black_box(x);
            assert!(process_cpu_seconds().unwrap() >= a);
        }
    }
}
