//! Plaintext TCP relays built four ways, for measuring io_uring against epoll and `splice(2)`
//! (issue #6): the relay binary times them, `tests/relay.rs` checks they move bytes intact.
//!
//! Each relay listens on `127.0.0.1:0`, connects every accepted connection to one upstream
//! address, copies both directions, and passes an EOF on as a half-close. Each runs on one
//! thread of its own so that CPU per byte compares; [`Relay::stop`] reports what that thread
//! used, and what the kernel's io_uring workers (`iou-wrk-<tid>`) used on its behalf: an
//! io_uring operation that cannot complete without blocking (splice) runs on those workers,
//! and leaving them out would flatter it.
//!
//! The relays are measuring instruments, not the agent's copy path (`agent::proxy::copy`); the
//! `epoll-rw` one does what that path does (readiness, `try_read`/`try_write`, a buffer of up to
//! 256 KiB).

mod epoll;
mod pipe;
mod uring;

use std::fmt;
use std::io;
use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::sync::Arc;
use std::sync::mpsc;
use std::thread::{self, JoinHandle};
use std::time::Duration;

use nix::sys::eventfd::{EfdFlags, EventFd};
use nix::time::{ClockId, clock_gettime};

/// How a relay moves bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// tokio current-thread runtime: readiness, `try_read`/`try_write` through a user buffer.
    EpollRw,
    /// tokio current-thread runtime: readiness, `splice(2)` socket → pipe → socket.
    EpollSplice,
    /// io_uring completion loop: `recv`/`send` on buffers the loop owns.
    UringRw,
    /// io_uring completion loop: `IORING_OP_SPLICE` socket → pipe → socket.
    UringSplice,
}

impl Kind {
    pub const ALL: [Kind; 4] = [
        Kind::EpollRw,
        Kind::EpollSplice,
        Kind::UringRw,
        Kind::UringSplice,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Kind::EpollRw => "epoll-rw",
            Kind::EpollSplice => "epoll-splice",
            Kind::UringRw => "uring-rw",
            Kind::UringSplice => "uring-splice",
        }
    }

    pub fn is_uring(self) -> bool {
        matches!(self, Kind::UringRw | Kind::UringSplice)
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(self.name())
    }
}

/// Why io_uring cannot be used here, if it cannot: `io_uring_setup` fails with ENOSYS (no
/// kernel support) or EPERM (disabled by `kernel.io_uring_disabled` or a seccomp filter).
pub fn uring_unavailable() -> Option<String> {
    match io_uring::IoUring::new(2) {
        Ok(_) => None,
        Err(e) if matches!(e.raw_os_error(), Some(libc::ENOSYS | libc::EPERM)) => {
            Some(format!("io_uring_setup failed: {e}"))
        }
        // Anything else is a fault worth seeing: the relay reports it when started.
        Err(_) => None,
    }
}

/// CPU a relay used between its start and its stop.
#[derive(Debug, Default, Clone, Copy)]
pub struct Usage {
    /// The relay's own thread.
    pub thread: Duration,
    /// io_uring's kernel workers for that thread, read just before the stop.
    pub workers: Duration,
    /// How many such workers there were then.
    pub worker_threads: usize,
}

impl Usage {
    pub fn total(&self) -> Duration {
        self.thread + self.workers
    }
}

/// A running relay; dropping it without [`Relay::stop`] leaves its thread running.
pub struct Relay {
    addr: SocketAddr,
    stop: Arc<EventFd>,
    tid: i32,
    thread: JoinHandle<io::Result<Duration>>,
}

/// The relay loop of one kind, set up and ready to run.
enum Server {
    Epoll(epoll::Server),
    // The ring's state is large; the enum lives once per relay thread.
    Uring(Box<uring::Server>),
}

