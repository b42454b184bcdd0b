//! Latency samples, percentiles, failures by reason, and the two outputs of a run: a
//! table for people and JSON for scripts (and for merging the shards of one run).

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Latency samples in microseconds. Kept whole (4 bytes each; a million heartbeats are
/// 4 MB) so that shards merge into exact percentiles.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Samples(pub Vec<u32>);

impl Samples {
    pub fn push(&mut self, d: Duration) {
        self.0
            .push(u32::try_from(d.as_micros()).unwrap_or(u32::MAX));
    }

    pub fn extend(&mut self, other: Samples) {
        self.0.extend(other.0);
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn summary(&self) -> Summary {
        let mut v = self.0.clone();
        v.sort_unstable();
        // Nearest-rank percentile.
        let pct = |p: f64| -> f64 {
            if v.is_empty() {
                return 0.0;
            }
            let rank = ((p / 100.0) * v.len() as f64).ceil() as usize;
            f64::from(v[rank.clamp(1, v.len()) - 1]) / 1000.0
        };
        let mean = if v.is_empty() {
            0.0
        } else {
            v.iter().map(|&x| f64::from(x)).sum::<f64>() / v.len() as f64 / 1000.0
        };
        Summary {
            count: v.len() as u64,
            p50_ms: pct(50.0),
            p99_ms: pct(99.0),
            max_ms: v.last().map_or(0.0, |&x| f64::from(x) / 1000.0),
            mean_ms: mean,
        }
    }
}

/// Percentiles of one kind of latency, in milliseconds.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize)]
pub struct Summary {
    pub count: u64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
    pub mean_ms: f64,
}

/// Failures counted by a short reason (`tls: received fatal alert: ...`, `timeout`, ...).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Failures(pub BTreeMap<String, u64>);

impl Failures {
    pub fn add(&mut self, reason: impl Into<String>) {
        *self.0.entry(reason.into()).or_default() += 1;
    }

    pub fn merge(&mut self, other: &Failures) {
        for (k, v) in &other.0 {
            *self.0.entry(k.clone()).or_default() += v;
        }
    }

    pub fn total(&self) -> u64 {
        self.0.values().sum()
    }
}

/// A rate with its count and the time it took.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize)]
pub struct Rate {
    pub count: u64,
    pub secs: f64,
    pub per_sec: f64,
}

impl Rate {
    pub fn new(count: u64, elapsed: Duration) -> Self {
        let secs = elapsed.as_secs_f64();
        Self {
            count,
            secs,
            per_sec: if secs > 0.0 { count as f64 / secs } else { 0.0 },
        }
    }
}

/// The printed table: one row per measured quantity.
pub struct Table {
    rows: Vec<(String, String)>,
}

impl Table {
    pub fn new() -> Self {
        Self { rows: Vec::new() }
    }

    pub fn row(&mut self, name: impl Into<String>, value: impl Into<String>) {
        self.rows.push((name.into(), value.into()));
    }

    pub fn latency(&mut self, name: &str, s: &Summary) {
        self.row(
            name,
            format!(
                "p50 {:.2} ms  p99 {:.2} ms  max {:.2} ms  (n = {})",
                s.p50_ms, s.p99_ms, s.max_ms, s.count
            ),
        );
    }

    pub fn failures(&mut self, f: &Failures) {
        if f.0.is_empty() {
            self.row("failures", "0");
        }
        for (reason, n) in &f.0 {
            self.row("failure", format!("{n} × {reason}"));
        }
    }

    pub fn print(&self) {
        let width = self.rows.iter().map(|(k, _)| k.len()).max().unwrap_or(0);
        for (k, v) in &self.rows {
            println!("{k:width$}  {v}");
        }
    }
}

impl Default for Table {
    fn default() -> Self {
        Self::new()
    }
}

/// Writes `value` as pretty JSON to `path`.
pub fn write_json(path: &std::path::Path, value: &impl Serialize) -> anyhow::Result<()> {
    let text = serde_json::to_string_pretty(value)?;
    std::fs::write(path, text + "\n")
        .map_err(|e| anyhow::anyhow!("writing {}: {e}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_percentiles() {
        let s = Samples((1..=100).map(|ms| ms * 1000).collect());
        let sum = s.summary();
        assert_eq!(sum.count, 100);
        assert_eq!(sum.p50_ms, 50.0);
        assert_eq!(sum.p99_ms, 99.0);
        assert_eq!(sum.max_ms, 100.0);
        assert_eq!(Samples::default().summary().p99_ms, 0.0);
    }

    #[test]
    fn failures_merge_by_reason() {
        let mut a = Failures::default();
        a.add("timeout");
        let mut b = Failures::default();
        b.add("timeout");
        b.add("tls");
        a.merge(&b);
        assert_eq!(a.0["timeout"], 2);
        assert_eq!(a.total(), 3);
    }
}
