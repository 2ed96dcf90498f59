//! The load generator: servers in the server pod, clients in the client pod, on blocking std
//! sockets.
//!
//! Why blocking sockets on plain threads: every operation is one system call with no event
//! loop, no readiness registration and no wake-up of another thread in between, so the
//! generator adds the least CPU and latency of any design on a 2-core machine where a
//! cross-core wake-up costs as much as a round trip. Sockets belong to the namespace they were
//! created in, so only threads that create sockets enter a pod's namespace, once each
//! (`Namespace::run`); the others work on sockets handed to them.
//!
//! The server ends of the idle connections are held by a child process ([`hold`], `ambientd
//! bench --hold`, in the server pod): with both ends of 10,000 connections the bench would
//! need more descriptors than a usual hard limit (and it cannot always be raised). It is not
//! on any measured path, so it runs on tokio; it exits when the bench closes its stdin.
//!
//! Every blocking operation has a timeout ([`IO_TIMEOUT`]), every loop ends at its deadline or
//! count, and an interrupt flag is checked throughout, so a sample always ends.

use std::io::{self, BufRead, Read, Write};
use std::net::{IpAddr, Ipv4Addr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Barrier};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde::Serialize;
use socket2::{Domain, Protocol, SockRef, Socket, Type};

use crate::demo::topology::Namespace;

/// Client → server: the server reads and counts.
pub const SINK_PORT: u16 = 5001;
/// Server → client: the server writes until the client goes.
pub const SOURCE_PORT: u16 = 5002;
/// Echo of whatever arrives (ping-pong).
pub const ECHO_PORT: u16 = 5003;
/// One byte echoed, then closed once the client closed.
pub const CONN_PORT: u16 = 5004;
/// One byte echoed, then the connection is held open until the client closes it ([`hold`]).
pub const HOLD_PORT: u16 = 5005;

/// Bound on every blocking socket operation.
pub const IO_TIMEOUT: Duration = Duration::from_secs(5);
const BUF: usize = 128 * 1024;
/// Threads accepting on [`CONN_PORT`]: each also waits for its client's close, so more than
/// the clients' 4 threads keep accepts from queueing behind slow closes.
const CONN_ACCEPTORS: usize = 8;
/// A connection-rate thread gives up after this many failed connections.
const MAX_ERRORS: u64 = 100;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Direction {
    /// Client → server.
    Up,
    /// Server → client.
    Down,
}

impl Direction {
    pub fn label(self) -> &'static str {
        match self {
            Direction::Up => "up",
            Direction::Down => "down",
        }
    }
}

/// Set on Ctrl-C: every loop here returns [`interrupted`] soon after.
pub type Interrupt = Arc<AtomicBool>;

pub fn interrupted() -> io::Error {
    io::Error::new(io::ErrorKind::Interrupted, "interrupted")
}

fn check(interrupt: &AtomicBool) -> io::Result<()> {
    if interrupt.load(Ordering::Relaxed) {
        Err(interrupted())
    } else {
        Ok(())
    }
}

/// The bench's threads are its own (never a runtime worker), so they may block.
#[allow(clippy::disallowed_methods)] // dedicated bench threads, see above
fn nap(d: Duration) {
    std::thread::sleep(d);
}

/// Sleeps `d`, waking every 50 ms to honour `interrupt`.
pub fn sleep(d: Duration, interrupt: &AtomicBool) -> io::Result<()> {
    let end = Instant::now() + d;
    loop {
        check(interrupt)?;
        let now = Instant::now();
        if now >= end {
            return Ok(());
        }
        nap((end - now).min(Duration::from_millis(50)));
    }
}

fn bounded(s: &Socket) -> io::Result<()> {
    s.set_read_timeout(Some(IO_TIMEOUT))?;
    s.set_write_timeout(Some(IO_TIMEOUT))
}

/// A blocking connect bounded by [`IO_TIMEOUT`] (Linux applies the send timeout to
/// `connect`), from the calling thread's namespace.
fn connect(dst: SocketAddr) -> io::Result<TcpStream> {
    let s = Socket::new(
        Domain::for_address(dst),
        Type::STREAM.cloexec(),
        Some(Protocol::TCP),
    )?;
    bounded(&s)?;
    s.connect(&dst.into())?;
    Ok(s.into())
}

