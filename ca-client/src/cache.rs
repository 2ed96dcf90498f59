//! The per-identity certificate cache: one fetch at a time per identity, renewal at half-life.
//!
//! [`Cache`] owns, for each identity it was asked about, the current certificate, the fetch in
//! progress (shared by every caller waiting for it) and a rotation task that renews the
//! certificate shortly before half-way through its life (jittered, so that a node's identities
//! do not all renew at once), retrying with jittered exponential backoff while the old
//! certificate stays in service. Every certificate stored is published to the
//! [`CertificateSink`]. Which identities are needed is the caller's business: it asks for one
//! ([`Cache::get`]), drops one ([`Cache::forget`]), or states the whole set its local workloads
//! use ([`Cache::set_wanted`]), which fetches the new ones ahead and forgets the rest.

#[cfg(test)]
mod tests;

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, Weak};
use std::time::{Duration, SystemTime};

use identity::{Identity, WorkloadCertificate};
use tokio::sync::watch;
use tokio::task::AbortHandle;

use crate::source::{CertificateSink, CertificateSource, Error};

/// First retry delay after a failed renewal; it doubles with each failure...
const BACKOFF_START: Duration = Duration::from_millis(500);
/// ...up to this.
const BACKOFF_MAX: Duration = Duration::from_secs(150);

/// Renewal happens at a random point between `0.5 - RENEWAL_JITTER` and `0.5` of a certificate's
/// lifetime (40% to 50%), unless changed with [`Cache::set_renewal_jitter`].
pub const RENEWAL_JITTER: f64 = 0.1;

/// Certificates by identity, fetched from a [`CertificateSource`] and kept fresh.
///
/// Cheap to clone: clones share the certificates and tasks. Rotation tasks stop when the last
/// clone is dropped.
#[derive(Clone)]
pub struct Cache {
    inner: Arc<Inner>,
}

struct Inner {
    source: Arc<dyn CertificateSource>,
    sink: Arc<dyn CertificateSink>,
    entries: Mutex<HashMap<Identity, Entry>>,
    next_flight: AtomicU64,
    /// The identities of [`Cache::set_wanted`], each with its prefetch task (which ends once
    /// the first certificate is in).
    wanted: Mutex<HashMap<Identity, AbortHandle>>,
    /// An `f64` (bits): the fraction of a lifetime renewal may come before half-life.
    renewal_jitter: AtomicU64,
}

#[derive(Default)]
struct Entry {
    cert: Option<Arc<WorkloadCertificate>>,
    flight: Option<Flight>,
    rotation: Option<AbortHandle>,
}

/// A fetch in progress. It runs in its own task, so that a caller giving up does not cancel it
/// for the others waiting.
struct Flight {
    id: u64,
    outcome: watch::Receiver<Option<Outcome>>,
    task: AbortHandle,
}

type Outcome = Result<Arc<WorkloadCertificate>, Error>;

impl Cache {
    pub fn new(source: Arc<dyn CertificateSource>, sink: Arc<dyn CertificateSink>) -> Cache {
        Cache {
            inner: Arc::new(Inner {
                source,
                sink,
                entries: Mutex::new(HashMap::new()),
                next_flight: AtomicU64::new(0),
                wanted: Mutex::new(HashMap::new()),
                renewal_jitter: AtomicU64::new(RENEWAL_JITTER.to_bits()),
            }),
        }
    }

    /// The certificate for `identity`: the cached one while it has not expired, otherwise a
    /// fresh one (fetched once however many callers ask at the same time, then published and
    /// kept fresh in the background).
    pub async fn get(&self, identity: &Identity) -> Result<Arc<WorkloadCertificate>, Error> {
        let flight = {
            let mut entries = self.inner.lock();
            if let Some(cert) = entries.get(identity).and_then(|e| e.cert.as_ref())
                && !cert.is_expired(SystemTime::now())
            {
                return Ok(cert.clone());
            }
            self.inner.join_flight(&mut entries, identity)
        };
        wait(flight, identity).await
    }

    /// Sets how much earlier than half-life renewals may come, as a fraction of the lifetime
    /// (clamped to `[0, 0.5]`; 0 renews exactly at half-life). Applies from the next renewal
    /// scheduled.
    pub fn set_renewal_jitter(&self, fraction: f64) {
        let fraction = if fraction.is_nan() {
            0.0
        } else {
            fraction.clamp(0.0, 0.5)
        };
        self.inner
            .renewal_jitter
            .store(fraction.to_bits(), Ordering::Relaxed);
    }

