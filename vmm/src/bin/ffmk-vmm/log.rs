//! The monitor's messages: what a command says (`say!`) and the library's
//! logs (`tracing`), in one style.
//!
//! Text (the default): `ffmk-vmm: MESSAGE` for what a command says,
//! `ffmk-vmm: LEVEL: MESSAGE` for logs; colour only on a terminal (and
//! never with `NO_COLOR`). `--log-format json`: one JSON object per line
//! (timestamp, level, target, fields) for log collectors. Which logs show:
//! `--log-level`, else `RUST_LOG`, else `warn`; a level or `RUST_LOG`-style
//! directives (`info,vmm::migration=debug`). What a command says always
//! shows.
use std::fmt;
use std::io::IsTerminal;
use tracing::{Event, Level, Subscriber};
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::registry::LookupSpan;

/// The target of what a command says (always shown).
pub const SAY: &str = "ffmk_vmm::say";

/// What a command says on stderr: `ffmk-vmm: ...` (a JSON object with
/// `--log-format json`).
macro_rules! say {
    ($($arg:tt)*) => {
        tracing::info!(target: crate::log::SAY, $($arg)*)
    };
}

/// `--log-format`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// `ffmk-vmm: ...` lines; colour on a terminal.
    Text,
    /// One JSON object per line.
    Json,
}

/// Checks a `--log-level` / `RUST_LOG` value (vmm::cli's rule).
pub use vmm::cli::check_log_filter as check_filter;

/// Installs the subscriber. `level` is `--log-level` (already checked);
/// without it `RUST_LOG` is used, and a bad `RUST_LOG` is an error.
pub fn init(level: Option<&str>, format: Format) -> Result<(), String> {
    let chosen = match level {
        Some(l) => l.to_string(),
        None => match std::env::var("RUST_LOG") {
            Ok(v) if !v.trim().is_empty() => {
                check_filter(&v).map_err(|e| format!("RUST_LOG: {e}"))?
            }
            _ => "warn".to_string(),
        },
    };
    // vfio-ioctls warns about interrupt indices a device does not have
    // (error reporting, device request); we only use INTx, MSI and MSI-X.
    let mut directives = chosen.clone();
    if !chosen.contains("vfio_ioctls") {
        directives.push_str(",vfio_ioctls=error");
    }
    directives.push_str(&format!(",{SAY}=info"));
    let filter = tracing_subscriber::EnvFilter::try_new(&directives).map_err(|e| e.to_string())?;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        Format::Json => builder
            .json()
            .with_current_span(false)
            .with_span_list(false)
            .try_init(),
        Format::Text => {
            let ansi = std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none();
            builder
                .with_ansi(ansi)
                .event_format(Text { ansi })
                .try_init()
        }
    }
    .map_err(|e| e.to_string())
}

/// `ffmk-vmm: [LEVEL: ][TARGET: ]MESSAGE FIELDS`.
struct Text {
    ansi: bool,
}

impl<S, N> FormatEvent<S, N> for Text
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        let meta = event.metadata();
        write!(writer, "ffmk-vmm: ")?;
        let level = *meta.level();
        if meta.target() != SAY || level != Level::INFO {
            let (word, colour) = match level {
                Level::ERROR => ("error", "31"),
                Level::WARN => ("warning", "33"),
                Level::INFO => ("info", "32"),
                Level::DEBUG => ("debug", "34"),
                Level::TRACE => ("trace", "35"),
            };
            if self.ansi {
                write!(writer, "\x1b[{colour}m{word}\x1b[0m: ")?;
            } else {
                write!(writer, "{word}: ")?;
            }
            if level >= Level::DEBUG {
                write!(writer, "{}: ", meta.target())?;
            }
        }
        ctx.format_fields(writer.by_ref(), event)?;
        writeln!(writer)
    }
}

#[cfg(test)]
mod tests {
    use super::check_filter;

    #[test]
    fn filters_take_levels_and_directives_only() {
        assert!(check_filter("info").is_ok());
        assert!(check_filter("WARN").is_ok());
        assert!(check_filter("warn,vmm::migration=debug").is_ok());
        assert!(check_filter("verbose").unwrap_err().contains("not a level"));
        assert!(check_filter("vmm=loud").is_err());
        assert!(check_filter("").is_err());
    }
}
