//! `ambientd bench` (root): what the mesh costs on this node, measured against a direct
//! connection in the same run.
//!
//! It builds the netns harness's two simulated nodes ([`bed`]), runs one pair of real agent
//! processes per mode that needs them, and drives traffic from a client pod on node-1 to a
//! server pod on node-2 with its own load generator ([`load`]): throughput with 1 and 4
//! streams both ways, ping-pong latency, new connections per second, the agents' memory idle
//! and with thousands of idle connections, and their CPU per GB and per 1,000 connections
//! ([`usage`]). Cases are interleaved across modes (case by case, mode by mode, repeat after
//! repeat) so a drift of the machine hits every mode alike; each figure is the median over
//! repeats ([`stats`]). The table goes to stdout, progress to stderr, all raw samples to
//! `--json`, a chart of the ratios to `--svg` ([`report`], [`chart`]). Everything it creates is
//! removed at the end, also on error and Ctrl-C.

pub mod bed;
pub mod chart;
pub mod load;
pub mod report;
pub mod stats;
pub mod usage;

use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use serde::Serialize;

use bed::{Bed, Lane};
use load::{Direction, Interrupt};
use report::{Data, IdleStep, Machine, QuietStep, Sample, Unit};
use usage::{Cpu, Process};

/// Ping-pong message sizes, bytes.
pub const PING_PONG_SIZES: [usize; 2] = [64, 1024];
/// Client threads of the connection-rate case.
pub const CONN_THREADS: [usize; 2] = [1, 4];

/// Pause between samples.
const SETTLE: Duration = Duration::from_millis(100);

/// How the client reaches the server.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    /// No agent, no capture.
    Direct,
    /// Capture on both nodes and HBONE between the agents.
    Mesh,
    /// Capture on both nodes, plain TCP between them (no tunnel).
    Tcp,
}

impl Mode {
    pub fn label(self) -> &'static str {
        match self {
            Mode::Direct => "direct",
            Mode::Mesh => "mesh",
            Mode::Tcp => "tcp",
        }
    }

    /// The pods' `tunnelProtocol`, for modes with agents.
    fn tunnel(self) -> Option<&'static str> {
        match self {
            Mode::Direct => None,
            Mode::Mesh => Some("HBONE"),
            Mode::Tcp => Some("NONE"),
        }
    }

    /// How node-2's agent records the mode's connections.
    fn inbound_direction(self) -> Option<&'static str> {
        match self {
            Mode::Direct => None,
            Mode::Mesh => Some("InboundHbone"),
            Mode::Tcp => Some("InboundPlaintext"),
        }
    }
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.label())
    }
}

/// Groups of cases, as `--cases` names them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum CaseGroup {
    /// Throughput with 1 and 4 streams, both directions, and the agents' CPU per GB.
    Throughput,
    /// Ping-pong round trips of 64 B and 1 KiB.
    Latency,
    /// New connections per second with 1 and 4 threads, and the agents' CPU per connection.
    Connections,
    /// The agents' memory idle, with `--idle-conns` idle connections open, and after the load
    /// (right after it and once they were quiet for `--quiet-for`).
    Memory,
}

impl CaseGroup {
    pub const ALL: [CaseGroup; 4] = [
        CaseGroup::Throughput,
        CaseGroup::Latency,
        CaseGroup::Connections,
        CaseGroup::Memory,
    ];
}

/// What is measured.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Case {
    /// The agents' memory before the load.
    AgentIdle,
    Throughput {
        streams: usize,
        direction: Direction,
    },
    PingPong {
        size: usize,
    },
    ConnRate {
        threads: usize,
    },
    /// Agent memory with `--idle-conns` connections open.
    IdleConns,
    /// Agent memory once the repeat's other cases are over, and while the agents stay quiet.
    AfterLoad,
}

impl Case {
    fn needs_agents(self) -> bool {
        matches!(self, Case::AgentIdle | Case::IdleConns | Case::AfterLoad)
    }

    fn group(self) -> CaseGroup {
        match self {
            Case::AgentIdle | Case::IdleConns | Case::AfterLoad => CaseGroup::Memory,
            Case::Throughput { .. } => CaseGroup::Throughput,
            Case::PingPong { .. } => CaseGroup::Latency,
            Case::ConnRate { .. } => CaseGroup::Connections,
        }
    }
}

