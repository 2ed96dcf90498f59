//! The HBONE client pool: HTTP/2 connections to peer agents, shared by tunnelled streams.
//!
//! A connection is keyed by (source identity, expected destination identities, destination
//! address), so a TLS session is never shared between source identities. Each connection
//! carries at most `max_streams` streams (fewer when the peer allows fewer); when all are full
//! another is opened. A key's last connection is closed once it has had no stream for
//! `idle_timeout`; the others (opened for a burst, and emptied when it ended) already after
//! [`SURPLUS_IDLE`]. Each is kept alive (and checked) with PINGs.
//! Opening happens under a per-key lock, so a burst of new streams to one peer waits for one
//! handshake instead of opening one connection each.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use bytes::Bytes;
use identity::Identity;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::time::Instant;

use crate::config::H2Config;

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Key {
    pub src: Identity,
    /// The source address the connection is opened from: pods sharing an identity still get
    /// connections of their own (each from its own network namespace).
    pub src_ip: Option<IpAddr>,
    /// Sorted, without duplicates.
    pub expected: Vec<Identity>,
    pub dst: SocketAddr,
}

impl Key {
    pub fn new(
        src: Identity,
        src_ip: Option<IpAddr>,
        mut expected: Vec<Identity>,
        dst: SocketAddr,
    ) -> Self {
        expected.sort();
        expected.dedup();
        Self {
            src,
            src_ip,
            expected,
            dst,
        }
    }
}

/// How long a key's connections other than its most recently used one are kept without a
/// stream (at most `idle_timeout`). A burst of streams opens connections of 100 streams each,
/// and each holds ~100 KiB (buffers, TLS and HPACK state) while it is kept; one connection
/// already serves the next stream at once, and another burst within this time finds them all.
pub const SURPLUS_IDLE: Duration = Duration::from_secs(30);

#[derive(Debug, Clone)]
pub struct PoolConfig {
    pub max_streams: usize,
    pub idle_timeout: Duration,
}

impl Default for PoolConfig {
    fn default() -> Self {
        Self {
            max_streams: 100,
            idle_timeout: Duration::from_secs(300),
        }
    }
}

/// An established HBONE connection.
pub struct Conn {
    send: h2::client::SendRequest<Bytes>,
    /// The server identity TLS verified.
    pub peer: Option<Identity>,
    streams: AtomicUsize,
    idle_since: Mutex<Instant>,
    closed: Arc<AtomicBool>,
}

impl Conn {
    fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }

    /// Marks the connection unusable for new streams (it failed or was told to go away).
    pub fn retire(&self) {
        self.closed.store(true, Ordering::Release);
    }
}

/// A stream slot on a pooled connection; dropping it frees the slot. (One pointer: a session
/// holds it for the connection's life.)
pub struct Checkout {
    conn: Arc<Conn>,
}

impl Checkout {
    pub fn conn(&self) -> &Arc<Conn> {
        &self.conn
    }

    pub fn sender(&self) -> h2::client::SendRequest<Bytes> {
        self.conn.send.clone()
    }
}

impl Drop for Checkout {
    fn drop(&mut self) {
        if self.conn.streams.fetch_sub(1, Ordering::AcqRel) == 1 {
            *self.conn.idle_since.lock().expect("pool lock poisoned") = Instant::now();
        }
    }
}

type Slot = Arc<tokio::sync::Mutex<Vec<Arc<Conn>>>>;

struct Inner {
    cfg: PoolConfig,
    slots: Mutex<HashMap<Key, Slot>>,
    opened: AtomicU64,
}

#[derive(Clone)]
pub struct Pool {
    inner: Arc<Inner>,
}

impl Pool {
    pub fn new(cfg: PoolConfig) -> Self {
        let inner = Arc::new(Inner {
            cfg,
            slots: Mutex::new(HashMap::new()),
            opened: AtomicU64::new(0),
        });
        Self { inner }
    }

