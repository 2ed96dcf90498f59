//! Running one tool (`iptables-restore`, `nft`, `ip`) with its input on stdin and its output
//! captured; a failure carries the command line, exit status and stderr.

use std::io::{self, Write};
use std::path::Path;
use std::process::{Command, ExitStatus, Stdio};

#[derive(Debug, thiserror::Error)]
pub enum CommandError {
    #[error("cannot start `{command}`: {source}")]
    Spawn { command: String, source: io::Error },
    #[error("cannot write the input of `{command}`: {source}")]
    Stdin { command: String, source: io::Error },
    #[error("`{command}` failed with {status}: {stderr}")]
    Failed {
        command: String,
        status: ExitStatus,
        stderr: String,
    },
}

impl CommandError {
    /// The command line that failed.
    pub fn command(&self) -> &str {
        match self {
            CommandError::Spawn { command, .. }
            | CommandError::Stdin { command, .. }
            | CommandError::Failed { command, .. } => command,
        }
    }
}

/// Runs `program args…` to completion and returns its stdout. Runs in the calling thread's
/// network namespace.
pub(crate) fn run(
    program: &Path,
    args: &[&str],
    stdin: Option<&str>,
) -> Result<String, CommandError> {
    let command = std::iter::once(program.display().to_string())
        .chain(args.iter().map(|a| (*a).to_owned()))
        .collect::<Vec<_>>()
        .join(" ");
    tracing::debug!(%command, "running");
    let mut child = Command::new(program)
        .args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|source| CommandError::Spawn {
            command: command.clone(),
            source,
        })?;
    if let (Some(input), Some(mut pipe)) = (stdin, child.stdin.take()) {
        // Our inputs are a few KiB, far below the pipe buffer, so writing all of it before
        // reading any output cannot deadlock. Dropping the pipe sends EOF.
        if let Err(source) = pipe.write_all(input.as_bytes()) {
            let _ = child.kill();
            let _ = child.wait();
            return Err(CommandError::Stdin { command, source });
        }
    }
    let output = child
        .wait_with_output()
        .map_err(|source| CommandError::Spawn {
            command: command.clone(),
            source,
        })?;
    if !output.status.success() {
        return Err(CommandError::Failed {
            command,
            status: output.status,
            stderr: String::from_utf8_lossy(&output.stderr).trim().to_owned(),
        });
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn returns_stdout_of_a_successful_command() {
        let out = run(Path::new("cat"), &[], Some("*nat\nCOMMIT\n")).unwrap();
        assert_eq!(out, "*nat\nCOMMIT\n");
    }

    #[test]
    fn failure_carries_command_status_and_stderr() {
        let err = run(
            Path::new("sh"),
            &["-c", "echo 'line 3 failed' >&2; exit 2"],
            None,
        )
        .unwrap_err();
        assert_eq!(err.command(), "sh -c echo 'line 3 failed' >&2; exit 2");
        let CommandError::Failed { status, stderr, .. } = &err else {
            panic!("{err:?}")
        };
        assert_eq!(status.code(), Some(2));
        assert_eq!(stderr, "line 3 failed");
        assert!(
            err.to_string().ends_with("exit status: 2: line 3 failed"),
            "{err}"
        );
    }

    #[test]
    fn missing_program_is_a_spawn_error() {
        let err = run(Path::new("/nonexistent/nft"), &["-f", "-"], Some("")).unwrap_err();
        assert!(matches!(err, CommandError::Spawn { .. }));
        assert!(
            err.to_string()
                .starts_with("cannot start `/nonexistent/nft -f -`: "),
            "{err}"
        );
    }
}
