//! Criterion's estimates as the benches read them back after a run, to print ratios between
//! contenders. Included by `rewrite.rs` and `compressed.rs` with `#[path]`.

use std::path::{Path, PathBuf};
use std::time::SystemTime;

/// The estimates written by this run: a benchmark that a filter left out keeps the files of an
/// earlier run, and those must not be reported as this run's.
pub struct Estimates {
    home: PathBuf,
    since: SystemTime,
}

impl Estimates {
    /// Estimates written from now on, where criterion writes them: `$CRITERION_HOME`, else
    /// `$CARGO_TARGET_DIR/criterion`, else `target/criterion` in this crate.
    pub fn from_now() -> Estimates {
        let home = std::env::var_os("CRITERION_HOME")
            .map(PathBuf::from)
            .or_else(|| {
                std::env::var_os("CARGO_TARGET_DIR").map(|t| PathBuf::from(t).join("criterion"))
            })
            .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("target/criterion"));
        Estimates {
            home,
            since: SystemTime::now(),
        }
    }

    /// Mean time per iteration in nanoseconds of `group`/`function`, if this run measured it.
    /// Both are names criterion keeps as they are for a directory (no `/`, `:` or the like, at
    /// most 64 bytes).
    pub fn mean_ns(&self, group: &str, function: &str) -> Option<f64> {
        let path = self
            .home
            .join(group)
            .join(function)
            .join("new/estimates.json");
        let written = std::fs::metadata(&path).and_then(|m| m.modified()).ok()?;
        if written < self.since {
            return None;
        }
        let text = std::fs::read_to_string(path).ok()?;
        let json: serde_json::Value = serde_json::from_str(&text).ok()?;
        json["mean"]["point_estimate"].as_f64()
    }
}
