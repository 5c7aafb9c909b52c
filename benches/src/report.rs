//! Turning [`results`](crate::results) into what people read: an aligned text table for the
//! terminal, JSON files for re-analysis, PNG bar charts, and the markdown section that goes
//! into `docs/benchmarks.md`.
//!
//! Owns every file the benchmarks write and the chart drawing (plotters, bitmap backend).
//! [`text_table`] and [`markdown`] are pure; the `write_*` functions and [`render_chart`] do
//! the I/O.
//!
//! Files, for a scenario with id `tcp_rr` and two charts: `tcp_rr.json` (the whole
//! [`ScenarioResult`], pretty-printed), `tcp_rr.png`, `tcp_rr-2.png`. A run adds `run.json`
//! (the whole [`RunReport`]) and `summary.md` (the [`markdown`] section, images linked from the
//! same directory).
//!
//! Invariant — charts never cost data: every JSON and markdown file is written before the
//! first chart is drawn, and a chart that fails (no font, bad data, backend error) does not
//! stop the other charts. Chart failures come back together as [`ReportError::Charts`], which
//! also lists the files that were written; any other error means a data file could not be
//! written.
//!
//! Chart text needs a font file: plotters is built with only its `ab_glyph` text renderer (no
//! fontconfig/freetype), and [`FONT_PATH`] (DejaVu Sans, Debian package
//! [`FONT_PACKAGE`]) is read once per process and registered as `sans-serif`.
//!
//! Limits: charts are fixed at [`CHART_SIZE`]; readable up to about 8 categories × 5 series
//! (bar value labels are left out when they do not fit; long category labels wrap to three
//! lines, long legend entries are shortened with "…" — the table holds the full text).
//! Values that cannot be drawn (not finite; ≤ 0 on a log axis) are marked on the chart rather
//! than failing it.

use std::collections::HashSet;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use plotters::coord::ranged1d::ValueFormatter;
use plotters::element::DashedPathElement;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};

use crate::results::{BarChart, BarValue, RunReport, ScenarioResult, Table};

/// The font every chart's text is drawn with.
pub const FONT_PATH: &str = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf";
/// The Debian package that installs [`FONT_PATH`].
pub const FONT_PACKAGE: &str = "fonts-dejavu-core";
/// Width and height of every chart, in pixels.
pub const CHART_SIZE: (u32, u32) = (960, 540);

const FONT_FAMILY: &str = "sans-serif";

