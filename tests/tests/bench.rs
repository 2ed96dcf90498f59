//! Root only: `ambientd bench --quick` end to end — the real binary builds its nodes, runs
//! its agents, measures every case in every mode, writes the JSON and SVG, and leaves nothing
//! behind (namespaces, agent processes, files). Without root it is skipped, unless `CI` is
//! set, where it fails.

use std::collections::BTreeSet;
use std::process::Command;

use anyhow::{Context, ensure};
use serde_json::Value;
use tests::netns::{ambientd_bin, root_or_skip};

fn cases_of(samples: &[Value], mode: &str) -> BTreeSet<String> {
    samples
        .iter()
        .filter(|s| s["mode"] == mode)
        .map(|s| s["case"].to_string())
        .collect()
}

/// One CPU reading per agent, and its kernel part within it (both are counted in clock
/// ticks, so allow one).
fn check_agent_cpu(d: &Value, agents: usize) -> anyhow::Result<()> {
    let all = d["agent_cpu_s"].as_array().context("agent_cpu_s")?;
    let kernel = d["agent_system_cpu_s"]
        .as_array()
        .context("agent_system_cpu_s")?;
    ensure!(all.len() == agents && kernel.len() == agents, "{d}");
    for (a, k) in all.iter().zip(kernel) {
        let (a, k) = (a.as_f64().context("cpu")?, k.as_f64().context("cpu")?);
        ensure!(
            (0.0..=a + 0.011).contains(&k),
            "kernel {k} of {a} CPU-s: {d}"
        );
    }
    Ok(())
}

fn check_sample(s: &Value) -> anyhow::Result<()> {
    let data = s["data"].as_object().context("data is an object")?;
    let (kind, d) = data.iter().next().context("data names its kind")?;
    let agents = if s["mode"] == "direct" { 0 } else { 2 };
    match kind.as_str() {
        "throughput" => {
            ensure!(d["bytes_per_s"].as_f64() > Some(0.0), "no throughput: {s}");
            check_agent_cpu(d, agents)?;
        }
        "ping_pong" => {
            let rtt = d["rtt_ns"].as_array().context("rtt_ns")?;
            ensure!(!rtt.is_empty() && rtt.iter().all(|v| v.as_u64() > Some(0)));
        }
        "conn_rate" => {
            ensure!(d["conns"].as_u64() > Some(0), "no connections: {s}");
            ensure!(d["conns_per_s"].as_f64() > Some(0.0));
            ensure!(
                d["latency_ns"].as_array().map(Vec::len) == d["conns"].as_u64().map(|n| n as usize)
            );
            check_agent_cpu(d, agents)?;
        }
        "agent_idle" => {
            let a = d["agents"].as_array().context("agents")?;
            ensure!(a.len() == 2 && a.iter().all(|u| u["rss"].as_u64() > Some(0)));
        }
        "idle_conns" => {
            let before = d["before"].as_array().context("before")?;
            ensure!(d["error"].is_null(), "{s}");
            let step = &d["steps"][0];
            ensure!(step["conns"] == 100, "{s}");
            for (a, b) in step["agents"]
                .as_array()
                .context("agents")?
                .iter()
                .zip(before)
            {
                ensure!(
                    a["fds"].as_u64() >= b["fds"].as_u64().map(|f| f + 100),
                    "{s}"
                );
                ensure!(a["rss"].as_u64() > Some(0));
            }
        }
        "after_load" => {
            // --quick leaves the agents quiet for 1 s, read about once a second.
            let quiet = d["quiet"].as_array().context("quiet")?;
            ensure!((2..=3).contains(&quiet.len()), "{s}");
            ensure!(quiet[0]["after_s"] == 0.0, "{s}");
            let last = quiet.last().context("a last reading")?;
            ensure!(last["after_s"].as_f64() >= Some(1.0), "{s}");
            for step in quiet {
                let a = step["agents"].as_array().context("agents")?;
                ensure!(a.len() == 2 && a.iter().all(|u| u["rss"].as_u64() > Some(0)));
            }
        }
        other => anyhow::bail!("sample failed or unknown ({other}): {s}"),
    }
    Ok(())
}