    /// Makes `identities` the set this node needs: each new one is fetched ahead (retrying
    /// with backoff until it succeeds) and then kept fresh; every other identity held is
    /// forgotten. Must be called within a Tokio runtime.
    pub fn set_wanted(&self, identities: impl IntoIterator<Item = Identity>) {
        let wanted: HashSet<Identity> = identities.into_iter().collect();
        {
            let mut prefetching = self.inner.lock_wanted();
            prefetching.retain(|identity, task| {
                let keep = wanted.contains(identity);
                if !keep {
                    task.abort();
                }
                keep
            });
            for identity in &wanted {
                prefetching.entry(identity.clone()).or_insert_with(|| {
                    tokio::spawn(prefetch(Arc::downgrade(&self.inner), identity.clone()))
                        .abort_handle()
                });
            }
        }
        for identity in self.identities() {
            if !wanted.contains(&identity) {
                self.forget(&identity);
            }
        }
    }

    /// Stops renewing `identity`, drops its certificate and tells the sink. A fetch in progress
    /// is cancelled; its waiters get [`Error::Forgotten`]. It is no longer wanted either.
    pub fn forget(&self, identity: &Identity) {
        if let Some(prefetch) = self.inner.lock_wanted().remove(identity) {
            prefetch.abort();
        }
        let mut entries = self.inner.lock();
        if let Some(entry) = entries.remove(identity) {
            entry.abort();
            self.inner.sink.forget(identity);
        }
    }

    /// The identities held or being fetched, sorted.
    pub fn identities(&self) -> Vec<Identity> {
        let mut ids: Vec<Identity> = self.inner.lock().keys().cloned().collect();
        ids.sort();
        ids
    }
}

impl std::fmt::Debug for Cache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cache")
            .field("identities", &self.identities())
            .finish_non_exhaustive()
    }
}

impl Inner {
    fn lock(&self) -> MutexGuard<'_, HashMap<Identity, Entry>> {
        // A panicking sink must not wedge every later caller: the map itself stays consistent.
        self.entries.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn lock_wanted(&self) -> MutexGuard<'_, HashMap<Identity, AbortHandle>> {
        self.wanted.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn renewal_jitter(&self) -> f64 {
        f64::from_bits(self.renewal_jitter.load(Ordering::Relaxed))
    }

    /// The outcome of the fetch in progress for `identity`, starting one if there is none.
    fn join_flight(
        self: &Arc<Self>,
        entries: &mut HashMap<Identity, Entry>,
        identity: &Identity,
    ) -> watch::Receiver<Option<Outcome>> {
        let entry = entries.entry(identity.clone()).or_default();
        if let Some(flight) = &entry.flight {
            return flight.outcome.clone();
        }
        let id = self.next_flight.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = watch::channel(None);
        let source = self.source.clone();
        let inner = Arc::downgrade(self);
        let target = identity.clone();
        let task = tokio::spawn(async move {
            let result = source.fetch(&target).await;
            if let Some(inner) = inner.upgrade() {
                tx.send_replace(Some(inner.land(&target, id, result)));
            }
        });
        entry.flight = Some(Flight {
            id,
            outcome: rx.clone(),
            task: task.abort_handle(),
        });
        rx
    }

    /// Stores and publishes what flight `id` fetched, unless `identity` was forgotten meanwhile.
    fn land(
        self: &Arc<Self>,
        identity: &Identity,
        id: u64,
        fetched: Result<WorkloadCertificate, Error>,
    ) -> Outcome {
        let mut entries = self.lock();
        let Some(entry) = entries
            .get_mut(identity)
            .filter(|e| e.flight.as_ref().is_some_and(|f| f.id == id))
        else {
            return Err(Error::Forgotten {
                identity: identity.clone(),
            });
        };
        entry.flight = None;
        let fetched = fetched.and_then(|cert| {
            if cert.identity == *identity {
                Ok(cert)
            } else {
                Err(Error::WrongIdentity {
                    identity: identity.clone(),
                    got: cert.identity,
                })
            }
        });
        match fetched {
            Ok(cert) => {
                let cert = Arc::new(cert);
                entry.cert = Some(cert.clone());
                // Under the lock, so that a concurrent `forget` reaches the sink after this.
                self.sink.publish(cert.clone());
                if entry.rotation.is_none() {
                    let rotation = tokio::spawn(rotate(Arc::downgrade(self), identity.clone()));
                    entry.rotation = Some(rotation.abort_handle());
                }
                Ok(cert)
            }
            Err(error) => {
                // Without a certificate there is nothing to renew: the next `get` tries again.
                if entry.cert.is_none() {
                    entries.remove(identity);
                }
                Err(error)
            }
        }
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        let entries = self
            .entries
            .get_mut()
            .unwrap_or_else(PoisonError::into_inner);
        for (_, entry) in entries.drain() {
            entry.abort();
        }
        let wanted = self
            .wanted
            .get_mut()
            .unwrap_or_else(PoisonError::into_inner);
        for (_, prefetch) in wanted.drain() {
            prefetch.abort();
        }
    }
}

impl Entry {
    fn abort(self) {
        if let Some(flight) = self.flight {
            flight.task.abort();
        }
        if let Some(rotation) = self.rotation {
            rotation.abort();
        }
    }
}

