//! The epoll relays: tokio's current-thread runtime, one task per connection running both
//! directions, each direction either through a user buffer or through a pipe with `splice(2)`.

use std::io;
use std::net::{Shutdown, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use nix::sys::eventfd::EventFd;
use socket2::SockRef;
use tokio::io::Interest;
use tokio::io::unix::AsyncFd;
use tokio::net::{TcpListener, TcpStream};
use tokio::runtime::Runtime;

use super::pipe::Pipe;

/// First read size; a read that fills the buffer doubles it, up to [`MAX_BUF`], and one that
/// uses less than a quarter halves it (as the agent's copy does).
const MIN_BUF: usize = 8 * 1024;
const MAX_BUF: usize = 256 * 1024;

#[derive(Debug, Clone, Copy)]
pub(crate) enum Mode {
    Buffer,
    Splice,
}

pub(crate) struct Server {
    rt: Runtime,
    listener: std::net::TcpListener,
    upstream: SocketAddr,
    stop: Arc<EventFd>,
    mode: Mode,
}

impl Server {
    pub(crate) fn new(
        listener: std::net::TcpListener,
        upstream: SocketAddr,
        stop: Arc<EventFd>,
        mode: Mode,
    ) -> io::Result<Self> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_io()
            .build()?;
        listener.set_nonblocking(true)?;
        Ok(Server {
            rt,
            listener,
            upstream,
            stop,
            mode,
        })
    }

    /// Accepts until the stop event fires; open connections are dropped with the runtime.
    pub(crate) fn run(self) -> io::Result<()> {
        let Server {
            rt,
            listener,
            upstream,
            stop,
            mode,
        } = self;
        rt.block_on(async move {
            let listener = TcpListener::from_std(listener)?;
            // SAFETY: the eventfd is owned by the `Arc` the AsyncFd holds, so it stays open and
            // the same file for as long as it is registered.
            let stop = unsafe { AsyncFd::register_with_interest(stop, Interest::READABLE) }?;
            loop {
                tokio::select! {
                    _ = stop.readable() => return Ok(()),
                    accepted = listener.accept() => {
                        let (client, _) = accepted?;
                        tokio::spawn(connection(client, upstream, mode));
                    }
                }
            }
        })
    }
}

async fn connection(client: TcpStream, upstream: SocketAddr, mode: Mode) {
    let Ok(server) = TcpStream::connect(upstream).await else {
        return;
    };
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    let copied = match mode {
        Mode::Buffer => tokio::try_join!(copy(&client, &server), copy(&server, &client)),
        Mode::Splice => match (Pipe::new(true), Pipe::new(true)) {
            (Ok(up), Ok(down)) => tokio::try_join!(
                splice(&client, &server, &up),
                splice(&server, &client, &down)
            ),
            (Err(e), _) | (_, Err(e)) => Err(e),
        },
    };
    if copied.is_err() {
        // One side failed: both peers see a reset rather than a clean end.
        let _ = SockRef::from(&client).set_linger(Some(Duration::ZERO));
        let _ = SockRef::from(&server).set_linger(Some(Duration::ZERO));
    }
}

fn half_close(sock: &TcpStream) {
    let _ = SockRef::from(sock).shutdown(Shutdown::Write);
}

/// `from` → `to` through a buffer; EOF → half-close of `to`.
async fn copy(from: &TcpStream, to: &TcpStream) -> io::Result<()> {
    let mut buf = vec![0u8; MIN_BUF];
    loop {
        from.readable().await?;
        let n = match from.try_read(&mut buf) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e),
        };
        if n == 0 {
            half_close(to);
            return Ok(());
        }
        let mut data = &buf[..n];
        while !data.is_empty() {
            to.writable().await?;
            match to.try_write(data) {
                Ok(m) => data = &data[m..],
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(e),
            }
        }
        if n == buf.len() && buf.len() < MAX_BUF {
            buf.resize(buf.len() * 2, 0);
        } else if n < buf.len() / 4 && buf.len() > MIN_BUF {
            buf.truncate(buf.len() / 2);
            buf.shrink_to_fit();
        }
    }
}

/// `from` → pipe → `to`; EOF → half-close of `to`.
///
/// The pipe is drained into `to` before `from` is read again: only then does EAGAIN from the
/// socket → pipe splice mean "socket empty" (see [`Pipe::fill_from`]).
async fn splice(from: &TcpStream, to: &TcpStream, pipe: &Pipe) -> io::Result<()> {
    loop {
        let n = loop {
            from.readable().await?;
            match from.try_io(Interest::READABLE, || pipe.fill_from(from)) {
                Ok(n) => break n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(e),
            }
        };
        if n == 0 {
            half_close(to);
            return Ok(());
        }
        let mut pending = n;
        while pending > 0 {
            to.writable().await?;
            match to.try_io(Interest::WRITABLE, || pipe.drain_to(to, pending)) {
                Ok(m) => pending -= m,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(e),
            }
        }
    }
}
