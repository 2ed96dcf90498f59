//! What a bench run found: every raw sample, the figures derived from them (median over
//! repeats, ratio to `direct`, the target the mesh is held to), and their renderings — the
//! table on stdout and the JSON file. The chart is in [`super::chart`].

use std::fmt::Write as _;
use std::time::Duration;

use serde::Serialize;

use super::load::Direction;
use super::stats::{self, PERCENTILES};
use super::usage::Usage;
use super::{Case, Mode};

/// One measurement of one case in one mode and repeat.
#[derive(Debug, Clone, Serialize)]
pub struct Sample {
    pub mode: Mode,
    /// 1-based.
    pub repeat: usize,
    pub case: Case,
    pub data: Data,
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Data {
    /// Agents started afresh for it, once they enrolled their pods and carried one
    /// connection.
    AgentIdle {
        agents: Vec<Usage>,
    },
    Throughput {
        bytes: u64,
        seconds: f64,
        bytes_per_s: f64,
        /// CPU seconds of each agent (node-1, node-2) during the window.
        agent_cpu_s: Vec<f64>,
        /// The part of `agent_cpu_s` in the kernel (system time).
        agent_system_cpu_s: Vec<f64>,
        /// CPU seconds of the bench process (the load generator) during the window.
        generator_cpu_s: f64,
    },
    PingPong {
        rtt_ns: Vec<u64>,
    },
    ConnRate {
        conns: u64,
        errors: u64,
        seconds: f64,
        conns_per_s: f64,
        agent_cpu_s: Vec<f64>,
        agent_system_cpu_s: Vec<f64>,
        generator_cpu_s: f64,
        latency_ns: Vec<u64>,
    },
    IdleConns {
        /// The agents before the connections were opened.
        before: Vec<Usage>,
        steps: Vec<IdleStep>,
        /// Why the steps after the last one were not measured.
        error: Option<String>,
    },
    /// The agents' memory when the repeat's other cases were over (the first step), then
    /// about once a second while they carried no traffic.
    AfterLoad {
        quiet: Vec<QuietStep>,
    },
    /// The sample could not be taken; the error says why.
    Failed {
        error: String,
    },
}

#[derive(Debug, Clone, Serialize)]
pub struct IdleStep {
    pub conns: usize,
    pub agents: Vec<Usage>,
}

#[derive(Debug, Clone, Serialize)]
pub struct QuietStep {
    /// Seconds since the load was over.
    pub after_s: f64,
    pub agents: Vec<Usage>,
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Unit {
    BytesPerS,
    /// Latency, stored in ns.
    Nanos,
    PerS,
    Bytes,
    /// Memory per connection, bytes.
    BytesPerConn,
    CpuSPerGb,
    CpuSPer1kConns,
}

/// What the mesh mode is held to.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Target {
    RatioAtLeast(f64),
    RatioAtMost(f64),
    AtMost(f64),
}

/// One row of the table.
#[derive(Debug, Clone, Serialize)]
pub struct Figure {
    pub key: String,
    pub label: String,
    pub unit: Unit,
    /// Median over repeats, per mode (in the run's mode order).
    pub values: Vec<(Mode, Option<f64>)>,
    /// Value ÷ direct's, per mode other than direct; empty when the figure has no direct.
    pub ratios: Vec<(Mode, Option<f64>)>,
    /// The lowest and highest of the ratios taken repeat by repeat (each mode ÷ direct of the
    /// same repeat), per mode in `ratios`; `None` with fewer than two repeats measured in both.
    /// How far the ratio moved between repeats: a difference between two runs within it is
    /// noise.
    pub ratio_ranges: Vec<(Mode, Option<(f64, f64)>)>,
    pub target: Option<Target>,
    /// Whether `mesh` meets the target; `None` when not measured.
    pub met: Option<bool>,
}

/// The machine the figures come from.
#[derive(Debug, Clone, Serialize)]
pub struct Machine {
    pub cores: usize,
    pub memory_bytes: u64,
    pub cpu: String,
    pub kernel: String,
    /// `release` or `debug` (figures of a debug build mean little).
    pub profile: &'static str,
    /// The 1-minute load average when the run started: other work on the machine makes
    /// every figure noisier (ratios less so, as the modes are interleaved).
    pub load_average: f64,
}

impl Machine {
    pub fn current() -> Machine {
        let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
        let memory_kib = meminfo
            .lines()
            .find_map(|l| l.strip_prefix("MemTotal:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .unwrap_or(0);
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let cpu = cpuinfo
            .lines()
            .find_map(|l| l.strip_prefix("model name")?.split_once(':'))
            .map(|(_, v)| v.trim().to_owned())
            .unwrap_or_else(|| "unknown".into());
        Machine {
            cores: std::thread::available_parallelism().map_or(0, usize::from),
            memory_bytes: memory_kib * 1024,
            cpu,
            kernel: nix::sys::utsname::uname()
                .map(|u| u.release().to_string_lossy().into_owned())
                .unwrap_or_else(|_| "unknown".into()),
            profile: if cfg!(debug_assertions) {
                "debug"
            } else {
                "release"
            },
            load_average: std::fs::read_to_string("/proc/loadavg")
                .ok()
                .and_then(|l| l.split_whitespace().next()?.parse().ok())
                .unwrap_or(0.0),
        }
    }

    pub fn describe(&self) -> String {
        format!(
            "{} cores ({}), {:.1} GiB, Linux {}, {} build, load average {:.2} at start",
            self.cores,
            self.cpu,
            self.memory_bytes as f64 / (1u64 << 30) as f64,
            self.kernel,
            self.profile,
            self.load_average
        )
    }
}

/// Everything `--json` writes.
#[derive(Debug, Serialize)]
pub struct Report<'a> {
    pub machine: &'a Machine,
    pub settings: &'a super::Settings,
    pub seconds: f64,
    pub figures: &'a [Figure],
    pub samples: &'a [Sample],
}

/// Reads a figure's value from one sample.
type Read = Box<dyn Fn(&Data) -> Option<f64>>;

/// How one figure is read from the samples of one case.
struct Def {
    key: String,
    label: String,
    unit: Unit,
    case: Case,
    read: Read,
    /// Compared with direct.
    ratio: bool,
    target: Option<Target>,
}

const THROUGHPUT: [(usize, Direction); 4] = [
    (1, Direction::Up),
    (1, Direction::Down),
    (4, Direction::Up),
    (4, Direction::Down),
];

fn streams(n: usize) -> String {
    if n == 1 {
        "1 stream".into()
    } else {
        format!("{n} streams")
    }
}

fn threads(n: usize) -> String {
    if n == 1 {
        "1 thread".into()
    } else {
        format!("{n} threads")
    }
}

fn percentile_of(samples: &[u64], q: f64) -> Option<f64> {
    let mut sorted = samples.to_vec();
    sorted.sort_unstable();
    stats::percentile(&sorted, q).map(|v| v as f64)
}

fn sum(v: &[f64]) -> f64 {
    v.iter().sum()
}

/// The row under each agent CPU figure: system time, i.e. system calls and the network
/// stack's work done while an agent ran (without kTLS, the TLS records are user time).
const KERNEL_LABEL: &str = "  of which in the kernel";

fn kernel_key(kernel: bool) -> &'static str {
    if kernel { "kernel_" } else { "" }
}

/// The agents' CPU seconds, in all or the kernel's part, per unit of `work` (GB moved,
/// thousands of connections); none without agents or work.
fn cpu_per(all: &[f64], kernel_part: &[f64], kernel: bool, work: f64) -> Option<f64> {
    let cpu = if kernel { kernel_part } else { all };
    (!all.is_empty() && work > 0.0).then(|| sum(cpu) / work)
}

fn defs(idle_conns: &[usize], quiet_for: Duration) -> Vec<Def> {
    let mut defs = Vec::new();
    for (n, dir) in THROUGHPUT {
        defs.push(Def {
            key: format!("throughput_{n}_{}", dir.label()),
            label: format!("throughput, {}, {}", streams(n), dir.arrow()),
            unit: Unit::BytesPerS,
            case: Case::Throughput {
                streams: n,
                direction: dir,
            },
            read: Box::new(|d| match d {
                Data::Throughput { bytes_per_s, .. } => Some(*bytes_per_s),
                _ => None,
            }),
            ratio: true,
            target: (n == 1).then_some(Target::RatioAtLeast(0.40)),
        });
    }
    for size in super::PING_PONG_SIZES {
        for (name, q) in PERCENTILES {
            defs.push(Def {
                key: format!("ping_pong_{size}_{name}"),
                label: format!("ping-pong {} {name}", size_label(size)),
                unit: Unit::Nanos,
                case: Case::PingPong { size },
                read: Box::new(move |d| match d {
                    Data::PingPong { rtt_ns } => percentile_of(rtt_ns, q),
                    _ => None,
                }),
                ratio: true,
                target: match name {
                    "p50" => Some(Target::RatioAtMost(3.3)),
                    "p99" => Some(Target::RatioAtMost(3.2)),
                    _ => None,
                },
            });
        }
    }
    for n in super::CONN_THREADS {
        let case = Case::ConnRate { threads: n };
        defs.push(Def {
            key: format!("conn_rate_{n}"),
            label: format!("new connections, {}", threads(n)),
            unit: Unit::PerS,
            case,
            read: Box::new(|d| match d {
                Data::ConnRate { conns_per_s, .. } => Some(*conns_per_s),
                _ => None,
            }),
            ratio: true,
            target: (n == 1).then_some(Target::RatioAtLeast(0.33)),
        });
        for (name, q) in PERCENTILES {
            defs.push(Def {
                key: format!("conn_latency_{n}_{name}"),
                label: format!("  connection latency {name}"),
                unit: Unit::Nanos,
                case,
                read: Box::new(move |d| match d {
                    Data::ConnRate { latency_ns, .. } => percentile_of(latency_ns, q),
                    _ => None,
                }),
                ratio: true,
                target: None,
            });
        }
    }
    // Each CPU row, then the part of it the kernel ran on the agents' behalf.
    for (n, dir) in THROUGHPUT {
        let case = Case::Throughput {
            streams: n,
            direction: dir,
        };
        for kernel in [false, true] {
            defs.push(Def {
                key: format!("agent_{}cpu_per_gb_{n}_{}", kernel_key(kernel), dir.label()),
                label: if kernel {
                    KERNEL_LABEL.to_owned()
                } else {
                    format!("agent CPU per GB, {}, {}", streams(n), dir.arrow())
                },
                unit: Unit::CpuSPerGb,
                case,
                read: Box::new(move |d| match d {
                    Data::Throughput {
                        bytes,
                        agent_cpu_s,
                        agent_system_cpu_s,
                        ..
                    } => cpu_per(agent_cpu_s, agent_system_cpu_s, kernel, *bytes as f64 / 1e9),
                    _ => None,
                }),
                ratio: false,
                target: (!kernel).then_some(Target::AtMost(0.5)),
            });
        }
    }
    for n in super::CONN_THREADS {
        for kernel in [false, true] {
            defs.push(Def {
                key: format!("agent_{}cpu_per_1k_conns_{n}", kernel_key(kernel)),
                label: if kernel {
                    KERNEL_LABEL.to_owned()
                } else {
                    format!("agent CPU per 1,000 connections, {}", threads(n))
                },
                unit: Unit::CpuSPer1kConns,
                case: Case::ConnRate { threads: n },
                read: Box::new(move |d| match d {
                    Data::ConnRate {
                        conns,
                        agent_cpu_s,
                        agent_system_cpu_s,
                        ..
                    } => cpu_per(
                        agent_cpu_s,
                        agent_system_cpu_s,
                        kernel,
                        *conns as f64 / 1000.0,
                    ),
                    _ => None,
                }),
                ratio: false,
                target: None,
            });
        }
    }
    for (i, node) in ["node-1", "node-2"].into_iter().enumerate() {
        defs.push(Def {
            key: format!("agent_rss_idle_{node}"),
            label: format!("agent RSS idle, {node}"),
            unit: Unit::Bytes,
            case: Case::AgentIdle,
            read: Box::new(move |d| match d {
                Data::AgentIdle { agents } => agents.get(i).map(|u| u.rss as f64),
                _ => None,
            }),
            ratio: false,
            target: Some(Target::AtMost(10.0 * 1024.0 * 1024.0)),
        });
        defs.push(Def {
            key: format!("agent_rss_anon_idle_{node}"),
            label: "  of which anonymous (heap, stacks)".to_owned(),
            unit: Unit::Bytes,
            case: Case::AgentIdle,
            read: Box::new(move |d| match d {
                Data::AgentIdle { agents } => agents.get(i).map(|u| u.rss_anon as f64),
                _ => None,
            }),
            ratio: false,
            target: None,
        });
    }
    for &n in idle_conns {
        for (who, pick) in [
            ("node-1", Some(0)),
            ("node-2", Some(1)),
            ("both agents", None),
        ] {
            defs.push(Def {
                key: format!(
                    "agent_rss_per_conn_{n}_{}",
                    who.replace(' ', "_").replace('-', "")
                ),
                label: format!("agent RSS per idle connection, {n} open, {who}"),
                unit: Unit::BytesPerConn,
                case: Case::IdleConns,
                read: Box::new(move |d| match d {
                    Data::IdleConns { before, steps, .. } => {
                        let step = steps.iter().find(|s| s.conns == n)?;
                        let grew = |i: usize| -> Option<f64> {
                            Some(step.agents.get(i)?.rss as f64 - before.get(i)?.rss as f64)
                        };
                        let total = match pick {
                            Some(i) => grew(i)?,
                            None => (0..before.len()).map(grew).sum::<Option<f64>>()?,
                        };
                        Some(total / n as f64)
                    }
                    _ => None,
                }),
                ratio: false,
                target: pick.is_none().then_some(Target::AtMost(4.0 * 1024.0)),
            });
        }
    }
    let quiet = format_duration(quiet_for);
    for (i, node) in ["node-1", "node-2"].into_iter().enumerate() {
        // The first reading (right after the load) and the last (after `quiet_for`).
        for (when, key, last) in [
            ("right after the load".to_owned(), "after_load", false),
            (format!("{quiet} after the load"), "quiet", true),
        ] {
            let step = move |d: &Data| -> Option<Usage> {
                match d {
                    Data::AfterLoad { quiet } => {
                        let step = if last { quiet.last() } else { quiet.first() }?;
                        step.agents.get(i).copied()
                    }
                    _ => None,
                }
            };
            defs.push(Def {
                key: format!("agent_rss_{key}_{node}"),
                label: format!("agent RSS {when}, {node}"),
                unit: Unit::Bytes,
                case: Case::AfterLoad,
                read: Box::new(move |d| step(d).map(|u| u.rss as f64)),
                ratio: false,
                target: None,
            });
            defs.push(Def {
                key: format!("agent_rss_anon_{key}_{node}"),
                label: "  of which anonymous (heap, stacks)".to_owned(),
                unit: Unit::Bytes,
                case: Case::AfterLoad,
                read: Box::new(move |d| step(d).map(|u| u.rss_anon as f64)),
                ratio: false,
                target: None,
            });
        }
    }
    defs
}

/// `10 s`, `1.5 s`, `5 min`: a quiet period as the table names it.
fn format_duration(d: Duration) -> String {
    let s = d.as_secs_f64();
    if s >= 60.0 && d.as_secs().is_multiple_of(60) && d.subsec_nanos() == 0 {
        format!("{} min", d.as_secs() / 60)
    } else {
        format!("{s} s")
    }
}

fn size_label(size: usize) -> String {
    if size >= 1024 && size.is_multiple_of(1024) {
        format!("{} KiB", size / 1024)
    } else {
        format!("{size} B")
    }
}

impl Direction {
    fn arrow(self) -> &'static str {
        match self {
            Direction::Up => "client→server",
            Direction::Down => "server→client",
        }
    }
}

