//! Byte copying between sockets and tunnel streams, with half-close and reset carried across.
//!
//! Both directions of a connection run in one task (no cross-core wake-ups between them) and
//! work on `&TcpStream` through readiness + `try_read`/`try_write`, so the socket is never
//! split and can still be shut down or reset from either direction. Socket read readiness
//! and write readiness have separate wakers, so the direction reading a socket and the one
//! writing it never take each other's wake-up.
//!
//! FIN ↔ END_STREAM (and FIN ↔ FIN for plain TCP); an error reading one side (a reset) resets
//! the other: RST_STREAM on a tunnel stream, an RST (SO_LINGER 0) on a socket.

use std::io;
use std::net::Shutdown;
use std::pin::Pin;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use std::os::fd::OwnedFd;

use bytes::{Bytes, BytesMut};
use h2::{RecvStream, SendStream};
use nix::fcntl::{FcntlArg, OFlag, SpliceFFlags, fcntl, splice};
use nix::unistd::pipe2;
use socket2::SockRef;
use tokio::io::Interest;
use tokio::net::TcpStream;

/// First read size; reads that fill the buffer double it up to [`MAX_BUF`].
pub(super) const MIN_BUF: usize = 8 * 1024;
const MAX_BUF: usize = 256 * 1024;

/// Bytes moved in each direction. `a_to_b` is the client's direction.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Transferred {
    pub a_to_b: u64,
    pub b_to_a: u64,
}

/// How one direction ended.
enum End {
    /// Clean EOF, passed on as a half-close.
    Eof,
    /// The source side failed or was reset: the other side gets reset too.
    Reset(io::Error),
}

/// A read buffer that grows with traffic and gives back what it does not use.
///
/// No memory is held while a connection waits for data: the buffer is taken only once the
/// socket is readable, and let go after a read that drained the socket (one that did not fill
/// the buffer) or found nothing to read. A busy stream keeps its buffer from read to read; an
/// idle connection holds none, whatever its past traffic. (The allocator keeps freed buffers
/// for reuse, see `main.rs`, so letting go is cheap.)
pub(super) struct Buf {
    pub(super) buf: BytesMut,
    /// Size of the next read.
    size: u32,
    /// The last read filled the buffer.
    full: bool,
}

impl Buf {
    pub(super) fn new() -> Self {
        Self {
            buf: BytesMut::new(),
            size: MIN_BUF as u32,
            full: false,
        }
    }

    /// Reads once from `sock` into the (empty) buffer, then sizes the next read by how full
    /// this one was.
    pub(super) fn poll_read(
        &mut self,
        sock: &TcpStream,
        cx: &mut Context<'_>,
    ) -> Poll<io::Result<usize>> {
        let size = self.size as usize;
        let n = loop {
            ready!(sock.poll_read_ready(cx))?;
            if self.buf.capacity() < size {
                self.buf.reserve(size);
            }
            match sock.try_read_buf(&mut self.buf) {
                // Readiness was stale (and is now cleared): wait without holding memory.
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => self.buf = BytesMut::new(),
                other => break other?,
            }
        };
        self.full = n >= size;
        if self.full && size < MAX_BUF {
            self.size *= 2;
        } else if n < size / 4 && size > MIN_BUF {
            self.size /= 2;
        }
        Poll::Ready(Ok(n))
    }

    /// Called once the bytes read were passed on: keeps the buffer for the next read while the
    /// socket is likely to have more (the last read filled it), releases it otherwise.
    pub(super) fn consumed(&mut self) {
        if self.full {
            self.buf.clear();
        } else {
            self.buf = BytesMut::new();
        }
    }
}

/// Writes `data[*written..]` to `sock`, advancing `written`; ready once all of it is written.
/// (A `u32` count: `data` is one read buffer or one DATA frame, both far below 4 GiB.)
fn poll_write_all(
    sock: &TcpStream,
    data: &[u8],
    written: &mut u32,
    cx: &mut Context<'_>,
) -> Poll<io::Result<()>> {
    while (*written as usize) < data.len() {
        ready!(sock.poll_write_ready(cx))?;
        match sock.try_write(&data[*written as usize..]) {
            Ok(n) => *written += n as u32,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => return Poll::Ready(Err(e)),
        }
    }
    Poll::Ready(Ok(()))
}

/// Makes the connection end in a reset: the peer sees RST instead of FIN when the socket is
/// dropped (which its owner does right after).
pub(crate) fn reset(sock: &TcpStream) {
    let _ = SockRef::from(sock).set_linger(Some(Duration::ZERO));
}

