//! The gRPC channel to the control plane: TCP, then TLS verified against the
//! configured root (re-read on every connect, as it rotates) with ALPN `h2`,
//! or plaintext for an `http://` address (development only). A fresh channel
//! is built per stream, so every reconnect is a new TLS session.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use hyper_util::rt::TokioIo;
use rustls::pki_types::{CertificateDer, ServerName, pem::PemObject};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tonic::transport::{Channel, Endpoint, Uri};

use super::{ClientError, Config};

trait Io: AsyncRead + AsyncWrite + Send + Unpin {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin> Io for T {}

/// Connects a channel to `cfg.address`.
pub(crate) async fn connect(cfg: &Config) -> Result<Channel, ClientError> {
    let uri: Uri = cfg
        .address
        .parse()
        .map_err(|_| ClientError::Address(cfg.address.clone()))?;
    let tls = match uri.scheme_str() {
        Some("https") => {
            let host = match &cfg.server_name {
                Some(name) => name.clone(),
                None => uri
                    .host()
                    .ok_or_else(|| ClientError::Address(cfg.address.clone()))?
                    .trim_start_matches('[')
                    .trim_end_matches(']')
                    .to_owned(),
            };
            let name = ServerName::try_from(host.clone())
                .map_err(|_| ClientError::ServerName(host.clone()))?;
            let root = cfg.root_cert.as_deref().ok_or(ClientError::NoRoot)?;
            Some((tls_config(root)?, name))
        }
        Some("http") => None,
        _ => return Err(ClientError::Address(cfg.address.clone())),
    };
    let endpoint = Endpoint::from(uri)
        .connect_timeout(cfg.connect_timeout)
        .http2_keep_alive_interval(Duration::from_secs(30))
        .keep_alive_timeout(Duration::from_secs(10))
        .keep_alive_while_idle(true);
    let connect_timeout = cfg.connect_timeout;
    let connector = tower::service_fn(move |uri: Uri| {
        let tls = tls.clone();
        async move {
            let host = uri
                .host()
                .unwrap_or_default()
                .trim_start_matches('[')
                .trim_end_matches(']');
            let port = uri
                .port_u16()
                .unwrap_or(if tls.is_some() { 443 } else { 80 });
            let tcp = tokio::time::timeout(connect_timeout, TcpStream::connect((host, port)))
                .await
                .map_err(|_| {
                    std::io::Error::new(std::io::ErrorKind::TimedOut, "TCP connect timed out")
                })??;
            tcp.set_nodelay(true)?;
            // A dead peer behind a silent network shows up within minutes.
            socket2::SockRef::from(&tcp).set_tcp_keepalive(
                &socket2::TcpKeepalive::new()
                    .with_time(Duration::from_secs(300))
                    .with_interval(Duration::from_secs(75))
                    .with_retries(9),
            )?;
            let io: Box<dyn Io> = match tls {
                Some((config, name)) => {
                    let tls = tokio_rustls::TlsConnector::from(config)
                        .connect(name, tcp)
                        .await?;
                    Box::new(tls)
                }
                None => Box::new(tcp),
            };
            Ok::<_, std::io::Error>(TokioIo::new(io))
        }
    });
    endpoint
        .connect_with_connector(connector)
        .await
        .map_err(|e| ClientError::Connect(cfg.address.clone(), error_chain(&e)))
}

fn tls_config(root: &Path) -> Result<Arc<rustls::ClientConfig>, ClientError> {
    let bad_root = |reason: String| ClientError::Root {
        path: root.to_owned(),
        reason,
    };
    let mut roots = rustls::RootCertStore::empty();
    let certs = CertificateDer::pem_file_iter(root)
        .map_err(|e| bad_root(e.to_string()))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| bad_root(e.to_string()))?;
    if certs.is_empty() {
        return Err(bad_root("it holds no PEM certificate".into()));
    }
    for cert in certs {
        roots.add(cert).map_err(|e| bad_root(e.to_string()))?;
    }
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| bad_root(e.to_string()))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(config))
}

/// An error and its sources on one line: tonic's transport errors hide the
/// useful part (refused, certificate unknown) in the chain.
pub(crate) fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let text = s.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        source = s.source();
    }
    out
}
