//! The io_uring relays: one ring driven by a plain completion loop on the relay's thread. Every
//! accept, connect, read and write is a ring operation; the loop reacts to each completion by
//! queueing the next operation of that connection and direction.
//!
//! A direction has one operation in flight at a time: read (into its buffer, or socket → pipe),
//! then write until all of it went out, then read again. Sockets and pipes stay blocking and no
//! `SPLICE_F_NONBLOCK` is passed: `IORING_OP_SPLICE` is always handed to an io_uring worker
//! thread (it has no poll-driven retry), which should wait there rather than come back with
//! EAGAIN; recv and send wait by polling whatever the descriptor's mode.
//!
//! Shutdown: on the stop event every operation in flight is cancelled and every socket shut
//! down; the loop returns once the last completion arrived, so no buffer or descriptor is freed
//! while the kernel may still use it.

use std::io;
use std::net::{Shutdown, SocketAddr, TcpListener};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::Arc;
use std::time::Duration;

use io_uring::types::{CancelBuilder, Fd};
use io_uring::{IoUring, opcode, squeue};
use nix::sys::eventfd::EventFd;
use socket2::{Domain, SockAddr, SockRef, Socket, Type};

use super::pipe::Pipe;

const RING_ENTRIES: u32 = 256;
/// Per direction, as the buffered epoll relay's largest read.
const BUF: usize = 256 * 1024;

// Operation tags, in the low byte of an operation's user data; a connection's slot is above.
const ACCEPT: u64 = 1;
const STOP: u64 = 2;
const CANCEL: u64 = 3;
const CONNECT: u64 = 4;
/// Direction 0 is client → server, 1 server → client.
const READ_UP: u64 = 8;
const READ_DOWN: u64 = 9;
const WRITE_UP: u64 = 10;
const WRITE_DOWN: u64 = 11;

#[derive(Debug, Clone, Copy)]
pub(crate) enum Mode {
    Buffer,
    Splice,
}

/// Where a direction's bytes wait between read and write.
enum Hold {
    Buffer(Box<[u8]>),
    Pipe(Pipe),
}

struct Direction {
    hold: Hold,
    /// Bytes read and not yet all written.
    pending: usize,
    written: usize,
    eof: bool,
}

struct Conn {
    client: OwnedFd,
    server: OwnedFd,
    dirs: [Direction; 2],
    in_flight: u32,
    failed: bool,
}

impl Conn {
    /// (source, destination) of direction `d`.
    fn ends(&self, d: usize) -> (&OwnedFd, &OwnedFd) {
        if d == 0 {
            (&self.client, &self.server)
        } else {
            (&self.server, &self.client)
        }
    }

    fn finished(&self) -> bool {
        self.in_flight == 0 && (self.failed || self.dirs.iter().all(|d| d.eof))
    }

    /// Resets both peers and wakes whatever waits on either socket.
    fn fail(&mut self) {
        if self.failed {
            return;
        }
        self.failed = true;
        for fd in [&self.client, &self.server] {
            let sock = SockRef::from(fd);
            let _ = sock.set_linger(Some(Duration::ZERO));
            let _ = sock.shutdown(Shutdown::Both);
        }
    }
}

pub(crate) struct Server {
    ring: IoUring,
    listener: TcpListener,
    /// Read by the kernel during each connect: lives as long as the ring.
    upstream: SockAddr,
    stop: Arc<EventFd>,
    mode: Mode,
    conns: Vec<Option<Conn>>,
    free_slots: Vec<usize>,
    /// Buffers of finished connections, for the next ones.
    spare: Vec<Box<[u8]>>,
    in_flight: usize,
    stopping: bool,
}

impl Server {
    pub(crate) fn new(
        listener: TcpListener,
        upstream: SocketAddr,
        stop: Arc<EventFd>,
        mode: Mode,
    ) -> io::Result<Self> {
        // Single issuer + deferred task work: completions are processed only when this thread
        // waits for them, with no interrupts of it in between (kernel ≥ 6.1).
        let ring = match IoUring::builder()
            .setup_single_issuer()
            .setup_defer_taskrun()
            .build(RING_ENTRIES)
        {
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => IoUring::new(RING_ENTRIES)?,
            other => other?,
        };
        Ok(Server {
            ring,
            listener,
            upstream: SockAddr::from(upstream),
            stop,
            mode,
            conns: Vec::new(),
            free_slots: Vec::new(),
            spare: Vec::new(),
            in_flight: 0,
            stopping: false,
        })
    }