impl fmt::Display for Case {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Case::AgentIdle => write!(f, "agent memory idle"),
            Case::Throughput { streams, direction } => {
                write!(f, "throughput {streams}x {}", direction.label())
            }
            Case::PingPong { size } => write!(f, "ping-pong {size} B"),
            Case::ConnRate { threads } => write!(f, "connections {threads}x"),
            Case::IdleConns => write!(f, "idle connections"),
            Case::AfterLoad => write!(f, "memory after the load"),
        }
    }
}

fn secs<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_f64(d.as_secs_f64())
}

/// What to run (the command line's `bench` flags).
#[derive(Debug, Clone, Serialize)]
pub struct Settings {
    pub modes: Vec<Mode>,
    /// Which groups of cases run.
    pub cases: Vec<CaseGroup>,
    /// Measuring window of each sample.
    #[serde(serialize_with = "secs")]
    pub duration: Duration,
    /// Traffic before each window (slow start, pool connections, caches).
    #[serde(serialize_with = "secs")]
    pub warmup: Duration,
    pub repeats: usize,
    /// Open idle connections to measure memory at, ascending.
    pub idle_conns: Vec<usize>,
    /// How long the agents are left without traffic after the load before their memory is
    /// read the last time.
    #[serde(serialize_with = "secs")]
    pub quiet_for: Duration,
    /// Round trips per ping-pong sample, at most.
    pub round_trip_cap: usize,
    /// Connections per connection-rate sample, at most.
    pub conn_cap: usize,
    /// Extra `ambientd run` flags for every agent.
    pub agent_args: Vec<String>,
    /// The agents' binary; this one when unset.
    pub agent_bin: Option<PathBuf>,
    #[serde(skip)]
    pub json: Option<PathBuf>,
    #[serde(skip)]
    pub svg: Option<PathBuf>,
}

impl Settings {
    fn cases(&self) -> Vec<Case> {
        // Memory first, on agents restarted for it; what the load left behind last.
        let mut cases = vec![Case::AgentIdle];
        if !self.idle_conns.is_empty() {
            cases.push(Case::IdleConns);
        }
        cases.extend([1, 4].into_iter().flat_map(|streams| {
            [Direction::Up, Direction::Down]
                .map(|direction| Case::Throughput { streams, direction })
        }));
        cases.extend(PING_PONG_SIZES.map(|size| Case::PingPong { size }));
        cases.extend(CONN_THREADS.map(|threads| Case::ConnRate { threads }));
        cases.push(Case::AfterLoad);
        cases.retain(|c| self.cases.contains(&c.group()));
        cases
    }

    /// Descriptors the bench needs (the client end of every idle connection, and spare),
    /// and those the agents it starts would want (they inherit its limit; a `tcp` mode agent
    /// holds two ends of each connection: the client's, and its own to the server).
    fn descriptors(&self) -> Descriptors {
        let idle = if self.cases.contains(&CaseGroup::Memory) {
            self.idle_conns.iter().copied().max().unwrap_or(0) as u64
        } else {
            0
        };
        Descriptors {
            needed: idle + 1024,
            wanted: 2 * idle + 1024,
        }
    }
}

/// Runs the bench (root only); the table goes to stdout.
pub async fn run(settings: Settings) -> anyhow::Result<()> {
    if !nix::unistd::geteuid().is_root() {
        bail!(
            "ambientd bench needs root: it creates network namespaces, installs capture rules \
             in them and runs agents there (run it with sudo)"
        );
    }
    ensure!(!settings.modes.is_empty(), "--modes is empty");
    let interrupt: Interrupt = Arc::new(AtomicBool::new(false));
    let flag = interrupt.clone();
    let watcher = tokio::spawn(async move {
        use tokio::signal::unix::{SignalKind, signal};
        let Ok(mut term) = signal(SignalKind::terminate()) else {
            return;
        };
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
        eprintln!("\ninterrupted: stopping the agents and removing the namespaces");
        flag.store(true, Ordering::Relaxed);
    });
    let result = tokio::task::spawn_blocking(move || run_blocking(&settings, &interrupt)).await;
    watcher.abort();
    result.context("the bench thread panicked")?
}

