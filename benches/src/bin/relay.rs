//! `relay`: io_uring against epoll and `splice(2)` for a plaintext TCP relay on loopback
//! (issue #6). Prints one table: each relay of `benches::relay` next to a direct connection.
//!
//! ```text
//! cargo run --release -p benches --bin relay -- [--secs N] [--reps N] [--quick] [--only RELAY]...
//! ```
//!
//! Cases, each run for every path, interleaved, `--reps` times (median):
//! - bulk: one stream client → server as fast as the client writes, the server sinks;
//! - ping-pong: 64 B request, 64 B echo, one at a time; p50/p99 of the round trip;
//! - connections: connect, 1 B echo, close, one after another.
//!
//! Client and server are blocking std sockets on threads of their own; the relay has one
//! thread, whose CPU (plus its io_uring workers') is reported per GB, per round trip and per
//! connection. Everything is bounded: each sample ends at its deadline, every socket operation
//! has a time-out.

use std::io::{self, Read, Write};
use std::net::{Ipv4Addr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use benches::relay::{Kind, Relay, Usage, uring_unavailable};
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};

const IO_TIMEOUT: Duration = Duration::from_secs(5);
const BULK_CHUNK: usize = 256 * 1024;
const PING: usize = 64;
/// A connections sample gives up after this many failed connections.
const MAX_ERRORS: u32 = 100;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Path {
    Direct,
    Via(Kind),
}

impl Path {
    fn name(self) -> &'static str {
        match self {
            Path::Direct => "direct",
            Path::Via(kind) => kind.name(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Case {
    Bulk,
    PingPong,
    Conns,
}

/// One sample of one case on one path.
#[derive(Debug, Default, Clone, Copy)]
struct Sample {
    /// Bytes, round trips or connections per second.
    rate: f64,
    p50_us: f64,
    p99_us: f64,
    /// Relay CPU seconds per GB, µs per round trip or µs per connection.
    cpu: Option<f64>,
    /// Share of that CPU spent on io_uring workers.
    workers: Option<f64>,
}

struct Settings {
    secs: Duration,
    reps: usize,
    /// Relays to measure (all when empty); the direct path is always measured.
    only: Vec<String>,
}

fn settings() -> anyhow::Result<Settings> {
    let mut s = Settings {
        secs: Duration::from_millis(1500),
        reps: 3,
        only: Vec::new(),
    };
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--secs" => {
                let v: f64 = args.next().context("--secs N")?.parse()?;
                s.secs = Duration::from_secs_f64(v.clamp(0.05, 30.0));
            }
            "--reps" => s.reps = args.next().context("--reps N")?.parse::<usize>()?.max(1),
            "--quick" => s.secs = Duration::from_millis(300),
            "--only" => s.only.push(args.next().context("--only RELAY")?),
            other => bail!(
                "unknown argument {other}; usage: relay [--secs N] [--reps N] [--quick] \
                 [--only RELAY]..."
            ),
        }
    }
    Ok(s)
}

fn main() -> anyhow::Result<()> {
    let settings = settings()?;
    let mut paths = vec![Path::Direct];
    let no_uring = uring_unavailable();
    let wanted =
        |kind: Kind| settings.only.is_empty() || settings.only.iter().any(|o| o == kind.name());
    for kind in Kind::ALL.into_iter().filter(|&k| wanted(k)) {
        match &no_uring {
            Some(reason) if kind.is_uring() => eprintln!("skipping {kind}: {reason}"),
            _ => paths.push(Path::Via(kind)),
        }
    }
    let load_before = loadavg();
    let cases = [Case::Bulk, Case::PingPong, Case::Conns];
    // samples[case][path] over the repetitions.
    let mut samples = vec![vec![Vec::new(); paths.len()]; cases.len()];
    for rep in 0..settings.reps {
        for (c, &case) in cases.iter().enumerate() {
            for (p, &path) in paths.iter().enumerate() {
                let sample = match case {
                    Case::Bulk => bulk(path, settings.secs),
                    Case::PingPong => ping_pong(path, settings.secs),
                    Case::Conns => conns(path, settings.secs),
                }
                .with_context(|| format!("{case:?} through {}", path.name()))?;
                eprintln!("rep {rep} {case:?} {}: {sample:?}", path.name());
                samples[c][p].push(sample);
            }
        }
    }
    let load_after = loadavg();
    let medians: Vec<Vec<Sample>> = samples
        .iter()
        .map(|per_path| per_path.iter().map(|s| median(s)).collect())
        .collect();
    println!(
        "relay benchmark: kernel {}, {} cores; median of {} runs, {:.1} s per sample; \
         load average before {load_before}, after {load_after}",
        kernel(),
        thread::available_parallelism().map_or(0, |n| n.get()),
        settings.reps,
        settings.secs.as_secs_f64(),
    );
    print_table(&paths, &medians);
    Ok(())
}

