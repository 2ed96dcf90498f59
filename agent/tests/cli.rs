//! The `ambientd` binary as an operator uses it: bad input stops it with a message naming the
//! problem; `ca init` / `ca issue`; `demo`; `run` stopping on SIGTERM.

use std::os::unix::fs::PermissionsExt;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_ambientd");

fn ambientd(args: &[&str]) -> std::process::Output {
    Command::new(BIN)
        .args(args)
        .env_remove("RUST_LOG")
        .output()
        .expect("ambientd runs")
}

#[test]
fn run_exits_with_the_mesh_file_error_instead_of_starting() {
    let dir = tempfile::tempdir().unwrap();
    let mesh = dir.path().join("mesh.yaml");
    std::fs::write(
        &mesh,
        "workloads:\n  - name: a\n    namespace: demo\n    addresses: [127.0.0.300]\n    node: n1\n",
    )
    .unwrap();
    let state = dir.path().join("state");
    let out = ambientd(&[
        "run",
        "--mesh",
        mesh.to_str().unwrap(),
        "--node",
        "n1",
        "--state-dir",
        state.to_str().unwrap(),
    ]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("workloads[0].addresses[0]"), "{stderr}");
    assert!(stderr.contains("127.0.0.300"), "{stderr}");
    assert!(stderr.contains("mesh.yaml"), "names the file: {stderr}");
}

#[test]
fn run_names_a_missing_mesh_file() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("nope.yaml");
    let out = ambientd(&["run", "--mesh", missing.to_str().unwrap(), "--node", "n1"]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("nope.yaml"), "{stderr}");
}

