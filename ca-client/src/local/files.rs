//! The CA's files: a state directory with a root made on first run, or Istio's `cacerts` layout.
//!
//! Everything read is checked before it is used (key matches certificate, certificate is a CA,
//! chain leads to a root), and every error names the file at fault. A root key is written once,
//! with mode 0600 from its creation, and never overwritten.

use std::fs;
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use identity::Identity;
use rcgen::{KeyPair, PKCS_ECDSA_P256_SHA256, PKCS_ECDSA_P384_SHA384, PKCS_RSA_SHA256};
use rustls_pki_types::CertificateDer;
use x509_parser::public_key::PublicKey;

use super::{IssueError, LocalCa, new_root};
use crate::x509;

/// Root certificate in a state directory.
pub const ROOT_CERT: &str = "root-cert.pem";
/// Root key in a state directory (PKCS#8 PEM, mode 0600).
pub const ROOT_KEY: &str = "root-key.pem";

const MIN_RSA_BITS: usize = 2048;

/// A CA given as files, in Istio's `cacerts` layout.
///
/// `cert` signs leaves (it may be an intermediate) and `key` is its private key. `chain` holds
/// the certificates from `cert` up to the root (either end may be included); `root` the trusted
/// root(s). Without `root`, `cert` must be self-signed and is the root.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CaFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub chain: Option<PathBuf>,
    pub root: Option<PathBuf>,
}

impl CaFiles {
    /// Istio's `cacerts` secret mounted at `dir`: `ca-cert.pem`, `ca-key.pem`, and
    /// `cert-chain.pem` and `root-cert.pem` when they exist.
    pub fn cacerts(dir: &Path) -> CaFiles {
        let optional = |name: &str| Some(dir.join(name)).filter(|p| p.exists());
        CaFiles {
            cert: dir.join("ca-cert.pem"),
            key: dir.join("ca-key.pem"),
            chain: optional("cert-chain.pem"),
            root: optional("root-cert.pem"),
        }
    }
}

/// Why a CA could not be loaded or created.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("cannot read {}: {source}", path.display())]
    Read { path: PathBuf, source: io::Error },
    #[error("{}: {source}", path.display())]
    Pem { path: PathBuf, source: x509::Error },
    #[error("{}: {source}", path.display())]
    Cert { path: PathBuf, source: x509::Error },
    #[error(
        "{}: unusable private key ({reason}); expected an unencrypted ECDSA P-256, ECDSA P-384 \
         or RSA key",
        path.display()
    )]
    Key { path: PathBuf, reason: String },
    #[error(
        "{}: {kind} keys are not supported; use ECDSA P-256, ECDSA P-384 or RSA of 2048 bits or more",
        path.display()
    )]
    UnsupportedKey { path: PathBuf, kind: String },
    #[error("{}: RSA key of {bits} bits is too short; 2048 bits or more are required", path.display())]
    WeakKey { path: PathBuf, bits: usize },
    #[error("the private key in {} does not match the certificate in {}", key.display(), cert.display())]
    KeyMismatch { key: PathBuf, cert: PathBuf },
    #[error("the certificate in {} is not a CA certificate (no basic constraints with CA:TRUE)", path.display())]
    NotCa { path: PathBuf },
    #[error("no root file was given and the certificate in {} is not self-signed", path.display())]
    NotSelfSigned { path: PathBuf },
    #[error(
        "the subject name of the certificate in {} cannot be reproduced in issued certificates \
         (repeated or multi-valued attributes)",
        path.display()
    )]
    IssuerName { path: PathBuf },
    #[error("the certificate in {} does not chain to {to}: {source}", cert.display())]
    Chain {
        cert: PathBuf,
        /// The root file and the intermediates file, in words.
        to: String,
        source: Box<x509::Error>,
    },
    #[error("the CA in {} cannot issue certificates: {source}", path.display())]
    Issue { path: PathBuf, source: IssueError },
    #[error("a CA root already exists at {}; refusing to overwrite it", path.display())]
    Exists { path: PathBuf },
    #[error(
        "{} exists but {} does not; restore it, or remove both to create a new root",
        present.display(),
        missing.display()
    )]
    Incomplete { present: PathBuf, missing: PathBuf },
    #[error("cannot write {}: {source}", path.display())]
    Write { path: PathBuf, source: io::Error },
    #[error("generating a root failed: {0}")]
    Generate(#[source] rcgen::Error),
}

