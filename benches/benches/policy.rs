//! Cost of one authorization decision: the destination's 8 applying policies, among 8 or
//! 10,000 stored. The two figures should match: evaluation must not grow with policies that
//! do not apply. Run: `cargo bench -p benches --bench policy`.

use std::hint::black_box;

use benches::policy;
use criterion::{Criterion, criterion_group, criterion_main};

fn evaluation(c: &mut Criterion) {
    let conn = policy::connection();
    let mut group = c.benchmark_group("authorize");
    for total in [policy::APPLYING, 10_000] {
        let state = policy::mesh(total);
        group.bench_function(format!("{total}_policies"), |b| {
            b.iter(|| black_box(state.authorize(black_box(policy::DESTINATION), &conn)))
        });
    }
    group.finish();
}

criterion_group!(benches, evaluation);
criterion_main!(benches);
