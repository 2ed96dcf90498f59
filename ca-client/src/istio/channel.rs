//! The gRPC channel to the CA: TCP, then TLS verified by server name against the configured
//! roots, then HTTP/2 — built here rather than by tonic so that the TLS settings are ours
//! (aws-lc-rs, TLS 1.3, ALPN `h2`) whatever TLS features tonic is compiled with elsewhere.

use std::sync::Arc;

use hyper_util::rt::TokioIo;
use rustls::ClientConfig;
use rustls_pki_types::ServerName;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tonic::transport::{Channel, Endpoint};

use super::Config;
use crate::tls;

/// Why a client could not be set up from its [`Config`].
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("CA address {0:?} is not https://host:port")]
    Address(String),
    #[error("CA server name {0:?} is neither a DNS name nor an IP address")]
    ServerName(String),
    #[error("CA root file {path}: {reason}")]
    RootFile {
        path: std::path::PathBuf,
        reason: String,
    },
    #[error("CA roots: {0}")]
    Roots(#[from] tls::Error),
    #[error("header {0:?} has a name or value that cannot be sent")]
    Header(String),
}

/// A channel that connects on first use and reconnects after failures.
pub(super) fn connect_lazy(config: &Config) -> Result<Channel, ConfigError> {
    let address = &config.address;
    let bad_address = || ConfigError::Address(address.to_string());
    if address.scheme_str() != Some("https") {
        return Err(bad_address());
    }
    let host = address.host().ok_or_else(bad_address)?;
    let port = address.port_u16().ok_or_else(bad_address)?;
    let name = config.server_name.clone().unwrap_or_else(|| {
        host.trim_start_matches('[')
            .trim_end_matches(']')
            .to_owned()
    });
    let server_name =
        ServerName::try_from(name.clone()).map_err(|_| ConfigError::ServerName(name))?;
    let tls = tls::client_config(&config.roots)?;

    // The endpoint's own scheme is plain http so that tonic never tries TLS itself (it would
    // refuse an https address when built without its TLS features); requests still carry the
    // real https origin.
    let plain: http::Uri = format!("http://{}", address.authority().ok_or_else(bad_address)?)
        .parse()
        .map_err(|_| bad_address())?;
    let endpoint = Endpoint::from(plain)
        .origin(address.clone())
        .connect_timeout(config.timeout)
        .timeout(config.timeout);
    let target = (
        host.trim_start_matches('[')
            .trim_end_matches(']')
            .to_owned(),
        port,
    );
    let connector = tower::service_fn(move |_: http::Uri| {
        connect(target.clone(), server_name.clone(), tls.clone())
    });
    Ok(endpoint.connect_with_connector_lazy(connector))
}

async fn connect(
    (host, port): (String, u16),
    server_name: ServerName<'static>,
    tls: Arc<ClientConfig>,
) -> Result<TokioIo<tokio_rustls::client::TlsStream<TcpStream>>, std::io::Error> {
    let tcp = TcpStream::connect((host.as_str(), port)).await?;
    tcp.set_nodelay(true)?;
    let stream = TlsConnector::from(tls).connect(server_name, tcp).await?;
    if stream.get_ref().1.alpn_protocol() != Some(tls::ALPN_H2) {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            "the CA did not agree to HTTP/2 (ALPN h2)",
        ));
    }
    Ok(TokioIo::new(stream))
}
