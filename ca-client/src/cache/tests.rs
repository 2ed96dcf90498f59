use std::sync::Arc;
use std::time::{Duration, SystemTime};

use identity::{Identity, WorkloadCertificate};

use super::*;
use crate::source::BoxFuture;
use crate::testing::{FakeSource, RecordingSink};

const VALIDITY: Duration = Duration::from_secs(600);

fn id(sa: &str) -> Identity {
    format!("spiffe://cluster.local/ns/demo/sa/{sa}")
        .parse()
        .unwrap()
}

fn setup() -> (Cache, Arc<FakeSource>, Arc<RecordingSink>) {
    let source = Arc::new(FakeSource::new(VALIDITY));
    let sink = Arc::new(RecordingSink::default());
    (Cache::new(source.clone(), sink.clone()), source, sink)
}

/// Lets every ready task run until the runtime is idle. With the clock paused, the runtime then
/// jumps to this sleep's deadline, not to the far-off renewal timers.
async fn settle() {
    tokio::time::sleep(Duration::from_millis(1)).await;
}

fn until_refresh(cert: &WorkloadCertificate) -> Duration {
    cert.refresh_at()
        .duration_since(SystemTime::now())
        .expect("a fresh certificate is before its half-life")
}

#[tokio::test(start_paused = true)]
async fn concurrent_gets_make_one_fetch() {
    let (cache, source, sink) = setup();
    let alice = id("alice");
    source.hold();
    let waiters: Vec<_> = (0..8)
        .map(|_| {
            let (cache, alice) = (cache.clone(), alice.clone());
            tokio::spawn(async move { cache.get(&alice).await })
        })
        .collect();
    settle().await;
    assert_eq!(source.fetches(), 1, "all gets wait on the one fetch");
    source.release();
    let mut certs = Vec::new();
    for waiter in waiters {
        certs.push(waiter.await.unwrap().unwrap());
    }
    assert!(certs.iter().all(|c| Arc::ptr_eq(c, &certs[0])));
    assert_eq!(source.fetches(), 1);
    assert_eq!(sink.published().len(), 1);
    assert!(Arc::ptr_eq(&sink.published()[0], &certs[0]));

    // Cached from now on.
    assert!(Arc::ptr_eq(&cache.get(&alice).await.unwrap(), &certs[0]));
    assert_eq!(source.fetches(), 1);
}

#[tokio::test(start_paused = true)]
async fn identities_are_fetched_separately() {
    let (cache, source, _sink) = setup();
    let a = cache.get(&id("alice")).await.unwrap();
    let b = cache.get(&id("bob")).await.unwrap();
    assert_eq!(a.identity, id("alice"));
    assert_eq!(b.identity, id("bob"));
    assert_eq!(source.fetches(), 2);
    assert_eq!(cache.identities(), vec![id("alice"), id("bob")]);
}

#[tokio::test(start_paused = true)]
async fn renews_at_half_life_and_publishes() {
    let (cache, source, sink) = setup();
    let alice = id("alice");
    let first = cache.get(&alice).await.unwrap();
    settle().await; // the rotation task must be asleep before the clock moves
    let wait = until_refresh(&first);

    tokio::time::advance(wait - Duration::from_secs(2)).await;
    settle().await;
    assert_eq!(source.fetches(), 1, "nothing happens before half-life");

    tokio::time::advance(Duration::from_secs(4)).await;
    settle().await;
    assert_eq!(source.fetches(), 2, "renewed at half-life");
    let published = sink.published();
    assert_eq!(published.len(), 2);
    let second = cache.get(&alice).await.unwrap();
    assert!(!Arc::ptr_eq(&first, &second));
    assert!(Arc::ptr_eq(&published[1], &second));
    assert_ne!(first.leaf(), second.leaf());

    // And again, from the new certificate's half-life.
    tokio::time::advance(until_refresh(&second) + Duration::from_secs(2)).await;
    settle().await;
    assert_eq!(source.fetches(), 3);
    assert_eq!(sink.published().len(), 3);
}

#[tokio::test(start_paused = true)]
async fn failed_renewal_keeps_the_old_certificate_and_retries() {
    let (cache, source, sink) = setup();
    let alice = id("alice");
    let first = cache.get(&alice).await.unwrap();
    settle().await;
    source.fail_next(3);

    tokio::time::advance(until_refresh(&first) + Duration::from_secs(1)).await;
    settle().await;
    assert_eq!(source.fetches(), 2, "the renewal was attempted");
    assert!(Arc::ptr_eq(&cache.get(&alice).await.unwrap(), &first));
    assert_eq!(sink.published().len(), 1, "a failure publishes nothing");

    // Retries follow by themselves; the old certificate is served until one succeeds.
    let mut steps = 0;
    while sink.published().len() == 1 {
        assert!(Arc::ptr_eq(&cache.get(&alice).await.unwrap(), &first));
        steps += 1;
        assert!(steps < 600, "no successful retry within ten minutes");
        tokio::time::advance(Duration::from_secs(1)).await;
        settle().await;
    }
    assert_eq!(
        source.fetches(),
        5,
        "three failed retries, then one that worked"
    );
    let renewed = cache.get(&alice).await.unwrap();
    assert!(!Arc::ptr_eq(&renewed, &first));
    assert!(Arc::ptr_eq(&sink.published()[1], &renewed));
}