fn half_close(sock: &TcpStream) {
    let _ = SockRef::from(sock).shutdown(Shutdown::Write);
}

/// One direction from a socket to a socket: the bytes read are written from a buffer
/// (`moved` of them already), or once the direction carries bulk data, spliced through a pipe
/// (`moved` bytes in it, not yet spliced on). Kept small: a passthrough connection's task
/// holds two.
struct ToSocket {
    via: Via,
    moved: u32,
    count: u64,
    done: bool,
}

/// How a [`ToSocket`] direction moves its bytes.
enum Via {
    Buffer(Buf),
    /// Once the direction carries bulk data: bytes move through this pipe with `splice(2)`,
    /// never through user space. Boxed: only bulk directions have one.
    Pipe(Box<Pipe>),
}

/// One direction from a socket into a tunnel stream: the bytes read wait in `buf` until the
/// peer's flow-control window lets them go, as DATA frames that share the buffer.
struct ToTunnel {
    buf: Buf,
    count: u64,
    done: bool,
}

/// A pipe for splicing one direction's bytes from socket to socket.
///
/// Measured against reading into a buffer and writing it (`benches/RELAY.md`): half the CPU per
/// GB for bulk transfers, but two extra descriptors and a few system calls to set up, which
/// new connections and small exchanges do not earn back. So a direction switches to a pipe only
/// after a read filled a [`SPLICE_AFTER`] buffer, and keeps it for its remaining life.
struct Pipe {
    read: OwnedFd,
    write: OwnedFd,
    /// What the pipe holds when full.
    capacity: u32,
}

/// A direction whose reads have filled a buffer this size is moving bulk data.
const SPLICE_AFTER: usize = 64 * 1024;

impl Pipe {
    fn new() -> io::Result<Pipe> {
        let (read, write) = pipe2(OFlag::O_CLOEXEC | OFlag::O_NONBLOCK)?;
        // Bigger pipes mean fewer splices; a refused resize (past `fs.pipe-max-size`, or the
        // per-user pipe allowance without CAP_SYS_RESOURCE) keeps the default 64 KiB.
        let capacity = match fcntl(&write, FcntlArg::F_SETPIPE_SZ(MAX_BUF as i32)) {
            Ok(size) => size,
            Err(_) => fcntl(&write, FcntlArg::F_GETPIPE_SZ)?,
        };
        Ok(Pipe {
            read,
            write,
            capacity: capacity as u32,
        })
    }

    /// Moves what `from` has into the (empty) pipe. Only on an empty pipe does EAGAIN mean
    /// that the socket has nothing to read (on a full one it would mean the pipe is full).
    fn fill_from(&self, from: &TcpStream) -> io::Result<usize> {
        let flags = SpliceFFlags::SPLICE_F_MOVE | SpliceFFlags::SPLICE_F_NONBLOCK;
        Ok(splice(
            from,
            None,
            &self.write,
            None,
            self.capacity as usize,
            flags,
        )?)
    }

    /// Moves up to `len` bytes from the pipe into `to`; EAGAIN means `to` is full.
    fn drain_to(&self, to: &TcpStream, len: usize) -> io::Result<usize> {
        let flags = SpliceFFlags::SPLICE_F_MOVE | SpliceFFlags::SPLICE_F_NONBLOCK;
        Ok(splice(&self.read, None, to, None, len, flags)?)
    }
}

/// One direction out of a tunnel stream: `chunk` is the DATA frame being written, `written`
/// of it already.
struct FromTunnel {
    chunk: Bytes,
    written: u32,
    count: u64,
    done: bool,
}

impl ToSocket {
    fn new() -> Self {
        Self {
            via: Via::Buffer(Buf::new()),
            moved: 0,
            count: 0,
            done: false,
        }
    }