fn connect_in(ns: &Namespace, dst: SocketAddr, n: usize) -> io::Result<Vec<TcpStream>> {
    ns.run(|| (0..n).map(|_| connect(dst)).collect())
        .map_err(io::Error::other)?
}

struct Shared {
    stop: AtomicBool,
    /// Bytes the sink has read, over all its connections.
    sunk: AtomicU64,
}

/// The server application in the server pod: one listener per kind of load, served by
/// blocking threads. Stops (and closes everything) on drop.
pub struct Server {
    pub ip: IpAddr,
    shared: Arc<Shared>,
    listeners: Vec<TcpListener>,
    threads: Vec<JoinHandle<()>>,
    /// The child process serving [`HOLD_PORT`].
    holder: Child,
}

impl Server {
    /// Listens on every port on `ip` inside `ns`.
    pub fn start(ns: &Namespace, ip: Ipv4Addr) -> io::Result<Server> {
        let listeners = ns
            .run(|| {
                [SINK_PORT, SOURCE_PORT, ECHO_PORT, CONN_PORT]
                    .map(|port| listen(SocketAddr::new(ip.into(), port)))
                    .into_iter()
                    .collect::<io::Result<Vec<_>>>()
            })
            .map_err(io::Error::other)??;
        let shared = Arc::new(Shared {
            stop: AtomicBool::new(false),
            sunk: AtomicU64::new(0),
        });
        let holder = start_holder(ns, SocketAddr::new(ip.into(), HOLD_PORT))?;
        let mut server = Server {
            ip: ip.into(),
            shared,
            listeners: Vec::new(),
            threads: Vec::new(),
            holder,
        };
        for listener in listeners {
            let port = listener.local_addr()?.port();
            let acceptors = if port == CONN_PORT { CONN_ACCEPTORS } else { 1 };
            for _ in 0..acceptors {
                let l = listener.try_clone()?;
                let shared = server.shared.clone();
                server.threads.push(
                    std::thread::Builder::new()
                        .name(format!("bench-srv-{port}"))
                        .spawn(move || accept_loop(&l, port, &shared))?,
                );
            }
            server.listeners.push(listener);
        }
        Ok(server)
    }

    pub fn addr(&self, port: u16) -> SocketAddr {
        SocketAddr::new(self.ip, port)
    }

    /// Bytes the sink has read so far.
    pub fn sunk(&self) -> u64 {
        self.shared.sunk.load(Ordering::Relaxed)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Relaxed);
        // shutdown(2) on a listening socket wakes the threads blocked in accept(2).
        for l in &self.listeners {
            let _ = SockRef::from(l).shutdown(Shutdown::Both);
        }
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
        // Closing its stdin ends the holder; killing it is the fallback.
        drop(self.holder.stdin.take());
        let deadline = Instant::now() + Duration::from_secs(2);
        while matches!(self.holder.try_wait(), Ok(None)) && Instant::now() < deadline {
            nap(Duration::from_millis(10));
        }
        let _ = self.holder.kill();
        let _ = self.holder.wait();
    }
}

fn start_holder(ns: &Namespace, addr: SocketAddr) -> io::Result<Child> {
    let mut child = Command::new("ip")
        .args(["netns", "exec", ns.name()])
        .arg(std::env::current_exe()?)
        .args(["bench", "--hold", &addr.to_string()])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()?;
    // It says `ready` once listening, or exits (closing stdout) on failure.
    let mut line = String::new();
    let stdout = child.stdout.take().expect("piped stdout");
    io::BufReader::new(stdout).read_line(&mut line)?;
    if line.trim() != "ready" {
        let _ = child.kill();
        let status = child.wait()?;
        return Err(io::Error::other(format!(
            "the idle-connection holder on {addr} did not start ({status})"
        )));
    }
    Ok(child)
}

