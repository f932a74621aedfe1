//! Shell completions and man pages for a command, generated from its clap
//! definition (so they say what `--help` says). `ffmk-vmm completions
//! bash` and `ffmk-vmm man --dir D` (and ffmk-node's) call these; the
//! Debian package (ci/package) ships what they write.
use clap::Command;
use std::io::Write;
use std::path::{Path, PathBuf};

pub use clap_complete::Shell;

/// The two subcommands every ffmk command has, flattened into its own
/// subcommands (`#[command(flatten)] Docs(cli_docs::Docs)`).
#[derive(clap::Subcommand, Debug, Clone)]
pub enum Docs {
    /// Print the shell completion script (bash, zsh, fish, elvish,
    /// powershell), e.g. into /usr/share/bash-completion/completions/.
    Completions {
        #[arg(value_enum)]
        shell: Shell,
    },
    /// Write the man pages (NAME.1, NAME-run.1, ...) into a directory.
    #[command(hide = true)]
    Man {
        #[arg(long)]
        dir: PathBuf,
    },
}

impl Docs {
    /// Does what was asked for `cmd` (the whole command line's
    /// definition). A closed pipe while printing completions is not an
    /// error worth a message.
    pub fn run(self, cmd: Command) -> Result<(), String> {
        match self {
            Docs::Completions { shell } => {
                let _ = completions(cmd, shell, &mut std::io::stdout());
                Ok(())
            }
            Docs::Man { dir } => man_pages(cmd, &dir)
                .map(|_| ())
                .map_err(|e| format!("cannot write man pages into {}: {e}", dir.display())),
        }
    }
}

/// Writes the completion script of `cmd` for `shell` to `out` (an error
/// such as a closed pipe is returned, not a panic).
pub fn completions(mut cmd: Command, shell: Shell, out: &mut dyn Write) -> std::io::Result<()> {
    let name = cmd.get_name().to_string();
    let mut buf = Vec::new();
    clap_complete::generate(shell, &mut cmd, name, &mut buf);
    out.write_all(&buf)?;
    out.flush()
}

/// Writes `NAME.1` and one `NAME-SUB.1` per subcommand (nested ones
/// too, hidden ones left out) into `dir`; returns the files written.
pub fn man_pages(cmd: Command, dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    std::fs::create_dir_all(dir)?;
    let mut cmd = cmd;
    cmd.build();
    let mut written = Vec::new();
    page(&cmd, cmd.get_name(), dir, &mut written)?;
    Ok(written)
}

fn page(cmd: &Command, name: &str, dir: &Path, written: &mut Vec<PathBuf>) -> std::io::Result<()> {
    let path = dir.join(format!("{name}.1"));
    let mut buf = Vec::new();
    clap_mangen::Man::new(cmd.clone().name(name.to_string())).render(&mut buf)?;
    std::fs::write(&path, buf)?;
    written.push(path);
    for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
        if sub.get_name() == "help" {
            continue;
        }
        page(sub, &format!("{name}-{}", sub.get_name()), dir, written)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn demo() -> Command {
        Command::new("demo")
            .about("a demo")
            .subcommand(
                Command::new("run")
                    .about("runs")
                    .arg(clap::arg!(--fast "go fast")),
            )
            .subcommand(Command::new("secret").hide(true))
    }

    #[test]
    fn a_page_per_visible_command_and_completions_that_name_the_flags() {
        let dir = std::env::temp_dir().join(format!("cli-docs-{}", std::process::id()));
        let files = man_pages(demo(), &dir).unwrap();
        let names: Vec<String> = files
            .iter()
            .map(|f| f.file_name().unwrap().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names, ["demo.1", "demo-run.1"]);
        let run = std::fs::read_to_string(dir.join("demo-run.1")).unwrap();
        assert!(
            run.contains(".TH demo-run") && run.contains("fast"),
            "{run}"
        );
        let mut out = Vec::new();
        completions(demo(), Shell::Bash, &mut out).unwrap();
        let script = String::from_utf8(out).unwrap();
        assert!(
            script.contains("--fast") && script.contains("complete"),
            "{script}"
        );
        std::fs::remove_dir_all(dir).unwrap();
    }
}
