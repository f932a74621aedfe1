//! How a command fails: an error and the exit code it maps to (1 VMM or
//! host failure, 2 bad usage or input), printed on one line.

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