/// `ambientd bench --hold ADDR`: accepts on `addr`, echoes one byte on each connection and
/// keeps it open until the client closes it; ends when stdin closes (the bench is done or
/// gone).
pub async fn hold(addr: SocketAddr) -> anyhow::Result<()> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    if let Err(e) = crate::app::raise_nofile_limit() {
        eprintln!("idle-connection holder: cannot raise the open-files limit: {e}");
    }
    let listener = tokio::net::TcpListener::bind(addr).await?;
    println!("ready");
    let serve = async {
        loop {
            let (mut s, _) = listener.accept().await?;
            tokio::spawn(async move {
                let mut b = [0u8; 1];
                if s.read_exact(&mut b).await.is_ok() && s.write_all(&b).await.is_ok() {
                    let _ = s.read(&mut b).await;
                }
            });
        }
    };
    let stdin_closed = tokio::task::spawn_blocking(|| io::copy(&mut io::stdin(), &mut io::sink()));
    tokio::select! {
        r = serve => r,
        _ = stdin_closed => Ok(()),
    }
}

fn listen(addr: SocketAddr) -> io::Result<TcpListener> {
    let s = Socket::new(
        Domain::for_address(addr),
        Type::STREAM.cloexec(),
        Some(Protocol::TCP),
    )?;
    s.set_reuse_address(true)?;
    s.bind(&addr.into())?;
    s.listen(4096)?;
    Ok(s.into())
}

fn accept_loop(listener: &TcpListener, port: u16, shared: &Arc<Shared>) {
    while !shared.stop.load(Ordering::Relaxed) {
        let stream = match listener.accept() {
            Ok((stream, _)) => stream,
            Err(_) => {
                // Out of descriptors, or the shutdown below: never spin.
                nap(Duration::from_millis(1));
                continue;
            }
        };
        if bounded(&SockRef::from(&stream)).is_err() {
            continue;
        }
        match port {
            // A short-lived connection is served on the accepting thread: no thread start
            // per connection in the connection-rate figure.
            CONN_PORT => {
                let _ = one_byte_then_eof(stream);
            }
            _ => {
                let shared = shared.clone();
                let spawned = std::thread::Builder::new()
                    .name(format!("bench-conn-{port}"))
                    .spawn(move || {
                        let _ = serve(stream, port, &shared);
                    });
                if spawned.is_err() {
                    continue;
                }
            }
        }
    }
}

fn one_byte_then_eof(mut s: TcpStream) -> io::Result<()> {
    let mut b = [0u8; 1];
    s.read_exact(&mut b)?;
    s.write_all(&b)?;
    // The client closes first, as a client of a short request does.
    let _ = s.read(&mut b)?;
    Ok(())
}

fn serve(mut s: TcpStream, port: u16, shared: &Shared) -> io::Result<()> {
    let mut buf = vec![0u8; BUF];
    match port {
        SINK_PORT => loop {
            let n = s.read(&mut buf)?;
            if n == 0 || shared.stop.load(Ordering::Relaxed) {
                return Ok(());
            }
            shared.sunk.fetch_add(n as u64, Ordering::Relaxed);
        },
        SOURCE_PORT => {
            buf.fill(0x5a);
            while !shared.stop.load(Ordering::Relaxed) {
                s.write_all(&buf)?;
            }
            Ok(())
        }
        _ => {
            s.set_nodelay(true)?;
            loop {
                let n = s.read(&mut buf)?;
                if n == 0 || shared.stop.load(Ordering::Relaxed) {
                    return Ok(());
                }
                s.write_all(&buf[..n])?;
            }
        }
    }
}

/// What a throughput sample moved, counted at the receiver over the measuring window.
#[derive(Debug, Clone, Copy)]
pub struct Moved {
    pub bytes: u64,
    pub seconds: f64,
}

