//! Fakes for tests, here and in the crates that use this one (feature `testing`).
//!
//! [`FakeSource`] is a real [`LocalCa`] with an in-memory root that counts fetches, can be told
//! to fail or to hold fetches until released, and issues certificates as short-lived as a test
//! wants. [`RecordingSink`] remembers what the cache published and forgot. [`FakeCa`] is the
//! Istio CA protocol on loopback, with a script.

mod server;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use identity::{Identity, WorkloadCertificate};
use tokio::sync::watch;

use crate::local::LocalCa;
use crate::source::{BoxFuture, CertificateSink, CertificateSource, Error};

pub use server::{FakeCa, Recorded, SERVER_NAME};

/// A certificate source backed by a throw-away local CA, with knobs for tests.
#[derive(Debug)]
pub struct FakeSource {
    ca: LocalCa,
    validity: Duration,
    fetches: AtomicUsize,
    fail_next: AtomicUsize,
    open: watch::Sender<bool>,
}

impl FakeSource {
    /// Issues certificates valid for `validity` from a new in-memory root.
    ///
    /// # Panics
    /// If the root cannot be generated (a broken crypto library).
    pub fn new(validity: Duration) -> FakeSource {
        FakeSource {
            ca: LocalCa::generate().expect("generating an in-memory root"),
            validity,
            fetches: AtomicUsize::new(0),
            fail_next: AtomicUsize::new(0),
            open: watch::Sender::new(true),
        }
    }

    /// The CA behind the fake (its roots verify what the fake issues).
    pub fn ca(&self) -> &LocalCa {
        &self.ca
    }

    /// Fetches started so far, including failed and held ones.
    pub fn fetches(&self) -> usize {
        self.fetches.load(Ordering::SeqCst)
    }

    /// Makes the next `n` fetches fail with [`Error::Unavailable`].
    pub fn fail_next(&self, n: usize) {
        self.fail_next.store(n, Ordering::SeqCst);
    }

    /// Makes fetches wait until [`FakeSource::release`].
    pub fn hold(&self) {
        self.open.send_replace(false);
    }

    /// Lets held and future fetches proceed.
    pub fn release(&self) {
        self.open.send_replace(true);
    }
}

impl CertificateSource for FakeSource {
    fn fetch<'a>(
        &'a self,
        identity: &'a Identity,
    ) -> BoxFuture<'a, Result<WorkloadCertificate, Error>> {
        Box::pin(async move {
            self.fetches.fetch_add(1, Ordering::SeqCst);
            let mut open = self.open.subscribe();
            // The sender lives in `self`, so this cannot see a closed channel.
            let _ = open.wait_for(|open| *open).await;
            let fail = self
                .fail_next
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                .is_ok();
            if fail {
                return Err(Error::Unavailable {
                    identity: identity.clone(),
                    reason: "the fake CA was told to fail".into(),
                });
            }
            self.ca
                .issue(identity, self.validity)
                .map_err(|source| Error::Local {
                    identity: identity.clone(),
                    source: Arc::new(source),
                })
        })
    }
}

/// A sink that records every call.
#[derive(Debug, Default)]
pub struct RecordingSink {
    published: Mutex<Vec<Arc<WorkloadCertificate>>>,
    forgotten: Mutex<Vec<Identity>>,
}

impl RecordingSink {
    /// Every certificate published, oldest first.
    pub fn published(&self) -> Vec<Arc<WorkloadCertificate>> {
        self.published
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Every identity forgotten, oldest first.
    pub fn forgotten(&self) -> Vec<Identity> {
        self.forgotten
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }
}

impl CertificateSink for RecordingSink {
    fn publish(&self, cert: Arc<WorkloadCertificate>) {
        self.published
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(cert);
    }

    fn forget(&self, identity: &Identity) {
        self.forgotten
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(identity.clone());
    }
}