/// Errors writing a report.
#[derive(Debug, thiserror::Error)]
pub enum ReportError {
    /// The output directory could not be created.
    #[error("creating report directory {path}: {source}")]
    CreateDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A JSON or markdown file could not be written.
    #[error("writing {path}: {source}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A result could not be encoded as JSON (a non-string map key in `raw`, say).
    #[error("encoding {path}: {source}")]
    Json {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    /// A scenario id that cannot name files, or that two scenarios of a run share.
    #[error("scenario id {id:?}: {reason}")]
    BadId { id: String, reason: &'static str },
    /// The chart font could not be loaded.
    #[error("chart font {path}: {reason} (install the Debian package {package})")]
    Font {
        path: &'static str,
        package: &'static str,
        reason: String,
    },
    /// One chart could not be drawn.
    #[error("chart {title:?} ({path}): {reason}")]
    Chart {
        path: PathBuf,
        title: String,
        reason: String,
    },
    /// Some charts could not be drawn; every other file was written.
    #[error("{} chart(s) not drawn (JSON and markdown were written): {}", failed.len(), join_errors(failed))]
    Charts {
        /// Each failure, a [`ReportError::Chart`] or [`ReportError::Font`].
        failed: Vec<ReportError>,
        /// The files that were written despite them.
        written: Vec<PathBuf>,
    },
}

fn join_errors(errors: &[ReportError]) -> String {
    errors
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("; ")
}

// ---------------------------------------------------------------------------------------------
// Files

/// Writes `<dir>/<id>.json` and one PNG per chart (`<id>.png`, `<id>-2.png`, …); creates `dir`.
/// Returns the written paths. The JSON is written before any chart is drawn; chart failures
/// are returned as [`ReportError::Charts`] after all charts were tried.
pub fn write_scenario(dir: &Path, r: &ScenarioResult) -> Result<Vec<PathBuf>, ReportError> {
    check_id(&r.id)?;
    create_dir(dir)?;
    let mut written = vec![write_json(&dir.join(format!("{}.json", r.id)), r)?];
    draw_charts(dir, std::slice::from_ref(r), written.clone()).map(|charts| {
        written.extend(charts);
        written
    })
}

/// Writes `<dir>/run.json`, `<dir>/summary.md` (images linked relative to `dir`) and every
/// scenario's JSON, then every scenario's charts; creates `dir`. Returns the written paths.
/// Chart failures are returned as [`ReportError::Charts`] after everything else was written.
pub fn write_run(dir: &Path, r: &RunReport) -> Result<Vec<PathBuf>, ReportError> {
    let mut seen = HashSet::new();
    for s in &r.scenarios {
        check_id(&s.id)?;
        if !seen.insert(s.id.as_str()) {
            return Err(ReportError::BadId {
                id: s.id.clone(),
                reason:
                    "used by two scenarios of this run (their files would overwrite each other)",
            });
        }
    }
    create_dir(dir)?;
    let mut written = vec![write_json(&dir.join("run.json"), r)?];
    let md_path = dir.join("summary.md");
    std::fs::write(&md_path, markdown(r, "")).map_err(|source| ReportError::Write {
        path: md_path.clone(),
        source,
    })?;
    written.push(md_path);
    for s in &r.scenarios {
        written.push(write_json(&dir.join(format!("{}.json", s.id)), s)?);
    }
    let charts = draw_charts(dir, &r.scenarios, written.clone())?;
    written.extend(charts);
    Ok(written)
}

/// File name of chart `index` (0-based) of scenario `id`: `<id>.png`, `<id>-2.png`, …
pub fn chart_file_name(id: &str, index: usize) -> String {
    match index {
        0 => format!("{id}.png"),
        i => format!("{id}-{}.png", i + 1),
    }
}

/// Draws every chart of `scenarios`; on failures, `written_before` plus the charts that did
/// get drawn go into [`ReportError::Charts`].
fn draw_charts(
    dir: &Path,
    scenarios: &[ScenarioResult],
    written_before: Vec<PathBuf>,
) -> Result<Vec<PathBuf>, ReportError> {
    let mut drawn = Vec::new();
    let mut failed = Vec::new();
    for s in scenarios {
        for (i, chart) in s.charts.iter().enumerate() {
            let path = dir.join(chart_file_name(&s.id, i));
            match render_chart(&path, chart) {
                Ok(()) => drawn.push(path),
                Err(e) => failed.push(e),
            }
        }
    }
    if failed.is_empty() {
        return Ok(drawn);
    }
    let mut written = written_before;
    written.extend(drawn);
    Err(ReportError::Charts { failed, written })
}

fn check_id(id: &str) -> Result<(), ReportError> {
    let reason = if id.is_empty() {
        "empty"
    } else if id == "." || id == ".." || id == "run" || id == "summary" {
        "reserved name"
    } else if id
        .chars()
        .any(|c| c == '/' || c == '\\' || c == '\0' || c.is_control())
    {
        "contains a path separator or control character"
    } else {
        return Ok(());
    };
    Err(ReportError::BadId {
        id: id.to_string(),
        reason,
    })
}

fn create_dir(dir: &Path) -> Result<(), ReportError> {
    std::fs::create_dir_all(dir).map_err(|source| ReportError::CreateDir {
        path: dir.to_path_buf(),
        source,
    })
}

fn write_json<T: serde::Serialize>(path: &Path, value: &T) -> Result<PathBuf, ReportError> {
    let mut bytes = serde_json::to_vec_pretty(value).map_err(|source| ReportError::Json {
        path: path.to_path_buf(),
        source,
    })?;
    bytes.push(b'\n');
    std::fs::write(path, bytes).map_err(|source| ReportError::Write {
        path: path.to_path_buf(),
        source,
    })?;
    Ok(path.to_path_buf())
}

// ---------------------------------------------------------------------------------------------
// Text

/// An aligned plain-text table: the first column left-aligned, the others right-aligned (they
/// hold figures), a dashed rule under the header, two spaces between columns. Rows shorter than
/// the header are padded with empty cells; extra cells get an empty header.
pub fn text_table(t: &Table) -> String {
    let ncols = t
        .rows
        .iter()
        .map(Vec::len)
        .chain(std::iter::once(t.columns.len()))
        .max()
        .unwrap_or(0);
    fn cell(row: &[String], i: usize) -> &str {
        row.get(i).map(String::as_str).unwrap_or("")
    }
    let mut widths = vec![0usize; ncols];
    for row in std::iter::once(&t.columns).chain(&t.rows) {
        for (i, w) in widths.iter_mut().enumerate() {
            *w = (*w).max(cell(row, i).chars().count());
        }
    }
    let line = |row: &[String]| {
        let mut s = String::new();
        for (i, w) in widths.iter().enumerate() {
            let c = cell(row, i);
            let pad = " ".repeat(w - c.chars().count());
            if i > 0 {
                s.push_str("  ");
            }
            if i == 0 {
                s.push_str(c);
                s.push_str(&pad);
            } else {
                s.push_str(&pad);
                s.push_str(c);
            }
        }
        s.trim_end().to_string()
    };
    let mut out = line(&t.columns);
    out.push('\n');
    let rule: Vec<String> = widths.iter().map(|w| "-".repeat(*w)).collect();
    out.push_str(&rule.join("  "));
    out.push('\n');
    for row in &t.rows {
        out.push_str(&line(row));
        out.push('\n');
    }
    out
}

/// The markdown section of a run: a `##` heading, the machine line, then per scenario a `###`
/// heading, the method, the table, the goals (goal | measured | met), the notes as bullets and
/// the charts as images under `image_dir` (`""`: next to the markdown file).
pub fn markdown(r: &RunReport, image_dir: &str) -> String {
    let m = &r.machine;
    let mut s = String::new();
    // `write!` to a String cannot fail; the results are ignored for that reason.
    let _ = writeln!(s, "## snas-bench run of {}\n", m.started_utc);
    let _ = writeln!(
        s,
        "**Machine**: Linux {}, {} cores ({}), {:.1} GiB, load {:.2} → {:.2}, `sch_fq` {}, \
         revision {}, started {}. {} repetition{} per measurement; command `{}`.\n",
        m.kernel,
        m.cores,
        m.cpu_model,
        m.memory_gib,
        m.load_start,
        m.load_end,
        if m.has_fq { "present" } else { "absent" },
        m.revision
            .as_deref()
            .map_or_else(|| "unknown".to_string(), |r| format!("`{r}`")),
        m.started_utc,
        r.repetitions,
        if r.repetitions == 1 { "" } else { "s" },
        r.command.replace('`', "'"),
    );
    if !r.conditions.is_empty() {
        for c in &r.conditions {
            let _ = writeln!(s, "- {c}");
        }
        s.push('\n');
    }
    for sc in &r.scenarios {
        let _ = writeln!(s, "### {}\n", sc.title);
        if !sc.method.trim().is_empty() {
            let _ = writeln!(s, "{}\n", sc.method.trim());
        }
        if !sc.table.columns.is_empty() || !sc.table.rows.is_empty() {
            s.push_str(&markdown_table(&sc.table.columns, &sc.table.rows));
            s.push('\n');
        }
        if !sc.goals.is_empty() {
            let rows: Vec<Vec<String>> = sc
                .goals
                .iter()
                .map(|g| {
                    let met = match g.met {
                        Some(true) => "yes",
                        Some(false) => "no",
                        None => "n.a.",
                    };
                    vec![g.goal.clone(), g.measured.clone(), met.to_string()]
                })
                .collect();
            let cols = ["goal", "measured", "met"].map(String::from);
            s.push_str(&markdown_table(&cols, &rows));
            s.push('\n');
        }
        for note in &sc.notes {
            let _ = writeln!(s, "- {}", note.trim().replace('\n', " "));
        }
        if !sc.notes.is_empty() {
            s.push('\n');
        }
        for (i, chart) in sc.charts.iter().enumerate() {
            let file = chart_file_name(&sc.id, i);
            let dir = image_dir.trim_end_matches('/');
            let target = if dir.is_empty() {
                file
            } else {
                format!("{dir}/{file}")
            };
            let alt = chart.title.replace(['[', ']'], "");
            let _ = writeln!(s, "![{alt}]({target})\n");
        }
    }
    s
}

fn markdown_table(columns: &[String], rows: &[Vec<String>]) -> String {
    let ncols = rows
        .iter()
        .map(Vec::len)
        .chain(std::iter::once(columns.len()))
        .max()
        .unwrap_or(0)
        .max(1);
    let esc = |c: &str| c.replace('|', "\\|").replace('\n', "<br>");
    let line = |row: &[String]| {
        let cells: Vec<String> = (0..ncols)
            .map(|i| esc(row.get(i).map(String::as_str).unwrap_or("")))
            .collect();
        format!("| {} |\n", cells.join(" | "))
    };
    let mut s = line(columns);
    s.push('|');
    s.push_str(&"---|".repeat(ncols));
    s.push('\n');
    for row in rows {
        s.push_str(&line(row));
    }
    s
}

/// A figure for a chart label: three significant digits, trailing zeros dropped, thousands
/// separated from 1,000 on (`0.000123`, `1.5`, `42`, `12,346`).
pub fn format_number(v: f64) -> String {
    if !v.is_finite() {
        return v.to_string();
    }
    let a = v.abs();
    if a >= 999.5 {
        let digits = format!("{:.0}", a);
        let mut grouped = String::new();
        for (i, ch) in digits.chars().enumerate() {
            if i > 0 && (digits.len() - i) % 3 == 0 {
                grouped.push(',');
            }
            grouped.push(ch);
        }
        return if v < 0.0 {
            format!("-{grouped}")
        } else {
            grouped
        };
    }
    if a == 0.0 {
        return "0".to_string();
    }
    let decimals = (2 - a.log10().floor() as i32).clamp(0, 12) as usize;
    let s = format!("{v:.decimals$}");
    let s = if s.contains('.') {
        s.trim_end_matches('0').trim_end_matches('.').to_string()
    } else {
        s
    };
    if s == "-0" {
        "0".to_string()
    } else {
        s
    }
}

// ---------------------------------------------------------------------------------------------
// Charts

/// Colour-blind-safe series colours (Okabe–Ito, yellow left out: too pale on white).
const SERIES_COLORS: [RGBColor; 7] = [
    RGBColor(0, 114, 178),
    RGBColor(230, 159, 0),
    RGBColor(0, 158, 115),
    RGBColor(204, 121, 167),
    RGBColor(86, 180, 233),
    RGBColor(213, 94, 0),
    RGBColor(110, 110, 110),
];
/// Reference lines: darker than any bar so that they read across them.
const REFERENCE_COLORS: [RGBColor; 3] = [
    RGBColor(180, 0, 0),
    RGBColor(40, 40, 40),
    RGBColor(100, 40, 150),
];
const TEXT_COLOR: RGBColor = RGBColor(30, 30, 30);
const MUTED: RGBColor = RGBColor(120, 120, 120);

const TITLE_PX: u32 = 22;
const AXIS_DESC_PX: u32 = 16;
const TICK_PX: u32 = 14;
const CATEGORY_PX: u32 = 15;
const LEGEND_PX: u32 = 14;
const VALUE_PX: u32 = 12;
const Y_LABEL_AREA: u32 = 86;
const MARGIN: u32 = 12;
/// Share of a category's width that its bars use (the rest separates the groups).
const GROUP_FILL: f64 = 0.8;
const MAX_CATEGORY_LINES: usize = 3;

/// Loads and registers the chart font once per process; later calls return the first outcome.
fn ensure_font() -> Result<(), ReportError> {
    static LOADED: OnceLock<Result<(), String>> = OnceLock::new();
    LOADED
        .get_or_init(|| register_font_file(FONT_PATH))
        .clone()
        .map_err(|reason| ReportError::Font {
            path: FONT_PATH,
            package: FONT_PACKAGE,
            reason,
        })
}

/// Reads `path` and registers it as the chart font family; the error is the reason only.
fn register_font_file(path: &str) -> Result<(), String> {
    let bytes = std::fs::read(path).map_err(|e| e.to_string())?;
    // plotters keeps registered fonts for the life of the process and wants `'static` bytes;
    // this runs once per process, so leaking the one copy is the intended lifetime.
    let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
    plotters::style::register_font(FONT_FAMILY, FontStyle::Normal, bytes)
        .map_err(|_| "not a TrueType/OpenType font".to_string())
}

/// Draws `chart` as a PNG of [`CHART_SIZE`] at `path`: grouped bars (one group per category,
/// one bar per series), whiskers from `low` to `high`, dashed reference lines, a legend right
/// of the plot, optional log10 y axis.
pub fn render_chart(path: &Path, chart: &BarChart) -> Result<(), ReportError> {
    ensure_font()?;
    let fail = |reason: String| ReportError::Chart {
        path: path.to_path_buf(),
        title: chart.title.clone(),
        reason,
    };
    check_chart(chart).map_err(fail)?;
    draw(path, chart).map_err(fail)
}

fn check_chart(chart: &BarChart) -> Result<(), String> {
    if chart.categories.is_empty() {
        return Err("no categories".to_string());
    }
    if chart.series.is_empty() {
        return Err("no series".to_string());
    }
    for s in &chart.series {
        if s.values.len() != chart.categories.len() {
            return Err(format!(
                "series {:?} has {} values for {} categories",
                s.name,
                s.values.len(),
                chart.categories.len()
            ));
        }
    }
    Ok(())
}

/// The y range and the level bars grow from.
#[derive(Debug, Clone, Copy, PartialEq)]
struct YAxis {
    lo: f64,
    hi: f64,
    base: f64,
}

impl YAxis {
    /// Fits every value, whisker end and reference line, with headroom above for value labels.
    fn fit(chart: &BarChart) -> YAxis {
        let mut vs: Vec<f64> = chart
            .series
            .iter()
            .flat_map(|s| s.values.iter().flatten())
            .flat_map(|b| [Some(b.value), b.low, b.high])
            .flatten()
            .chain(chart.reference_lines.iter().map(|(_, y)| *y))
            .filter(|v| v.is_finite())
            .collect();
        if chart.log_y {
            vs.retain(|v| *v > 0.0);
            let (min, max) = crate::stats::min_max(&vs).unwrap_or((1.0, 10.0));
            let lo = 10f64.powf(min.log10().floor());
            // Headroom for the value labels without rounding up to a whole empty decade.
            let mut hi = max * 1.6;
            if hi <= lo {
                hi = lo * 10.0;
            }
            YAxis { lo, hi, base: lo }
        } else {
            let (min, max) = crate::stats::min_max(&vs).unwrap_or((0.0, 1.0));
            let (mut lo, mut hi) = (min.min(0.0), max.max(0.0));
            if hi - lo <= 0.0 {
                hi = lo + 1.0;
            }
            let span = hi - lo;
            hi += span * 0.12;
            if lo < 0.0 {
                lo -= span * 0.05;
            }
            YAxis { lo, hi, base: 0.0 }
        }
    }

    /// Where a value can be drawn on this axis (`None`: not finite, or ≤ 0 on a log axis).
    fn drawable(&self, v: f64, log: bool) -> Option<f64> {
        (v.is_finite() && (!log || v > 0.0)).then(|| v.clamp(self.lo, self.hi))
    }
}

fn draw(path: &Path, chart: &BarChart) -> Result<(), String> {
    let err = |e: &dyn std::fmt::Display| e.to_string();
    let root = BitMapBackend::new(path, CHART_SIZE).into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(&e))?;
    let title_style = TextStyle::from((FONT_FAMILY, TITLE_PX).into_font()).color(&TEXT_COLOR);
    let body = root
        .margin(8, 0, 0, 0)
        .titled(&chart.title, title_style)
        .map_err(|e| err(&e))?;

    let legend = Legend::build(&body, chart)?;
    let (plot_area, legend_area) = body.split_horizontally(CHART_SIZE.0 - legend.width);

    // Category labels wrap to the width of their group; the label area grows with the lines.
    let (plot_w, _) = plot_area.dim_in_pixel();
    let n = chart.categories.len();
    let group_px = (plot_w.saturating_sub(Y_LABEL_AREA + 2 * MARGIN)) as f64 / n as f64;
    let category_style = TextStyle::from((FONT_FAMILY, CATEGORY_PX).into_font())
        .color(&TEXT_COLOR)
        .pos(Pos::new(HPos::Center, VPos::Top));
    let mut category_lines = Vec::with_capacity(n);
    for c in &chart.categories {
        category_lines.push(wrap(&plot_area, c, &category_style, group_px * 0.95)?);
    }
    let lines = category_lines.iter().map(Vec::len).max().unwrap_or(1) as u32;
    let x_label_area = 10 + lines * (CATEGORY_PX + 3);

    let y = YAxis::fit(chart);
    let x_spec = XAxis { categories: n };
    let mut builder = ChartBuilder::on(&plot_area);
    builder
        .margin(MARGIN)
        .margin_top(MARGIN / 2)
        .x_label_area_size(x_label_area)
        .y_label_area_size(Y_LABEL_AREA);
    let layout = Layout {
        chart,
        y,
        category_lines: &category_lines,
        category_style: &category_style,
    };
    if chart.log_y {
        let mut ctx = builder
            .build_cartesian_2d(x_spec, (y.lo..y.hi).log_scale())
            .map_err(|e| err(&e))?;
        draw_plot(&plot_area, &mut ctx, &layout)?;
    } else {
        let mut ctx = builder
            .build_cartesian_2d(x_spec, y.lo..y.hi)
            .map_err(|e| err(&e))?;
        draw_plot(&plot_area, &mut ctx, &layout)?;
    }
    legend.draw(&legend_area, chart)?;
    root.present().map_err(|e| err(&e))
}

struct Layout<'a> {
    chart: &'a BarChart,
    y: YAxis,
    category_lines: &'a [Vec<String>],
    category_style: &'a TextStyle<'a>,
}