    /// Closes connections idle for `idle_timeout`; runs until the pool is dropped.
    pub fn reaper(&self) -> impl Future<Output = ()> + Send + 'static {
        reap(Arc::downgrade(&self.inner))
    }

    /// A stream slot on a connection for `key`, opening one with `connect` when none has room;
    /// with whether the connection existed before (a stale one may be retried).
    pub async fn checkout<F, Fut, E>(&self, key: Key, connect: F) -> Result<(Checkout, bool), E>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<Conn, E>>,
    {
        let slot = self
            .inner
            .slots
            .lock()
            .expect("pool lock poisoned")
            .entry(key)
            .or_default()
            .clone();
        let mut conns = slot.lock().await;
        conns.retain(|c| !c.is_closed());
        for conn in conns.iter() {
            // Never past what the peer allows (SETTINGS_MAX_CONCURRENT_STREAMS): a stream over
            // its limit would wait in h2 for another to end instead of opening.
            let max = self
                .inner
                .cfg
                .max_streams
                .min(conn.send.current_max_send_streams());
            let used = conn.streams.load(Ordering::Acquire);
            if used < max
                && conn
                    .streams
                    .compare_exchange(used, used + 1, Ordering::AcqRel, Ordering::Acquire)
                    .is_ok()
            {
                return Ok((Checkout { conn: conn.clone() }, true));
            }
        }
        let conn = Arc::new(connect().await?);
        conn.streams.store(1, Ordering::Release);
        self.inner.opened.fetch_add(1, Ordering::Relaxed);
        conns.push(conn.clone());
        Ok((Checkout { conn }, false))
    }

    /// Forgets the connections opened from `ip` (an un-enrolled pod's address): no new stream
    /// uses them, and each closes once its open streams have ended.
    pub fn forget_source(&self, ip: IpAddr) {
        self.inner
            .slots
            .lock()
            .expect("pool lock poisoned")
            .retain(|key, _| key.src_ip != Some(ip));
    }

    /// Open connections in the pool (a key whose slot is being checked out at this instant is
    /// not counted).
    pub fn connections(&self) -> usize {
        let slots: Vec<Slot> = self
            .inner
            .slots
            .lock()
            .expect("pool lock poisoned")
            .values()
            .cloned()
            .collect();
        slots
            .iter()
            .map(|s| {
                s.try_lock()
                    .map(|c| c.iter().filter(|c| !c.is_closed()).count())
                    .unwrap_or(0)
            })
            .sum()
    }

    /// Connections opened since start.
    pub fn opened(&self) -> u64 {
        self.inner.opened.load(Ordering::Relaxed)
    }
}

impl PoolConfig {
    fn surplus_idle(&self) -> Duration {
        SURPLUS_IDLE.min(self.idle_timeout)
    }

    /// How often the reaper looks (5 s by default: a look costs a pass over the keys).
    fn sweep_every(&self) -> Duration {
        (self.surplus_idle() / 6).max(Duration::from_millis(100))
    }
}

async fn reap(inner: Weak<Inner>) {
    let period = match inner.upgrade() {
        Some(i) => i.cfg.sweep_every(),
        None => return,
    };
    loop {
        tokio::time::sleep(period).await;
        let Some(inner) = inner.upgrade() else { return };
        let now = Instant::now();
        let mut slots = inner.slots.lock().expect("pool lock poisoned");
        slots.retain(|_, slot| {
            // A slot being used right now (locked) is kept as it is until the next round.
            let Ok(mut conns) = slot.try_lock() else {
                return true;
            };
            sweep(&mut conns, &inner.cfg, now);
            !conns.is_empty()
        });
    }
}