fn run_blocking(settings: &Settings, interrupt: &Interrupt) -> anyhow::Result<()> {
    let machine = Machine::current();
    eprintln!("ambientd bench on {}", machine.describe());
    if machine.profile != "release" {
        eprintln!(
            "warning: this is a debug build, whose figures say little about the agent: build \
             with `cargo build --release --bin ambientd`"
        );
    }
    if machine.load_average > 0.5 * machine.cores as f64 {
        eprintln!(
            "warning: the machine is busy (load average {:.2} on {} cores): absolute figures \
             will be noisy; the ratios less so, as modes are interleaved",
            machine.load_average, machine.cores
        );
    }
    let limit = raise_nofile(settings.descriptors())
        .context("raising the open-files limit (RLIMIT_NOFILE)")?;
    eprintln!("open-files limit: {limit}");
    let started = Instant::now();
    if let Some(bin) = &settings.agent_bin {
        eprintln!("agents run from {}", bin.display());
    }
    eprintln!(
        "building two simulated nodes with a client and a server pod per mode ({}) and \
         starting the agents",
        settings
            .modes
            .iter()
            .map(|m| m.label())
            .collect::<Vec<_>>()
            .join(", ")
    );
    let mut bed = Bed::build(
        &settings.modes,
        &settings.agent_args,
        settings.agent_bin.as_deref(),
        interrupt,
    )?;
    eprintln!(
        "agents' mesh files and logs in {} (removed at the end)",
        bed.dir().display()
    );
    let samples = measure(&mut bed, settings, interrupt);
    drop(bed);
    let seconds = started.elapsed().as_secs_f64();
    match crate::demo::topology::leftovers() {
        Ok(left) if left.is_empty() => eprintln!(
            "cleaned up: agents stopped, namespaces and files removed ({seconds:.0} s in all)"
        ),
        Ok(left) => eprintln!("warning: network namespaces left behind: {left:?}"),
        Err(e) => eprintln!("warning: cannot list network namespaces: {e}"),
    }
    let samples = samples?;
    let figures = report::figures(
        &samples,
        &settings.modes,
        &settings.idle_conns,
        settings.quiet_for,
    );
    println!(
        "ambientd bench: {}; {} repeat(s) of {:.1} s windows (after {:.1} s warm-up), medians",
        machine.describe(),
        settings.repeats,
        settings.duration.as_secs_f64(),
        settings.warmup.as_secs_f64()
    );
    print!("{}", report::table(&figures, &settings.modes));
    let notes = report::notes(&samples);
    if !notes.is_empty() {
        println!("\nnot measured:");
        for n in notes {
            println!("  {n}");
        }
    }
    if let Some(path) = &settings.json {
        let report = report::Report {
            machine: &machine,
            settings,
            seconds,
            figures: &figures,
            samples: &samples,
        };
        let file =
            std::fs::File::create(path).with_context(|| format!("creating {}", path.display()))?;
        serde_json::to_writer(std::io::BufWriter::new(file), &report)
            .with_context(|| format!("writing {}", path.display()))?;
        eprintln!("raw samples and figures written to {}", path.display());
    }
    if let Some(path) = &settings.svg {
        std::fs::write(path, chart::svg(&figures, &machine))
            .with_context(|| format!("writing {}", path.display()))?;
        eprintln!("chart written to {}", path.display());
    }
    Ok(())
}

/// Open files for the bench's process, and so for the agents it starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Descriptors {
    /// Without these the bench cannot run its cases.
    needed: u64,
    /// With these, no agent runs out either.
    wanted: u64,
}

