//! The Prometheus text exposition format (version 0.0.4), written by hand:
//! families with HELP and TYPE, samples with escaped labels. `GET
//! /metrics` on a VM's API and on ffmk-node's metrics port use it.
use std::fmt::Write;

/// The `Content-Type` of the format.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// What a family's samples are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Counter,
    Gauge,
}

/// A page of metrics being written.
#[derive(Debug, Default)]
pub struct Page {
    text: String,
    families: Vec<String>,
}

impl Page {
    pub fn new() -> Page {
        Page::default()
    }

    /// Starts family `name` (once per page; a second start of the same
    /// name adds samples to it).
    pub fn family(&mut self, name: &str, kind: Kind, help: &str) -> &mut Self {
        if !self.families.iter().any(|f| f == name) {
            self.families.push(name.into());
            let kind = match kind {
                Kind::Counter => "counter",
                Kind::Gauge => "gauge",
            };
            let help = help.replace('\\', "\\\\").replace('\n', "\\n");
            let _ = writeln!(self.text, "# HELP {name} {help}");
            let _ = writeln!(self.text, "# TYPE {name} {kind}");
        }
        self
    }

    /// One sample of the family started last with this name.
    pub fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: f64) -> &mut Self {
        self.text.push_str(name);
        if !labels.is_empty() {
            self.text.push('{');
            for (i, (k, v)) in labels.iter().enumerate() {
                if i > 0 {
                    self.text.push(',');
                }
                let v = v
                    .replace('\\', "\\\\")
                    .replace('"', "\\\"")
                    .replace('\n', "\\n");
                let _ = write!(self.text, "{k}=\"{v}\"");
            }
            self.text.push('}');
        }
        let _ = if value.is_finite() {
            writeln!(self.text, " {value}")
        } else if value.is_nan() {
            writeln!(self.text, " NaN")
        } else if value > 0.0 {
            writeln!(self.text, " +Inf")
        } else {
            writeln!(self.text, " -Inf")
        };
        self
    }

    /// A family with one unlabelled sample.
    pub fn one(&mut self, name: &str, kind: Kind, help: &str, value: f64) -> &mut Self {
        self.family(name, kind, help).sample(name, &[], value)
    }

    pub fn finish(self) -> String {
        self.text
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn families_samples_and_escaped_labels() {
        let mut p = Page::new();
        p.one("ffmk_up", Kind::Gauge, "1 when up", 1.0);
        p.family("ffmk_x_total", Kind::Counter, "x")
            .sample("ffmk_x_total", &[("dev", "a \"b\"\\c\nd")], 3.0)
            .sample("ffmk_x_total", &[("dev", "e")], 4.5);
        let t = p.finish();
        assert_eq!(
            t,
            "# HELP ffmk_up 1 when up\n# TYPE ffmk_up gauge\nffmk_up 1\n\
             # HELP ffmk_x_total x\n# TYPE ffmk_x_total counter\n\
             ffmk_x_total{dev=\"a \\\"b\\\"\\\\c\\nd\"} 3\nffmk_x_total{dev=\"e\"} 4.5\n"
        );
    }
}
