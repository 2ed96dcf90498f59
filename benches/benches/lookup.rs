//! Cost of the proxy's mesh look-ups, in a mesh of 100 and of 10,000 workloads (10 and 1,000
//! services): `resolve` of a service VIP (with the endpoint choice) and of a pod IP,
//! `workload_by_ip`, `workload_by_uid`; on the bare `State`, then through `Store` (its read
//! lock, uncontended) as the proxy calls them. Hash look-ups: the two sizes should be close.
//! Run: `cargo bench -p benches --bench lookup`.

use std::hint::black_box;

use benches::mesh::{Mesh, NETWORK};
use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use xds::Store;

const SIZES: [usize; 2] = [100, 10_000];

fn state(c: &mut Criterion) {
    let mut group = c.benchmark_group("state");
    for size in SIZES {
        let mesh = Mesh::new(size);
        let s = &mesh.state;
        group.bench_function(BenchmarkId::new("resolve_service", size), |b| {
            b.iter(|| s.resolve(black_box(NETWORK), black_box(mesh.service)))
        });
        group.bench_function(BenchmarkId::new("resolve_pod", size), |b| {
            b.iter(|| s.resolve(black_box(NETWORK), black_box(mesh.pod)))
        });
        group.bench_function(BenchmarkId::new("workload_by_ip", size), |b| {
            b.iter(|| s.workload_by_ip(black_box(NETWORK), black_box(mesh.pod.ip())))
        });
        group.bench_function(BenchmarkId::new("workload_by_uid", size), |b| {
            b.iter(|| s.workload_by_uid(black_box(&mesh.uid)))
        });
    }
    group.finish();
}

fn store(c: &mut Criterion) {
    let mut group = c.benchmark_group("store");
    for size in SIZES {
        let Mesh {
            state,
            service,
            pod,
            uid,
        } = Mesh::new(size);
        let store = Store::new(state);
        group.bench_function(BenchmarkId::new("resolve_service", size), |b| {
            b.iter(|| store.resolve(black_box(NETWORK), black_box(service)))
        });
        group.bench_function(BenchmarkId::new("resolve_pod", size), |b| {
            b.iter(|| store.resolve(black_box(NETWORK), black_box(pod)))
        });
        group.bench_function(BenchmarkId::new("workload_by_ip", size), |b| {
            b.iter(|| store.workload_by_ip(black_box(NETWORK), black_box(pod.ip())))
        });
        group.bench_function(BenchmarkId::new("workload_by_uid", size), |b| {
            b.iter(|| store.workload_by_uid(black_box(&uid)))
        });
    }
    group.finish();
}

criterion_group!(benches, state, store);
criterion_main!(benches);