fn print_table(paths: &[Path], m: &[Vec<Sample>]) {
    let (bulk, ping, conn) = (&m[0], &m[1], &m[2]);
    let direct = |s: &[Sample]| s[0];
    println!(
        "\n| path | bulk GB/s | ×direct | CPU s/GB | io-wq | ping p50 µs | p99 µs | p50 ×direct \
         | CPU µs/rt | conn/s | ×direct | CPU µs/conn |"
    );
    println!("|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|");
    for (p, path) in paths.iter().enumerate() {
        let cpu = |s: Sample, scale: f64, digits: usize| {
            s.cpu
                .map_or("-".to_string(), |v| format!("{:.*}", digits, v * scale))
        };
        let workers = bulk[p]
            .workers
            .filter(|_| matches!(path, Path::Via(k) if k.is_uring()))
            .map_or("-".to_string(), |w| format!("{:.0}%", w * 100.0));
        println!(
            "| {} | {:.2} | {:.2} | {} | {} | {:.1} | {:.1} | {:.2} | {} | {:.0} | {:.2} | {} |",
            path.name(),
            bulk[p].rate / 1e9,
            bulk[p].rate / direct(bulk).rate,
            cpu(bulk[p], 1.0, 3),
            workers,
            ping[p].p50_us,
            ping[p].p99_us,
            ping[p].p50_us / direct(ping).p50_us,
            cpu(ping[p], 1.0, 2),
            conn[p].rate,
            conn[p].rate / direct(conn).rate,
            cpu(conn[p], 1.0, 1),
        );
    }
    println!(
        "\nCPU: the relay thread plus its io_uring workers (iou-wrk), per GB / round trip / \
         connection; io-wq: the workers' share of the bulk CPU."
    );
}

fn median(samples: &[Sample]) -> Sample {
    fn mid(mut v: Vec<f64>) -> f64 {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    }
    let opt = |f: fn(&Sample) -> Option<f64>| {
        let v: Vec<f64> = samples.iter().filter_map(f).collect();
        (!v.is_empty()).then(|| mid(v))
    };
    Sample {
        rate: mid(samples.iter().map(|s| s.rate).collect()),
        p50_us: mid(samples.iter().map(|s| s.p50_us).collect()),
        p99_us: mid(samples.iter().map(|s| s.p99_us).collect()),
        cpu: opt(|s| s.cpu),
        workers: opt(|s| s.workers),
    }
}

/// Runs `serve` on the server's listener and `drive` against the path's entry (the relay, or
/// the server itself), each on its own thread; `drive` also gets the server's address.
fn through<S, D>(
    path: Path,
    serve: impl FnOnce(TcpListener) -> io::Result<S> + Send,
    drive: impl FnOnce(SocketAddr, SocketAddr) -> io::Result<D> + Send,
) -> io::Result<(D, S, Option<Usage>)>
where
    S: Send,
    D: Send,
{
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?;
    let server_addr = listener.local_addr()?;
    thread::scope(|scope| {
        let server = thread::Builder::new()
            .name("server".into())
            .spawn_scoped(scope, move || serve(listener))?;
        let relay = match path {
            Path::Direct => None,
            Path::Via(kind) => Some(Relay::spawn(kind, server_addr)?),
        };
        let target = relay.as_ref().map_or(server_addr, Relay::addr);
        let client = thread::Builder::new()
            .name("client".into())
            .spawn_scoped(scope, move || drive(target, server_addr))?;
        // The server finishes only once the relay delivered everything: stopping the relay
        // any earlier would cut off bytes still in flight.
        let driven = client
            .join()
            .map_err(|_| io::Error::other("client panicked"));
        let served = server
            .join()
            .map_err(|_| io::Error::other("server panicked"));
        let usage = relay.map(Relay::stop).transpose()?;
        Ok((driven??, served??, usage))
    })
}

fn timeouts(sock: &TcpStream) -> io::Result<()> {
    sock.set_read_timeout(Some(IO_TIMEOUT))?;
    sock.set_write_timeout(Some(IO_TIMEOUT))?;
    sock.set_nodelay(true)
}

fn connect(addr: SocketAddr) -> io::Result<TcpStream> {
    let sock = TcpStream::connect_timeout(&addr, IO_TIMEOUT)?;
    timeouts(&sock)?;
    Ok(sock)
}

/// Accepts one connection, or fails after [`IO_TIMEOUT`] (the client never came).
fn accept_one(listener: &TcpListener) -> io::Result<TcpStream> {
    let mut fds = [PollFd::new(listener.as_fd(), PollFlags::POLLIN)];
    let timeout = PollTimeout::try_from(IO_TIMEOUT).map_err(io::Error::other)?;
    if poll(&mut fds, timeout).map_err(io::Error::from)? == 0 {
        return Err(io::Error::new(io::ErrorKind::TimedOut, "no client came"));
    }
    let (sock, _) = listener.accept()?;
    timeouts(&sock)?;
    Ok(sock)
}

fn cpu_per(usage: Option<Usage>, units: f64) -> (Option<f64>, Option<f64>) {
    let Some(u) = usage else {
        return (None, None);
    };
    let total = u.total().as_secs_f64();
    let workers = (total > 0.0).then(|| u.workers.as_secs_f64() / total);
    (Some(total / units.max(1e-12)), workers)
}