/// Raises the soft open-files limit to the hard one, and both to `wanted` when the hard
/// limit is lower and this process may (CAP_SYS_RESOURCE); fails only when even `needed`
/// is out of reach. Returns the soft limit now: an agent that cannot hold a memory step
/// gets it listed as not measured.
fn raise_nofile(want: Descriptors) -> anyhow::Result<u64> {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE)?;
    let target = hard.max(want.wanted);
    if soft >= target {
        return Ok(soft);
    }
    if setrlimit(Resource::RLIMIT_NOFILE, target, target).is_ok() {
        return Ok(target);
    }
    ensure!(
        hard >= want.needed,
        "{} open files are needed for --idle-conns, the limit is {soft} (hard {hard}) and \
         cannot be raised here: lower --idle-conns or raise `ulimit -Hn`",
        want.needed
    );
    if soft < hard {
        setrlimit(Resource::RLIMIT_NOFILE, hard, hard)?;
    }
    Ok(hard)
}

fn measure(bed: &mut Bed, s: &Settings, interrupt: &Interrupt) -> anyhow::Result<Vec<Sample>> {
    let mut samples = Vec::new();
    let cases = s.cases();
    let per_repeat: usize = cases
        .iter()
        .map(|c| {
            bed.lanes
                .iter()
                .filter(|l| !c.needs_agents() || !l.agents.is_empty())
                .count()
        })
        .sum();
    let total = per_repeat * s.repeats;
    let mut done = 0;
    for repeat in 1..=s.repeats {
        for &case in &cases {
            for i in 0..bed.lanes.len() {
                if case.needs_agents() && bed.lanes[i].agents.is_empty() {
                    continue;
                }
                let started = Instant::now();
                if case == Case::AgentIdle {
                    bed.restart_agents(i, interrupt)
                        .with_context(|| format!("restarting the {} agents", bed.lanes[i].mode))?;
                    load::sleep(Duration::from_millis(500), interrupt)?;
                }
                let lane = &bed.lanes[i];
                let data = match sample(bed, lane, case, s, interrupt) {
                    Ok(data) => data,
                    Err(_) if interrupt.load(Ordering::Relaxed) => bail!("interrupted"),
                    Err(e) => Data::Failed {
                        error: crate::describe(&e),
                    },
                };
                done += 1;
                eprintln!(
                    "[{done:>3}/{total}] repeat {repeat} {:<6} {:<22} {}  ({:.1} s)",
                    bed.lanes[i].mode.label(),
                    case.to_string(),
                    headline(&data),
                    started.elapsed().as_secs_f64()
                );
                samples.push(Sample {
                    mode: bed.lanes[i].mode,
                    repeat,
                    case,
                    data,
                });
                bed.lanes[i].check_agents()?;
                // Let the last sample's connections wind down before the next one starts.
                load::sleep(SETTLE, interrupt)?;
            }
        }
    }
    Ok(samples)
}

/// A sample in a few words, for the progress line.
fn headline(data: &Data) -> String {
    match data {
        Data::AgentIdle { agents } => agents
            .iter()
            .map(|u| report::format_value(Unit::Bytes, u.rss as f64))
            .collect::<Vec<_>>()
            .join(", "),
        Data::Throughput { bytes_per_s, .. } => format!("{:.0} MB/s", bytes_per_s / 1e6),
        Data::PingPong { rtt_ns } => {
            let p = stats::latency_percentiles(rtt_ns);
            format!(
                "p50 {:.1} µs, p99 {:.1} µs ({} round trips)",
                p[0].1.unwrap_or(0) as f64 / 1e3,
                p[2].1.unwrap_or(0) as f64 / 1e3,
                rtt_ns.len()
            )
        }
        Data::ConnRate {
            conns_per_s,
            errors,
            ..
        } => format!("{conns_per_s:.0}/s ({errors} errors)"),
        Data::IdleConns {
            before,
            steps,
            error,
        } => {
            let mut parts: Vec<String> = steps
                .iter()
                .map(|s| {
                    let grew: f64 = s
                        .agents
                        .iter()
                        .zip(before)
                        .map(|(a, b)| a.rss as f64 - b.rss as f64)
                        .sum();
                    format!(
                        "{}: {:.2} KiB/conn",
                        s.conns,
                        grew / s.conns as f64 / 1024.0
                    )
                })
                .collect();
            parts.extend(error.iter().map(|e| format!("STOPPED: {e}")));
            parts.join(", ")
        }
        Data::AfterLoad { quiet } => {
            let (Some(first), Some(last)) = (quiet.first(), quiet.last()) else {
                return String::new();
            };
            first
                .agents
                .iter()
                .zip(&last.agents)
                .enumerate()
                .map(|(i, (a, b))| {
                    format!(
                        "node-{} {} → {}",
                        i + 1,
                        report::format_value(Unit::Bytes, a.rss as f64),
                        report::format_value(Unit::Bytes, b.rss as f64)
                    )
                })
                .collect::<Vec<_>>()
                .join(", ")
        }
        Data::Failed { error } => format!("FAILED: {error}"),
    }
}