impl Server {
    fn new(
        kind: Kind,
        listener: TcpListener,
        upstream: SocketAddr,
        stop: Arc<EventFd>,
    ) -> io::Result<Self> {
        Ok(match kind {
            Kind::EpollRw => Server::Epoll(epoll::Server::new(
                listener,
                upstream,
                stop,
                epoll::Mode::Buffer,
            )?),
            Kind::EpollSplice => Server::Epoll(epoll::Server::new(
                listener,
                upstream,
                stop,
                epoll::Mode::Splice,
            )?),
            Kind::UringRw => Server::Uring(Box::new(uring::Server::new(
                listener,
                upstream,
                stop,
                uring::Mode::Buffer,
            )?)),
            Kind::UringSplice => Server::Uring(Box::new(uring::Server::new(
                listener,
                upstream,
                stop,
                uring::Mode::Splice,
            )?)),
        })
    }

    fn run(self) -> io::Result<()> {
        match self {
            Server::Epoll(s) => s.run(),
            Server::Uring(s) => s.run(),
        }
    }
}

impl Relay {
    /// Starts a relay of `kind` to `upstream` on a thread of its own; it accepts on a fresh
    /// loopback port ([`Relay::addr`]) until stopped.
    pub fn spawn(kind: Kind, upstream: SocketAddr) -> io::Result<Relay> {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?;
        let addr = listener.local_addr()?;
        let stop = Arc::new(
            EventFd::from_flags(EfdFlags::EFD_CLOEXEC | EfdFlags::EFD_NONBLOCK)
                .map_err(io::Error::from)?,
        );
        let (ready_tx, ready_rx) = mpsc::channel();
        let thread_stop = stop.clone();
        let thread = thread::Builder::new()
            .name(format!("relay-{kind}"))
            .spawn(move || {
                let server = match Server::new(kind, listener, upstream, thread_stop) {
                    Ok(server) => server,
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                        return Ok(Duration::ZERO);
                    }
                };
                let start = thread_cpu()?;
                let _ = ready_tx.send(Ok(nix::unistd::gettid().as_raw()));
                server.run()?;
                Ok(thread_cpu()?.saturating_sub(start))
            })?;
        match ready_rx.recv() {
            Ok(Ok(tid)) => Ok(Relay {
                addr,
                stop,
                tid,
                thread,
            }),
            Ok(Err(e)) => {
                let _ = thread.join();
                Err(e)
            }
            Err(_) => Err(io::Error::other("relay thread died while starting")),
        }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Stops the relay (open connections are torn down) and reports the CPU it used.
    pub fn stop(self) -> io::Result<Usage> {
        // Workers go away with the ring, so they are read first.
        let (workers, worker_threads) = uring_workers_cpu(self.tid);
        self.stop.write(1).map_err(io::Error::from)?;
        let thread = self
            .thread
            .join()
            .map_err(|_| io::Error::other("relay thread panicked"))??;
        Ok(Usage {
            thread,
            workers,
            worker_threads,
        })
    }
}

fn thread_cpu() -> io::Result<Duration> {
    Ok(clock_gettime(ClockId::CLOCK_THREAD_CPUTIME_ID)
        .map_err(io::Error::from)?
        .into())
}

/// CPU time of this process's io_uring workers created for thread `tid` (named
/// `iou-wrk-<tid>`), from `/proc/self/task/*/schedstat` (first field: nanoseconds on CPU).
fn uring_workers_cpu(tid: i32) -> (Duration, usize) {
    let name = format!("iou-wrk-{tid}");
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
        return (Duration::ZERO, 0);
    };
    let (mut ns, mut count) = (0u64, 0usize);
    for task in tasks.flatten() {
        let path = task.path();
        let Ok(comm) = std::fs::read_to_string(path.join("comm")) else {
            continue;
        };
        if comm.trim_end() != name {
            continue;
        }
        let Ok(stat) = std::fs::read_to_string(path.join("schedstat")) else {
            continue;
        };
        if let Some(on_cpu) = stat
            .split_whitespace()
            .next()
            .and_then(|f| f.parse::<u64>().ok())
        {
            ns += on_cpu;
            count += 1;
        }
    }
    (Duration::from_nanos(ns), count)
}