async fn wait(mut outcome: watch::Receiver<Option<Outcome>>, identity: &Identity) -> Outcome {
    let forgotten = || Error::Forgotten {
        identity: identity.clone(),
    };
    match outcome.wait_for(Option::is_some).await {
        Ok(done) => done.clone().unwrap_or_else(|| Err(forgotten())),
        // The fetch task was aborted by `forget` (or the cache dropped) before it finished.
        Err(_) => Err(forgotten()),
    }
}

/// Keeps `identity`'s certificate fresh until it is forgotten or the cache is dropped.
async fn rotate(inner: Weak<Inner>, identity: Identity) {
    let mut failures: u32 = 0;
    loop {
        let Some((current, delay)) = next_attempt(&inner, &identity, failures) else {
            return;
        };
        tokio::time::sleep(delay).await;
        let flight = {
            let Some(inner) = inner.upgrade() else {
                return;
            };
            let mut entries = inner.lock();
            let Some(entry) = entries.get(&identity) else {
                return;
            };
            if !entry
                .cert
                .as_ref()
                .is_some_and(|c| Arc::ptr_eq(c, &current))
            {
                // A `get` replaced the certificate meanwhile: schedule from the new one.
                failures = 0;
                continue;
            }
            inner.join_flight(&mut entries, &identity)
        };
        match wait(flight, &identity).await {
            Ok(cert) if cert.refresh_at() > SystemTime::now() => {
                tracing::debug!(%identity, refresh_at = ?cert.refresh_at(), "certificate renewed");
                failures = 0;
            }
            Ok(cert) => {
                // Renewing again at once would hammer the CA (its own chain may expire soon).
                failures += 1;
                tracing::warn!(
                    %identity,
                    not_after = ?cert.not_after,
                    "renewed certificate is already past half-life; backing off",
                );
            }
            Err(Error::Forgotten { .. }) => return,
            Err(error) => {
                failures += 1;
                tracing::warn!(
                    %identity,
                    %error,
                    failures,
                    "certificate renewal failed; serving the current certificate until it expires",
                );
            }
        }
    }
}

/// Fetches `identity` ahead of any connection needing it, retrying until a certificate is in
/// (the rotation task takes over from there) or the identity is forgotten.
async fn prefetch(inner: Weak<Inner>, identity: Identity) {
    let mut failures: u32 = 0;
    loop {
        let Some(inner) = inner.upgrade() else {
            return;
        };
        let result = Cache { inner }.get(&identity).await;
        match result {
            Ok(_) | Err(Error::Forgotten { .. }) => return,
            Err(error) => {
                failures += 1;
                tracing::warn!(%identity, %error, failures, "fetching a certificate ahead failed");
                tokio::time::sleep(retry_delay(failures, Duration::ZERO, rand::random())).await;
            }
        }
    }
}

/// The current certificate and how long to wait before renewing it.
fn next_attempt(
    inner: &Weak<Inner>,
    identity: &Identity,
    failures: u32,
) -> Option<(Arc<WorkloadCertificate>, Duration)> {
    let inner = inner.upgrade()?;
    let current = inner.lock().get(identity)?.cert.clone()?;
    let now = SystemTime::now();
    let delay = if failures == 0 {
        until(
            renew_at(&current, inner.renewal_jitter(), rand::random()),
            now,
        )
    } else {
        retry_delay(failures, until(current.not_after, now), rand::random())
    };
    Some((current, delay))
}

/// Delay before retry number `failures` (from 1): exponential from [`BACKOFF_START`] up to
/// [`BACKOFF_MAX`], scaled by a `jitter` in `[0, 1)` to between half and all of it, and never
/// past the current certificate's expiry while it is still valid.
fn retry_delay(failures: u32, until_expiry: Duration, jitter: f64) -> Duration {
    let doublings = failures.saturating_sub(1).min(16);
    let ceiling = BACKOFF_START
        .saturating_mul(1 << doublings)
        .min(BACKOFF_MAX);
    let delay = ceiling.mul_f64(0.5 + jitter.clamp(0.0, 1.0) / 2.0);
    if until_expiry.is_zero() {
        delay
    } else {
        delay.min(until_expiry)
    }
}

/// When to renew `cert`: at half-life, brought forward by up to `jitter` of its lifetime, by a
/// `random` amount in `[0, 1)` of that.
fn renew_at(cert: &WorkloadCertificate, jitter: f64, random: f64) -> SystemTime {
    let lifetime = cert
        .not_after
        .duration_since(cert.not_before)
        .unwrap_or(Duration::ZERO);
    let early = lifetime.mul_f64((jitter * random.clamp(0.0, 1.0)).clamp(0.0, 0.5));
    cert.refresh_at() - early
}

fn until(t: SystemTime, now: SystemTime) -> Duration {
    t.duration_since(now).unwrap_or(Duration::ZERO)
}