pub(super) fn load_or_init(dir: &Path) -> Result<LocalCa, LoadError> {
    let cert = dir.join(ROOT_CERT);
    let key = dir.join(ROOT_KEY);
    match (exists(&cert)?, exists(&key)?) {
        (true, true) => load(&CaFiles {
            cert,
            key,
            chain: None,
            root: None,
        }),
        (false, false) => init(dir),
        (true, false) => Err(LoadError::Incomplete {
            present: cert,
            missing: key,
        }),
        (false, true) => Err(LoadError::Incomplete {
            present: key,
            missing: cert,
        }),
    }
}

pub(super) fn init(dir: &Path) -> Result<LocalCa, LoadError> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|source| LoadError::Write {
            path: dir.to_owned(),
            source,
        })?;
    let cert_path = dir.join(ROOT_CERT);
    let key_path = dir.join(ROOT_KEY);
    for path in [&cert_path, &key_path] {
        if exists(path)? {
            return Err(LoadError::Exists { path: path.clone() });
        }
    }
    let (key, cert) = new_root().map_err(LoadError::Generate)?;
    // The key goes first: a directory with a certificate and no key is the one state `init`
    // cannot tell from a deliberate setup, so it must not be left behind.
    write_new(&key_path, key.serialize_pem().as_bytes(), 0o600)?;
    if let Err(e) = write_new(&cert_path, x509::cert_to_pem(&cert).as_bytes(), 0o644) {
        let _ = fs::remove_file(&key_path);
        return Err(e);
    }
    if let Ok(d) = fs::File::open(dir) {
        // Make the new names durable; failing here loses nothing already written.
        let _ = d.sync_all();
    }
    LocalCa::from_parts(key, cert.clone(), Vec::new(), vec![cert]).map_err(|source| {
        LoadError::Cert {
            path: cert_path,
            source,
        }
    })
}

pub(super) fn load(files: &CaFiles) -> Result<LocalCa, LoadError> {
    let mut certs = read_certs(&files.cert)?;
    let signing = certs.remove(0);
    let parsed = x509::parse(&signing).map_err(|source| LoadError::Cert {
        path: files.cert.clone(),
        source,
    })?;
    // Checked on the certificate first: aws-lc refuses to even parse short RSA private keys.
    if let Ok(PublicKey::RSA(rsa)) = parsed.public_key().parsed() {
        let bits = rsa.key_size();
        if bits < MIN_RSA_BITS {
            return Err(LoadError::WeakKey {
                path: files.cert.clone(),
                bits,
            });
        }
    }
    let key = read_key(&files.key)?;
    if parsed.public_key().subject_public_key.data.as_ref() != key.public_key_raw() {
        return Err(LoadError::KeyMismatch {
            key: files.key.clone(),
            cert: files.cert.clone(),
        });
    }
    if !matches!(parsed.basic_constraints(), Ok(Some(bc)) if bc.value.ca) {
        return Err(LoadError::NotCa {
            path: files.cert.clone(),
        });
    }
    let self_signed = parsed.subject().as_raw() == parsed.issuer().as_raw()
        && parsed.verify_signature(None).is_ok();
    let subject = parsed.subject().as_raw().to_vec();

    // Extra certificates after the signing one in its own file are read as its chain.
    if let Some(chain) = &files.chain {
        certs.extend(read_certs(chain)?);
    }
    let roots = match &files.root {
        Some(root) => read_certs(root)?,
        None if self_signed => vec![signing.clone()],
        None => {
            return Err(LoadError::NotSelfSigned {
                path: files.cert.clone(),
            });
        }
    };

    let ca = LocalCa::from_parts(key, signing, certs, roots).map_err(|source| LoadError::Cert {
        path: files.cert.clone(),
        source,
    })?;
    check_issues_verifiable_leaves(&ca, files, &subject)?;
    Ok(ca)
}

