use super::*;
use crate::bench::{Settings, chart};
use std::time::Duration;

fn usage(rss_mib: f64, fds: u64) -> Usage {
    Usage {
        cpu_s: 0.0,
        rss: (rss_mib * 1048576.0) as u64,
        rss_anon: 0,
        fds,
    }
}

fn sample(mode: Mode, repeat: usize, case: Case, data: Data) -> Sample {
    Sample {
        mode,
        repeat,
        case,
        data,
    }
}

/// The agents spent three quarters of their CPU in the kernel.
fn throughput(bytes_per_s: f64, agent_cpu_s: Vec<f64>) -> Data {
    Data::Throughput {
        bytes: (bytes_per_s * 2.0) as u64,
        seconds: 2.0,
        bytes_per_s,
        agent_system_cpu_s: agent_cpu_s.iter().map(|c| c * 0.75).collect(),
        agent_cpu_s,
        generator_cpu_s: 0.5,
    }
}

const UP1: Case = Case::Throughput {
    streams: 1,
    direction: Direction::Up,
};

/// direct and mesh, three repeats of 1-stream upload, one of the rest.
fn samples() -> Vec<Sample> {
    let mut s = Vec::new();
    for (r, (d, m)) in [(100e6, 50e6), (300e6, 90e6), (200e6, 70e6)]
        .into_iter()
        .enumerate()
    {
        s.push(sample(Mode::Direct, r + 1, UP1, throughput(d, Vec::new())));
        s.push(sample(
            Mode::Mesh,
            r + 1,
            UP1,
            throughput(m, vec![0.1, 0.2]),
        ));
    }
    s.push(sample(
        Mode::Direct,
        1,
        Case::PingPong { size: 64 },
        Data::PingPong {
            rtt_ns: (1..=1000).map(|i| i * 10).collect(),
        },
    ));
    s.push(sample(
        Mode::Mesh,
        1,
        Case::PingPong { size: 64 },
        Data::PingPong {
            rtt_ns: (1..=1000).map(|i| i * 20).collect(),
        },
    ));
    s.push(sample(
        Mode::Mesh,
        1,
        Case::ConnRate { threads: 1 },
        Data::Failed {
            error: "refused".into(),
        },
    ));
    s.push(sample(
        Mode::Mesh,
        1,
        Case::AgentIdle,
        Data::AgentIdle {
            agents: vec![usage(8.0, 20), usage(12.0, 20)],
        },
    ));
    s.push(sample(
        Mode::Mesh,
        1,
        Case::IdleConns,
        Data::IdleConns {
            before: vec![usage(10.0, 20), usage(10.0, 20)],
            steps: vec![IdleStep {
                conns: 1024,
                agents: vec![usage(12.0, 1100), usage(13.0, 1100)],
            }],
            error: Some("out of descriptors".into()),
        },
    ));
    // Two repeats: the figures are the medians of the first and of the last readings.
    for (r, (first, last)) in [((40.0, 30.0), (12.0, 11.0)), ((60.0, 50.0), (14.0, 13.0))]
        .into_iter()
        .enumerate()
    {
        let step = |after_s: f64, (n1, n2): (f64, f64)| QuietStep {
            after_s,
            agents: vec![
                Usage {
                    rss_anon: (n1 * 1048576.0) as u64 / 2,
                    ..usage(n1, 30)
                },
                usage(n2, 30),
            ],
        };
        s.push(sample(
            Mode::Mesh,
            r + 1,
            Case::AfterLoad,
            Data::AfterLoad {
                quiet: vec![step(0.0, first), step(1.0, (20.0, 20.0)), step(2.0, last)],
            },
        ));
    }
    s
}

const QUIET: Duration = Duration::from_secs(10);

fn figure<'a>(figures: &'a [Figure], key: &str) -> &'a Figure {
    figures
        .iter()
        .find(|f| f.key == key)
        .unwrap_or_else(|| panic!("no figure {key}"))
}

fn value(f: &Figure, mode: Mode) -> Option<f64> {
    f.values.iter().find(|(m, _)| *m == mode).unwrap().1
}