    /// Socket → socket; EOF → half-close of `to`.
    fn poll_to_socket(
        &mut self,
        from: &TcpStream,
        to: &TcpStream,
        cx: &mut Context<'_>,
    ) -> Poll<End> {
        loop {
            let buf = match &mut self.via {
                Via::Pipe(pipe) => {
                    match ready!(Self::poll_splice(
                        pipe,
                        &mut self.moved,
                        &mut self.count,
                        from,
                        to,
                        cx
                    )) {
                        Ok(true) => continue,
                        Ok(false) => {
                            half_close(to);
                            return Poll::Ready(End::Eof);
                        }
                        Err(e) => return Poll::Ready(End::Reset(e)),
                    }
                }
                Via::Buffer(buf) => buf,
            };
            if buf.buf.is_empty() {
                match ready!(buf.poll_read(from, cx)) {
                    Ok(0) => {
                        half_close(to);
                        return Poll::Ready(End::Eof);
                    }
                    Ok(n) => {
                        self.count += n as u64;
                        self.moved = 0;
                    }
                    Err(e) => return Poll::Ready(End::Reset(e)),
                }
            }
            if let Err(e) = ready!(poll_write_all(to, &buf.buf, &mut self.moved, cx)) {
                return Poll::Ready(End::Reset(e));
            }
            if buf.full && buf.buf.len() >= SPLICE_AFTER {
                // Bulk: splice from now on; the buffer is given back. Without a pipe (out of
                // descriptors, say) the direction stays buffered.
                if let Ok(pipe) = Pipe::new() {
                    self.via = Via::Pipe(Box::new(pipe));
                    self.moved = 0;
                    continue;
                }
            }
            buf.consumed();
        }
    }