/// Issues a throw-away leaf and verifies it as a peer would: proves in one go that the key signs
/// for the certificate, that the certificate may sign, and that the chain leads to a root.
fn check_issues_verifiable_leaves(
    ca: &LocalCa,
    files: &CaFiles,
    signing_subject: &[u8],
) -> Result<(), LoadError> {
    let probe = Identity::new("ambientd.invalid", "ca-check", "probe")
        .expect("the probe identity is well-formed");
    let leaf = ca
        .issue(&probe, Duration::from_secs(60))
        .map_err(|source| LoadError::Issue {
            path: files.cert.clone(),
            source,
        })?;
    let issuer_matches =
        x509::parse(leaf.leaf()).is_ok_and(|leaf| leaf.issuer().as_raw() == signing_subject);
    if !issuer_matches {
        return Err(LoadError::IssuerName {
            path: files.cert.clone(),
        });
    }
    x509::verify_chain(&leaf.chain, &leaf.roots, SystemTime::now()).map_err(|source| {
        let roots = match &files.root {
            Some(root) => format!("a root in {}", root.display()),
            None => "itself (self-signed)".to_owned(),
        };
        let via = match &files.chain {
            Some(chain) => format!(" through the certificates in {}", chain.display()),
            None => String::new(),
        };
        LoadError::Chain {
            cert: files.cert.clone(),
            to: roots + &via,
            source: Box::new(source),
        }
    })
}

fn read(path: &Path) -> Result<Vec<u8>, LoadError> {
    fs::read(path).map_err(|source| LoadError::Read {
        path: path.to_owned(),
        source,
    })
}

fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, LoadError> {
    x509::certs_from_pem(&read(path)?).map_err(|source| LoadError::Pem {
        path: path.to_owned(),
        source,
    })
}

fn read_key(path: &Path) -> Result<KeyPair, LoadError> {
    let der = x509::key_from_pem(&read(path)?).map_err(|source| LoadError::Pem {
        path: path.to_owned(),
        source,
    })?;
    let key = KeyPair::try_from(&der).map_err(|e| LoadError::Key {
        path: path.to_owned(),
        reason: e.to_string(),
    })?;
    let alg = key.algorithm();
    if alg != &PKCS_ECDSA_P256_SHA256 && alg != &PKCS_ECDSA_P384_SHA384 && alg != &PKCS_RSA_SHA256 {
        return Err(LoadError::UnsupportedKey {
            path: path.to_owned(),
            kind: format!("{alg:?}"),
        });
    }
    Ok(key)
}

fn exists(path: &Path) -> Result<bool, LoadError> {
    fs::exists(path).map_err(|source| LoadError::Read {
        path: path.to_owned(),
        source,
    })
}

/// Writes `contents` to a new file at `path` created with `mode`, atomically: the name appears
/// only once the contents are on disk, and an existing file is never replaced.
fn write_new(path: &Path, contents: &[u8], mode: u32) -> Result<(), LoadError> {
    let write_err = |source| LoadError::Write {
        path: path.to_owned(),
        source,
    };
    let name = path.file_name().unwrap_or_default().to_string_lossy();
    let tmp = path.with_file_name(format!(
        ".{name}.{}.{:016x}.tmp",
        std::process::id(),
        rand::random::<u64>()
    ));
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&tmp)
        .map_err(write_err)?;
    if let Err(e) = file.write_all(contents).and_then(|()| file.sync_all()) {
        let _ = fs::remove_file(&tmp);
        return Err(write_err(e));
    }
    // A hard link, unlike rename, fails if `path` exists: two racing inits cannot clobber.
    let linked = fs::hard_link(&tmp, path);
    let _ = fs::remove_file(&tmp);
    match linked {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Err(LoadError::Exists {
            path: path.to_owned(),
        }),
        Err(e) => Err(write_err(e)),
    }
}