/// The figures of `samples` for `modes`: medians over repeats, ratios to direct, targets.
pub fn figures(
    samples: &[Sample],
    modes: &[Mode],
    idle_conns: &[usize],
    quiet_for: Duration,
) -> Vec<Figure> {
    defs(idle_conns, quiet_for)
        .into_iter()
        .filter_map(|def| {
            let of = |m: Mode| {
                samples
                    .iter()
                    .filter(move |s| s.mode == m && s.case == def.case)
                    .filter_map(|s| Some((s.repeat, (def.read)(&s.data)?)))
            };
            let values: Vec<(Mode, Option<f64>)> = modes
                .iter()
                .map(|&m| (m, stats::median(of(m).map(|(_, v)| v))))
                .collect();
            // Agent figures need a mode with agents.
            if !def.ratio && modes.iter().all(|&m| m == Mode::Direct) {
                return None;
            }
            let direct = values
                .iter()
                .find(|(m, _)| *m == Mode::Direct)
                .and_then(|(_, v)| *v);
            let ratios = if def.ratio && modes.contains(&Mode::Direct) {
                values
                    .iter()
                    .filter(|(m, _)| *m != Mode::Direct)
                    .map(|&(m, v)| (m, stats::ratio(v, direct)))
                    .collect()
            } else {
                Vec::new()
            };
            let ratio_ranges = ratios
                .iter()
                .map(|&(m, _)| {
                    let direct: Vec<(usize, f64)> = of(Mode::Direct).collect();
                    let per_repeat = of(m).filter_map(|(repeat, v)| {
                        let (_, d) = direct.iter().find(|(r, _)| *r == repeat)?;
                        stats::ratio(Some(v), Some(*d))
                    });
                    (m, stats::range(per_repeat))
                })
                .collect();
            let mesh_value = values
                .iter()
                .find(|(m, _)| *m == Mode::Mesh)
                .and_then(|(_, v)| *v);
            let mesh_ratio = ratios
                .iter()
                .find(|(m, _)| *m == Mode::Mesh)
                .and_then(|(_, v)| *v);
            let met = def.target.and_then(|t| match t {
                Target::RatioAtLeast(x) => mesh_ratio.map(|r| r >= x),
                Target::RatioAtMost(x) => mesh_ratio.map(|r| r <= x),
                Target::AtMost(x) => mesh_value.map(|v| v <= x),
            });
            Some(Figure {
                key: def.key,
                label: def.label,
                unit: def.unit,
                values,
                ratios,
                ratio_ranges,
                target: def.target,
                met,
            })
        })
        .collect()
}