#[tokio::test(start_paused = true)]
async fn forget_stops_rotation_and_tells_the_sink() {
    let (cache, source, sink) = setup();
    let alice = id("alice");
    let first = cache.get(&alice).await.unwrap();
    cache.forget(&alice);
    assert_eq!(sink.forgotten(), vec![alice.clone()]);
    assert!(cache.identities().is_empty());

    tokio::time::advance(until_refresh(&first) * 3).await;
    settle().await;
    assert_eq!(source.fetches(), 1, "no renewal after forget");

    let again = cache.get(&alice).await.unwrap();
    assert!(!Arc::ptr_eq(&again, &first), "forgotten means fetched anew");
    assert_eq!(source.fetches(), 2);
}

#[tokio::test(start_paused = true)]
async fn forget_during_a_fetch_fails_its_waiters_and_publishes_nothing() {
    let (cache, source, sink) = setup();
    let alice = id("alice");
    source.hold();
    let waiter = {
        let (cache, alice) = (cache.clone(), alice.clone());
        tokio::spawn(async move { cache.get(&alice).await })
    };
    settle().await;
    cache.forget(&alice);
    source.release();
    let err = waiter.await.unwrap().unwrap_err();
    assert!(matches!(err, Error::Forgotten { .. }), "{err}");
    settle().await;
    assert!(sink.published().is_empty());
    assert!(cache.identities().is_empty());
}

#[tokio::test(start_paused = true)]
async fn a_failed_first_fetch_is_returned_and_the_next_get_tries_again() {
    let (cache, source, sink) = setup();
    let alice = id("alice");
    source.fail_next(1);
    let err = cache.get(&alice).await.unwrap_err();
    assert!(matches!(err, Error::Unavailable { .. }), "{err}");
    assert!(
        err.to_string()
            .contains("spiffe://cluster.local/ns/demo/sa/alice")
    );
    assert!(cache.identities().is_empty());
    assert!(sink.published().is_empty());

    cache.get(&alice).await.unwrap();
    assert_eq!(source.fetches(), 2);
}

#[tokio::test(start_paused = true)]
async fn dropping_the_cache_stops_rotation() {
    let (cache, source, _sink) = setup();
    let first = cache.get(&id("alice")).await.unwrap();
    drop(cache);
    tokio::time::advance(until_refresh(&first) * 3).await;
    settle().await;
    assert_eq!(source.fetches(), 1);
}

/// Answers every request with a certificate for someone else.
struct Impostor(FakeSource);

impl CertificateSource for Impostor {
    fn fetch<'a>(
        &'a self,
        _identity: &'a Identity,
    ) -> BoxFuture<'a, Result<WorkloadCertificate, Error>> {
        Box::pin(async move { self.0.fetch(&id("mallory")).await })
    }
}

#[tokio::test(start_paused = true)]
async fn a_certificate_for_another_identity_is_refused() {
    let sink = Arc::new(RecordingSink::default());
    let cache = Cache::new(Arc::new(Impostor(FakeSource::new(VALIDITY))), sink.clone());
    let err = cache.get(&id("alice")).await.unwrap_err();
    assert!(
        matches!(&err, Error::WrongIdentity { got, .. } if *got == id("mallory")),
        "{err}"
    );
    assert!(sink.published().is_empty());
}

#[test]
fn retry_delay_doubles_up_to_the_cap_with_jitter() {
    let far = Duration::from_secs(24 * 3600);
    // Without jitter's lower half: the ceiling itself.
    assert_eq!(retry_delay(1, far, 1.0), Duration::from_millis(500));
    assert_eq!(retry_delay(2, far, 1.0), Duration::from_secs(1));
    assert_eq!(retry_delay(3, far, 1.0), Duration::from_secs(2));
    assert_eq!(retry_delay(10, far, 1.0), Duration::from_secs(150));
    assert_eq!(retry_delay(u32::MAX, far, 1.0), Duration::from_secs(150));
    // Jitter keeps at least half.
    assert_eq!(retry_delay(1, far, 0.0), Duration::from_millis(250));
    assert_eq!(retry_delay(10, far, 0.0), Duration::from_secs(75));
    let mid = retry_delay(4, far, 0.5);
    assert!(mid > Duration::from_secs(2) && mid < Duration::from_secs(4));
}

#[test]
fn retry_delay_never_sleeps_past_a_valid_certificates_expiry() {
    let soon = Duration::from_secs(10);
    assert_eq!(retry_delay(10, soon, 1.0), soon);
    assert_eq!(retry_delay(1, soon, 1.0), Duration::from_millis(500));
    // Once expired, plain backoff (no busy loop).
    assert_eq!(
        retry_delay(10, Duration::ZERO, 1.0),
        Duration::from_secs(150)
    );
}