/// The x axis: category `i` spans `[i, i + 1)`; ticks at the group boundaries. Its own type
/// because plotters' `with_key_points` wrapper loses the f64 formatter that the mesh needs.
#[derive(Debug, Clone, Copy)]
struct XAxis {
    categories: usize,
}

impl Ranged for XAxis {
    type FormatOption = plotters::coord::ranged1d::DefaultFormatting;
    type ValueType = f64;

    fn map(&self, value: &f64, limit: (i32, i32)) -> i32 {
        let share = value / self.categories as f64;
        limit.0 + (share * f64::from(limit.1 - limit.0)).round() as i32
    }

    fn key_points<Hint: plotters::coord::ranged1d::KeyPointHint>(&self, _hint: Hint) -> Vec<f64> {
        (0..=self.categories).map(|i| i as f64).collect()
    }

    fn range(&self) -> std::ops::Range<f64> {
        0.0..self.categories as f64
    }
}

/// Mesh, bars, whiskers, value labels, reference lines and category labels — the same code
/// for the linear and the log y axis.
fn draw_plot<DB, Y>(
    area: &DrawingArea<DB, plotters::coord::Shift>,
    ctx: &mut ChartContext<'_, DB, Cartesian2d<XAxis, Y>>,
    l: &Layout<'_>,
) -> Result<(), String>
where
    DB: DrawingBackend,
    Y: Ranged<ValueType = f64> + ValueFormatter<f64>,
{
    let err = |e: &dyn std::fmt::Display| e.to_string();
    let chart = l.chart;
    let origin = area.get_base_pixel();
    let log = chart.log_y;
    let y_fmt = |v: &f64| format_number(*v);
    let no_label = |_: &f64| String::new();
    ctx.configure_mesh()
        .disable_x_mesh()
        .x_label_formatter(&no_label)
        .y_label_formatter(&y_fmt)
        .y_labels(8)
        .y_desc(chart.y_label.as_str())
        .axis_desc_style((FONT_FAMILY, AXIS_DESC_PX))
        .label_style((FONT_FAMILY, TICK_PX))
        .bold_line_style(RGBColor(215, 215, 215))
        .light_line_style(TRANSPARENT)
        .draw()
        .map_err(|e| err(&e))?;

    let nseries = chart.series.len();
    let slot = GROUP_FILL / nseries as f64;
    let value_style = TextStyle::from((FONT_FAMILY, VALUE_PX).into_font())
        .color(&TEXT_COLOR)
        .pos(Pos::new(HPos::Center, VPos::Bottom));
    let muted_style = TextStyle::from((FONT_FAMILY, VALUE_PX).into_font())
        .color(&MUTED)
        .pos(Pos::new(HPos::Center, VPos::Bottom));
    // Bar slot width in pixels decides whether a value label fits over the bar.
    let slot_px = (px(ctx, origin, slot, l.y.base).0 - px(ctx, origin, 0.0, l.y.base).0) as f64;
    let (_, base_py) = px(ctx, origin, 0.0, l.y.base);

    let mut texts: Vec<(String, (i32, i32), bool)> = Vec::new();
    for (si, series) in chart.series.iter().enumerate() {
        let color = SERIES_COLORS[si % SERIES_COLORS.len()];
        for (ci, value) in series.values.iter().enumerate() {
            let x0 = ci as f64 + (1.0 - GROUP_FILL) / 2.0 + si as f64 * slot;
            let (x1, xm) = (x0 + slot * 0.88, x0 + slot * 0.44);
            let Some(BarValue { value, low, high }) = *value else {
                texts.push((
                    "n/a".into(),
                    (px(ctx, origin, xm, l.y.base).0, base_py - 3),
                    false,
                ));
                continue;
            };
            let Some(top) = l.y.drawable(value, log) else {
                let mark = if value.is_finite() { "≤0" } else { "n/a" };
                texts.push((
                    mark.into(),
                    (px(ctx, origin, xm, l.y.base).0, base_py - 3),
                    false,
                ));
                continue;
            };
            ctx.draw_series(std::iter::once(Rectangle::new(
                [(x0, l.y.base), (x1, top)],
                color.filled(),
            )))
            .map_err(|e| err(&e))?;
            let lo = low.and_then(|v| l.y.drawable(v, log));
            let hi = high.and_then(|v| l.y.drawable(v, log));
            let mut label_at = top;
            if lo.is_some() || hi.is_some() {
                let (a, b) = (lo.unwrap_or(top), hi.unwrap_or(top));
                let cap = slot * 0.18;
                let style = ShapeStyle::from(&BLACK).stroke_width(2);
                let whisker = [
                    vec![(xm, a), (xm, b)],
                    vec![(xm - cap, a), (xm + cap, a)],
                    vec![(xm - cap, b), (xm + cap, b)],
                ];
                ctx.draw_series(whisker.into_iter().map(|p| PathElement::new(p, style)))
                    .map_err(|e| err(&e))?;
                label_at = label_at.max(a).max(b);
            }
            let (tx, ty) = px(ctx, origin, xm, label_at);
            texts.push((format_number(value), (tx, ty - 4), true));
        }
    }

    for (i, (_, yv)) in chart.reference_lines.iter().enumerate() {
        let Some(yv) = l.y.drawable(*yv, log) else {
            continue;
        };
        let color = REFERENCE_COLORS[i % REFERENCE_COLORS.len()];
        ctx.draw_series(std::iter::once(DashedPathElement::new(
            vec![(0.0, yv), (chart.categories.len() as f64, yv)],
            9,
            5,
            color.stroke_width(2),
        )))
        .map_err(|e| err(&e))?;
    }

    // Value labels last, so reference lines do not run through them; only where they fit.
    for (text, pos, is_value) in texts {
        let style = if is_value { &value_style } else { &muted_style };
        let (w, _) = area.estimate_text_size(&text, style).map_err(|e| err(&e))?;
        if (w as f64) <= slot_px * 1.1 {
            area.draw(&Text::new(text, pos, style.clone()))
                .map_err(|e| err(&e))?;
        }
    }

    for (ci, lines) in l.category_lines.iter().enumerate() {
        let (cx, _) = px(ctx, origin, ci as f64 + 0.5, l.y.base);
        let (_, bottom) = px(ctx, origin, 0.0, l.y.lo);
        for (li, line) in lines.iter().enumerate() {
            let y = bottom + 8 + li as i32 * (CATEGORY_PX as i32 + 3);
            area.draw(&Text::new(line.clone(), (cx, y), l.category_style.clone()))
                .map_err(|e| err(&e))?;
        }
    }
    Ok(())
}

