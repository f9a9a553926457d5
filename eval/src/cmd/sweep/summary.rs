//! The summary table a sweep prints: per model and task, the primary metric of every method (rows) at
//! every budget (columns), and whether Alloc-L+T beats uniform top-k at each budget.

use std::collections::BTreeMap;

use crate::methods::Method;
use crate::results::{Record, ResultsFile, Status};

/// Print, per model and task, the primary metric for every method (rows) and budget (columns), and
/// whether Alloc-L+T beats uniform top-k at each budget.
pub fn print_summary(results: &ResultsFile) {
    let latest = results.latest();
    let mut groups: BTreeMap<(String, String), Vec<&Record>> = BTreeMap::new();
    for r in latest {
        groups.entry((r.key.model.clone(), r.key.task.clone())).or_default().push(r);
    }
    for ((model, task), recs) in groups {
        let metric = ["acc", "exact_match", "ppl"].into_iter().find(|m| recs.iter().any(|r| r.metrics.contains_key(*m))).unwrap_or("nll");
        let mut budgets: Vec<String> = recs.iter().map(|r| r.key.budget.clone()).collect();
        budgets.sort_by(|a, b| b.cmp(a));
        budgets.dedup();
        let mut methods: Vec<String> = Vec::new();
        for m in Method::ALL.iter().map(|m| m.as_str().to_string()) {
            if recs.iter().any(|r| r.key.method == m) {
                methods.push(m);
            }
        }
        println!("\n{model} / {task}: {metric} by method (rows) and budget fraction (columns)");
        print!("{:<11}", "method");
        for b in &budgets {
            print!("{b:>10}");
        }
        println!();
        for m in &methods {
            print!("{m:<11}");
            for b in &budgets {
                let cell = recs.iter().find(|r| &r.key.method == m && &r.key.budget == b).map(|r| match &r.status {
                    Status::Ok => r.metrics.get(metric).map_or("-".to_string(), |v| format!("{v:.3}")),
                    Status::Failed { .. } => "failed".to_string(),
                });
                print!("{:>10}", cell.unwrap_or_else(|| "".into()));
            }
            println!();
        }
        let lower_better = metric == "ppl" || metric == "nll";
        let get = |m: &str, b: &str| recs.iter().find(|r| r.key.method == m && r.key.budget == b && r.status == Status::Ok).and_then(|r| r.metrics.get(metric).copied());
        let mut verdicts = Vec::new();
        for b in &budgets {
            if let (Some(lt), Some(u)) = (get("alloc-l+t", b), get("uniform", b)) {
                let better = if lower_better { lt < u } else { lt > u };
                verdicts.push(format!("{b}: {} ({lt:.3} vs {u:.3})", if better { "yes" } else { "no" }));
            }
        }
        if !verdicts.is_empty() {
            println!("alloc-l+t beats uniform? {}", verdicts.join("; "));
        }
    }
}