/// `value` (in the unit's base: bytes/s, ns, bytes, …) as the table shows it.
pub fn format_value(unit: Unit, value: f64) -> String {
    match unit {
        Unit::BytesPerS => format!("{:.0} MB/s", value / 1e6),
        Unit::Nanos => format!("{:.1} µs", value / 1e3),
        Unit::PerS => format!("{value:.0}/s"),
        Unit::Bytes => format!("{:.1} MiB", value / (1024.0 * 1024.0)),
        Unit::BytesPerConn => format!("{:.2} KiB", value / 1024.0),
        Unit::CpuSPerGb => format!("{value:.2} CPU-s"),
        Unit::CpuSPer1kConns => format!("{value:.3} CPU-s"),
    }
}

fn format_target(unit: Unit, target: Target) -> String {
    match target {
        Target::RatioAtLeast(x) => format!("≥{x:.2}x"),
        Target::RatioAtMost(x) => format!("≤{x:.2}x"),
        Target::AtMost(x) => format!("≤{}", format_value(unit, x)),
    }
}

/// The table: one row per figure, a value column per mode, a ratio column (÷ direct) per
/// mode other than direct, and the mesh target with whether it is met.
pub fn table(figures: &[Figure], modes: &[Mode]) -> String {
    let has_direct = modes.contains(&Mode::Direct);
    let mesh_range = |f: &Figure| {
        f.ratio_ranges
            .iter()
            .find(|(m, _)| *m == Mode::Mesh)
            .and_then(|(_, r)| *r)
    };
    // With one repeat there is no range to show.
    let has_range = figures.iter().any(|f| mesh_range(f).is_some());
    let mut header = vec!["figure".to_owned()];
    for &m in modes {
        header.push(m.label().to_owned());
        if has_direct && m != Mode::Direct {
            header.push(format!("{}/direct", m.label()));
        }
        if m == Mode::Mesh && has_range {
            header.push("repeats".to_owned());
        }
        if m == Mode::Mesh {
            header.push("mesh target".to_owned());
        }
    }
    let mut rows = vec![header];
    for f in figures {
        let mut row = vec![f.label.clone()];
        for &(m, v) in &f.values {
            row.push(v.map_or_else(|| "-".into(), |v| format_value(f.unit, v)));
            if has_direct && m != Mode::Direct {
                let r = f
                    .ratios
                    .iter()
                    .find(|(rm, _)| *rm == m)
                    .and_then(|(_, r)| *r);
                row.push(r.map_or_else(|| "-".into(), |r| format!("{r:.2}x")));
            }
            if m == Mode::Mesh && has_range {
                row.push(
                    mesh_range(f).map_or_else(String::new, |(lo, hi)| format!("{lo:.2}–{hi:.2}")),
                );
            }
            if m == Mode::Mesh {
                row.push(match (f.target, f.met) {
                    (None, _) => String::new(),
                    (Some(t), None) => format_target(f.unit, t),
                    (Some(t), Some(true)) => format!("{} ok", format_target(f.unit, t)),
                    (Some(t), Some(false)) => format!("{} MISS", format_target(f.unit, t)),
                });
            }
        }
        rows.push(row);
    }
    let columns = rows[0].len();
    let widths: Vec<usize> = (0..columns)
        .map(|c| {
            rows.iter()
                .map(|r| r.get(c).map_or(0, |s| s.chars().count()))
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut out = String::new();
    for (i, row) in rows.iter().enumerate() {
        let mut line = String::new();
        for (c, cell) in row.iter().enumerate() {
            let pad = widths[c] - cell.chars().count();
            if c == 0 {
                line.push_str(cell);
                line.push_str(&" ".repeat(pad));
            } else {
                line.push_str("  ");
                line.push_str(&" ".repeat(pad));
                line.push_str(cell);
            }
        }
        let _ = writeln!(out, "{}", line.trim_end());
        if i == 0 {
            let total = widths.iter().sum::<usize>() + 2 * (columns - 1);
            let _ = writeln!(out, "{}", "-".repeat(total));
        }
    }
    out
}

/// Why samples are missing: one line per failed sample or stopped idle-connection step,
/// the same reason across repeats said once.
pub fn notes(samples: &[Sample]) -> Vec<String> {
    let mut notes: Vec<String> = Vec::new();
    for s in samples {
        let error = match &s.data {
            Data::Failed { error } => error,
            Data::IdleConns {
                error: Some(error), ..
            } => error,
            _ => continue,
        };
        let note = format!("{} {}: {error}", s.mode, s.case);
        if !notes.contains(&note) {
            notes.push(note);
        }
    }
    notes
}

#[cfg(test)]
mod tests;