#[test]
fn ca_init_then_issue_writes_a_certificate_to_inspect() {
    let dir = tempfile::tempdir().unwrap();
    let ca = dir.path().join("ca");
    let out = ambientd(&["ca", "init", "--dir", ca.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mode = std::fs::metadata(ca.join("root-key.pem"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);

    // A second init must not replace the root.
    let again = ambientd(&["ca", "init", "--dir", ca.to_str().unwrap()]);
    assert!(!again.status.success());

    let issued = dir.path().join("issued");
    let out = ambientd(&[
        "ca",
        "issue",
        "--dir",
        ca.to_str().unwrap(),
        "--identity",
        "spiffe://cluster.local/ns/demo/sa/echo",
        "--out",
        issued.to_str().unwrap(),
        "--ttl",
        "1h",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("spiffe://cluster.local/ns/demo/sa/echo"),
        "{stdout}"
    );
    let key_mode = std::fs::metadata(issued.join("key.pem"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(key_mode & 0o777, 0o600);
    let chain = std::fs::read_to_string(issued.join("cert-chain.pem")).unwrap();
    assert!(chain.starts_with("-----BEGIN CERTIFICATE-----"));
    let root = std::fs::read_to_string(issued.join("root-cert.pem")).unwrap();
    assert_eq!(
        root,
        std::fs::read_to_string(ca.join("root-cert.pem"))
            .unwrap()
            .trim_end()
            .to_owned()
            + "\n"
    );

    let bad = ambientd(&[
        "ca",
        "issue",
        "--dir",
        ca.to_str().unwrap(),
        "--identity",
        "spiffe://cluster.local/ns/demo",
        "--out",
        issued.to_str().unwrap(),
    ]);
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("must have the form"));
}

#[test]
fn demo_sends_traffic_through_the_mesh_and_reports_both_identities() {
    let child = Command::new(BIN)
        .arg("demo")
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("ambientd demo runs");
    let pid = child.id();
    let out = child.wait_with_output().expect("ambientd demo finishes");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("verified server   spiffe://cluster.local/ns/demo/sa/echo"),
        "{stdout}"
    );
    assert!(
        stdout.contains("verified client   spiffe://cluster.local/ns/demo/sa/client"),
        "{stdout}"
    );
    assert!(stdout.contains("intact"), "{stdout}");
    assert!(stdout.contains("cleaned up"), "{stdout}");
    if nix::unistd::geteuid().is_root() {
        // Root: simulated nodes with real capture; the echo app saw the client's own address.
        assert!(stdout.contains("real capture rules"), "{stdout}");
        assert!(
            stdout.contains("echo app saw the connection from 198.19.1.1:"),
            "{stdout}"
        );
        let netns = Command::new("ip").args(["netns", "list"]).output().unwrap();
        let netns = String::from_utf8_lossy(&netns.stdout);
        assert!(
            !netns.contains(&format!("amb-{pid}-")),
            "the demo left namespaces behind: {netns}"
        );
    } else {
        assert!(stdout.contains("not running as root"), "{stdout}");
    }
}

#[test]
fn demo_interrupted_by_ctrl_c_leaves_nothing_behind() {
    use std::io::{BufRead, BufReader};
    if !nix::unistd::geteuid().is_root() {
        assert!(
            std::env::var_os("CI").is_none(),
            "the root demo needs root and CI is set"
        );
        eprintln!("skipping: the root demo needs root");
        return;
    }
    let mut child = Command::new(BIN)
        .arg("demo")
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("ambientd demo runs");
    let pid = child.id();
    let mut stdout = BufReader::new(child.stdout.take().unwrap());
    let mut first = String::new();
    stdout.read_line(&mut first).unwrap();
    assert!(first.contains("ambientd demo (root)"), "{first}");
    // The namespaces exist now; interrupt wherever the demo is.
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGINT,
    )
    .unwrap();
    let mut rest = String::new();
    std::io::Read::read_to_string(&mut stdout, &mut rest).unwrap();
    let status = child.wait().unwrap();
    assert!(
        status.code().is_some(),
        "the demo died from the signal instead of handling it: {status}"
    );
    assert!(rest.contains("cleaned up"), "{rest}");
    let netns = Command::new("ip").args(["netns", "list"]).output().unwrap();
    let netns = String::from_utf8_lossy(&netns.stdout);
    assert!(
        !netns.contains(&format!("amb-{pid}-")),
        "the interrupted demo left namespaces behind: {netns}"
    );
}

#[test]
#[allow(clippy::disallowed_methods)] // a plain test thread polling a child process
fn run_serves_until_sigterm_then_exits_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let mesh = dir.path().join("mesh.yaml");
    // A subnet of its own, away from the demo's and the in-process tests' addresses.
    std::fs::write(
        &mesh,
        "workloads:\n  - name: a\n    namespace: demo\n    addresses: [127.0.77.2]\n    node: n1\n    tunnelProtocol: HBONE\n",
    )
    .unwrap();
    let state = dir.path().join("state");
    // A file, for the failure messages (a pipe nobody reads is the next test's case).
    let log = dir.path().join("agent.log");
    let mut child = Command::new(BIN)
        .args([
            "run",
            "--mesh",
            mesh.to_str().unwrap(),
            "--node",
            "n1",
            "--state-dir",
            state.to_str().unwrap(),
            "--drain-deadline",
            "2s",
            // Port 15021 of the machine is not ours to take.
            "--readiness-address",
            "127.0.0.1:0",
        ])
        .env("RUST_LOG", "info")
        .stderr(Stdio::from(std::fs::File::create(&log).unwrap()))
        .spawn()
        .unwrap();
    let logs = || std::fs::read_to_string(&log).unwrap_or_default();
    // Wait until it serves HBONE on the workload's address.
    let started = Instant::now();
    while std::net::TcpStream::connect("127.0.77.2:15008").is_err() {
        if started.elapsed() > Duration::from_secs(20) || child.try_wait().unwrap().is_some() {
            let _ = child.kill();
            let _ = child.wait();
            panic!("agent did not start listening:\n{}", logs());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("agent did not stop after SIGTERM:\n{}", logs());
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let stderr = logs();
    assert!(status.success(), "{stderr}");
    assert!(stderr.contains("SIGTERM received"), "{stderr}");
    assert!(
        state.join("root-cert.pem").exists(),
        "root created on first run"
    );
}

/// Kills and reaps the child when the test ends, also when it fails.
struct Reaped(std::process::Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Its stderr is a pipe nobody reads until the end (as a stalled container runtime would):
/// thousands of connections, each logging a line, still go through, and the lines that did
/// not fit are counted in the log once it is read.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_keeps_serving_while_nobody_reads_its_log() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let dir = tempfile::tempdir().unwrap();
    let mesh = dir.path().join("mesh.yaml");
    // A subnet of its own: the client workload, the SOCKS5 listener, and a server outside the
    // mesh (so connections pass through in plain TCP).
    std::fs::write(
        &mesh,
        "workloads:\n  - name: a\n    namespace: demo\n    addresses: [127.0.78.2]\n    node: n1\n",
    )
    .unwrap();
    let socks: std::net::SocketAddr = "127.0.78.1:1080".parse().unwrap();
    let server = tokio::net::TcpListener::bind("127.0.78.9:0").await.unwrap();
    let dst = server.local_addr().unwrap();
    let echo = tokio::spawn(async move {
        loop {
            let (mut s, _) = server.accept().await.unwrap();
            tokio::spawn(async move {
                let mut b = [0u8; 1];
                if s.read_exact(&mut b).await.is_ok() {
                    let _ = s.write_all(&b).await;
                }
            });
        }
    });
    let state = dir.path().join("state");
    let mut child = Reaped(
        Command::new(BIN)
            .args(["run", "--mesh", mesh.to_str().unwrap(), "--node", "n1"])
            .args([
                "--state-dir",
                state.to_str().unwrap(),
                "--drain-deadline",
                "2s",
            ])
            .args([
                "--readiness-address",
                "127.0.0.1:0",
                "--socks5",
                "127.0.78.1:1080",
            ])
            .env("RUST_LOG", "info")
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let mut stderr = child.0.stderr.take().unwrap();
    let started = Instant::now();
    while tokio::net::TcpStream::connect(socks).await.is_err() {
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "no SOCKS5 listener"
        );
        assert!(child.0.try_wait().unwrap().is_none(), "the agent exited");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // ~250 bytes of log each: the 64 KiB pipe is full after a few hundred, the agent's
    // 1 MiB buffer after ~4,000.
    let connections = |n: usize| async move {
        for _ in 0..n {
            let mut s = agent::proxy::socks5::connect(socks, "127.0.78.2".parse().unwrap(), dst)
                .await
                .unwrap()
                .expect("SOCKS5 connect");
            s.write_all(b"x").await.unwrap();
            let mut b = [0u8; 1];
            s.read_exact(&mut b).await.unwrap();
        }
    };
    let all = async {
        tokio::join!(
            connections(1500),
            connections(1500),
            connections(1500),
            connections(1500)
        )
    };
    tokio::time::timeout(Duration::from_secs(120), all)
        .await
        .expect("connections stalled while the log was not read");
    echo.abort();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.0.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let log = tokio::task::spawn_blocking(move || {
        let mut text = String::new();
        std::io::Read::read_to_string(&mut stderr, &mut text).unwrap();
        text
    })
    .await
    .unwrap();
    let status = child.0.wait().unwrap();
    assert!(status.success(), "{log}");
    assert!(log.contains("SIGTERM received"), "{log}");
    let dropped = log.lines().find(|l| l.contains("log lines dropped"));
    assert!(
        dropped.is_some(),
        "no report of dropped lines in {} bytes of log",
        log.len()
    );
    assert!(log.contains("connection complete"));
}