/// CPU per 1,000 connections sums the agents, in all and in the kernel.
#[test]
fn connection_cpu_is_per_thousand_connections_with_the_kernel_part() {
    let conns = Data::ConnRate {
        conns: 4000,
        errors: 0,
        seconds: 2.0,
        conns_per_s: 2000.0,
        agent_cpu_s: vec![1.0, 1.4],
        agent_system_cpu_s: vec![0.7, 1.1],
        generator_cpu_s: 0.3,
        latency_ns: vec![100_000; 4000],
    };
    let samples = [sample(Mode::Mesh, 1, Case::ConnRate { threads: 1 }, conns)];
    let figures = figures(&samples, &[Mode::Mesh], &[], QUIET);
    let all = value(figure(&figures, "agent_cpu_per_1k_conns_1"), Mode::Mesh).unwrap();
    let kernel = value(
        figure(&figures, "agent_kernel_cpu_per_1k_conns_1"),
        Mode::Mesh,
    )
    .unwrap();
    assert!(
        (all - 0.6).abs() < 1e-9 && (kernel - 0.45).abs() < 1e-9,
        "{all} {kernel}"
    );
    assert_eq!(
        value(figure(&figures, "agent_cpu_per_1k_conns_4"), Mode::Mesh),
        None
    );
}

#[test]
fn figures_are_medians_over_repeats_with_ratios_and_targets() {
    let figures = figures(&samples(), &[Mode::Direct, Mode::Mesh], &[1024], QUIET);
    let up = figure(&figures, "throughput_1_up");
    assert_eq!(value(up, Mode::Direct), Some(200e6));
    assert_eq!(value(up, Mode::Mesh), Some(70e6));
    assert_eq!(up.ratios, vec![(Mode::Mesh, Some(0.35))]);
    // Repeat by repeat: 50/100, 90/300, 70/200.
    let (lo, hi) = up.ratio_ranges[0].1.unwrap();
    assert_eq!(up.ratio_ranges[0].0, Mode::Mesh);
    assert!(
        (lo - 0.3).abs() < 1e-12 && (hi - 0.5).abs() < 1e-12,
        "{lo} {hi}"
    );
    assert_eq!(up.target, Some(Target::RatioAtLeast(0.40)));
    assert_eq!(up.met, Some(false));
    // Not measured: no value, no verdict.
    let down = figure(&figures, "throughput_1_down");
    assert_eq!(value(down, Mode::Mesh), None);
    assert_eq!(down.met, None);

    let p50 = figure(&figures, "ping_pong_64_p50");
    assert_eq!(value(p50, Mode::Direct), Some(5000.0));
    assert_eq!(value(p50, Mode::Mesh), Some(10000.0));
    assert_eq!(p50.met, Some(true), "2x is within 3.3x");
    assert_eq!(p50.ratio_ranges, vec![(Mode::Mesh, None)], "one repeat");
    let p999 = figure(&figures, "ping_pong_64_p999");
    assert_eq!(value(p999, Mode::Mesh), Some(19980.0));

    // (0.1 + 0.2) CPU-s over 2 × 70 MB.
    let cpu = figure(&figures, "agent_cpu_per_gb_1_up");
    let per_gb = value(cpu, Mode::Mesh).unwrap();
    assert!((per_gb - 0.3 / 0.14).abs() < 1e-9, "{per_gb}");
    assert_eq!(value(cpu, Mode::Direct), None);
    assert!(cpu.ratios.is_empty());
    assert_eq!(cpu.met, Some(false));
    // The row under it: the kernel's part, with no target of its own.
    let kernel = figure(&figures, "agent_kernel_cpu_per_gb_1_up");
    let per_gb = value(kernel, Mode::Mesh).unwrap();
    assert!((per_gb - 0.225 / 0.14).abs() < 1e-9, "{per_gb}");
    assert_eq!((kernel.target, kernel.met), (None, None));
    assert_eq!(kernel.label, "  of which in the kernel");
    let at = |key: &str| figures.iter().position(|f| f.key == key).unwrap();
    assert_eq!(
        at("agent_kernel_cpu_per_gb_1_up"),
        at("agent_cpu_per_gb_1_up") + 1
    );

    // A failed sample gives no value.
    assert_eq!(value(figure(&figures, "conn_rate_1"), Mode::Mesh), None);

    let rss1 = figure(&figures, "agent_rss_idle_node-1");
    assert_eq!(value(rss1, Mode::Mesh), Some(8.0 * 1048576.0));
    assert_eq!(rss1.met, Some(true));
    assert_eq!(
        figure(&figures, "agent_rss_idle_node-2").met,
        Some(false),
        "12 MiB is over 10 MiB"
    );
    let both = figure(&figures, "agent_rss_per_conn_1024_both_agents");
    assert_eq!(value(both, Mode::Mesh), Some(5.0 * 1048576.0 / 1024.0));
    assert_eq!(both.met, Some(false), "5 KiB is over 4 KiB");
    let node2 = figure(&figures, "agent_rss_per_conn_1024_node2");
    assert_eq!(value(node2, Mode::Mesh), Some(3.0 * 1048576.0 / 1024.0));
    assert_eq!(node2.target, None);

    // After the load: the first reading, and the last one (after the quiet period).
    let mib = |v: f64| Some(v * 1048576.0);
    let after = figure(&figures, "agent_rss_after_load_node-1");
    assert_eq!(value(after, Mode::Mesh), mib(50.0));
    assert_eq!(after.label, "agent RSS right after the load, node-1");
    assert_eq!((after.target, value(after, Mode::Direct)), (None, None));
    let quiet = figure(&figures, "agent_rss_quiet_node-1");
    assert_eq!(value(quiet, Mode::Mesh), mib(13.0));
    assert_eq!(quiet.label, "agent RSS 10 s after the load, node-1");
    let anon = figure(&figures, "agent_rss_anon_quiet_node-1");
    assert_eq!(value(anon, Mode::Mesh), mib(6.5));
    let quiet2 = figure(&figures, "agent_rss_quiet_node-2");
    assert_eq!(value(quiet2, Mode::Mesh), mib(12.0));
    assert_eq!(
        value(figure(&figures, "agent_rss_after_load_node-2"), Mode::Mesh),
        mib(40.0)
    );
}