/// `streams` connections from `client` to the server, sending (`Up`) or receiving (`Down`)
/// as fast as they can. After `warmup`, counts the bytes received during `duration`;
/// `meter` is read at the window's start and end.
pub fn throughput<M>(
    client: &Namespace,
    server: &Server,
    streams: usize,
    direction: Direction,
    (warmup, duration): (Duration, Duration),
    interrupt: &AtomicBool,
    mut meter: impl FnMut() -> M,
) -> io::Result<(Moved, M, M)> {
    let port = match direction {
        Direction::Up => SINK_PORT,
        Direction::Down => SOURCE_PORT,
    };
    let sockets = connect_in(client, server.addr(port), streams)?;
    let stop = Arc::new(AtomicBool::new(false));
    let received = Arc::new(AtomicU64::new(0));
    let mut workers = Vec::new();
    for s in &sockets {
        let (mut s, stop, received) = (s.try_clone()?, stop.clone(), received.clone());
        workers.push(std::thread::spawn(move || -> io::Result<()> {
            let mut buf = vec![0x5au8; BUF];
            let result = match direction {
                Direction::Up => loop {
                    if let Err(e) = s.write_all(&buf) {
                        break Err(e);
                    }
                },
                Direction::Down => loop {
                    match s.read(&mut buf) {
                        Ok(0) => {
                            break Err(io::Error::new(
                                io::ErrorKind::UnexpectedEof,
                                "server closed",
                            ));
                        }
                        Ok(n) => {
                            received.fetch_add(n as u64, Ordering::Relaxed);
                        }
                        Err(e) => break Err(e),
                    }
                },
            };
            // Errors after the end of the window are the shutdown below.
            if stop.load(Ordering::Relaxed) {
                Ok(())
            } else {
                result
            }
        }));
    }
    let counter = || match direction {
        Direction::Up => server.sunk(),
        Direction::Down => received.load(Ordering::Relaxed),
    };
    let window = (|| {
        sleep(warmup, interrupt)?;
        let (b0, t0) = (counter(), Instant::now());
        let m0 = meter();
        sleep(duration, interrupt)?;
        let (b1, t1) = (counter(), Instant::now());
        let m1 = meter();
        io::Result::Ok((
            Moved {
                bytes: b1 - b0,
                seconds: (t1 - t0).as_secs_f64(),
            },
            m0,
            m1,
        ))
    })();
    stop.store(true, Ordering::Relaxed);
    for s in &sockets {
        let _ = s.shutdown(Shutdown::Both);
    }
    let mut failure = None;
    for w in workers {
        if let Err(e) = w.join().expect("throughput worker panicked") {
            failure.get_or_insert(e);
        }
    }
    let window = window?;
    match failure {
        Some(e) => Err(io::Error::new(
            e.kind(),
            format!("a stream failed during the window: {e}"),
        )),
        None => Ok(window),
    }
}

/// Round trips of `size` bytes on one connection (TCP_NODELAY): after `warmup`, the time of
/// each round trip in ns, for `duration` or `cap` round trips.
pub fn ping_pong(
    client: &Namespace,
    server: &Server,
    size: usize,
    (warmup, duration): (Duration, Duration),
    cap: usize,
    interrupt: &AtomicBool,
) -> io::Result<Vec<u64>> {
    let mut s = connect_in(client, server.addr(ECHO_PORT), 1)?
        .pop()
        .expect("one socket");
    s.set_nodelay(true)?;
    let msg = vec![0x5au8; size];
    let mut back = vec![0u8; size];
    let mut round_trip = |s: &mut TcpStream| -> io::Result<u64> {
        let t = Instant::now();
        s.write_all(&msg)?;
        s.read_exact(&mut back)?;
        Ok(u64::try_from(t.elapsed().as_nanos()).unwrap_or(u64::MAX))
    };
    let end = Instant::now() + warmup;
    while Instant::now() < end {
        round_trip(&mut s)?;
    }
    let mut samples = Vec::with_capacity(cap.min(1 << 20));
    let end = Instant::now() + duration;
    while samples.len() < cap {
        samples.push(round_trip(&mut s)?);
        if samples.len() % 16 == 0 {
            check(interrupt)?;
            if Instant::now() >= end {
                break;
            }
        }
    }
    Ok(samples)
}

/// What a connection-rate sample did.
#[derive(Debug, Clone, Default)]
pub struct Connections {
    pub conns: u64,
    pub errors: u64,
    pub seconds: f64,
    /// Per successful connection: connect, 1 byte echoed, close; ns.
    pub latency_ns: Vec<u64>,
}