    pub(crate) fn run(mut self) -> io::Result<()> {
        self.push(accept(&self.listener));
        self.push(
            opcode::PollAdd::new(Fd(self.stop.as_raw_fd()), libc::POLLIN as u32)
                .build()
                .user_data(STOP),
        );
        let mut done = Vec::new();
        while !(self.stopping && self.in_flight == 0) {
            match self.ring.submit_and_wait(1) {
                Ok(_) => {}
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
                Err(e) => return Err(e),
            }
            done.extend(
                self.ring
                    .completion()
                    .map(|cqe| (cqe.user_data(), cqe.result())),
            );
            for (user_data, result) in done.drain(..) {
                self.in_flight -= 1;
                self.complete(user_data, result)?;
            }
        }
        Ok(())
    }

    fn push(&mut self, entry: squeue::Entry) {
        loop {
            // SAFETY: every pointer and descriptor in `entry` belongs to `self` (the listener,
            // the upstream address) or to a connection that is kept, with its buffers and
            // pipes, until its last operation completed (`Conn::in_flight`, `finished`).
            match unsafe { self.ring.submission().push(&entry) } {
                Ok(()) => break,
                // Full: hand the queue to the kernel and retry. A failure here resurfaces in
                // the loop's next submit.
                Err(_) => {
                    let _ = self.ring.submit();
                }
            }
        }
        self.in_flight += 1;
    }

    fn complete(&mut self, user_data: u64, result: i32) -> io::Result<()> {
        let (slot, tag) = ((user_data >> 8) as usize, user_data & 0xff);
        match tag {
            ACCEPT => {
                if result >= 0 {
                    // SAFETY: the kernel just created this descriptor for us.
                    let client = unsafe { OwnedFd::from_raw_fd(result) };
                    if !self.stopping {
                        self.open(client);
                    }
                } else if result != -libc::ECANCELED {
                    return Err(io::Error::from_raw_os_error(-result));
                }
                if !self.stopping {
                    self.push(accept(&self.listener));
                }
            }
            STOP => self.begin_stop(),
            CANCEL => {}
            _ => self.progress(slot, tag, result),
        }
        Ok(())
    }

    fn begin_stop(&mut self) {
        self.stopping = true;
        self.push(
            opcode::AsyncCancel2::new(CancelBuilder::any())
                .build()
                .user_data(CANCEL),
        );
        for conn in self.conns.iter_mut().flatten() {
            conn.fail();
        }
    }

    fn open(&mut self, client: OwnedFd) {
        let Ok(server) = Socket::new(Domain::IPV4, Type::STREAM, None) else {
            return;
        };
        let _ = SockRef::from(&client).set_tcp_nodelay(true);
        let _ = server.set_tcp_nodelay(true);
        let mut hold = || -> io::Result<Hold> {
            Ok(match self.mode {
                Mode::Buffer => Hold::Buffer(
                    self.spare
                        .pop()
                        .unwrap_or_else(|| vec![0u8; BUF].into_boxed_slice()),
                ),
                Mode::Splice => Hold::Pipe(Pipe::new(false)?),
            })
        };
        let (Ok(up), Ok(down)) = (hold(), hold()) else {
            return;
        };
        let direction = |hold| Direction {
            hold,
            pending: 0,
            written: 0,
            eof: false,
        };
        let conn = Conn {
            client,
            server: server.into(),
            dirs: [direction(up), direction(down)],
            in_flight: 0,
            failed: false,
        };
        let slot = match self.free_slots.pop() {
            Some(slot) => {
                self.conns[slot] = Some(conn);
                slot
            }
            None => {
                self.conns.push(Some(conn));
                self.conns.len() - 1
            }
        };
        let conn = self.conns[slot].as_mut().expect("just stored");
        let entry = opcode::Connect::new(
            Fd(conn.server.as_raw_fd()),
            self.upstream.as_ptr().cast(),
            self.upstream.len(),
        )
        .build()
        .user_data(token(slot, CONNECT));
        conn.in_flight += 1;
        self.push(entry);
    }