/// Each agent's CPU seconds between two readings: in all, and of them in the kernel.
fn cpu_delta(before: &[Cpu], after: &[Cpu]) -> (Vec<f64>, Vec<f64>) {
    before
        .iter()
        .zip(after)
        .map(|(b, a)| (a.total() - b.total(), a.system_s - b.system_s))
        .unzip()
}

fn sample(
    bed: &Bed,
    lane: &Lane,
    case: Case,
    s: &Settings,
    interrupt: &Interrupt,
) -> anyhow::Result<Data> {
    let client = &bed.client(lane).ns;
    let window = (s.warmup, s.duration);
    let meter = || {
        (
            lane.agent_cpu(),
            Process::Current.cpu_s().unwrap_or(f64::NAN),
        )
    };
    Ok(match case {
        Case::AgentIdle => Data::AgentIdle {
            agents: lane.agent_usage()?,
        },
        Case::Throughput { streams, direction } => {
            let (moved, (a0, g0), (a1, g1)) = load::throughput(
                client,
                &lane.server,
                streams,
                direction,
                window,
                interrupt,
                meter,
            )?;
            let (agent_cpu_s, agent_system_cpu_s) = cpu_delta(&a0, &a1);
            Data::Throughput {
                bytes: moved.bytes,
                seconds: moved.seconds,
                bytes_per_s: moved.bytes as f64 / moved.seconds,
                agent_cpu_s,
                agent_system_cpu_s,
                generator_cpu_s: g1 - g0,
            }
        }
        Case::PingPong { size } => Data::PingPong {
            rtt_ns: load::ping_pong(
                client,
                &lane.server,
                size,
                window,
                s.round_trip_cap,
                interrupt,
            )?,
        },
        Case::ConnRate { threads } => {
            let (c, (a0, g0), (a1, g1)) = load::connection_rate(
                client,
                &lane.server,
                threads,
                window,
                s.conn_cap,
                interrupt,
                meter,
            )?;
            let (agent_cpu_s, agent_system_cpu_s) = cpu_delta(&a0, &a1);
            Data::ConnRate {
                conns: c.conns,
                errors: c.errors,
                seconds: c.seconds,
                conns_per_s: c.conns as f64 / c.seconds,
                agent_cpu_s,
                agent_system_cpu_s,
                generator_cpu_s: g1 - g0,
                latency_ns: c.latency_ns,
            }
        }
        Case::IdleConns => idle(bed, lane, s, interrupt)?,
        Case::AfterLoad => after_load(lane, s.quiet_for, interrupt)?,
    })
}

/// Reads the agents' memory as soon as the repeat's load is over, then about once a second
/// while they carry no traffic, until `quiet_for` has passed: what a burst leaves behind,
/// and how much of it they give back (jemalloc's freed pages age out over ~10 s).
fn after_load(lane: &Lane, quiet_for: Duration, interrupt: &Interrupt) -> anyhow::Result<Data> {
    let start = Instant::now();
    let mut quiet = vec![QuietStep {
        after_s: 0.0,
        agents: lane.agent_usage()?,
    }];
    while let Some(left) = quiet_for
        .checked_sub(start.elapsed())
        .filter(|d| !d.is_zero())
    {
        load::sleep(left.min(Duration::from_secs(1)), interrupt)?;
        quiet.push(QuietStep {
            after_s: start.elapsed().as_secs_f64(),
            agents: lane.agent_usage()?,
        });
    }
    Ok(Data::AfterLoad { quiet })
}