/// Pixel position of a data point relative to `origin`, the corner of the drawing area the
/// text is drawn on (plotters answers in image pixels, and that area starts below the title).
/// A function, not a closure, so that the borrow of `ctx` ends before the next draw call.
fn px<DB, Y>(
    ctx: &ChartContext<'_, DB, Cartesian2d<XAxis, Y>>,
    origin: (i32, i32),
    x: f64,
    v: f64,
) -> (i32, i32)
where
    DB: DrawingBackend,
    Y: Ranged<ValueType = f64>,
{
    let (x, y) = ctx.backend_coord(&(x, v));
    (x - origin.0, y - origin.1)
}

/// Breaks `text` at spaces into lines no wider than `max_px` (a single word may be wider),
/// at most [`MAX_CATEGORY_LINES`]; the last line takes the rest, shortened with "…".
fn wrap<DB: DrawingBackend>(
    area: &DrawingArea<DB, plotters::coord::Shift>,
    text: &str,
    style: &TextStyle<'_>,
    max_px: f64,
) -> Result<Vec<String>, String> {
    let width = |s: &str| -> Result<f64, String> {
        area.estimate_text_size(s, style)
            .map(|(w, _)| w as f64)
            .map_err(|e| e.to_string())
    };
    let mut lines: Vec<String> = Vec::new();
    let mut current = String::new();
    for word in text.split_whitespace() {
        let candidate = if current.is_empty() {
            word.to_string()
        } else {
            format!("{current} {word}")
        };
        if current.is_empty() || width(&candidate)? <= max_px {
            current = candidate;
        } else {
            lines.push(std::mem::replace(&mut current, word.to_string()));
        }
    }
    lines.push(current);
    if lines.len() > MAX_CATEGORY_LINES {
        let rest = lines.split_off(MAX_CATEGORY_LINES - 1).join(" ");
        lines.push(shorten(&rest, max_px, &width)?);
    }
    Ok(lines)
}

