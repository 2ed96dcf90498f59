//! Throughput and latency of the copy loop through one HBONE stream, both agents in this
//! process joined by an in-memory pipe (see `benches::tunnel`): 64 KiB and 1 MiB messages one
//! way (client app → server app), and a 64 B ping-pong round trip; plaintext HTTP/2, then over
//! mutual TLS. `direct` is the two loopback apps connected without agents, the floor the
//! tunnel adds to. Run: `cargo bench -p benches --bench tunnel`.

use std::time::{Duration, Instant};

use benches::tunnel::{Apps, Path};
use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const MESSAGES: [(usize, &str); 2] = [(64 * 1024, "64KiB"), (1024 * 1024, "1MiB")];
const PING: usize = 64;

fn copy(c: &mut Criterion) {
    // Like the agent's: multi-threaded (here one worker per core of a 2-core runner).
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    for (name, path) in [
        ("direct", Path::Direct),
        ("plain", Path::Plain),
        ("tls", Path::Tls),
    ] {
        let mut apps = rt.block_on(Apps::connect(path));
        let mut group = c.benchmark_group(name);
        for (size, label) in MESSAGES {
            group.throughput(Throughput::Bytes(size as u64));
            group.bench_function(BenchmarkId::new("one_way", label), |b| {
                b.iter_custom(|iters| rt.block_on(one_way(&mut apps, size, iters)))
            });
        }
        group.throughput(Throughput::Elements(1));
        group.bench_function(BenchmarkId::new("round_trip", format!("{PING}B")), |b| {
            b.iter_custom(|iters| rt.block_on(ping_pong(&mut apps, iters)))
        });
        group.finish();
    }
}

/// `iters` messages of `size` bytes from the client app to the server app, written and read
/// concurrently.
async fn one_way(Apps { client, server, .. }: &mut Apps, size: usize, iters: u64) -> Duration {
    let message = vec![0x5a; size];
    let mut got = vec![0; size];
    let start = Instant::now();
    for _ in 0..iters {
        let (sent, read) = tokio::join!(client.write_all(&message), server.read_exact(&mut got));
        sent.expect("client write");
        read.expect("server read");
    }
    start.elapsed()
}

/// `iters` round trips of a [`PING`]-byte message and its echo.
async fn ping_pong(Apps { client, server, .. }: &mut Apps, iters: u64) -> Duration {
    let mut buf = [0x5a; PING];
    let start = Instant::now();
    for _ in 0..iters {
        client.write_all(&buf).await.expect("client write");
        server.read_exact(&mut buf).await.expect("server read");
        server.write_all(&buf).await.expect("server write");
        client.read_exact(&mut buf).await.expect("client read");
    }
    start.elapsed()
}

criterion_group!(benches, copy);
criterion_main!(benches);