/// `threads` clients each opening connections one after another (connect, write 1 byte, read
/// it back, close) for `duration` or `cap` connections in all, after `warmup` doing the same;
/// `meter` is read when all threads start and when the last one ends.
pub fn connection_rate<M>(
    client: &Namespace,
    server: &Server,
    threads: usize,
    (warmup, duration): (Duration, Duration),
    cap: usize,
    interrupt: &AtomicBool,
    mut meter: impl FnMut() -> M,
) -> io::Result<(Connections, M, M)> {
    let dst = server.addr(CONN_PORT);
    let start = Barrier::new(threads + 1);
    let per_thread = cap.div_ceil(threads).max(1);
    std::thread::scope(|scope| {
        let workers: Vec<_> = (0..threads)
            .map(|_| {
                scope.spawn(|| {
                    client
                        .run(|| {
                            connect_loop(dst, &start, (warmup, duration), per_thread, interrupt)
                        })
                        .map_err(io::Error::other)?
                })
            })
            .collect();
        start.wait();
        let t0 = Instant::now();
        let m0 = meter();
        let mut all = Connections::default();
        let mut failure = None;
        for w in workers {
            match w.join().expect("connection worker panicked") {
                Ok(c) => {
                    all.conns += c.conns;
                    all.errors += c.errors;
                    all.latency_ns.extend(c.latency_ns);
                }
                Err(e) => {
                    failure.get_or_insert(e);
                }
            }
        }
        all.seconds = t0.elapsed().as_secs_f64();
        let m1 = meter();
        match failure {
            Some(e) => Err(e),
            None => Ok((all, m0, m1)),
        }
    })
}

fn connect_loop(
    dst: SocketAddr,
    start: &Barrier,
    (warmup, duration): (Duration, Duration),
    cap: usize,
    interrupt: &AtomicBool,
) -> io::Result<Connections> {
    let one = |latency: &mut Vec<u64>| -> io::Result<()> {
        let t = Instant::now();
        let mut s = connect(dst)?;
        let mut b = [b'c'];
        s.write_all(&b)?;
        s.read_exact(&mut b)?;
        drop(s);
        latency.push(u64::try_from(t.elapsed().as_nanos()).unwrap_or(u64::MAX));
        Ok(())
    };
    // Warm up before the barrier, so a failing path shows before the window; every thread
    // must still reach the barrier, so errors are kept for after it.
    let mut scratch = Vec::new();
    let end = Instant::now() + warmup;
    let mut warm = Ok(());
    while warm.is_ok() && Instant::now() < end && !interrupt.load(Ordering::Relaxed) {
        warm = one(&mut scratch);
    }
    start.wait();
    warm.map_err(|e| io::Error::new(e.kind(), format!("warm-up connection failed: {e}")))?;
    let mut out = Connections {
        latency_ns: Vec::with_capacity(cap.min(1 << 20)),
        ..Connections::default()
    };
    let end = Instant::now() + duration;
    while out.latency_ns.len() < cap && Instant::now() < end {
        check(interrupt)?;
        if one(&mut out.latency_ns).is_err() {
            out.errors += 1;
            if out.errors >= MAX_ERRORS {
                return Err(io::Error::other(format!(
                    "{MAX_ERRORS} connections to {dst} failed"
                )));
            }
        }
    }
    out.conns = out.latency_ns.len() as u64;
    Ok(out)
}

/// Opens connections from `client` to the server's holding port until `total` are open
/// (adding to `open`), each echoing one byte so that the path is really established; a few
/// threads open them side by side.
pub fn open_idle(
    client: &Namespace,
    server: &Server,
    open: &mut Vec<TcpStream>,
    total: usize,
    interrupt: &AtomicBool,
) -> io::Result<()> {
    const THREADS: usize = 4;
    let dst = server.addr(HOLD_PORT);
    let need = total.saturating_sub(open.len());
    let batch = |n: usize| {
        client
            .run(|| {
                let mut more = Vec::with_capacity(n);
                for i in 0..n {
                    if i % 100 == 0 {
                        check(interrupt)?;
                    }
                    let mut s = connect(dst)?;
                    let mut b = [b'i'];
                    s.write_all(&b)?;
                    s.read_exact(&mut b)?;
                    more.push(s);
                }
                io::Result::Ok(more)
            })
            .map_err(io::Error::other)?
    };
    let results: Vec<io::Result<Vec<TcpStream>>> = std::thread::scope(|scope| {
        let workers: Vec<_> = (0..THREADS)
            .map(|t| {
                let n = need / THREADS + usize::from(t < need % THREADS);
                scope.spawn(move || batch(n))
            })
            .collect();
        workers
            .into_iter()
            .map(|w| w.join().expect("idle-connection worker panicked"))
            .collect()
    });
    // Whatever was opened stays in `open`, so the caller closes it.
    let mut failure = None;
    for r in results {
        match r {
            Ok(more) => open.extend(more),
            Err(e) => {
                failure.get_or_insert(e);
            }
        }
    }
    failure.map_or(Ok(()), Err)
}
