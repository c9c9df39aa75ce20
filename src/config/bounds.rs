//! Validation tables: each section lists its bounded numbers as [`Bound`] rows, and one
//! loop ([`check_bounds`]) checks them all and words every error the same way.

use super::ConfigError;

/// One row of a validation table: a key, its value and the inclusive range it must be in.
#[derive(Debug, Clone, Copy)]
pub(super) struct Bound {
    /// The key as written in its section.
    pub(super) key: &'static str,
    /// Its value, widened so that every integer type of the configuration fits.
    pub(super) value: i128,
    /// The smallest value allowed.
    pub(super) min: i128,
    /// The largest value allowed; `None` for no upper bound.
    pub(super) max: Option<i128>,
}

impl Bound {
    /// A value that must be greater than 0.
    pub(super) fn positive(key: &'static str, value: impl TryInto<i128>) -> Bound {
        Bound {
            key,
            value: widen(value),
            min: 1,
            max: None,
        }
    }

    /// A value that must be in `min..=max`.
    pub(super) fn within<T: TryInto<i128>>(key: &'static str, value: T, min: T, max: T) -> Bound {
        Bound {
            key,
            value: widen(value),
            min: widen(min),
            max: Some(widen(max)),
        }
    }

    /// The complaint about a value outside the range, after `section.key: `.
    fn expectation(&self) -> String {
        match self.max {
            None => format!("must be greater than {}", self.min - 1),
            Some(max) => format!("from {} to {max}", self.min),
        }
    }
}

/// An integer of the configuration (`usize`, `u64`, `i32`) as `i128`, where every one of
/// them fits (the fallback is never taken, and would still be out of any upper bound).
fn widen(value: impl TryInto<i128>) -> i128 {
    value.try_into().unwrap_or(i128::MAX)
}

/// Checks a section's validation table; the error names `section.key` of the first row out
/// of range.
pub(super) fn check_bounds(section: &str, bounds: &[Bound]) -> Result<(), ConfigError> {
    let outside = bounds
        .iter()
        .find(|bound| bound.value < bound.min || bound.max.is_some_and(|max| bound.value > max));
    match outside {
        None => Ok(()),
        Some(bound) => Err(ConfigError::Invalid(format!(
            "{section}.{}: {}",
            bound.key,
            bound.expectation()
        ))),
    }
}