#[test]
fn a_quiet_period_is_named_in_seconds_or_minutes() {
    assert_eq!(format_duration(Duration::from_secs(10)), "10 s");
    assert_eq!(format_duration(Duration::from_millis(1500)), "1.5 s");
    assert_eq!(format_duration(Duration::from_secs(300)), "5 min");
    assert_eq!(format_duration(Duration::from_secs(90)), "90 s");
}

#[test]
fn agent_figures_are_left_out_without_agents() {
    let figures = figures(&samples(), &[Mode::Direct], &[1024], QUIET);
    assert!(figures.iter().any(|f| f.key == "throughput_1_up"));
    assert!(!figures.iter().any(|f| f.key.starts_with("agent_")));
    assert!(figures.iter().all(|f| f.ratios.is_empty()));
}

/// A table row's cells: columns are separated by at least two spaces.
fn cells(row: &str) -> Vec<&str> {
    row.split("  ")
        .map(str::trim)
        .filter(|c| !c.is_empty())
        .collect()
}

#[test]
fn table_has_a_column_per_mode_and_ratio_and_the_verdicts() {
    let modes = [Mode::Direct, Mode::Mesh];
    let table = table(&figures(&samples(), &modes, &[1024], QUIET), &modes);
    let lines: Vec<&str> = table.lines().collect();
    let header: Vec<&str> = lines[0].split_whitespace().collect();
    assert_eq!(
        header,
        [
            "figure",
            "direct",
            "mesh",
            "mesh/direct",
            "repeats",
            "mesh",
            "target"
        ]
    );
    assert!(lines[1].chars().all(|c| c == '-'));
    let up = lines
        .iter()
        .find(|l| l.starts_with("throughput, 1 stream, client→server"))
        .unwrap();
    assert_eq!(
        cells(up),
        [
            "throughput, 1 stream, client→server",
            "200 MB/s",
            "70 MB/s",
            "0.35x",
            "0.30–0.50",
            "≥0.40x MISS"
        ]
    );
    let p50 = lines
        .iter()
        .find(|l| l.starts_with("ping-pong 64 B p50"))
        .unwrap();
    assert_eq!(
        cells(p50),
        [
            "ping-pong 64 B p50",
            "5.0 µs",
            "10.0 µs",
            "2.00x",
            "≤3.30x ok"
        ]
    );
    let rss = lines
        .iter()
        .find(|l| l.starts_with("agent RSS idle, node-1"))
        .unwrap();
    assert_eq!(
        cells(rss),
        [
            "agent RSS idle, node-1",
            "-",
            "8.0 MiB",
            "-",
            "≤10.0 MiB ok"
        ]
    );
    // Every row is as wide as the header's columns: right-aligned cells end together.
    let width = lines[0].chars().count();
    assert!(
        lines
            .iter()
            .filter(|l| l.ends_with(" ok") || l.ends_with("MISS"))
            .all(|l| l.chars().count() == width),
        "{table}"
    );
}

