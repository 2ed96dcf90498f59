//! Byte copying between sockets and tunnel streams, with half-close and reset carried across.
//!
//! Both directions of a connection run in one task (no cross-core wake-ups between them) and
//! work on `&TcpStream` through readiness + `try_read`/`try_write`, so the socket is never
//! split and can still be shut down or reset from either direction.
//!
//! FIN ↔ END_STREAM (and FIN ↔ FIN for plain TCP); an error reading one side (a reset) resets
//! the other: RST_STREAM on a tunnel stream, an RST (SO_LINGER 0) on a socket.

use std::future::poll_fn;
use std::io;
use std::net::Shutdown;
use std::pin::{Pin, pin};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use h2::{RecvStream, SendStream};
use socket2::SockRef;
use tokio::net::TcpStream;

/// First read size; reads that fill the buffer double it up to [`MAX_BUF`].
const MIN_BUF: usize = 8 * 1024;
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
struct Buf {
    buf: BytesMut,
    size: usize,
    /// The last read filled the buffer.
    full: bool,
}

impl Buf {
    fn new() -> Self {
        Self {
            buf: BytesMut::new(),
            size: MIN_BUF,
            full: false,
        }
    }

    /// Reads once from `sock` into the buffer, then sizes the next read by how full this one
    /// was.
    async fn read_from(&mut self, sock: &TcpStream) -> io::Result<usize> {
        let n = loop {
            sock.readable().await?;
            if self.buf.capacity() < self.size {
                self.buf.reserve(self.size);
            }
            match sock.try_read_buf(&mut self.buf) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    // Readiness was stale: wait for data without holding memory.
                    self.buf = BytesMut::new();
                }
                other => break other?,
            }
        };
        self.full = n >= self.size;
        if self.full && self.size < MAX_BUF {
            self.size *= 2;
        } else if n < self.size / 4 && self.size > MIN_BUF {
            self.size /= 2;
        }
        Ok(n)
    }

    /// Called once the bytes read were passed on: keeps the buffer for the next read while the
    /// socket is likely to have more (the last read filled it), releases it otherwise.
    fn consumed(&mut self) {
        if !self.full {
            self.buf = BytesMut::new();
        } else {
            self.buf.clear();
        }
    }
}

