//! The L4 proxy: per-workload listeners and every proxied connection.
//!
//! For each enrolled workload the agent opens, inside its pod's network namespace (or on the
//! workload's own address when it has none; see `app::pods`):
//! - 15001 outbound ([`outbound`]): captured client traffic → HBONE or plain passthrough;
//! - 15006 inbound plaintext ([`plaintext`]): clients outside the mesh → the workload;
//! - 15008 inbound HBONE ([`inbound`]): tunnels from peer agents → the workload.
//!
//! Every connection's sockets are created in the workload's [`Net`]; inbound connections reach
//! the application through [`delivery`].
//!
//! Inbound connections of both kinds are authorized and tracked by [`authorization`].
//!
//! An optional SOCKS5 listener ([`socks5`]) enters the same outbound path without capture.
//! Each server is a function of its listener and a drain [`Watch`](crate::drain::Watch).

pub mod authorization;
pub mod copy;
pub mod delivery;
pub mod headers;
pub mod inbound;
pub mod outbound;
pub mod plaintext;
pub mod pool;
pub mod readahead;
mod relay;
pub mod socks5;

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use tokio::net::{TcpListener, TcpSocket, TcpStream};

use crate::config::ProxyConfig;
use crate::events::Events;
use crate::netns::Net;
use crate::tls::Credentials;

/// The destination the client asked for, before capture redirected it (`SO_ORIGINAL_DST`), or
/// the address it named through SOCKS5.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OrigDstAddr(pub SocketAddr);

/// The address of the other end of an accepted connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PeerAddr(pub SocketAddr);

/// Everything the proxy's connections share. Cheap to clone behind an `Arc`.
pub struct Proxy {
    pub cfg: ProxyConfig,
    pub state: xds::Store,
    pub creds: Arc<Credentials>,
    pub certs: ca_client::Cache,
    pub pool: pool::Pool,
    pub events: Events,
    /// Live inbound connections, re-checked when policies change.
    pub live_inbound: Arc<authorization::Registry>,
}

impl Proxy {
    /// Ports the agent serves itself: traffic aimed at them is refused, never proxied (no
    /// loops, no nested tunnels).
    pub fn is_own_port(&self, port: u16) -> bool {
        let p = &self.cfg.ports;
        port == p.outbound || port == p.inbound_plaintext || port == p.hbone
    }

    /// Connects to `dst` from a socket in `net` with the configured timeout, from `src` when
    /// given.
    pub async fn connect(
        &self,
        net: &Net,
        src: Option<IpAddr>,
        dst: SocketAddr,
    ) -> io::Result<TcpStream> {
        let socket = net.tcp_socket(dst.ip())?;
        if let Some(ip) = src {
            bind_source(&socket, ip)?;
        }
        self.connect_socket(socket, dst).await
    }

    /// Connects a prepared socket to `dst` with the configured timeout.
    pub async fn connect_socket(
        &self,
        socket: TcpSocket,
        dst: SocketAddr,
    ) -> io::Result<TcpStream> {
        let stream = tokio::time::timeout(self.cfg.connect_timeout, socket.connect(dst))
            .await
            .map_err(|_| {
                io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!(
                        "connect to {dst} timed out after {:?}",
                        self.cfg.connect_timeout
                    ),
                )
            })??;
        stream.set_nodelay(true)?;
        Ok(stream)
    }
}

/// Binds an outgoing socket to the source address `ip`, leaving the port to `connect`.
///
/// With `IP_BIND_ADDRESS_NO_PORT` the kernel picks the port at connect time, unique only for
/// the whole 4-tuple, as for any client; a plain bind to port 0 would reserve a port for the
/// address alone, and every source address (a client pod's, for each connection delivered
/// from it) would run out of its ~28,000 ephemeral ports after as many connections in a
/// minute, while they wait in TIME_WAIT.
pub(crate) fn bind_source<S: std::os::fd::AsFd>(socket: &S, ip: IpAddr) -> io::Result<()> {
    nix::sys::socket::setsockopt(
        socket,
        nix::sys::socket::sockopt::IpBindAddressNoPort,
        &true,
    )?;
    socket2::SockRef::from(socket).bind(&SocketAddr::new(ip, 0).into())
}

/// Binds a listener with SO_REUSEADDR and SO_REUSEPORT, so a new agent can bind beside one
/// that is draining, and TCP_NODELAY for the sockets it accepts ([`serve`]).
pub fn bind(addr: SocketAddr) -> io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.set_reuseport(true)?;
    socket.set_nodelay(true)?;
    socket.bind(addr)?;
    socket.listen(1024)
}

