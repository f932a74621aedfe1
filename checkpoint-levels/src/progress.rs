//! Progress of the background fill: bars on a terminal, JSON lines
//! (one event per line on stdout) otherwise.
use indicatif::{MultiProgress, ProgressBar, ProgressStyle};
use std::io::IsTerminal;
use std::sync::Mutex;
use std::time::{Duration, Instant};

pub enum Reporter {
    Bars(MultiProgress),
    Json(Mutex<()>),
}

/// One level's progress.
pub struct Task<'a> {
    r: &'a Reporter,
    level: String,
    bar: Option<ProgressBar>,
    last: Mutex<Instant>,
}

impl Reporter {
    /// Bars when stdout is a terminal and JSON is not asked for.
    pub fn new(json: bool) -> Reporter {
        if !json && std::io::stdout().is_terminal() {
            Reporter::Bars(MultiProgress::new())
        } else {
            Reporter::Json(Mutex::new(()))
        }
    }

    pub fn is_json(&self) -> bool {
        matches!(self, Reporter::Json(_))
    }

    /// A JSON event line (JSON mode) or a line above the bars.
    pub fn event(&self, v: serde_json::Value) {
        match self {
            Reporter::Json(lock) => {
                let _g = lock.lock();
                println!("{v}");
            }
            Reporter::Bars(m) => {
                let text = v
                    .get("message")
                    .and_then(|m| m.as_str())
                    .map(String::from)
                    .unwrap_or_else(|| v.to_string());
                let _ = m.println(text);
            }
        }
    }

    pub fn task(&self, level: &str) -> Task<'_> {
        let bar = match self {
            Reporter::Bars(m) => {
                let b = m.add(ProgressBar::new(0));
                b.set_style(
                    ProgressStyle::with_template(
                        "{prefix:>13} [{bar:30}] {bytes:>10}/{total_bytes:<10} {binary_bytes_per_sec} {msg}",
                    )
                    .unwrap_or_else(|_| ProgressStyle::default_bar())
                    .progress_chars("=> "),
                );
                b.set_prefix(level.to_string());
                Some(b)
            }
            Reporter::Json(_) => None,
        };
        Task {
            r: self,
            level: level.into(),
            bar,
            last: Mutex::new(Instant::now() - Duration::from_secs(1)),
        }
    }
}

impl Task<'_> {
    pub fn progress(&self, done: u64, total: u64) {
        if let Some(b) = &self.bar {
            b.set_length(total);
            b.set_position(done);
            return;
        }
        // JSON: at most a few events a second, and the last one.
        if let Ok(mut last) = self.last.lock() {
            if done < total && last.elapsed() < Duration::from_millis(250) {
                return;
            }
            *last = Instant::now();
        }
        self.r.event(serde_json::json!({
            "event": "progress", "level": self.level, "bytes": done, "total": total
        }));
    }

    /// Text next to the bar (nothing in JSON mode).
    pub fn message(&self, message: &str) {
        if let Some(b) = &self.bar {
            b.set_message(message.to_string());
        }
    }

    pub fn finish(&self, message: &str) {
        if let Some(b) = &self.bar {
            b.finish_with_message(message.to_string());
        }
    }
}
