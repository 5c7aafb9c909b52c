//! The shape of benchmark results: what every scenario hands to the report (printed table,
//! JSON file, PNG chart, the markdown for docs/benchmarks.md).
//!
//! Owns only data; no I/O. Values that will be plotted are plain `f64` in the unit the chart
//! names; table cells are preformatted strings so that each scenario chooses its precision.

use serde::{Deserialize, Serialize};

/// Where and when a run happened; every figure is read against this.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Machine {
    /// `uname -r`.
    pub kernel: String,
    /// Online CPUs.
    pub cores: usize,
    /// `model name` of /proc/cpuinfo.
    pub cpu_model: String,
    /// MemTotal in GiB.
    pub memory_gib: f64,
    /// 1-minute load average at the start and the end of the run.
    pub load_start: f64,
    pub load_end: f64,
    /// Whether `sch_fq` exists (EDT is then enforced by fq; otherwise by the proxy's pacer).
    pub has_fq: bool,
    /// RFC 3339 UTC start time.
    pub started_utc: String,
    /// `git describe --always --dirty` of the tree the binary was built from, if known.
    pub revision: Option<String>,
}

/// One bar (or point) with an optional spread, e.g. median with p99 as `high`, or the median
/// of repetitions with their min and max.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq)]
pub struct BarValue {
    pub value: f64,
    pub low: Option<f64>,
    pub high: Option<f64>,
}

impl BarValue {
    /// A bar without whiskers.
    pub fn plain(value: f64) -> BarValue {
        BarValue {
            value,
            low: None,
            high: None,
        }
    }
    /// A bar with whiskers from `low` to `high`.
    pub fn spread(value: f64, low: f64, high: f64) -> BarValue {
        BarValue {
            value,
            low: Some(low),
            high: Some(high),
        }
    }
}

/// One series of a grouped bar chart: one value per category (`None`: not measured).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct BarSeries {
    pub name: String,
    pub values: Vec<Option<BarValue>>,
}

/// A grouped bar chart: categories along x, one bar per series in each group.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct BarChart {
    pub title: String,
    pub y_label: String,
    pub categories: Vec<String>,
    pub series: Vec<BarSeries>,
    /// Horizontal reference lines (label, y), e.g. a goal or a configured rate.
    #[serde(default)]
    pub reference_lines: Vec<(String, f64)>,
    /// Plot y on a log10 scale (for values spanning decades).
    #[serde(default)]
    pub log_y: bool,
}

/// A printed table: header and rows of preformatted cells.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Table {
    pub columns: Vec<String>,
    pub rows: Vec<Vec<String>>,
}

/// A goal of the issue and whether this run met it (`None`: could not be judged here, with
/// the reason in `measured`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct GoalCheck {
    pub goal: String,
    pub measured: String,
    pub met: Option<bool>,
}

/// Everything one scenario produced.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ScenarioResult {
    /// File-name-safe id, e.g. `tcp_rr`; the JSON is `<id>.json`, the chart `<id>.png`.
    pub id: String,
    pub title: String,
    /// What was measured and how, in one or two sentences (goes above the table).
    pub method: String,
    pub table: Table,
    pub charts: Vec<BarChart>,
    pub goals: Vec<GoalCheck>,
    /// Things the reader must know (capacity limits, skipped paths and why, noise).
    pub notes: Vec<String>,
    /// Every raw sample, per path and repetition, for re-analysis.
    pub raw: serde_json::Value,
}

/// A whole run.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct RunReport {
    pub machine: Machine,
    /// The command line that produced it.
    pub command: String,
    pub repetitions: usize,
    /// How the machine was held during the run (CPU idle policy, proxy settings), one sentence
    /// each.
    #[serde(default)]
    pub conditions: Vec<String>,
    pub scenarios: Vec<ScenarioResult>,
}