/// The original destination of a captured connection from `peer`: `SO_ORIGINAL_DST` when NAT
/// redirected it, else the address it was accepted on (TPROXY). The socket's family is the
/// peer's, so the REDIRECT case costs one system call.
pub fn orig_dst(stream: &TcpStream, peer: PeerAddr) -> io::Result<OrigDstAddr> {
    let sock = socket2::SockRef::from(stream);
    let original = if peer.0.is_ipv4() {
        sock.original_dst_v4()
    } else {
        sock.original_dst_v6()
    };
    match original.ok().and_then(|a| a.as_socket()) {
        Some(addr) => Ok(OrigDstAddr(addr)),
        None => Ok(OrigDstAddr(stream.local_addr()?)),
    }
}

/// Sends a PING every `interval`; returns when a PONG does not come back within `timeout`.
pub(crate) async fn keepalive(mut pings: h2::PingPong, interval: Duration, timeout: Duration) {
    loop {
        tokio::time::sleep(interval).await;
        match tokio::time::timeout(timeout, pings.ping(h2::Ping::opaque())).await {
            Ok(Ok(_pong)) => {}
            Ok(Err(_)) => {
                // The connection itself ended; its driver reports that.
                std::future::pending::<()>().await;
            }
            Err(_) => return,
        }
    }
}