#[test]
#[allow(clippy::disallowed_methods)] // a plain test thread polling a child process
fn quick_bench_measures_every_case_in_every_mode_and_cleans_up() -> anyhow::Result<()> {
    if !root_or_skip("quick_bench_measures_every_case_in_every_mode_and_cleans_up") {
        return Ok(());
    }
    let out_dir = tempfile::tempdir()?;
    let json = out_dir.path().join("bench.json");
    let svg = out_dir.path().join("bench.svg");
    let mut child = Command::new(ambientd_bin()?)
        .args(["bench", "--quick", "--idle-conns", "100", "--json"])
        .arg(&json)
        .arg("--svg")
        .arg(&svg)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()?;
    let pid = child.id();
    // The bench bounds itself; this bounds a hang of the bench itself.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
    while child.try_wait()?.is_none() {
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            anyhow::bail!("ambientd bench --quick did not finish in 120 s");
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let out = child.wait_with_output()?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    ensure!(out.status.success(), "bench failed:\n{stderr}\n{stdout}");
    ensure!(
        stdout.contains("throughput, 1 stream, client→server"),
        "{stdout}"
    );
    ensure!(stderr.contains("cleaned up"), "{stderr}");

    // Nothing of the run is left: namespaces, its directory, agents running from it.
    let netns = agent::demo::topology::ip(&["netns", "list"])?;
    let prefix = format!("amb-{pid}-");
    ensure!(!netns.contains(&prefix), "namespaces left behind:\n{netns}");
    let dir = stderr
        .lines()
        .find_map(|l| l.strip_prefix("agents' mesh files and logs in "))
        .and_then(|l| l.split(' ').next())
        .context("the bench names its directory")?;
    ensure!(!std::path::Path::new(dir).exists(), "{dir} left behind");
    for entry in std::fs::read_dir("/proc")? {
        let cmdline = std::fs::read(entry?.path().join("cmdline")).unwrap_or_default();
        ensure!(
            !String::from_utf8_lossy(&cmdline).contains(dir),
            "an agent of the bench still runs: {}",
            String::from_utf8_lossy(&cmdline).replace('\0', " ")
        );
    }

    let report: Value = serde_json::from_slice(&std::fs::read(&json)?)?;
    let samples = report["samples"].as_array().context("samples")?;
    let direct = cases_of(samples, "direct");
    ensure!(
        direct.len() == 8,
        "direct: 4 throughput, 2 ping-pong, 2 connection cases: {direct:?}"
    );
    for mode in ["mesh", "tcp"] {
        let cases = cases_of(samples, mode);
        ensure!(cases.is_superset(&direct), "{mode} misses cases: {cases:?}");
        ensure!(
            cases.len() == 11,
            "{mode}: plus agent idle, idle connections and memory after the load: {cases:?}"
        );
    }
    for s in samples {
        check_sample(s)?;
    }
    for mode in ["mesh", "tcp"] {
        let cpu: f64 = samples
            .iter()
            .filter(|s| s["mode"] == mode)
            .filter_map(|s| s["data"]["throughput"]["agent_cpu_s"].as_array())
            .flatten()
            .filter_map(Value::as_f64)
            .sum();
        ensure!(cpu > 0.0, "{mode}'s agents used no CPU moving bytes");
    }
    // Every figure compared with direct has a positive value and ratio in every mode.
    for f in report["figures"].as_array().context("figures")? {
        if f["ratios"].as_array().is_some_and(|r| !r.is_empty()) {
            for (mode, v) in f["values"]
                .as_array()
                .context("values")?
                .iter()
                .map(|p| (&p[0], &p[1]))
            {
                ensure!(
                    v.as_f64() > Some(0.0),
                    "{} has no {mode} value: {f}",
                    f["key"]
                );
            }
            for r in f["ratios"].as_array().context("ratios")? {
                ensure!(r[1].as_f64() > Some(0.0), "{} has no ratio: {f}", f["key"]);
            }
        }
    }
    ensure!(report["machine"]["cores"].as_u64() > Some(0));
    let chart = std::fs::read_to_string(&svg)?;
    ensure!(chart.starts_with("<svg") && chart.contains("mesh target"));
    Ok(())
}