/// Retires and drops one key's connections that have been unused too long: the most recently
/// used one after `idle_timeout`, every other one after [`PoolConfig::surplus_idle`].
fn sweep(conns: &mut Vec<Arc<Conn>>, cfg: &PoolConfig, now: Instant) {
    conns.retain(|c| !c.is_closed());
    // How long each has been unused; `None` while it carries a stream.
    let unused: Vec<Option<Duration>> = conns
        .iter()
        .map(|c| {
            (c.streams.load(Ordering::Acquire) == 0).then(|| {
                let since = *c.idle_since.lock().expect("pool lock poisoned");
                now.saturating_duration_since(since)
            })
        })
        .collect();
    let busy = unused.iter().any(Option::is_none);
    // The connection kept longest: the most recently used idle one, unless one is busy.
    let last = (!busy)
        .then(|| (0..conns.len()).min_by_key(|&i| unused[i]))
        .flatten();
    let mut i = 0;
    conns.retain(|c| {
        let timeout = if Some(i) == last {
            cfg.idle_timeout
        } else {
            cfg.surplus_idle()
        };
        let idle = unused[i].is_some_and(|d| d >= timeout);
        i += 1;
        if idle {
            c.retire();
        }
        !idle
    });
}

/// The HTTP/2 client handshake over an established TLS stream, with HBONE's settings; spawns
/// the connection driver and its PING keepalive.
pub async fn handshake<T>(
    io: T,
    h2cfg: &H2Config,
    peer: Option<Identity>,
) -> Result<Conn, h2::Error>
where
    T: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (send, mut conn) = h2::client::Builder::new()
        .initial_window_size(h2cfg.stream_window)
        .initial_connection_window_size(h2cfg.connection_window)
        .max_frame_size(h2cfg.max_frame_size)
        .max_header_list_size(16 * 1024)
        .max_send_buffer_size(h2cfg.stream_window as usize)
        .enable_push(false)
        .handshake::<_, Bytes>(io)
        .await?;
    let closed = Arc::new(AtomicBool::new(false));
    let pings = conn.ping_pong();
    let driver_closed = closed.clone();
    let (interval, timeout) = (h2cfg.ping_interval, h2cfg.ping_timeout);
    tokio::spawn(async move {
        let keepalive = async move {
            match pings {
                Some(p) => super::keepalive(p, interval, timeout).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            res = conn => if let Err(e) = res {
                tracing::debug!(error = %e, "HBONE client connection ended");
            },
            () = keepalive => tracing::warn!("HBONE peer did not answer PING; connection closed"),
        }
        driver_closed.store(true, Ordering::Release);
    });
    Ok(Conn {
        send,
        peer,
        streams: AtomicUsize::new(0),
        idle_since: Mutex::new(Instant::now()),
        closed,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A connection to an in-memory peer that allows `max_streams` concurrent streams and
    /// answers each with 200.
    async fn connect_to_test_peer(
        servers: &mut tokio::task::JoinSet<()>,
        max_streams: u32,
    ) -> Result<Conn, h2::Error> {
        let (client, server) = tokio::io::duplex(64 * 1024);
        servers.spawn(async move {
            let mut conn = h2::server::Builder::new()
                .max_concurrent_streams(max_streams)
                .handshake::<_, Bytes>(server)
                .await
                .unwrap();
            let mut held = Vec::new();
            while let Some(Ok((_req, mut respond))) = conn.accept().await {
                let ok = http::Response::new(());
                held.push(respond.send_response(ok, false).unwrap());
            }
        });
        handshake(client, &H2Config::default(), None).await
    }

    fn test_key() -> Key {
        let id = Identity::new("cluster.local", "demo", "client").unwrap();
        Key::new(id, None, Vec::new(), "198.18.1.3:15008".parse().unwrap())
    }

    /// A pool of one stream per connection, with three connections for `test_key()`, each
    /// carrying the stream of its checkout.
    async fn three_connections() -> (Pool, tokio::task::JoinSet<()>, Vec<Checkout>) {
        let pool = Pool::new(PoolConfig {
            max_streams: 1,
            ..PoolConfig::default()
        });
        let mut servers = tokio::task::JoinSet::new();
        let mut slots = Vec::new();
        for _ in 0..3 {
            let (slot, _) = pool
                .checkout(test_key(), || connect_to_test_peer(&mut servers, 100))
                .await
                .unwrap();
            slots.push(slot);
        }
        (pool, servers, slots)
    }

    /// Sweeps `test_key()`'s connections as if `after` had passed; the ones left.
    fn sweep_test_key(pool: &Pool, after: Duration) -> Vec<*const Conn> {
        let slot = pool.inner.slots.lock().unwrap()[&test_key()].clone();
        let mut conns = slot.try_lock().unwrap();
        sweep(&mut conns, &pool.inner.cfg, Instant::now() + after);
        conns.iter().map(Arc::as_ptr).collect()
    }

    /// After a burst, a key keeps its most recently used connection for `idle_timeout` and
    /// closes the others after `SURPLUS_IDLE`; while one carries a stream, every idle one is
    /// surplus.
    #[tokio::test]
    async fn surplus_connections_close_before_the_last_one() {
        let (pool, mut servers, mut slots) = three_connections().await;
        let idle_timeout = pool.inner.cfg.idle_timeout;
        assert_eq!(pool.connections(), 3);
        let sweep_at = |after: Duration| sweep_test_key(&pool, after);

        // The third still carries its stream: the two idle ones are surplus.
        let held = slots.pop().unwrap();
        let busy = Arc::as_ptr(held.conn());
        slots.clear();
        assert_eq!(sweep_at(SURPLUS_IDLE - Duration::from_secs(1)).len(), 3);
        assert_eq!(sweep_at(SURPLUS_IDLE), [busy]);

        // Once it is idle too, it is the last one and stays until the idle timeout.
        drop(held);
        assert_eq!(sweep_at(SURPLUS_IDLE * 2), [busy]);
        assert_eq!(sweep_at(idle_timeout - Duration::from_secs(1)), [busy]);
        assert!(sweep_at(idle_timeout).is_empty());
        servers.abort_all();
    }

    /// Of several idle connections, the one used last is kept.
    #[tokio::test]
    async fn the_connection_used_last_is_the_one_kept() {
        let (pool, mut servers, mut slots) = three_connections().await;
        let middle = Arc::as_ptr(slots[1].conn());
        let others: Vec<_> = [slots.remove(0), slots.remove(1)].into();
        drop(others);
        tokio::time::sleep(Duration::from_millis(20)).await;
        drop(slots);
        assert_eq!(sweep_test_key(&pool, SURPLUS_IDLE), [middle]);
        servers.abort_all();
    }

    /// A peer that allows two concurrent streams gets a second connection for the third
    /// stream, although the pool's own limit is higher.
    #[tokio::test]
    async fn a_connection_carries_no_more_streams_than_the_peer_allows() {
        let pool = Pool::new(PoolConfig::default());
        let key = test_key();
        let mut servers = tokio::task::JoinSet::new();
        let mut slots = Vec::new();
        let mut open_streams = Vec::new();
        for _ in 0..3 {
            let (slot, reused) = pool
                .checkout(key.clone(), || connect_to_test_peer(&mut servers, 2))
                .await
                .unwrap();
            // A stream that is answered: the peer's SETTINGS have been read by then.
            let mut sender = slot.sender().ready().await.unwrap();
            let request = http::Request::connect("198.18.1.3:8080").body(()).unwrap();
            let (response, stream) = sender.send_request(request, false).unwrap();
            let response = tokio::time::timeout(Duration::from_secs(5), response)
                .await
                .expect("the stream opens at once")
                .unwrap();
            assert_eq!(response.status(), http::StatusCode::OK);
            open_streams.push((response, stream));
            slots.push((slot, reused));
        }
        assert_eq!(pool.opened(), 2);
        assert!(slots[1].1 && !slots[2].1);
        servers.abort_all();
    }
}