/// A repeat counts toward the range only with both modes measured in it; a table whose
/// figures have one repeat each has no range column.
#[test]
fn ratio_ranges_pair_the_modes_repeat_by_repeat() {
    let modes = [Mode::Direct, Mode::Mesh];
    let mut s = vec![
        sample(Mode::Direct, 1, UP1, throughput(100e6, Vec::new())),
        sample(Mode::Mesh, 1, UP1, throughput(40e6, vec![0.1, 0.1])),
        sample(Mode::Direct, 2, UP1, throughput(200e6, Vec::new())),
        sample(Mode::Mesh, 2, UP1, throughput(60e6, vec![0.1, 0.1])),
        // Repeat 3's direct sample failed: its mesh sample has nothing to be a ratio of.
        sample(Mode::Direct, 3, UP1, Data::Failed { error: "x".into() }),
        sample(Mode::Mesh, 3, UP1, throughput(190e6, vec![0.1, 0.1])),
    ];
    let up = |s: &[Sample]| {
        figure(&figures(s, &modes, &[1024], QUIET), "throughput_1_up")
            .ratio_ranges
            .clone()
    };
    assert_eq!(up(&s), vec![(Mode::Mesh, Some((0.3, 0.4)))]);
    s.retain(|x| x.repeat == 1);
    assert_eq!(up(&s), vec![(Mode::Mesh, None)]);
    let one = table(&figures(&s, &modes, &[1024], QUIET), &modes);
    assert!(!one.lines().next().unwrap().contains("repeats"), "{one}");
}

#[test]
fn notes_say_why_samples_are_missing_once() {
    let mut samples = samples();
    samples.push(sample(
        Mode::Mesh,
        2,
        Case::ConnRate { threads: 1 },
        Data::Failed {
            error: "refused".into(),
        },
    ));
    assert_eq!(
        notes(&samples),
        [
            "mesh connections 1x: refused",
            "mesh idle connections: out of descriptors"
        ]
    );
}

#[test]
fn values_are_shown_in_readable_units() {
    assert_eq!(format_value(Unit::BytesPerS, 1.5e9), "1500 MB/s");
    assert_eq!(format_value(Unit::Nanos, 12_345.0), "12.3 µs");
    assert_eq!(format_value(Unit::PerS, 999.6), "1000/s");
    assert_eq!(format_value(Unit::Bytes, 3.0 * 1048576.0), "3.0 MiB");
    assert_eq!(format_value(Unit::BytesPerConn, 2048.0), "2.00 KiB");
    assert_eq!(format_value(Unit::CpuSPerGb, 0.456), "0.46 CPU-s");
    assert_eq!(format_value(Unit::CpuSPer1kConns, 0.1234), "0.123 CPU-s");
}