pub(crate) async fn write_all(sock: &TcpStream, mut data: &[u8]) -> io::Result<()> {
    while !data.is_empty() {
        sock.writable().await?;
        match sock.try_write(data) {
            Ok(n) => data = &data[n..],
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Makes the connection end in a reset: the peer sees RST instead of FIN when the socket is
/// dropped (which its owner does right after).
pub(crate) fn reset(sock: &TcpStream) {
    let _ = SockRef::from(sock).set_linger(Some(Duration::ZERO));
}

fn half_close(sock: &TcpStream) {
    let _ = SockRef::from(sock).shutdown(Shutdown::Write);
}

/// Socket → socket; EOF → half-close of `to`.
async fn tcp_to_tcp(from: &TcpStream, to: &TcpStream, count: &mut u64) -> End {
    let mut buf = Buf::new();
    loop {
        match buf.read_from(from).await {
            Ok(0) => {
                half_close(to);
                return End::Eof;
            }
            Ok(n) => {
                *count += n as u64;
                let res = write_all(to, &buf.buf[..n]).await;
                buf.consumed();
                if let Err(e) = res {
                    return End::Reset(e);
                }
            }
            Err(e) => return End::Reset(e),
        }
    }
}

/// Runs both directions to their end; each passes its own EOF on as a half-close. When one
/// ends with a reset, `on_reset` tears both sides down and the other direction is abandoned.
///
/// The directions come pinned by the caller: passed by value, each would be stored twice in
/// this future (as argument and as pinned local), and the future lives as long as the
/// connection.
async fn join_directions(
    mut up: Pin<&mut impl Future<Output = End>>,
    mut down: Pin<&mut impl Future<Output = End>>,
    on_reset: impl FnOnce(),
) -> io::Result<()> {
    let (mut up_done, mut down_done) = (false, false);
    while !(up_done && down_done) {
        let end = tokio::select! {
            end = up.as_mut(), if !up_done => { up_done = true; end }
            end = down.as_mut(), if !down_done => { down_done = true; end }
        };
        if let End::Reset(e) = end {
            on_reset();
            return Err(e);
        }
    }
    Ok(())
}

/// Copies between two sockets (passthrough and plaintext inbound).
pub async fn tcp(a: &TcpStream, b: &TcpStream) -> io::Result<Transferred> {
    let (mut a_to_b, mut b_to_a) = (0u64, 0u64);
    let result = join_directions(
        pin!(tcp_to_tcp(a, b, &mut a_to_b)),
        pin!(tcp_to_tcp(b, a, &mut b_to_a)),
        || {
            reset(a);
            reset(b);
        },
    )
    .await;
    result.map(|()| Transferred { a_to_b, b_to_a })
}

fn h2_io(e: h2::Error) -> io::Error {
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

/// Socket → tunnel: DATA frames within the peer's flow-control window; EOF → END_STREAM.
async fn tcp_to_h2(from: &TcpStream, to: &mut SendStream<Bytes>, count: &mut u64) -> End {
    let mut buf = Buf::new();
    loop {
        let n = match buf.read_from(from).await {
            Ok(0) => {
                return match to.send_data(Bytes::new(), true) {
                    Ok(()) => End::Eof,
                    Err(e) => End::Reset(h2_io(e)),
                };
            }
            Ok(n) => n,
            Err(e) => {
                to.send_reset(h2::Reason::CANCEL);
                return End::Reset(e);
            }
        };
        *count += n as u64;
        let mut data = buf.buf.split().freeze();
        buf.consumed();
        while !data.is_empty() {
            to.reserve_capacity(data.len());
            let granted = match poll_fn(|cx| to.poll_capacity(cx)).await {
                Some(Ok(granted)) => granted,
                Some(Err(e)) => return End::Reset(h2_io(e)),
                None => {
                    return End::Reset(io::Error::new(
                        io::ErrorKind::ConnectionReset,
                        "tunnel stream closed by peer",
                    ));
                }
            };
            if granted == 0 {
                continue;
            }
            let chunk = data.split_to(granted.min(data.len()));
            if let Err(e) = to.send_data(chunk, false) {
                return End::Reset(h2_io(e));
            }
        }
    }
}

/// Tunnel → socket; END_STREAM → FIN; RST_STREAM → RST.
async fn h2_to_tcp(from: &mut RecvStream, to: &TcpStream, count: &mut u64) -> End {
    loop {
        match from.data().await {
            Some(Ok(chunk)) => {
                let n = chunk.len();
                *count += n as u64;
                if let Err(e) = write_all(to, &chunk).await {
                    return End::Reset(e);
                }
                let _ = from.flow_control().release_capacity(n);
            }
            Some(Err(e)) => return End::Reset(h2_io(e)),
            None => {
                half_close(to);
                return End::Eof;
            }
        }
    }
}

/// Copies between a socket and a tunnel stream until both directions ended. `Transferred`
/// counts socket → tunnel as `a_to_b`.
pub async fn tunnel(
    sock: &TcpStream,
    mut send: SendStream<Bytes>,
    mut recv: RecvStream,
) -> io::Result<Transferred> {
    let (mut a_to_b, mut b_to_a) = (0u64, 0u64);
    let result = {
        let send = &mut send;
        join_directions(
            pin!(tcp_to_h2(sock, send, &mut a_to_b)),
            pin!(h2_to_tcp(&mut recv, sock, &mut b_to_a)),
            || reset(sock),
        )
        .await
    };
    if result.is_err() {
        send.send_reset(h2::Reason::CANCEL);
    }
    result.map(|()| Transferred { a_to_b, b_to_a })
}