    /// One of a connection's operations completed: queue what follows it.
    fn progress(&mut self, slot: usize, tag: u64, result: i32) {
        let stopping = self.stopping;
        let conn = self.conns[slot]
            .as_mut()
            .expect("operation of a live connection");
        conn.in_flight -= 1;
        let mut next = Vec::with_capacity(2);
        if result < 0 {
            conn.fail();
        } else if !(stopping || conn.failed) {
            match tag {
                CONNECT => next.extend([0, 1].map(|d| read(conn, slot, d))),
                READ_UP | READ_DOWN => {
                    let d = (tag - READ_UP) as usize;
                    if result == 0 {
                        let _ = SockRef::from(conn.ends(d).1).shutdown(Shutdown::Write);
                        conn.dirs[d].eof = true;
                    } else {
                        let dir = &mut conn.dirs[d];
                        dir.pending = result as usize;
                        dir.written = 0;
                        next.push(write(conn, slot, d));
                    }
                }
                WRITE_UP | WRITE_DOWN => {
                    let d = (tag - WRITE_UP) as usize;
                    let dir = &mut conn.dirs[d];
                    if result == 0 {
                        // Neither send nor splice out of a non-empty pipe returns 0.
                        conn.fail();
                    } else {
                        dir.written += result as usize;
                        next.push(if dir.written < dir.pending {
                            write(conn, slot, d)
                        } else {
                            read(conn, slot, d)
                        });
                    }
                }
                _ => unreachable!("unknown operation tag {tag}"),
            }
        }
        conn.in_flight += next.len() as u32;
        for entry in next {
            self.push(entry);
        }
        if self.conns[slot].as_ref().is_some_and(Conn::finished) {
            let conn = self.conns[slot].take().expect("checked");
            self.free_slots.push(slot);
            for dir in conn.dirs {
                if let Hold::Buffer(buf) = dir.hold {
                    self.spare.push(buf);
                }
            }
        }
    }
}

fn token(slot: usize, tag: u64) -> u64 {
    (slot as u64) << 8 | tag
}

fn accept(listener: &TcpListener) -> squeue::Entry {
    opcode::Accept::new(
        Fd(listener.as_raw_fd()),
        std::ptr::null_mut(),
        std::ptr::null_mut(),
    )
    .flags(libc::SOCK_CLOEXEC)
    .build()
    .user_data(ACCEPT)
}

fn read(conn: &mut Conn, slot: usize, d: usize) -> squeue::Entry {
    let src = conn.ends(d).0.as_raw_fd();
    let entry = match &mut conn.dirs[d].hold {
        Hold::Buffer(buf) => opcode::Recv::new(Fd(src), buf.as_mut_ptr(), buf.len() as u32).build(),
        Hold::Pipe(pipe) => {
            opcode::Splice::new(Fd(src), -1, Fd(pipe.write_fd()), -1, pipe.capacity as u32)
                .flags(libc::SPLICE_F_MOVE)
                .build()
        }
    };
    entry.user_data(token(slot, READ_UP + d as u64))
}

fn write(conn: &mut Conn, slot: usize, d: usize) -> squeue::Entry {
    let dst = conn.ends(d).1.as_raw_fd();
    let dir = &conn.dirs[d];
    let left = (dir.pending - dir.written) as u32;
    let entry = match &dir.hold {
        Hold::Buffer(buf) => opcode::Send::new(Fd(dst), buf[dir.written..].as_ptr(), left)
            .flags(libc::MSG_NOSIGNAL)
            .build(),
        Hold::Pipe(pipe) => opcode::Splice::new(Fd(pipe.read_fd()), -1, Fd(dst), -1, left)
            .flags(libc::SPLICE_F_MOVE)
            .build(),
    };
    entry.user_data(token(slot, WRITE_UP + d as u64))
}
