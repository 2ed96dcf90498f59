//! `ambientd ca init` and `ambientd ca issue`: create a root that several agents share, and
//! issue a certificate so operators can inspect what the CA hands out.

use std::fs;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::time::Duration;

use anyhow::Context;
use ca_client::{CaFiles, LocalCa, x509};
use identity::Identity;
use rustls_pki_types::pem::PemObject;

pub fn init(dir: &Path) -> anyhow::Result<()> {
    LocalCa::init(dir).with_context(|| format!("creating a root in {}", dir.display()))?;
    println!("created a new root CA in {}", dir.display());
    println!(
        "  certificate: {}",
        dir.join(ca_client::local::ROOT_CERT).display()
    );
    println!(
        "  key:         {} (mode 0600)",
        dir.join(ca_client::local::ROOT_KEY).display()
    );
    println!(
        "start each agent with --state-dir {} to share it",
        dir.display()
    );
    Ok(())
}

pub fn issue(dir: &Path, identity: &str, out: &Path, ttl: Duration) -> anyhow::Result<()> {
    let identity: Identity = identity.parse()?;
    let ca = LocalCa::load(&CaFiles {
        cert: dir.join(ca_client::local::ROOT_CERT),
        key: dir.join(ca_client::local::ROOT_KEY),
        chain: None,
        root: None,
    })
    .with_context(|| {
        format!(
            "loading the root in {} (run `ambientd ca init` first)",
            dir.display()
        )
    })?;
    let cert = ca.issue(&identity, ttl)?;
    fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    let chain = x509::certs_to_pem(&cert.chain);
    let roots = x509::certs_to_pem(&cert.roots);
    write(&out.join("cert-chain.pem"), chain.as_bytes(), 0o644)?;
    write(&out.join("root-cert.pem"), roots.as_bytes(), 0o644)?;
    write(
        &out.join("key.pem"),
        x509::key_to_pem(&cert.key).as_bytes(),
        0o600,
    )?;
    let ids = x509::spiffe_ids(cert.leaf())?;
    let (not_before, not_after) = x509::validity(cert.leaf())?;
    println!("issued a certificate for {identity}");
    println!(
        "  URI SANs:   {}",
        ids.iter()
            .map(|i| i.to_string())
            .collect::<Vec<_>>()
            .join(", ")
    );
    println!("  not before: {}", humantime(not_before));
    println!("  not after:  {}", humantime(not_after));
    println!(
        "  files:      cert-chain.pem, key.pem (0600), root-cert.pem in {}",
        out.display()
    );
    // Round-trip check: what was written parses back.
    let written = fs::read(out.join("cert-chain.pem"))?;
    let parsed = rustls_pki_types::CertificateDer::pem_slice_iter(&written).count();
    anyhow::ensure!(
        parsed == cert.chain.len(),
        "cert-chain.pem did not read back"
    );
    Ok(())
}

fn write(path: &Path, data: &[u8], mode: u32) -> anyhow::Result<()> {
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(path)
        .with_context(|| format!("writing {}", path.display()))?;
    f.write_all(data)?;
    Ok(())
}

fn humantime(t: std::time::SystemTime) -> String {
    let t = time::OffsetDateTime::from(t);
    t.format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_else(|_| t.to_string())
}
