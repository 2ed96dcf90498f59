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
    let cache = Cache::new(source.clone(), sink.clone());
    // Exactly at half-life, so that tests can step around it; jitter has its own test.
    cache.set_renewal_jitter(0.0);
    (cache, source, sink)
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

#[tokio::test(start_paused = true)]
async fn renewal_comes_between_forty_and_fifty_percent_of_the_lifetime() {
    let (cache, source, _sink) = setup();
    cache.set_renewal_jitter(RENEWAL_JITTER);
    // Several identities, so that a schedule ignoring the jitter's lower bound would show.
    let ids: Vec<Identity> = (0..6).map(|n| id(&format!("w{n}"))).collect();
    let mut first = Vec::new();
    for identity in &ids {
        first.push(cache.get(identity).await.unwrap());
    }
    settle().await;
    let lifetime = first[0]
        .not_after
        .duration_since(first[0].not_before)
        .unwrap();
    // Nothing before 40% of the lifetime (measured from the earliest half-life).
    let refresh: Vec<Duration> = first.iter().map(|c| until_refresh(c)).collect();
    let (earliest, latest) = (
        *refresh.iter().min().unwrap(),
        *refresh.iter().max().unwrap(),
    );
    let window = lifetime.mul_f64(RENEWAL_JITTER);
    tokio::time::advance(earliest - window - Duration::from_secs(2)).await;
    settle().await;
    assert_eq!(
        source.fetches(),
        ids.len(),
        "no renewal before 40% of the lifetime"
    );
    // Jittered: with six identities, some renew early (all six in the window's last 4 s by
    // chance: odds about 1e-7).
    tokio::time::advance(window - Duration::from_secs(2)).await;
    settle().await;
    assert!(
        source.fetches() > ids.len(),
        "some renewals come before half-life"
    );
    // Everything by half-life.
    tokio::time::advance(latest - earliest + Duration::from_secs(4)).await;
    settle().await;
    assert_eq!(
        source.fetches(),
        2 * ids.len(),
        "every identity renewed by half-life"
    );
}

#[test]
fn renew_at_is_brought_forward_by_at_most_the_jitter() {
    let start = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
    let cert = WorkloadCertificate {
        identity: id("a"),
        chain: vec![],
        key: rustls_pki_types::PrivatePkcs8KeyDer::from(vec![1]),
        roots: vec![],
        not_before: start,
        not_after: start + Duration::from_secs(1000),
    };
    assert_eq!(renew_at(&cert, 0.1, 0.0), start + Duration::from_secs(500));
    assert_eq!(renew_at(&cert, 0.0, 0.9), start + Duration::from_secs(500));
    assert_eq!(renew_at(&cert, 0.1, 0.5), start + Duration::from_secs(450));
    let latest_early = renew_at(&cert, 0.1, 0.999_999);
    assert!(latest_early > start + Duration::from_secs(399));
    assert!(latest_early < start + Duration::from_secs(401));
}

#[tokio::test(start_paused = true)]
async fn set_wanted_fetches_ahead_and_forgets_the_rest() {
    let (cache, source, sink) = setup();
    let (alice, bob, carol) = (id("alice"), id("bob"), id("carol"));
    cache.get(&carol).await.unwrap();

    cache.set_wanted([alice.clone(), bob.clone()]);
    settle().await;
    assert_eq!(cache.identities(), vec![alice.clone(), bob.clone()]);
    assert_eq!(
        sink.forgotten(),
        vec![carol.clone()],
        "carol is no longer used"
    );
    let published: Vec<Identity> = sink
        .published()
        .iter()
        .map(|c| c.identity.clone())
        .collect();
    assert!(
        published.contains(&alice) && published.contains(&bob),
        "{published:?}"
    );
    assert_eq!(source.fetches(), 3);

    // Held certificates are served without another fetch.
    cache.get(&alice).await.unwrap();
    assert_eq!(source.fetches(), 3);

    // The same set again changes nothing; a smaller one forgets.
    cache.set_wanted([alice.clone(), bob.clone()]);
    settle().await;
    assert_eq!(source.fetches(), 3);
    cache.set_wanted([bob.clone()]);
    assert_eq!(cache.identities(), vec![bob.clone()]);
    assert_eq!(sink.forgotten(), vec![carol, alice]);
}

#[tokio::test(start_paused = true)]
async fn a_wanted_identity_is_retried_with_backoff_until_it_is_fetched() {
    let (cache, source, sink) = setup();
    let alice = id("alice");
    source.fail_next(3);
    cache.set_wanted([alice.clone()]);
    settle().await;
    assert_eq!(source.fetches(), 1);
    assert!(sink.published().is_empty());
    // Backoff: 250-500 ms, then 0.5-1 s, then 1-2 s; within 4 s all three retries are done.
    let mut steps = 0;
    while sink.published().is_empty() {
        steps += 1;
        assert!(steps < 40, "no successful prefetch within 4 s");
        tokio::time::advance(Duration::from_millis(100)).await;
        settle().await;
    }
    assert_eq!(source.fetches(), 4, "three failures, then one that worked");
    assert_eq!(cache.identities(), vec![alice.clone()]);

    // Once unwanted, a failing prefetch stops retrying.
    let bob = id("bob");
    source.fail_next(usize::MAX);
    cache.set_wanted([bob.clone()]);
    settle().await;
    let fetches = source.fetches();
    cache.set_wanted(Vec::new());
    tokio::time::advance(Duration::from_secs(600)).await;
    settle().await;
    assert_eq!(
        source.fetches(),
        fetches,
        "no retries for an identity no longer wanted"
    );
    assert!(cache.identities().is_empty());
}