/// Accepts connections until the drain starts; runs `handler`'s future for each on its own
/// task, which holds a drain watch until it ends and is abandoned when the drain deadline
/// passes.
/// Accepted sockets get `TCP_NODELAY`: the agent writes what it has as soon as it has it, so
/// small replies are not held back by Nagle's algorithm. Linux copies it from the listener
/// to each socket as the connection arrives, so the agent's listeners ([`bind`],
/// [`Net::listen`](crate::netns::Net::listen)) have it from their creation, and only sockets
/// from a listener without it get it one by one.
pub async fn serve<F, Fut>(listener: TcpListener, drain: crate::drain::Watch, handler: F)
where
    F: Fn(TcpStream, PeerAddr) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    let local = listener.local_addr().ok();
    let inherited = socket2::SockRef::from(&listener)
        .tcp_nodelay()
        .unwrap_or(false);
    let running = Arc::new(Running::default());
    loop {
        let accepted = tokio::select! {
            () = drain.draining() => break,
            accepted = listener.accept() => accepted,
        };
        match accepted {
            Ok((stream, peer)) => {
                if !inherited {
                    let _ = stream.set_nodelay(true);
                }
                let conn = handler(stream, PeerAddr(peer));
                // The entry exists before the task, so a task that ends at once finds it to
                // remove; its handle is filled in after the spawn (not under the lock: a
                // runtime that is shutting down drops the task inside `spawn`).
                let id = {
                    let mut tasks = running.lock();
                    tasks.next += 1;
                    let id = tasks.next;
                    tasks.live.insert(id, None);
                    id
                };
                let registration = Registration {
                    running: running.clone(),
                    id,
                    _watch: drain.clone(),
                };
                let task = tokio::spawn(Guarded { conn, registration });
                if let Some(slot) = running.lock().live.get_mut(&id) {
                    *slot = Some(task.abort_handle());
                }
            }
            Err(e) => {
                // Usually out of file descriptors: back off instead of spinning.
                tracing::warn!(listener = ?local, error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
    // Neither the listener nor the handler (which may hold a watch of its own) outlives the
    // accepting: the open connections hold the drain open, not this; at the deadline they
    // are abandoned.
    drop((listener, handler));
    tracing::debug!(listener = ?local, "listener closed for drain");
    let observer = drain.observer();
    drop(drain);
    observer.closed().await;
    let left: Vec<_> = running
        .lock()
        .live
        .drain()
        .filter_map(|(_, task)| task)
        .collect();
    for task in left {
        task.abort();
    }
}

/// A listener's connection tasks that are still running, so the drain deadline can abandon
/// them. Each task holds its [`Registration`]; nothing else of the drain lives in the task.
#[derive(Default)]
struct Running(std::sync::Mutex<Tasks>);

#[derive(Default)]
struct Tasks {
    next: u64,
    /// `None` only between a task's registration and its spawn.
    live: std::collections::HashMap<u64, Option<tokio::task::AbortHandle>>,
}

impl Running {
    fn lock(&self) -> std::sync::MutexGuard<'_, Tasks> {
        // Every critical section is one map operation: the map stays consistent on a panic.
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// A connection task's place in its listener's [`Running`] set and its drain watch (the
/// connection counts as open while it is held).
struct Registration {
    running: Arc<Running>,
    id: u64,
    _watch: crate::drain::Watch,
}

impl Drop for Registration {
    fn drop(&mut self) {
        forget(&mut self.running.lock().live, &self.id);
    }
}

/// Removes `key` from a map of open connections, and gives back the map's room once it is
/// mostly empty: a map never shrinks by itself, and one that held 10,000 connections keeps
/// ~270 KiB of buckets after they have closed. (Shrinking to twice what is left, at a quarter,
/// keeps the rehashing amortised.)
pub(crate) fn forget<K: std::hash::Hash + Eq, V>(
    map: &mut std::collections::HashMap<K, V>,
    key: &K,
) {
    map.remove(key);
    if map.capacity() > 1024 && map.len() < map.capacity() / 4 {
        map.shrink_to(map.len() * 2);
    }
}

pin_project_lite::pin_project! {
    /// One connection's task: its handler's future and its registration, dropped in that
    /// order (the connection is closed before it stops counting as open).
    ///
    /// A plain struct rather than an `async` block with a `select!` on the drain: the task
    /// lives as long as the connection, and this way it holds the handler's future and three
    /// words. (The block also kept the accepted socket and address it had handed to the
    /// handler, and a waiter on the drain: ~300 B per connection.)
    struct Guarded<F> {
        #[pin]
        conn: F,
        registration: Registration,
    }
}

impl<F: Future<Output = ()>> Future for Guarded<F> {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        self.project().conn.poll(cx)
    }
}

/// A connection's task in its two phases: opening (boxed, so its large short-lived state is
/// gone once it is done), then what runs for the connection's life, held inline. Opening
/// yields `None` when it already ended the connection (and recorded it).
///
/// A plain enum rather than `opening.then(...)`: the task's size is the running phase plus
/// one tag, which decides the tokio allocation class the task falls in (128-byte steps).
pub(crate) enum Phases<O, S> {
    Opening(Pin<Box<O>>),
    Running(S),
    Done,
}

impl<O, S> Phases<O, S> {
    pub(crate) fn new(opening: O) -> Self {
        Phases::Opening(Box::pin(opening))
    }
}

impl<O, S> Future for Phases<O, S>
where
    O: Future<Output = Option<S>>,
    S: Future<Output = ()> + Unpin,
{
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let this = self.get_mut();
        loop {
            match this {
                Phases::Opening(opening) => match ready!(opening.as_mut().poll(cx)) {
                    Some(running) => *this = Phases::Running(running),
                    None => break,
                },
                Phases::Running(running) => {
                    ready!(Pin::new(running).poll(cx));
                    break;
                }
                Phases::Done => return Poll::Ready(()),
            }
        }
        // What the connection held goes now, not when the task is freed.
        *this = Phases::Done;
        Poll::Ready(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A map that held 10,000 connections gives its room back as they close, keeps every
    /// entry still open, and a small one is left as it is.
    #[test]
    fn a_connection_map_shrinks_once_mostly_empty() {
        let mut map: std::collections::HashMap<u64, u64> = (0..10_000).map(|i| (i, i)).collect();
        let full = map.capacity();
        for i in 10..10_000 {
            forget(&mut map, &i);
        }
        assert!(map.capacity() <= 1024, "{} of {full}", map.capacity());
        assert_eq!(map.len(), 10);
        assert!((0..10).all(|i| map[&i] == i));

        let mut small: std::collections::HashMap<u64, u64> = (0..500).map(|i| (i, i)).collect();
        for i in 0..499 {
            forget(&mut small, &i);
        }
        // Not rehashed to a few buckets (`capacity` also counts out the removed entries'
        // tombstones, so it is not exact).
        assert!(small.capacity() > 500, "{}", small.capacity());
    }

    /// Every accepted socket has `TCP_NODELAY`, from the listener (no call per connection), and
    /// `orig_dst` falls back to the accepted address when nothing redirected the connection.
    #[tokio::test]
    async fn accepted_sockets_have_nodelay_and_their_own_address_as_destination() {
        // The agent's listener (it has TCP_NODELAY) and a plain one.
        for listener in [
            bind("127.0.0.1:0".parse().unwrap()).unwrap(),
            TcpListener::bind("127.0.0.1:0").await.unwrap(),
        ] {
            let addr = listener.local_addr().unwrap();
            // Queued before `serve` runs.
            let _early = TcpStream::connect(addr).await.unwrap();
            let (_trigger, watch) = crate::drain::channel();
            let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
            let server = tokio::spawn(serve(listener, watch, move |stream, peer| {
                let tx = tx.clone();
                async move {
                    let _ = tx.send((stream.nodelay().unwrap(), orig_dst(&stream, peer).unwrap()));
                }
            }));
            let _late = TcpStream::connect(addr).await.unwrap();
            for _ in 0..2 {
                assert_eq!(rx.recv().await, Some((true, OrigDstAddr(addr))));
            }
            server.abort();
        }
    }

    /// A connection that would run forever holds the drain open until the deadline, then its
    /// task is abandoned (its future dropped, which closes its sockets); one that ended
    /// before leaves nothing behind.
    #[tokio::test]
    async fn the_drain_deadline_abandons_open_connection_tasks() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (trigger, watch) = crate::drain::channel();
        let (dropped_tx, mut dropped_rx) = tokio::sync::mpsc::unbounded_channel();
        struct OnDrop(tokio::sync::mpsc::UnboundedSender<u16>, u16);
        impl Drop for OnDrop {
            fn drop(&mut self) {
                let _ = self.0.send(self.1);
            }
        }
        let (started_tx, mut started_rx) = tokio::sync::mpsc::unbounded_channel();
        let server = tokio::spawn(serve(listener, watch, move |stream, peer| {
            let guard = OnDrop(dropped_tx.clone(), peer.0.port());
            let started = started_tx.clone();
            async move {
                let _guard = guard;
                let _ = started.send(());
                // A client that says `q` is done at once; any other stays forever.
                let mut buf = [0u8; 1];
                let _ = stream.readable().await;
                let _ = stream.try_read(&mut buf);
                if buf[0] != b'q' {
                    std::future::pending::<()>().await
                }
            }
        }));
        use tokio::io::AsyncWriteExt;
        let mut quick = TcpStream::connect(addr).await.unwrap();
        quick.write_all(b"q").await.unwrap();
        let quick_port = quick.local_addr().unwrap().port();
        assert_eq!(dropped_rx.recv().await, Some(quick_port));
        let mut stuck = TcpStream::connect(addr).await.unwrap();
        stuck.write_all(b"s").await.unwrap();
        let stuck_port = stuck.local_addr().unwrap().port();
        // Both tasks have started (the drain must find the second one running).
        for _ in 0..2 {
            started_rx.recv().await.unwrap();
        }
        let outcome = trigger.drain(Duration::from_millis(200)).await;
        assert_eq!(outcome, crate::drain::Outcome::Forced);
        let abandoned = tokio::time::timeout(Duration::from_secs(5), dropped_rx.recv()).await;
        assert_eq!(
            abandoned.expect("the stuck task is abandoned"),
            Some(stuck_port)
        );
        server.await.unwrap();
    }

    /// A handler that holds a watch of its own (the HBONE listener's, for GOAWAY) does not
    /// keep the drain open once accepting stopped.
    #[tokio::test]
    async fn the_drain_is_clean_when_connections_ended_although_the_handler_holds_a_watch() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (trigger, watch) = crate::drain::channel();
        let (done_tx, mut done_rx) = tokio::sync::mpsc::unbounded_channel();
        let held = watch.clone();
        let server = tokio::spawn(serve(listener, watch, move |_stream, _peer| {
            let (_held, done) = (held.clone(), done_tx.clone());
            async move {
                let _ = done.send(());
            }
        }));
        let _client = TcpStream::connect(addr).await.unwrap();
        done_rx.recv().await.unwrap();
        let outcome = tokio::time::timeout(
            Duration::from_secs(5),
            trigger.drain(Duration::from_secs(30)),
        )
        .await
        .expect("the drain ends before its deadline");
        assert_eq!(outcome, crate::drain::Outcome::Clean);
        server.await.unwrap();
    }

    /// The source port is left to `connect`, so it is not reserved at bind time; the
    /// connection still gets one and works.
    #[tokio::test]
    async fn a_source_bind_leaves_the_port_to_connect() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let dst = listener.local_addr().unwrap();
        let mut ports = Vec::new();
        for _ in 0..2 {
            let socket = TcpSocket::new_v4().unwrap();
            bind_source(&socket, IpAddr::from([127, 0, 0, 1])).unwrap();
            assert_eq!(
                socket.local_addr().unwrap().port(),
                0,
                "no port reserved at bind"
            );
            let stream = socket.connect(dst).await.unwrap();
            let (accepted, from) = listener.accept().await.unwrap();
            let local = stream.local_addr().unwrap();
            assert_eq!(local, from);
            assert_eq!(local.ip(), IpAddr::from([127, 0, 0, 1]));
            assert_ne!(local.port(), 0);
            ports.push(local.port());
            drop(accepted);
        }
        assert_ne!(ports[0], ports[1]);
    }
}