    /// One splice step: empties the pipe into `to`, or fills it from `from`. `Ok(false)` at
    /// EOF (with the pipe empty).
    fn poll_splice(
        pipe: &Pipe,
        in_pipe: &mut u32,
        count: &mut u64,
        from: &TcpStream,
        to: &TcpStream,
        cx: &mut Context<'_>,
    ) -> Poll<io::Result<bool>> {
        while *in_pipe > 0 {
            ready!(to.poll_write_ready(cx))?;
            match to.try_io(Interest::WRITABLE, || pipe.drain_to(to, *in_pipe as usize)) {
                Ok(n) => *in_pipe -= n as u32,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
        loop {
            ready!(from.poll_read_ready(cx))?;
            match from.try_io(Interest::READABLE, || pipe.fill_from(from)) {
                Ok(0) => return Poll::Ready(Ok(false)),
                Ok(n) => {
                    *count += n as u64;
                    // At most the pipe's capacity.
                    *in_pipe = n as u32;
                    return Poll::Ready(Ok(true));
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
    }
}

impl ToTunnel {
    fn new() -> Self {
        Self {
            buf: Buf::new(),
            count: 0,
            done: false,
        }
    }

    /// Socket → tunnel: DATA frames within the peer's flow-control window; EOF → END_STREAM.
    fn poll_to_tunnel(
        &mut self,
        from: &TcpStream,
        to: &mut SendStream<Bytes>,
        cx: &mut Context<'_>,
    ) -> Poll<End> {
        loop {
            if self.buf.buf.is_empty() {
                match ready!(self.buf.poll_read(from, cx)) {
                    Ok(0) => {
                        return Poll::Ready(match to.send_data(Bytes::new(), true) {
                            Ok(()) => End::Eof,
                            Err(e) => End::Reset(h2_io(e)),
                        });
                    }
                    Ok(n) => {
                        self.count += n as u64;
                        to.reserve_capacity(n);
                    }
                    Err(e) => {
                        to.send_reset(h2::Reason::CANCEL);
                        return Poll::Ready(End::Reset(e));
                    }
                }
            }
            while !self.buf.buf.is_empty() {
                let granted = match ready!(to.poll_capacity(cx)) {
                    Some(Ok(granted)) => granted,
                    Some(Err(e)) => return Poll::Ready(End::Reset(h2_io(e))),
                    None => {
                        return Poll::Ready(End::Reset(io::Error::new(
                            io::ErrorKind::ConnectionReset,
                            "tunnel stream closed by peer",
                        )));
                    }
                };
                if granted == 0 {
                    continue;
                }
                // The frame owns its bytes (sharing the buffer's allocation); the rest stays.
                let len = granted.min(self.buf.buf.len());
                let chunk = self.buf.buf.split_to(len).freeze();
                if let Err(e) = to.send_data(chunk, false) {
                    return Poll::Ready(End::Reset(h2_io(e)));
                }
                if !self.buf.buf.is_empty() {
                    to.reserve_capacity(self.buf.buf.len());
                }
            }
            // All sent: the buffer's spare room is kept or let go as for a socket.
            self.buf.consumed();
        }
    }
}

impl FromTunnel {
    fn new() -> Self {
        Self {
            chunk: Bytes::new(),
            written: 0,
            count: 0,
            done: false,
        }
    }

    /// Tunnel → socket; END_STREAM → FIN; RST_STREAM → RST.
    fn poll_to_socket(
        &mut self,
        from: &mut RecvStream,
        to: &TcpStream,
        cx: &mut Context<'_>,
    ) -> Poll<End> {
        loop {
            if self.chunk.is_empty() {
                match ready!(from.poll_data(cx)) {
                    Some(Ok(chunk)) => {
                        self.count += chunk.len() as u64;
                        self.chunk = chunk;
                        self.written = 0;
                    }
                    Some(Err(e)) => return Poll::Ready(End::Reset(h2_io(e))),
                    None => {
                        half_close(to);
                        return Poll::Ready(End::Eof);
                    }
                }
                if self.chunk.is_empty() {
                    continue;
                }
            }
            if let Err(e) = ready!(poll_write_all(to, &self.chunk, &mut self.written, cx)) {
                return Poll::Ready(End::Reset(e));
            }
            let _ = from.flow_control().release_capacity(self.chunk.len());
            self.chunk = Bytes::new();
        }
    }
}

/// Notes how a direction's poll came out: marks it ended when it did, and hands back the
/// error when it ended in a reset.
fn settle(done: &mut bool, polled: Poll<End>) -> Option<io::Error> {
    match polled {
        Poll::Pending => None,
        Poll::Ready(end) => {
            *done = true;
            match end {
                End::Eof => None,
                End::Reset(e) => Some(e),
            }
        }
    }
}

/// Copies between two sockets (passthrough and plaintext inbound) until both directions
/// ended; each passes its own EOF on as a half-close, a reset of either resets both.
///
/// A hand-written future rather than an `async fn`: it lives as long as the connection, and
/// this way it holds the two sockets and the two directions' state, nothing else. It owns
/// the sockets, so a task that keeps it keeps them once.
pub struct Tcp {
    a: TcpStream,
    b: TcpStream,
    up: ToSocket,
    down: ToSocket,
}

/// Copies between two sockets; see [`Tcp`].
pub fn tcp(a: TcpStream, b: TcpStream) -> Tcp {
    Tcp {
        a,
        b,
        up: ToSocket::new(),
        down: ToSocket::new(),
    }
}

impl Tcp {
    /// The two sockets, `a` first.
    pub fn sockets(&self) -> (&TcpStream, &TcpStream) {
        (&self.a, &self.b)
    }
}

impl Future for Tcp {
    type Output = io::Result<Transferred>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.get_mut();
        let (a, b) = (&this.a, &this.b);
        let (up, down) = (&mut this.up, &mut this.down);
        let mut reset_by = None;
        if !up.done {
            let polled = up.poll_to_socket(a, b, cx);
            reset_by = settle(&mut up.done, polled);
        }
        if !down.done && reset_by.is_none() {
            let polled = down.poll_to_socket(b, a, cx);
            reset_by = settle(&mut down.done, polled);
        }
        if let Some(e) = reset_by {
            reset(a);
            reset(b);
            return Poll::Ready(Err(e));
        }
        if up.done && down.done {
            return Poll::Ready(Ok(Transferred {
                a_to_b: up.count,
                b_to_a: down.count,
            }));
        }
        Poll::Pending
    }
}

pub(super) fn h2_io(e: h2::Error) -> io::Error {
    if e.is_io() {
        return e
            .into_io()
            .unwrap_or_else(|| io::Error::other("h2 I/O error"));
    }
    match e.reason() {
        Some(reason) => io::Error::new(
            io::ErrorKind::ConnectionReset,
            format!("tunnel stream reset: {reason}"),
        ),
        None => io::Error::other(e),
    }
}

/// Copies between a socket and a tunnel stream until both directions ended (FIN ↔
/// END_STREAM); a reset of either side resets the other (RST ↔ RST_STREAM CANCEL).
/// `Transferred` counts socket → tunnel as `a_to_b`. Hand-written for the same reason as
/// [`Tcp`], and it owns the socket and the stream's halves, so a task that keeps it for the
/// connection's life keeps them once, with no references to them.
pub struct Tunnel {
    sock: TcpStream,
    send: SendStream<Bytes>,
    recv: RecvStream,
    up: ToTunnel,
    down: FromTunnel,
}

/// Copies between a socket and a tunnel stream; see [`Tunnel`].
pub fn tunnel(sock: TcpStream, send: SendStream<Bytes>, recv: RecvStream) -> Tunnel {
    Tunnel {
        sock,
        send,
        recv,
        up: ToTunnel::new(),
        down: FromTunnel::new(),
    }
}

impl Tunnel {
    /// The socket side.
    pub fn sock(&self) -> &TcpStream {
        &self.sock
    }
}

impl Future for Tunnel {
    type Output = io::Result<Transferred>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.get_mut();
        let sock = &this.sock;
        let (up, send) = (&mut this.up, &mut this.send);
        let (down, recv) = (&mut this.down, &mut this.recv);
        let mut reset_by = None;
        if !up.done {
            let polled = up.poll_to_tunnel(sock, send, cx);
            reset_by = settle(&mut up.done, polled);
        }
        if !down.done && reset_by.is_none() {
            let polled = down.poll_to_socket(recv, sock, cx);
            reset_by = settle(&mut down.done, polled);
        }
        if let Some(e) = reset_by {
            reset(sock);
            send.send_reset(h2::Reason::CANCEL);
            return Poll::Ready(Err(e));
        }
        if up.done && down.done {
            return Poll::Ready(Ok(Transferred {
                a_to_b: up.count,
                b_to_a: down.count,
            }));
        }
        Poll::Pending
    }
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};
    use std::net::{Shutdown, TcpListener as StdListener, TcpStream as StdStream};

    use super::*;

    /// A connected pair on loopback: (our end as a tokio stream, the peer's blocking end).
    async fn pair() -> (TcpStream, StdStream) {
        let listener = StdListener::bind("127.0.0.1:0").unwrap();
        let peer = StdStream::connect(listener.local_addr().unwrap()).unwrap();
        let (ours, _) = listener.accept().unwrap();
        ours.set_nonblocking(true).unwrap();
        (TcpStream::from_std(ours).unwrap(), peer)
    }

    fn pattern(len: usize, seed: u8) -> Vec<u8> {
        (0..len)
            .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
            .collect()
    }

    /// Writes `data` in `chunk`-sized pieces, half-closes, and reads everything that comes
    /// back until EOF.
    fn exchange(mut sock: StdStream, data: Vec<u8>, chunk: usize) -> Vec<u8> {
        let mut reader = sock.try_clone().unwrap();
        let read = std::thread::spawn(move || {
            let mut got = Vec::new();
            reader.read_to_end(&mut got).unwrap();
            got
        });
        for piece in data.chunks(chunk) {
            sock.write_all(piece).unwrap();
        }
        sock.shutdown(Shutdown::Write).unwrap();
        read.join().unwrap()
    }

    /// Both directions at once with EOF carried as half-close: small writes stay on the
    /// buffered path, bulk ones switch to splicing; every byte arrives, in order.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn tcp_copies_bulk_and_small_writes_both_ways_and_carries_half_close() {
        for (len, chunk) in [(1000, 100), (24 << 20, 1 << 20)] {
            let (a, a_peer) = pair().await;
            let (b, b_peer) = pair().await;
            let (up, down) = (pattern(len, 1), pattern(len / 2 + 7, 2));
            let (up2, down2) = (up.clone(), down.clone());
            let client = std::thread::spawn(move || exchange(a_peer, up2, chunk));
            let server = std::thread::spawn(move || exchange(b_peer, down2, chunk));
            let moved = tcp(a, b).await.unwrap();
            assert_eq!(
                moved,
                Transferred {
                    a_to_b: up.len() as u64,
                    b_to_a: down.len() as u64
                }
            );
            assert!(client.join().unwrap() == down, "b → a bytes differ ({len})");
            assert!(server.join().unwrap() == up, "a → b bytes differ ({len})");
        }
    }

    /// A reset on one side, also in the middle of a spliced bulk transfer, resets the other.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn tcp_carries_a_reset_during_a_bulk_transfer() {
        let (a, a_peer) = pair().await;
        let (b, mut b_peer) = pair().await;
        let writer = std::thread::spawn(move || {
            let data = pattern(4 << 20, 3);
            let mut a_peer = a_peer;
            a_peer.write_all(&data).unwrap();
            // Reset instead of FIN.
            SockRef::from(&a_peer)
                .set_linger(Some(Duration::ZERO))
                .unwrap();
        });
        let reader = std::thread::spawn(move || {
            let mut buf = vec![0; 1 << 20];
            loop {
                match b_peer.read(&mut buf) {
                    Ok(0) => return Ok(()),
                    Ok(_) => continue,
                    Err(e) => return Err(e.kind()),
                }
            }
        });
        // The copy owns the sockets and drops them when it ends.
        assert!(tcp(a, b).await.is_err());
        writer.join().unwrap();
        assert_eq!(
            reader.join().unwrap(),
            Err(io::ErrorKind::ConnectionReset),
            "the other side sees the reset"
        );
    }
}
