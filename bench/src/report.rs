//! The results: a table on stdout, `RESULTS.md`, and a PNG chart of the ratios.

use std::fmt::Write as _;
use std::path::Path;

use anyhow::Context as _;
use plotters::prelude::*;

use crate::load::Measured;

/// One line of the results.
pub(crate) struct Row {
    pub(crate) scenario: String,
    /// The figure (throughput, or a time).
    pub(crate) value: f64,
    pub(crate) unit: &'static str,
    /// p50, p99, p99.9 latency in ms, for request-driven scenarios.
    pub(crate) latency: Option<[f64; 3]>,
    /// The baseline's name and figure, measured in the same run.
    pub(crate) baseline: Option<(String, f64)>,
    /// Peak resident memory of the host serving the scenario, MiB.
    pub(crate) peak_rss_mib: Option<f64>,
    pub(crate) note: String,
}

impl Row {
    /// A throughput row from a load run (successful requests only; failed ones
    /// are named in the note).
    pub(crate) fn from(scenario: &str, unit: &'static str, m: &Measured) -> Self {
        let note = match &m.failed {
            (0, _) => String::new(),
            (n, first) => format!("{n} requests failed, first: {}", first.as_deref().unwrap_or("?").replace('|', "/")),
        };
        Self {
            scenario: scenario.to_owned(),
            value: m.rate(),
            unit,
            latency: Some([m.ms(0.5), m.ms(0.99), m.ms(0.999)]),
            baseline: None,
            peak_rss_mib: None,
            note,
        }
    }

    /// Compared with `name`'s `value`.
    pub(crate) fn against(mut self, name: &str, value: f64) -> Self {
        self.baseline = Some((name.to_owned(), value));
        self
    }

    /// Adds to the note.
    pub(crate) fn note(mut self, note: impl Into<String>) -> Self {
        let note = note.into();
        self.note = if self.note.is_empty() { note } else { format!("{note}; {}", self.note) };
        self
    }

    pub(crate) fn rss(mut self, mib: Option<f64>) -> Self {
        self.peak_rss_mib = mib;
        self
    }

    /// Figure over baseline.
    pub(crate) fn ratio(&self) -> Option<f64> {
        self.baseline.as_ref().map(|(_, b)| self.value / b)
    }
}

fn fmt_value(v: f64) -> String {
    if v >= 100.0 { format!("{:.0}", v) } else { format!("{v:.2}") }
}

/// The results as a Markdown table.
pub(crate) fn markdown(rows: &[Row]) -> String {
    let mut out = String::from(
        "| scenario | figure | p50 ms | p99 ms | p99.9 ms | baseline (same run) | ratio | host peak RSS | note |\n|---|---|---|---|---|---|---|---|---|\n",
    );
    for r in rows {
        let lat = r.latency.map_or(["".into(), "".into(), "".into()], |l| l.map(|x| format!("{x:.2}")));
        let base = r.baseline.as_ref().map_or(String::new(), |(n, v)| format!("{n}: {} {}", fmt_value(*v), r.unit));
        let ratio = r.ratio().map_or(String::new(), |x| format!("{x:.2}x"));
        let rss = r.peak_rss_mib.map_or(String::new(), |m| format!("{m:.0} MiB"));
        let _ = writeln!(
            out,
            "| {} | {} {} | {} | {} | {} | {base} | {ratio} | {rss} | {} |",
            r.scenario,
            fmt_value(r.value),
            r.unit,
            lat[0],
            lat[1],
            lat[2],
            r.note
        );
    }
    out
}

/// A bar chart of every ratio to its baseline, written to `path` as PNG. Text
/// needs a TrueType font: DejaVu Sans (Debian's fonts-dejavu-core) or `font`.
pub(crate) fn chart(rows: &[Row], path: &Path, font: &Path) -> anyhow::Result<()> {
    let bytes = std::fs::read(font).with_context(|| format!("no font at {} for the chart", font.display()))?;
    plotters::style::register_font("sans-serif", FontStyle::Normal, Box::leak(bytes.into_boxed_slice()))
        .map_err(|_| anyhow::anyhow!("{} is not a usable font", font.display()))?;
    let bars: Vec<(&str, f64)> = rows.iter().filter_map(|r| Some((r.scenario.as_str(), r.ratio()?))).collect();
    let top = bars.iter().map(|(_, v)| *v).fold(1.0, f64::max) * 1.15;
    // Every row labelled, long scenario names cut to fit.
    let label = |s: &str| if s.chars().count() > 72 { format!("{}…", s.chars().take(71).collect::<String>()) } else { s.to_owned() };
    let root = BitMapBackend::new(path, (1400, 120 + 40 * bars.len() as u32)).into_drawing_area();
    root.fill(&WHITE)?;
    let mut chart = ChartBuilder::on(&root)
        .caption("Spillway: each figure over its baseline, same run", ("sans-serif", 26))
        .margin(20)
        .x_label_area_size(40)
        .y_label_area_size(600)
        .build_cartesian_2d(0.0..top, (0..bars.len()).into_segmented())?;
    chart
        .configure_mesh()
        .disable_y_mesh()
        .y_labels(bars.len() + 1)
        .x_desc("ratio (1.0 = the baseline)")
        .y_label_formatter(&|v| match v {
            SegmentValue::CenterOf(i) => bars.get(*i).map_or(String::new(), |b| label(b.0)),
            _ => String::new(),
        })
        .label_style(("sans-serif", 15))
        .draw()?;
    // One colour: what is good differs per row (the notes give each target).
    chart.draw_series(bars.iter().enumerate().map(|(i, (_, v))| {
        Rectangle::new([(0.0, SegmentValue::Exact(i)), (*v, SegmentValue::Exact(i + 1))], RGBColor(70, 110, 160).mix(0.85).filled())
    }))?;
    chart.draw_series(bars.iter().enumerate().map(|(i, (_, v))| {
        Text::new(format!("{v:.2}x"), (*v + top * 0.01, SegmentValue::CenterOf(i)), ("sans-serif", 16))
    }))?;
    chart.draw_series(std::iter::once(PathElement::new(
        vec![(1.0, SegmentValue::Exact(0)), (1.0, SegmentValue::Exact(bars.len()))],
        BLACK.stroke_width(2),
    )))?;
    root.present()?;
    Ok(())
}