/// `text`, cut and ended with "…" until it is at most `max_px` wide.
fn shorten(
    text: &str,
    max_px: f64,
    width: &dyn Fn(&str) -> Result<f64, String>,
) -> Result<String, String> {
    if width(text)? <= max_px {
        return Ok(text.to_string());
    }
    let mut chars: Vec<char> = text.chars().collect();
    while !chars.is_empty() {
        chars.pop();
        let s: String = chars.iter().collect::<String>().trim_end().to_string() + "…";
        if width(&s)? <= max_px {
            return Ok(s);
        }
    }
    Ok("…".to_string())
}

/// The legend panel right of the plot: series swatches, then reference lines, then a note
/// on whiskers if any bar has them.
struct Legend {
    width: u32,
    series: Vec<String>,
    references: Vec<String>,
    whiskers: bool,
}

const LEGEND_MIN_PX: u32 = 150;
const LEGEND_MAX_PX: u32 = 280;
const SWATCH_PX: i32 = 26;
const ROW_PX: i32 = 24;

impl Legend {
    fn build<DB: DrawingBackend>(
        area: &DrawingArea<DB, plotters::coord::Shift>,
        chart: &BarChart,
    ) -> Result<Legend, String> {
        let style = TextStyle::from((FONT_FAMILY, LEGEND_PX).into_font());
        let width = |s: &str| -> Result<f64, String> {
            area.estimate_text_size(s, &style)
                .map(|(w, _)| w as f64)
                .map_err(|e| e.to_string())
        };
        let references: Vec<String> = chart
            .reference_lines
            .iter()
            .map(|(label, y)| format!("{label} ({})", format_number(*y)))
            .collect();
        let widest = chart
            .series
            .iter()
            .map(|s| s.name.as_str())
            .chain(references.iter().map(String::as_str))
            .map(&width)
            .try_fold(0f64, |m, w| w.map(|w| m.max(w)))?;
        let pad = (SWATCH_PX + 2 * MARGIN as i32) as u32;
        let panel = (widest as u32 + pad).clamp(LEGEND_MIN_PX, LEGEND_MAX_PX);
        let text_max = (panel - pad) as f64;
        let fit = |s: &str| shorten(s, text_max, &width);
        Ok(Legend {
            width: panel,
            series: chart
                .series
                .iter()
                .map(|s| fit(&s.name))
                .collect::<Result<_, _>>()?,
            references: references
                .iter()
                .map(|s| fit(s))
                .collect::<Result<_, _>>()?,
            whiskers: chart
                .series
                .iter()
                .flat_map(|s| s.values.iter().flatten())
                .any(|b| b.low.is_some() || b.high.is_some()),
        })
    }