#[test]
fn json_holds_every_raw_sample_the_figures_and_the_machine() {
    let modes = [Mode::Direct, Mode::Mesh];
    let samples = samples();
    let figures = figures(&samples, &modes, &[1024], QUIET);
    let machine = Machine::current();
    let settings = Settings {
        modes: modes.to_vec(),
        cases: crate::bench::CaseGroup::ALL.to_vec(),
        duration: Duration::from_millis(1500),
        warmup: Duration::from_millis(300),
        repeats: 3,
        idle_conns: vec![1024],
        quiet_for: QUIET,
        round_trip_cap: 10,
        conn_cap: 10,
        agent_args: Vec::new(),
        agent_bin: None,
        json: None,
        svg: None,
    };
    let report = Report {
        machine: &machine,
        settings: &settings,
        seconds: 12.5,
        figures: &figures,
        samples: &samples,
    };
    let v: serde_json::Value = serde_json::to_value(&report).unwrap();
    assert_eq!(v["settings"]["duration"], 1.5);
    assert_eq!(v["settings"]["quiet_for"], 10.0);
    assert_eq!(
        v["settings"]["modes"],
        serde_json::json!(["direct", "mesh"])
    );
    assert!(v["machine"]["cores"].as_u64().unwrap() >= 1);
    let profile = if cfg!(debug_assertions) {
        "debug"
    } else {
        "release"
    };
    assert_eq!(v["machine"]["profile"], profile);
    let all = v["samples"].as_array().unwrap();
    assert_eq!(all.len(), samples.len());
    assert_eq!(all[1]["mode"], "mesh");
    assert_eq!(
        all[1]["case"],
        serde_json::json!({"kind": "throughput", "streams": 1, "direction": "up"})
    );
    assert_eq!(
        all[1]["data"]["throughput"]["agent_cpu_s"],
        serde_json::json!([0.1, 0.2])
    );
    let pp = &all[6]["data"]["ping_pong"]["rtt_ns"];
    assert_eq!(pp.as_array().unwrap().len(), 1000);
    assert_eq!(all[8]["data"]["failed"]["error"], "refused");
    let quiet = &all[11]["data"]["after_load"]["quiet"];
    assert_eq!(quiet[2]["after_s"], 2.0);
    assert_eq!(quiet[2]["agents"][1]["rss"], 11 * 1048576);
    let f = v["figures"]
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["key"] == "throughput_1_up")
        .unwrap();
    assert_eq!(f["target"], serde_json::json!({"ratio_at_least": 0.4}));
    assert_eq!(f["met"], false);
}

#[test]
fn chart_draws_a_bar_per_ratio_and_a_mark_per_ratio_target() {
    let modes = [Mode::Direct, Mode::Mesh];
    let figures = figures(&samples(), &modes, &[1024], QUIET);
    let svg = chart::svg(&figures, &Machine::current());
    assert!(svg.starts_with("<svg xmlns=\"http://www.w3.org/2000/svg\""));
    assert!(svg.trim_end().ends_with("</svg>"));
    let measured = figures
        .iter()
        .flat_map(|f| &f.ratios)
        .filter(|(_, r)| r.is_some())
        .count();
    assert_eq!(measured, 5, "1-stream up and four ping-pong percentiles");
    assert_eq!(svg.matches("<title>mesh: ").count(), measured);
    // Only the throughput figure has more than one repeat: one range drawn, the right one.
    assert_eq!(svg.matches(" over the repeats: ").count(), 1);
    assert!(svg.contains("<title>mesh over the repeats: 0.30x to 0.50x</title>"));
    let targets = figures
        .iter()
        .filter(|f| {
            !f.ratios.is_empty()
                && matches!(
                    f.target,
                    Some(Target::RatioAtLeast(_) | Target::RatioAtMost(_))
                )
        })
        .count();
    assert_eq!(svg.matches("<title>mesh target").count(), targets);
    assert!(svg.contains("<title>mesh: 0.35x</title>"));
    assert!(svg.contains("client→server"));
    assert!(!svg.contains("agent RSS"), "absolute figures have no ratio");
    // Well formed enough for any viewer: every element opened is closed.
    assert_eq!(svg.matches("<text").count(), svg.matches("</text>").count());
    assert_eq!(
        svg.matches("<title>").count(),
        svg.matches("</title>").count()
    );
}
