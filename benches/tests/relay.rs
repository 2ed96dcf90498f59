//! Every relay of the relay benchmark moves bytes intact both ways, passes each side's EOF on as
//! a half-close while the other direction keeps flowing, and stops with connections still open.
//!
//! The io_uring relays are skipped, with the reason printed, where `io_uring_setup` is refused
//! (ENOSYS: no kernel support; EPERM: `kernel.io_uring_disabled` or a seccomp filter).

use std::io::{ErrorKind, Read, Write};
use std::net::{Ipv4Addr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::thread;
use std::time::Duration;

use benches::relay::{Kind, Relay, uring_unavailable};

const TIMEOUT: Duration = Duration::from_secs(10);

/// Deterministic bytes that differ from offset to offset, so a lost, repeated or reordered
/// chunk shows.
fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

fn connect(addr: SocketAddr) -> TcpStream {
    let sock = TcpStream::connect_timeout(&addr, TIMEOUT).expect("connect through the relay");
    sock.set_read_timeout(Some(TIMEOUT)).unwrap();
    sock.set_write_timeout(Some(TIMEOUT)).unwrap();
    sock
}

/// Accepts `n` connections on a fresh loopback port, each handled by `serve` on its own thread.
fn upstream(n: usize, serve: fn(TcpStream)) -> (SocketAddr, thread::JoinHandle<()>) {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
    let addr = listener.local_addr().unwrap();
    let acceptor = thread::spawn(move || {
        let handlers: Vec<_> = (0..n)
            .map(|_| {
                let (sock, _) = listener.accept().expect("accept from the relay");
                sock.set_read_timeout(Some(TIMEOUT)).unwrap();
                sock.set_write_timeout(Some(TIMEOUT)).unwrap();
                thread::spawn(move || serve(sock))
            })
            .collect();
        for h in handlers {
            h.join().expect("upstream handler");
        }
    });
    (addr, acceptor)
}

/// Echoes until the client's EOF, then half-closes.
fn echo(mut sock: TcpStream) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = sock.read(&mut buf).expect("upstream read");
        if n == 0 {
            break;
        }
        sock.write_all(&buf[..n]).expect("upstream write");
    }
    sock.shutdown(Shutdown::Write).unwrap();
}

/// Echoes until the client goes, by EOF or by reset (a stopped relay may do either).
fn echo_until_gone(mut sock: TcpStream) {
    let mut buf = [0u8; 1024];
    while let Ok(n @ 1..) = sock.read(&mut buf) {
        if sock.write_all(&buf[..n]).is_err() {
            return;
        }
    }
}

/// Speaks first and half-closes, then takes the client's whole message and answers with its
/// length: the client → server direction outlives server → client.
fn speak_first(mut sock: TcpStream) {
    sock.write_all(&pattern(1 << 20, 7)).unwrap();
    sock.shutdown(Shutdown::Write).unwrap();
    let mut got = Vec::new();
    sock.read_to_end(&mut got)
        .expect("upstream read after its own half-close");
    // A mismatch panics this thread, and the test joining it fails.
    assert!(got == pattern(3 << 20, 8), "client → server bytes");
}

fn skip(kind: Kind) -> bool {
    if kind.is_uring()
        && let Some(reason) = uring_unavailable()
    {
        eprintln!("skipping {kind}: {reason}");
        return true;
    }
    false
}

/// Both directions at once: the client writes while the echo comes back; the client's EOF
/// reaches the server, and the server's then reaches the client.
fn bulk_echo(kind: Kind) {
    if skip(kind) {
        return;
    }
    let (addr, server) = upstream(1, echo);
    let relay = Relay::spawn(kind, addr).unwrap();
    let sent = pattern(4 << 20, 1);
    let mut sock = connect(relay.addr());
    let mut writer = sock.try_clone().unwrap();
    let to_send = sent.clone();
    let writing = thread::spawn(move || {
        for chunk in to_send.chunks(100_003) {
            writer.write_all(chunk).unwrap();
        }
        writer.shutdown(Shutdown::Write).unwrap();
    });
    let mut got = Vec::new();
    sock.read_to_end(&mut got)
        .expect("read the echo to its EOF");
    writing.join().unwrap();
    assert!(
        got == sent,
        "{kind}: echoed {} of {} bytes, or altered",
        got.len(),
        sent.len()
    );
    server.join().expect("upstream");
    relay.stop().unwrap();
}

/// The server half-closes first and the client keeps sending afterwards.
fn server_closes_first(kind: Kind) {
    if skip(kind) {
        return;
    }
    let (addr, server) = upstream(1, speak_first);
    let relay = Relay::spawn(kind, addr).unwrap();
    let mut sock = connect(relay.addr());
    let mut got = Vec::new();
    sock.read_to_end(&mut got)
        .expect("read the server's message to its EOF");
    assert!(got == pattern(1 << 20, 7), "{kind}: server → client bytes");
    sock.write_all(&pattern(3 << 20, 8)).unwrap();
    sock.shutdown(Shutdown::Write).unwrap();
    server.join().expect("upstream checks what the client sent");
    relay.stop().unwrap();
}

/// Stopping tears down connections still open, and the relay thread returns.
fn stops_with_open_connections(kind: Kind) {
    if skip(kind) {
        return;
    }
    let (addr, server) = upstream(2, echo_until_gone);
    let relay = Relay::spawn(kind, addr).unwrap();
    let mut socks: Vec<_> = (0..2).map(|_| connect(relay.addr())).collect();
    for sock in &mut socks {
        sock.write_all(b"x").unwrap();
        let mut byte = [0u8; 1];
        sock.read_exact(&mut byte).unwrap();
        assert_eq!(&byte, b"x");
    }
    let usage = relay.stop().unwrap();
    assert!(
        usage.thread > Duration::ZERO,
        "{kind}: relay thread CPU measured"
    );
    for mut sock in socks {
        // EOF or reset, not a time-out.
        let mut rest = Vec::new();
        if let Err(e) = sock.read_to_end(&mut rest) {
            let timed_out = matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut);
            assert!(!timed_out, "{kind}: connection still open after the stop");
        }
    }
    server.join().expect("upstream sees its clients go");
}

macro_rules! for_each_kind {
    ($($name:ident => $kind:expr),* $(,)?) => {$(
        mod $name {
            use super::Kind;
            #[test]
            fn bulk_echo() {
                super::bulk_echo($kind)
            }
            #[test]
            fn server_closes_first() {
                super::server_closes_first($kind)
            }
            #[test]
            fn stops_with_open_connections() {
                super::stops_with_open_connections($kind)
            }
        }
    )*};
}

for_each_kind! {
    epoll_rw => Kind::EpollRw,
    epoll_splice => Kind::EpollSplice,
    uring_rw => Kind::UringRw,
    uring_splice => Kind::UringSplice,
}