    fn draw<DB: DrawingBackend>(
        &self,
        area: &DrawingArea<DB, plotters::coord::Shift>,
        chart: &BarChart,
    ) -> Result<(), String> {
        let err = |e: &dyn std::fmt::Display| e.to_string();
        let text = TextStyle::from((FONT_FAMILY, LEGEND_PX).into_font())
            .color(&TEXT_COLOR)
            .pos(Pos::new(HPos::Left, VPos::Center));
        let x = 4;
        let mut y = 2 * ROW_PX;
        for (i, name) in self.series.iter().enumerate() {
            let c = SERIES_COLORS[i % SERIES_COLORS.len()];
            area.draw(&Rectangle::new([(x, y - 7), (x + 18, y + 7)], c.filled()))
                .map_err(|e| err(&e))?;
            area.draw(&Text::new(name.clone(), (x + SWATCH_PX, y), text.clone()))
                .map_err(|e| err(&e))?;
            y += ROW_PX;
        }
        if !self.references.is_empty() {
            y += ROW_PX / 2;
        }
        for (i, label) in self.references.iter().enumerate() {
            let c = REFERENCE_COLORS[i % REFERENCE_COLORS.len()];
            area.draw(&DashedPathElement::new(
                vec![(x, y), (x + 20, y)],
                6,
                3,
                c.stroke_width(2),
            ))
            .map_err(|e| err(&e))?;
            area.draw(&Text::new(label.clone(), (x + SWATCH_PX, y), text.clone()))
                .map_err(|e| err(&e))?;
            y += ROW_PX;
        }
        if self.whiskers {
            y += ROW_PX / 2;
            let s = ShapeStyle::from(&BLACK).stroke_width(2);
            for p in [
                vec![(x + 9, y - 8), (x + 9, y + 8)],
                vec![(x + 5, y - 8), (x + 13, y - 8)],
                vec![(x + 5, y + 8), (x + 13, y + 8)],
            ] {
                area.draw(&PathElement::new(p, s)).map_err(|e| err(&e))?;
            }
            let muted = text.clone().color(&MUTED);
            area.draw(&Text::new("low – high", (x + SWATCH_PX, y), muted))
                .map_err(|e| err(&e))?;
        }
        if chart.log_y {
            y += ROW_PX;
            let muted = text.color(&MUTED);
            area.draw(&Text::new("log scale", (x, y), muted))
                .map_err(|e| err(&e))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::results::{BarSeries, GoalCheck, Machine};

    fn sample_chart() -> BarChart {
        BarChart {
            title: "TCP request/response latency".to_string(),
            y_label: "latency (µs)".to_string(),
            categories: vec!["1 connection".to_string(), "64 connections".to_string()],
            series: vec![
                BarSeries {
                    name: "direct".to_string(),
                    values: vec![
                        Some(BarValue::spread(42.0, 35.0, 80.0)),
                        Some(BarValue::spread(310.0, 250.0, 900.0)),
                    ],
                },
                BarSeries {
                    name: "nftables + NAT".to_string(),
                    values: vec![Some(BarValue::plain(55.0)), None],
                },
                BarSeries {
                    name: "SNAS".to_string(),
                    values: vec![
                        Some(BarValue::spread(61.0, 50.0, 120.0)),
                        Some(BarValue::spread(420.0, 300.0, 1100.0)),
                    ],
                },
            ],
            reference_lines: vec![("goal p99".to_string(), 1000.0)],
            log_y: false,
        }
    }

    fn sample_run() -> RunReport {
        RunReport {
            machine: Machine {
                kernel: "6.18.44".to_string(),
                cores: 2,
                cpu_model: "AMD EPYC 7B13".to_string(),
                memory_gib: 24.0,
                load_start: 1.2,
                load_end: 2.7,
                has_fq: false,
                started_utc: "2026-11-23T19:30:45Z".to_string(),
                revision: Some("2c16aaa-dirty".to_string()),
            },
            command: "snas-bench --reps 5 all".to_string(),
            repetitions: 5,
            conditions: vec!["CPU idle: polled.".to_string()],
            scenarios: vec![ScenarioResult {
                id: "tcp_rr".to_string(),
                title: "TCP request/response".to_string(),
                method: "One byte each way, 10 s per path.".to_string(),
                table: Table {
                    columns: vec!["path".to_string(), "p50".to_string(), "p99".to_string()],
                    rows: vec![
                        vec![
                            "direct".to_string(),
                            "42 µs".to_string(),
                            "80 µs".to_string(),
                        ],
                        vec!["a|b".to_string(), "61 µs".to_string(), "120 µs".to_string()],
                    ],
                },
                charts: vec![sample_chart(), sample_chart()],
                goals: vec![
                    GoalCheck {
                        goal: "p99 ≤ 1 ms".to_string(),
                        measured: "120 µs".to_string(),
                        met: Some(true),
                    },
                    GoalCheck {
                        goal: "10 Gbit/s".to_string(),
                        measured: "not measurable on veth".to_string(),
                        met: None,
                    },
                ],
                notes: vec!["squid skipped: not installed".to_string()],
                raw: serde_json::json!({"direct": [1, 2, 3]}),
            }],
        }
    }

    fn png_size(bytes: &[u8]) -> (u32, u32) {
        assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n", "PNG signature");
        assert_eq!(&bytes[12..16], b"IHDR");
        let be = |b: &[u8]| u32::from_be_bytes([b[0], b[1], b[2], b[3]]);
        (be(&bytes[16..20]), be(&bytes[20..24]))
    }

    #[test]
    fn chart_renders_png_of_chart_size() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("chart.png");
        render_chart(&path, &sample_chart()).unwrap();
        assert_eq!(png_size(&std::fs::read(&path).unwrap()), CHART_SIZE);
        keep_for_eyeballing(&path);
    }

    #[test]
    fn log_chart_with_unplottable_values_still_renders() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("log.png");
        let mut chart = sample_chart();
        chart.log_y = true;
        chart.series[1].values[0] = Some(BarValue::plain(0.0));
        chart.series[0].values[1] = Some(BarValue::plain(f64::NAN));
        render_chart(&path, &chart).unwrap();
        assert_eq!(png_size(&std::fs::read(&path).unwrap()), CHART_SIZE);
        keep_for_eyeballing(&path);
    }