/// Opens `--idle-conns` connections step by step and reads the agents' memory at each step;
/// every agent must hold at least one more descriptor per connection (its end of it). A step
/// the agents' open-files limit cannot hold is not tried; the steps before it are kept.
fn idle(bed: &Bed, lane: &Lane, s: &Settings, interrupt: &Interrupt) -> anyhow::Result<Data> {
    let client = &bed.client(lane).ns;
    let before = lane.agent_usage()?;
    let limits = lane.agent_nofile()?;
    let mut open = Vec::new();
    let mut steps: Vec<IdleStep> = Vec::new();
    let result = (|| -> anyhow::Result<()> {
        for &n in &s.idle_conns {
            if let Some(last) = steps.last() {
                for (i, ((a, b), limit)) in last.agents.iter().zip(&before).zip(&limits).enumerate()
                {
                    let per_conn = (a.fds.saturating_sub(b.fds)) as f64 / last.conns as f64;
                    let need = b.fds as f64 + per_conn * n as f64 + 64.0;
                    ensure!(
                        need <= *limit as f64,
                        "{n} connections need about {need:.0} descriptors in node-{}'s agent \
                         ({per_conn:.1} per connection), over its limit of {limit}",
                        i + 1
                    );
                }
            }
            load::open_idle(client, &lane.server, &mut open, n, interrupt)
                .with_context(|| format!("opening {n} idle connections"))?;
            // The agents' last steps (delivery, records) finish after the echo.
            load::sleep(Duration::from_millis(300), interrupt)?;
            let agents = lane.agent_usage()?;
            for (a, b) in agents.iter().zip(&before) {
                ensure!(
                    a.fds >= b.fds + n as u64,
                    "an agent holds {} descriptors with {n} connections open, {} before: the \
                     connections do not all pass through it",
                    a.fds,
                    b.fds
                );
            }
            steps.push(IdleStep { conns: n, agents });
        }
        Ok(())
    })();
    drop(open);
    // Let the agents close their ends before the next case.
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        let now = lane.agent_usage()?;
        if now.iter().zip(&before).all(|(a, b)| a.fds <= b.fds + 16) {
            break;
        }
        load::sleep(Duration::from_millis(50), interrupt)?;
    }
    if interrupt.load(Ordering::Relaxed) {
        bail!("interrupted");
    }
    Ok(Data::IdleConns {
        before,
        steps,
        error: result.err().map(|e| crate::describe(&e)),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(cases: &[CaseGroup], idle_conns: Vec<usize>) -> Settings {
        Settings {
            modes: vec![Mode::Direct, Mode::Mesh],
            cases: cases.to_vec(),
            duration: Duration::from_secs(1),
            warmup: Duration::ZERO,
            repeats: 1,
            idle_conns,
            quiet_for: Duration::from_secs(1),
            round_trip_cap: 10,
            conn_cap: 10,
            agent_args: Vec::new(),
            agent_bin: None,
            json: None,
            svg: None,
        }
    }

    /// `--cases` picks whole groups; memory comes first, what the load left behind last; idle
    /// connections only count towards the descriptors needed when memory is measured, twice
    /// (a `tcp` agent holds both ends).
    #[test]
    fn cases_follow_the_selected_groups() {
        let all = settings(&CaseGroup::ALL, vec![5000]);
        assert_eq!(all.cases().len(), 2 + 4 + 2 + 2 + 1);
        assert_eq!(all.cases()[0], Case::AgentIdle);
        assert_eq!(all.cases().last(), Some(&Case::AfterLoad));
        assert_eq!(
            all.descriptors(),
            Descriptors {
                needed: 5000 + 1024,
                wanted: 2 * 5000 + 1024
            }
        );
        let latency = settings(&[CaseGroup::Latency], vec![5000]);
        assert_eq!(
            latency.cases(),
            [Case::PingPong { size: 64 }, Case::PingPong { size: 1024 }]
        );
        assert_eq!(
            latency.descriptors(),
            Descriptors {
                needed: 1024,
                wanted: 1024
            }
        );
        let some = settings(&[CaseGroup::Connections, CaseGroup::Memory], Vec::new());
        assert_eq!(
            some.cases(),
            [
                Case::AgentIdle,
                Case::ConnRate { threads: 1 },
                Case::ConnRate { threads: 4 },
                Case::AfterLoad
            ]
        );
    }
}
