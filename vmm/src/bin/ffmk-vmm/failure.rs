//! How a command fails: an error and the exit code it maps to, printed on
//! one line. The rule, the same for every command (docs/cli.md):
//! 0 done; 1 failure (of the VMM, the host, or no answer in time); 2 bad
//! usage or input; 3 the guest crashed (`run`, `restore`); 4 refused (the
//! request was understood, but the VM's state, a policy or the peer will
//! not have it now); 159 stopped by its system-call filter. `run` and
//! `restore` exit with the guest's status when it writes one to the test
//! exit port.

/// Exit code of a refused request.
pub const EXIT_REFUSED: u8 = 4;

/// An error with the exit code it maps to.
pub struct Failure {
    pub code: u8,
    pub err: anyhow::Error,
}

pub fn usage(err: impl Into<anyhow::Error>) -> Failure {
    Failure {
        code: 2,
        err: err.into(),
    }
}

pub fn runtime(err: impl Into<anyhow::Error>) -> Failure {
    Failure {
        code: 1,
        err: err.into(),
    }
}

/// The error and its causes on one line, without repeating a cause that an
/// outer message already quotes (typed errors often embed their source).
pub fn one_line(err: &anyhow::Error) -> String {
    let mut line = String::new();
    for cause in err.chain() {
        let text = cause.to_string();
        if line.contains(&text) {
            continue;
        }
        if !line.is_empty() {
            line.push_str(": ");
        }
        line.push_str(&text);
    }
    line
}

/// The request was understood but is refused as things stand (the VM's
/// state, a policy, the peer): exit 4.
pub fn refused(err: impl Into<anyhow::Error>) -> Failure {
    Failure {
        code: EXIT_REFUSED,
        err: err.into(),
    }
}

/// A command line clap refused: help and version as asked (exit 0); a bare
/// command its usage (exit 2); anything else clap's message with its
/// detail on one line and its tip (or the usage) on a second (exit 2).
pub fn command_line(e: clap::Error) -> std::process::ExitCode {
    use clap::error::ErrorKind;
    match e.kind() {
        ErrorKind::DisplayHelp | ErrorKind::DisplayVersion => {
            let _ = e.print();
            std::process::ExitCode::SUCCESS
        }
        ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand => {
            let _ = e.print();
            std::process::ExitCode::from(2)
        }
        _ => {
            let (error, hint) = condense(&e.render().to_string());
            eprintln!("ffmk-vmm: error: {error}");
            if let Some(h) = hint {
                eprintln!("ffmk-vmm: {h}");
            }
            std::process::ExitCode::from(2)
        }
    }
}

/// clap's rendered error as (the error with its indented detail joined
/// on, the tips joined or else the usage line).
fn condense(rendered: &str) -> (String, Option<String>) {
    let mut error = String::new();
    let mut tips = Vec::new();
    let mut usage = None;
    for line in rendered.lines() {
        let t = line.trim();
        if t.is_empty() || t.starts_with("For more information") {
            continue;
        }
        if let Some(tip) = t.strip_prefix("tip: ") {
            tips.push(tip.to_string());
        } else if let Some(u) = t.strip_prefix("Usage: ") {
            usage = Some(format!("usage: {u}"));
        } else if usage.is_none() {
            if !error.is_empty() && !error.ends_with(' ') {
                error.push(' ');
            }
            error.push_str(t.trim_start_matches("error: "));
        }
    }
    let hint = if tips.is_empty() {
        usage
    } else {
        Some(format!("tip: {}", tips.join("; ")))
    };
    (error, hint)
}

#[cfg(test)]
mod tests {
    #[test]
    fn clap_errors_keep_their_detail_and_tip() {
        let (e, h) = super::condense(
            "error: the following required arguments were not provided:\n  --to <TO>\n\n\
             Usage: ffmk-vmm migrate --api-socket <API_SOCKET> --to <TO>\n\n\
             For more information, try '--help'.\n",
        );
        assert_eq!(
            e,
            "the following required arguments were not provided: --to <TO>"
        );
        assert_eq!(
            h.as_deref(),
            Some("usage: ffmk-vmm migrate --api-socket <API_SOCKET> --to <TO>")
        );
        let (e, h) = super::condense(
            "error: unexpected argument '--kernal' found\n\n  tip: a similar argument exists: \
             '--kernel'\n\nUsage: ffmk-vmm run --kernel <KERNEL>\n",
        );
        assert_eq!(e, "unexpected argument '--kernal' found");
        assert_eq!(
            h.as_deref(),
            Some("tip: a similar argument exists: '--kernel'")
        );
    }
}
