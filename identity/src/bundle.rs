//! A workload's certificate bundle: leaf, intermediates, key and trusted roots, as DER.

use std::time::{Duration, SystemTime};

use rustls_pki_types::{CertificateDer, PrivatePkcs8KeyDer};

use crate::Identity;

/// The certificate a workload presents, with what is needed to verify peers.
///
/// `chain[0]` is the leaf for `identity`; the rest are intermediates, root
/// excluded (the root is never sent on the wire). `roots` are the mesh roots
/// peers are verified against.
#[derive(Debug)]
pub struct WorkloadCertificate {
    pub identity: Identity,
    pub chain: Vec<CertificateDer<'static>>,
    pub key: PrivatePkcs8KeyDer<'static>,
    pub roots: Vec<CertificateDer<'static>>,
    pub not_before: SystemTime,
    pub not_after: SystemTime,
}

impl WorkloadCertificate {
    /// When to fetch a replacement: half-way through the validity period.
    pub fn refresh_at(&self) -> SystemTime {
        let lifetime = self
            .not_after
            .duration_since(self.not_before)
            .unwrap_or(Duration::ZERO);
        self.not_before + lifetime / 2
    }

    pub fn is_expired(&self, now: SystemTime) -> bool {
        now >= self.not_after
    }

    pub fn leaf(&self) -> &CertificateDer<'static> {
        &self.chain[0]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refresh_is_at_half_life() {
        let start = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000);
        let cert = WorkloadCertificate {
            identity: "spiffe://td/ns/a/sa/b".parse().unwrap(),
            chain: vec![CertificateDer::from(vec![1])],
            key: PrivatePkcs8KeyDer::from(vec![2]),
            roots: vec![],
            not_before: start,
            not_after: start + Duration::from_secs(3_600),
        };
        assert_eq!(cert.refresh_at(), start + Duration::from_secs(1_800));
        assert!(!cert.is_expired(start + Duration::from_secs(3_599)));
        assert!(cert.is_expired(start + Duration::from_secs(3_600)));
    }
}
