//! The Prometheus text exposition format (version 0.0.4), which every
//! Prometheus, `promtool check metrics` and the scrapers built on them read.
//!
//! Written by hand rather than through a client library: Spillway's metrics
//! are read from Redis on each scrape, not kept in process, and the format is a
//! few lines per family. Every family has `# HELP` and `# TYPE`; a counter's
//! name carries its `_total` in both (as the 0.0.4 format has it); a histogram
//! is given per bucket and written cumulatively.

use std::fmt::Write;

/// A metric family's type.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// Only ever grows (a reset is a restart of its count).
    Counter,
    /// Goes up and down.
    Gauge,
    /// Observations counted in buckets by upper bound, with their sum.
    Histogram,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Counter => "counter",
            Kind::Gauge => "gauge",
            Kind::Histogram => "histogram",
        }
    }
}

/// The text of one scrape, built family by family.
#[derive(Default)]
pub struct Exposition {
    out: String,
}

/// A label set: (name, value) pairs, names as Prometheus allows them.
pub type Labels<'a> = &'a [(&'a str, &'a str)];

impl Exposition {
    /// Starts the family `name` (a counter's ends in `_total`) with its help
    /// text; its samples follow.
    pub fn family(&mut self, name: &str, kind: Kind, help: &str) -> Family<'_> {
        debug_assert!(kind != Kind::Counter || name.ends_with("_total"), "counter {name} without _total");
        let _ = writeln!(self.out, "# HELP {name} {}", escape_help(help));
        let _ = writeln!(self.out, "# TYPE {name} {}", kind.name());
        Family { out: &mut self.out, name: name.to_owned() }
    }

    /// The text, as served with [`CONTENT_TYPE`].
    pub fn finish(self) -> String {
        self.out
    }
}

/// The content type of the text format.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// One family's samples.
pub struct Family<'e> {
    out: &'e mut String,
    name: String,
}

impl Family<'_> {
    /// One sample of a counter or gauge.
    pub fn sample(&mut self, labels: Labels<'_>, value: f64) -> &mut Self {
        let name = std::mem::take(&mut self.name);
        self.line(&name, labels, None, value);
        self.name = name;
        self
    }

    /// A histogram: the count of each bucket on its own (the last is above
    /// every bound, `None`), in order of their upper bounds, and the sum of
    /// the observations.
    pub fn histogram(&mut self, labels: Labels<'_>, buckets: &[(Option<f64>, u64)], sum: f64) -> &mut Self {
        let name = std::mem::take(&mut self.name);
        let mut seen = 0;
        for (bound, n) in buckets {
            seen += n;
            let le = bound.map_or_else(|| "+Inf".to_owned(), value_text);
            self.line(&format!("{name}_bucket"), labels, Some(&le), seen as f64);
        }
        if !buckets.last().is_some_and(|(b, _)| b.is_none()) {
            self.line(&format!("{name}_bucket"), labels, Some("+Inf"), seen as f64);
        }
        self.line(&format!("{name}_sum"), labels, None, sum);
        self.line(&format!("{name}_count"), labels, None, seen as f64);
        self.name = name;
        self
    }

    fn line(&mut self, name: &str, labels: Labels<'_>, le: Option<&str>, value: f64) {
        self.out.push_str(name);
        let all = labels.iter().map(|(k, v)| (*k, *v)).chain(le.map(|le| ("le", le)));
        let mut first = true;
        for (k, v) in all {
            self.out.push(if first { '{' } else { ',' });
            first = false;
            let _ = write!(self.out, "{k}=\"{}\"", escape_label(v));
        }
        if !first {
            self.out.push('}');
        }
        let _ = writeln!(self.out, " {}", value_text(value));
    }
}

/// A sample value: whole numbers without a fraction, `+Inf`, `-Inf`, `NaN`.
fn value_text(v: f64) -> String {
    if v.is_nan() {
        "NaN".into()
    } else if v.is_infinite() {
        if v > 0.0 { "+Inf".into() } else { "-Inf".into() }
    } else if v.fract() == 0.0 && v.abs() < 1e15 {
        format!("{}", v as i64)
    } else {
        format!("{v}")
    }
}

fn escape_help(s: &str) -> String {
    s.replace('\\', "\\\\").replace('\n', "\\n")
}

fn escape_label(s: &str) -> String {
    s.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Help and type before the samples, labels in braces, whole numbers
    /// without a fraction, no braces without labels.
    #[test]
    fn families_are_written_as_the_text_format_has_them() {
        let mut e = Exposition::default();
        e.family("x_writes_total", Kind::Counter, "Writes, ever.").sample(&[("shard", "0")], 3.0).sample(&[("shard", "1")], 0.0);
        e.family("x_age_seconds", Kind::Gauge, "Age.").sample(&[], 0.25);
        assert_eq!(
            e.finish(),
            "# HELP x_writes_total Writes, ever.\n# TYPE x_writes_total counter\nx_writes_total{shard=\"0\"} 3\nx_writes_total{shard=\"1\"} 0\n\
             # HELP x_age_seconds Age.\n# TYPE x_age_seconds gauge\nx_age_seconds 0.25\n"
        );
    }

    /// Buckets are cumulative, `+Inf` is always there and equals the count.
    #[test]
    fn histograms_are_cumulative() {
        let mut e = Exposition::default();
        e.family("d_seconds", Kind::Histogram, "Delay.").histogram(&[], &[(Some(0.01), 2), (Some(0.1), 3), (None, 1)], 1.5);
        let text = e.finish();
        let lines: Vec<&str> = text.lines().skip(2).collect();
        assert_eq!(
            lines,
            ["d_seconds_bucket{le=\"0.01\"} 2", "d_seconds_bucket{le=\"0.1\"} 5", "d_seconds_bucket{le=\"+Inf\"} 6", "d_seconds_sum 1.5", "d_seconds_count 6"]
        );
        let mut e = Exposition::default();
        e.family("d_seconds", Kind::Histogram, "Delay.").histogram(&[("shard", "2")], &[(Some(1.0), 4)], 2.0);
        assert!(e.finish().contains("d_seconds_bucket{shard=\"2\",le=\"+Inf\"} 4\n"), "an +Inf bucket is added");
    }

    /// Label values and help texts are escaped; odd values are spelled as
    /// the format spells them.
    #[test]
    fn escapes_and_values() {
        let mut e = Exposition::default();
        e.family("g", Kind::Gauge, "a \\ b\nc").sample(&[("t", "q\"\\\n")], f64::INFINITY).sample(&[], f64::NAN).sample(&[], -2.5);
        assert_eq!(e.finish(), "# HELP g a \\\\ b\\nc\n# TYPE g gauge\ng{t=\"q\\\"\\\\\\n\"} +Inf\ng NaN\ng -2.5\n");
    }
}
