//! One real `ambientd run` process inside a simulated node's namespace (root): started through
//! `ip netns exec`, logging JSON to a file, killed by its PID and reaped when its guard drops.
//! The netns end-to-end tests and `ambientd bench` run their agents this way, so an agent's
//! CPU and memory are its own process's.

use std::io;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use serde_json::Value;

use super::topology::Namespace;

/// What to run: the binary, the node, its mesh file, the shared CA and any further flags.
#[derive(Debug, Clone)]
pub struct Spec<'a> {
    pub bin: &'a Path,
    pub node: &'a str,
    pub mesh: &'a Path,
    /// `--state-dir`: the built-in CA every agent of the topology shares.
    pub ca_dir: &'a Path,
    /// Appended to `run`'s flags (capture backend, inbound mode, …).
    pub args: &'a [String],
    /// Where stderr (the JSON log) goes.
    pub log: PathBuf,
}

/// A running agent process; killed (SIGKILL) and reaped on drop if it still runs.
#[derive(Debug)]
pub struct AgentProcess {
    pub node: String,
    child: Child,
    log: PathBuf,
}

impl AgentProcess {
    /// Starts `spec.bin run` inside `node_ns` with short timeouts suited to tests and benches.
    pub fn spawn(node_ns: &Namespace, spec: Spec<'_>) -> io::Result<AgentProcess> {
        let out = std::fs::File::create(&spec.log)?;
        let child = Command::new("ip")
            .args(["netns", "exec", node_ns.name()])
            .arg(spec.bin)
            .args(["--log-format", "json", "run", "--node", spec.node])
            .arg("--mesh")
            .arg(spec.mesh)
            .arg("--state-dir")
            .arg(spec.ca_dir)
            .args([
                "--connect-timeout",
                "2s",
                "--drain-deadline",
                "1s",
                "--cert-ttl",
                "1h",
            ])
            .args(spec.args)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(out)
            .spawn()
            .map_err(|e| io::Error::new(e.kind(), format!("starting `ip netns exec`: {e}")))?;
        Ok(AgentProcess {
            node: spec.node.to_owned(),
            child,
            log: spec.log,
        })
    }

    /// The agent's PID (`ip netns exec` execs it in place).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Its exit status, if it has exited.
    pub fn exited(&mut self) -> io::Result<Option<ExitStatus>> {
        self.child.try_wait()
    }

    pub fn signal(&self, signal: Signal) -> io::Result<()> {
        let pid = i32::try_from(self.pid()).map_err(io::Error::other)?;
        kill(Pid::from_raw(pid), signal).map_err(io::Error::from)
    }

    /// The raw log, for failure messages.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Every JSON log line so far.
    pub fn log(&self) -> Vec<Value> {
        self.log_text()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }

    /// Log lines whose message is `message`, as their `fields`.
    pub fn messages(&self, message: &str) -> Vec<Value> {
        self.log()
            .into_iter()
            .filter_map(|l| l.get("fields").cloned())
            .filter(|f| f["message"] == message)
            .collect()
    }
}

impl Drop for AgentProcess {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.signal(Signal::SIGKILL);
            let _ = self.child.wait();
        }
    }
}
