//! The activation budget: routed expert activations per token, summed over MoE layers.
//!
//! DeepSeek-V2-Lite has 26 MoE layers at top-6, so its full budget is 156; half budget is 78.
//! Shared experts and dense layers are outside the budget.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// A global activation budget, either absolute or relative to the model's full budget.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Budget {
    /// Total routed activations per token over all MoE layers (e.g. 78).
    Total(u32),
    /// A fraction of the full budget in (0, 1] (e.g. 0.5 = half budget).
    Fraction(f64),
}

impl Budget {
    /// The absolute budget for a model whose full budget is `full_total` activations per token.
    ///
    /// A fraction is rounded to the nearest integer, halves away from zero (`0.5 * 157 = 78.5 -> 79`),
    /// so the same fraction always maps to the same total for a given model.
    pub fn resolve(&self, full_total: u32) -> Result<u32> {
        match *self {
            Budget::Total(b) => Ok(b),
            Budget::Fraction(f) => {
                if !f.is_finite() || f <= 0.0 {
                    return Err(Error::InvalidBudget {
                        budget: self.to_string(),
                        reason: "a budget fraction must be a finite number above 0".into(),
                    });
                }
                let total = (f * f64::from(full_total)).round();
                if total > f64::from(u32::MAX) {
                    return Err(Error::InvalidBudget {
                        budget: self.to_string(),
                        reason: "too large".into(),
                    });
                }
                // INVARIANT: checked finite, positive and below u32::MAX just above.
                Ok(total as u32)
            }
        }
    }

    /// The budget as a fraction of `full_total`.
    pub fn fraction_of(&self, full_total: u32) -> Result<f64> {
        Ok(f64::from(self.resolve(full_total)?) / f64::from(full_total.max(1)))
    }
}

impl fmt::Display for Budget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Budget::Total(b) => write!(f, "{b}"),
            Budget::Fraction(x) => write!(f, "{x}"),
        }
    }
}

impl FromStr for Budget {
    type Err = Error;

    /// `"78"` is an absolute total; `"0.5"`, `"1.0"` or `"50%"` is a fraction of the full budget.
    fn from_str(s: &str) -> Result<Self> {
        let s = s.trim();
        let bad = |reason: &str| Error::InvalidBudget { budget: s.to_string(), reason: reason.into() };
        if let Some(pct) = s.strip_suffix('%') {
            let p: f64 = pct.trim().parse().map_err(|_| bad("not a percentage"))?;
            if !(p.is_finite() && p > 0.0) {
                return Err(bad("a percentage must be above 0"));
            }
            return Ok(Budget::Fraction(p / 100.0));
        }
        if s.contains(['.', 'e', 'E']) {
            let f: f64 = s.parse().map_err(|_| bad("not a number"))?;
            if !(f.is_finite() && f > 0.0) {
                return Err(bad("a budget fraction must be a finite number above 0"));
            }
            return Ok(Budget::Fraction(f));
        }
        let b: u32 = s
            .parse()
            .map_err(|_| bad("expected a non-negative integer total or a fraction such as 0.5"))?;
        Ok(Budget::Total(b))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn integers_are_totals_and_decimals_are_fractions() {
        assert_eq!("78".parse::<Budget>().unwrap(), Budget::Total(78));
        assert_eq!("0.5".parse::<Budget>().unwrap(), Budget::Fraction(0.5));
        assert_eq!("1.0".parse::<Budget>().unwrap(), Budget::Fraction(1.0));
        assert_eq!("50%".parse::<Budget>().unwrap(), Budget::Fraction(0.5));
    }

    #[test]
    fn half_of_v2_lite_is_78() {
        assert_eq!(Budget::Fraction(0.5).resolve(156).unwrap(), 78);
        assert_eq!(Budget::Fraction(0.5).resolve(157).unwrap(), 79);
    }

    #[test]
    fn garbage_budgets_are_errors() {
        for s in ["", "-3", "abc", "0.0", "nan", "-0.5", "inf", "1.5.2", "%"] {
            assert!(s.parse::<Budget>().is_err(), "{s:?} parsed");
        }
    }
}