    /// With `SNAS_BENCH_CHART_DIR` set, test charts are copied there to be looked at.
    fn keep_for_eyeballing(path: &Path) {
        if let Some(dir) = std::env::var_os("SNAS_BENCH_CHART_DIR") {
            let name = path.file_name().unwrap();
            std::fs::copy(path, Path::new(&dir).join(name)).unwrap();
        }
    }

    #[test]
    fn crowded_chart_with_long_labels_renders() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("crowded.png");
        let categories: Vec<String> = [
            "TCP_RR 1 flow",
            "TCP_CRR new connection per transaction",
            "bulk 1 MiB upload through the proxy with pacing at 100 Mbit/s per job and more words",
            "UDP flood",
            "DNS lookups",
            "64 parallel flows",
        ]
        .map(String::from)
        .to_vec();
        let series = [
            "direct",
            "nftables + NAT",
            "squid (HTTP CONNECT proxy)",
            "SNAS",
        ]
        .iter()
        .enumerate()
        .map(|(si, name)| BarSeries {
            name: name.to_string(),
            values: (0..categories.len())
                .map(|ci| {
                    let v = 1000.0 * (1.0 + ci as f64) * (1.0 + si as f64 * 0.3);
                    Some(BarValue::spread(v, v * 0.8, v * 1.3))
                })
                .collect(),
        })
        .collect();
        let chart = BarChart {
            title: "Throughput per path, median of 5 repetitions (whiskers: min and max)"
                .to_string(),
            y_label: "transactions/s".to_string(),
            categories,
            series,
            reference_lines: vec![
                ("goal: ≥ 90% of direct".to_string(), 5400.0),
                ("configured rate".to_string(), 9000.0),
            ],
            log_y: false,
        };
        render_chart(&path, &chart).unwrap();
        assert_eq!(png_size(&std::fs::read(&path).unwrap()), CHART_SIZE);
        keep_for_eyeballing(&path);
    }

    #[test]
    fn missing_or_bad_font_file_is_reported_with_path_and_package() {
        let missing = register_font_file("/nonexistent/DejaVuSans.ttf").unwrap_err();
        assert!(missing.contains("No such file"), "{missing}");
        let dir = tempfile::tempdir().unwrap();
        let not_a_font = dir.path().join("font.ttf");
        std::fs::write(&not_a_font, b"plain text").unwrap();
        let bad = register_font_file(not_a_font.to_str().unwrap()).unwrap_err();
        assert_eq!(bad, "not a TrueType/OpenType font");
        let e = ReportError::Font {
            path: FONT_PATH,
            package: FONT_PACKAGE,
            reason: missing,
        };
        let msg = e.to_string();
        assert!(
            msg.contains(FONT_PATH) && msg.contains("fonts-dejavu-core"),
            "{msg}"
        );
    }

    #[test]
    fn chart_with_mismatched_series_is_refused_by_name() {
        let dir = tempfile::tempdir().unwrap();
        let mut chart = sample_chart();
        chart.series[1].values.pop();
        let e = render_chart(&dir.path().join("x.png"), &chart).unwrap_err();
        let msg = e.to_string();
        assert!(msg.contains("TCP request/response latency"), "{msg}");
        assert!(
            msg.contains("nftables + NAT") && msg.contains("1 values for 2"),
            "{msg}"
        );
    }

    #[test]
    fn write_scenario_writes_json_and_numbered_charts() {
        let dir = tempfile::tempdir().unwrap();
        let sc = &sample_run().scenarios[0];
        let written = write_scenario(dir.path(), sc).unwrap();
        let names: Vec<String> = written
            .iter()
            .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names, ["tcp_rr.json", "tcp_rr.png", "tcp_rr-2.png"]);
        let back: ScenarioResult =
            serde_json::from_slice(&std::fs::read(&written[0]).unwrap()).unwrap();
        assert_eq!(&back, sc);
    }

    #[test]
    fn failed_chart_keeps_json_and_names_the_chart() {
        let dir = tempfile::tempdir().unwrap();
        let mut sc = sample_run().scenarios[0].clone();
        sc.charts[1].categories.clear();
        let Err(ReportError::Charts { failed, written }) = write_scenario(dir.path(), &sc) else {
            panic!("expected a chart failure");
        };
        assert_eq!(failed.len(), 1);
        assert!(
            failed[0].to_string().contains("tcp_rr-2.png"),
            "{}",
            failed[0]
        );
        assert!(
            failed[0].to_string().contains("no categories"),
            "{}",
            failed[0]
        );
        assert!(written.contains(&dir.path().join("tcp_rr.json")));
        assert!(written.contains(&dir.path().join("tcp_rr.png")));
        assert!(dir.path().join("tcp_rr.json").exists());
    }

    #[test]
    fn write_run_writes_run_json_summary_and_scenarios() {
        let dir = tempfile::tempdir().unwrap();
        let run = sample_run();
        let written = write_run(dir.path(), &run).unwrap();
        for f in [
            "run.json",
            "summary.md",
            "tcp_rr.json",
            "tcp_rr.png",
            "tcp_rr-2.png",
        ] {
            assert!(
                written.contains(&dir.path().join(f)),
                "{f} missing: {written:?}"
            );
        }
        let back: RunReport =
            serde_json::from_slice(&std::fs::read(dir.path().join("run.json")).unwrap()).unwrap();
        assert_eq!(back, run);
        let md = std::fs::read_to_string(dir.path().join("summary.md")).unwrap();
        assert!(
            md.contains("![TCP request/response latency](tcp_rr.png)"),
            "{md}"
        );
    }

    #[test]
    fn write_run_refuses_duplicate_and_unsafe_ids() {
        let dir = tempfile::tempdir().unwrap();
        let mut run = sample_run();
        run.scenarios.push(run.scenarios[0].clone());
        assert!(matches!(
            write_run(dir.path(), &run),
            Err(ReportError::BadId { .. })
        ));
        run.scenarios.truncate(1);
        run.scenarios[0].id = "../escape".to_string();
        assert!(matches!(
            write_run(dir.path(), &run),
            Err(ReportError::BadId { .. })
        ));
        assert!(std::fs::read_dir(dir.path()).unwrap().next().is_none());
    }

    #[test]
    fn markdown_has_machine_line_tables_goals_notes_and_images() {
        let md = markdown(&sample_run(), "img/");
        let expected = "\
**Machine**: Linux 6.18.44, 2 cores (AMD EPYC 7B13), 24.0 GiB, load 1.20 → 2.70, `sch_fq` \
absent, revision `2c16aaa-dirty`, started 2026-11-23T19:30:45Z. 5 repetitions per measurement; \
command `snas-bench --reps 5 all`.

- CPU idle: polled.

### TCP request/response

One byte each way, 10 s per path.

| path | p50 | p99 |
|---|---|---|
| direct | 42 µs | 80 µs |
| a\\|b | 61 µs | 120 µs |

| goal | measured | met |
|---|---|---|
| p99 ≤ 1 ms | 120 µs | yes |
| 10 Gbit/s | not measurable on veth | n.a. |

- squid skipped: not installed

![TCP request/response latency](img/tcp_rr.png)

![TCP request/response latency](img/tcp_rr-2.png)

";
        assert!(
            md.starts_with("## snas-bench run of 2026-11-23T19:30:45Z\n\n"),
            "{md}"
        );
        assert!(
            md.ends_with(expected),
            "got:\n{md}\nexpected to end with:\n{expected}"
        );
    }

    #[test]
    fn text_table_aligns_columns_and_pads_short_rows() {
        let t = Table {
            columns: vec!["path".into(), "p50".into(), "p99".into()],
            rows: vec![
                vec!["direct".into(), "42 µs".into(), "80 µs".into()],
                vec!["SNAS".into(), "1,061 µs".into()],
            ],
        };
        let expected = "\
path         p50    p99
------  --------  -----
direct     42 µs  80 µs
SNAS    1,061 µs
";
        assert_eq!(text_table(&t), expected);
    }

    #[test]
    fn numbers_have_three_significant_digits_and_separators() {
        assert_eq!(format_number(0.0), "0");
        assert_eq!(format_number(0.000123456), "0.000123");
        assert_eq!(format_number(1.5), "1.5");
        assert_eq!(format_number(2.0), "2");
        assert_eq!(format_number(42.04), "42");
        assert_eq!(format_number(999.4), "999");
        assert_eq!(format_number(999.6), "1,000");
        assert_eq!(format_number(12345.6), "12,346");
        assert_eq!(format_number(-1234567.0), "-1,234,567");
        assert_eq!(format_number(-0.0001), "-0.0001");
    }

    #[test]
    fn y_axis_includes_whiskers_and_reference_lines() {
        let y = YAxis::fit(&sample_chart());
        assert_eq!((y.lo, y.base), (0.0, 0.0));
        assert!(y.hi >= 1100.0, "{y:?}");
        let mut log = sample_chart();
        log.log_y = true;
        let y = YAxis::fit(&log);
        assert_eq!(y.lo, 10.0);
        assert!(y.hi >= 1100.0 && y.base == y.lo, "{y:?}");
    }
}