fn bulk(path: Path, secs: Duration) -> io::Result<Sample> {
    let serve = |listener: TcpListener| {
        let mut sock = accept_one(&listener)?;
        let mut buf = vec![0u8; BULK_CHUNK];
        let mut total = 0u64;
        loop {
            match sock.read(&mut buf)? {
                0 => return Ok((total, Instant::now())),
                n => total += n as u64,
            }
        }
    };
    let drive = |target, _| {
        let mut sock = connect(target)?;
        let buf = vec![0x5au8; BULK_CHUNK];
        let start = Instant::now();
        while start.elapsed() < secs {
            sock.write_all(&buf)?;
        }
        sock.shutdown(Shutdown::Write)?;
        Ok(start)
    };
    let (start, (bytes, end), usage) = through(path, serve, drive)?;
    let (cpu, workers) = cpu_per(usage, bytes as f64 / 1e9);
    Ok(Sample {
        rate: bytes as f64 / (end - start).as_secs_f64(),
        cpu,
        workers,
        ..Sample::default()
    })
}

fn ping_pong(path: Path, secs: Duration) -> io::Result<Sample> {
    let serve = |listener: TcpListener| {
        let mut sock = accept_one(&listener)?;
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            match sock.read(&mut buf)? {
                0 => return Ok(()),
                n => sock.write_all(&buf[..n])?,
            }
        }
    };
    let drive = |target, _| {
        let mut sock = connect(target)?;
        let (out, mut back) = ([0x5au8; PING], [0u8; PING]);
        let mut round_trip = || -> io::Result<Duration> {
            let t = Instant::now();
            sock.write_all(&out)?;
            sock.read_exact(&mut back)?;
            Ok(t.elapsed())
        };
        for _ in 0..200 {
            round_trip()?;
        }
        let mut times = Vec::with_capacity(1 << 20);
        let start = Instant::now();
        while start.elapsed() < secs {
            times.push(round_trip()?);
        }
        let elapsed = start.elapsed();
        sock.shutdown(Shutdown::Write)?;
        Ok((times, elapsed))
    };
    let ((mut times, elapsed), (), usage) = through(path, serve, drive)?;
    times.sort_unstable();
    let at = |q: f64| times[((times.len() - 1) as f64 * q) as usize].as_secs_f64() * 1e6;
    // The relay also carried the warm-up round trips.
    let (cpu, workers) = cpu_per(usage, (times.len() + 200) as f64);
    Ok(Sample {
        rate: times.len() as f64 / elapsed.as_secs_f64(),
        p50_us: at(0.50),
        p99_us: at(0.99),
        cpu: cpu.map(|s| s * 1e6),
        workers,
    })
}

fn conns(path: Path, secs: Duration) -> io::Result<Sample> {
    let done = AtomicBool::new(false);
    let serve = |listener: TcpListener| {
        let mut served = 0u64;
        loop {
            let (mut sock, _) = listener.accept()?;
            if done.load(Ordering::Acquire) {
                return Ok(served);
            }
            timeouts(&sock)?;
            let mut byte = [0u8; 1];
            // A failed connection is counted by the client; the server carries on.
            if sock.read_exact(&mut byte).is_ok() && sock.write_all(&byte).is_ok() {
                let _ = sock.read(&mut byte);
                served += 1;
            }
        }
    };
    let drive = |target, server_addr| {
        let (mut made, mut errors) = (0u64, 0u32);
        let start = Instant::now();
        while start.elapsed() < secs {
            let attempt = || -> io::Result<()> {
                let mut sock = connect(target)?;
                sock.write_all(b"x")?;
                let mut byte = [0u8; 1];
                sock.read_exact(&mut byte)
            };
            match attempt() {
                Ok(()) => made += 1,
                Err(e) => {
                    errors += 1;
                    if errors >= MAX_ERRORS {
                        done.store(true, Ordering::Release);
                        let _ = TcpStream::connect_timeout(&server_addr, IO_TIMEOUT);
                        return Err(e);
                    }
                }
            }
        }
        let elapsed = start.elapsed();
        // Wakes the server's accept, directly.
        done.store(true, Ordering::Release);
        TcpStream::connect_timeout(&server_addr, IO_TIMEOUT)?;
        Ok((made, errors, elapsed))
    };
    let ((made, errors, elapsed), _served, usage) = through(path, serve, drive)?;
    if errors > 0 {
        eprintln!("{}: {errors} failed connections", path.name());
    }
    let (cpu, workers) = cpu_per(usage, made as f64);
    Ok(Sample {
        rate: made as f64 / elapsed.as_secs_f64(),
        cpu: cpu.map(|s| s * 1e6),
        workers,
        ..Sample::default()
    })
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| s.split_whitespace().next().map(str::to_owned))
        .unwrap_or_else(|| "?".into())
}

fn kernel() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map_or_else(|_| "?".into(), |s| s.trim().to_owned())
}
