//! Inputs of the tunnel benchmark: the two agents' ends of one HBONE stream, joined by an
//! in-memory pipe instead of the network, each copying to a loopback application socket with
//! the agent's own [`copy::tunnel`].
//!
//! ```text
//! client app ─tcp─ [copy::tunnel, h2 client] ═duplex═ [h2 server, copy::tunnel] ─tcp─ server app
//! ```
//!
//! The HTTP/2 settings are the agent's ([`H2Config`] and the inbound listener's), the client
//! side is [`pool::handshake`] itself; with [`Path::Tls`] the pipe carries mutual TLS built by
//! [`agent::tls::Credentials`] from certificates of a throw-away CA, so the crypto cost shows
//! beside the plaintext figures; [`Path::Direct`] is the floor, the two applications connected
//! without agents. Authorization, capture and the response headers are left out.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use agent::config::H2Config;
use agent::proxy::copy;
use agent::proxy::pool::{self, Checkout, Key, Pool, PoolConfig};
use agent::tls::{self, Credentials};
use bytes::Bytes;
use ca_client::LocalCa;
use h2::RecvStream;
use h2::server::SendResponse;
use http::{Method, Request, Response, StatusCode};
use identity::Identity;
use tokio::io::{AsyncRead, AsyncWrite, duplex};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::{TlsAcceptor, TlsConnector};

/// What the in-memory pipe buffers each way: large, so the pipe is not the bottleneck the
/// network would be.
const PIPE_BUF: usize = 4 * 1024 * 1024;

/// How the two applications are connected.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Path {
    /// One loopback connection between them, no agents.
    Direct,
    /// Through both agents, HTTP/2 straight on the pipe.
    Plain,
    /// Through both agents, HTTP/2 over mutual TLS 1.3 as between two nodes.
    Tls,
}

/// The two applications, connected: what is written to `client` comes out of `server`, and
/// back. The agents' copy tasks run on the runtime the pair was connected on.
pub struct Apps {
    pub client: TcpStream,
    pub server: TcpStream,
    /// Holds the HTTP/2 connection open (`None` for [`Path::Direct`]).
    _slot: Option<Checkout>,
}

impl Apps {
    /// Connects the applications; must run inside a Tokio runtime, which then drives the
    /// agents.
    pub async fn connect(path: Path) -> Self {
        match path {
            Path::Direct => direct().await,
            Path::Plain => {
                let (near, far) = duplex(PIPE_BUF);
                join(near, far).await
            }
            Path::Tls => {
                let (near, far) = duplex(PIPE_BUF);
                let pki = Pki::new();
                let (client, server) = tokio::join!(
                    TlsConnector::from(pki.client).connect(tls::server_name(), near),
                    TlsAcceptor::from(pki.server).accept(far),
                );
                join(
                    client.expect("client TLS handshake"),
                    server.expect("server TLS handshake"),
                )
                .await
            }
        }
    }
}

async fn direct() -> Apps {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let client = TcpStream::connect(listener.local_addr().expect("local address"))
        .await
        .expect("connect");
    let (server, _) = listener.accept().await.expect("accept");
    Apps {
        client,
        server,
        _slot: None,
    }
}

/// Runs HTTP/2 over the two ends of the pipe and opens one CONNECT stream through it.
async fn join<C, S>(near: C, far: S) -> Apps
where
    C: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let h2cfg = H2Config::default();
    let server_app = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let app_addr = server_app.local_addr().expect("local address");
    tokio::spawn(serve(far, h2cfg.clone(), app_addr));

    // What the outbound listener does with a captured connection.
    let outbound = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let client = TcpStream::connect(outbound.local_addr().expect("local address"))
        .await
        .expect("connect to the outbound listener");
    let (captured, _) = outbound.accept().await.expect("accept");
    let pool = Pool::new(PoolConfig::default());
    let key = Key::new(id("client"), None, vec![id("server")], app_addr);
    let (slot, _) = pool
        .checkout(key, || pool::handshake(near, &h2cfg, None))
        .await
        .expect("HTTP/2 client handshake");
    let mut sender = slot
        .sender()
        .ready()
        .await
        .expect("connection takes a stream");
    let request = Request::builder()
        .method(Method::CONNECT)
        .uri(app_addr.to_string())
        .body(())
        .expect("valid CONNECT request");
    let (response, send) = sender.send_request(request, false).expect("CONNECT sent");
    let response = response.await.expect("CONNECT answered");
    assert_eq!(response.status(), StatusCode::OK);
    let recv = response.into_body();
    tokio::spawn(async move {
        let _ = copy::tunnel(captured, send, recv).await;
    });

    let (server, _) = server_app.accept().await.expect("accept");
    Apps {
        client,
        server,
        _slot: Some(slot),
    }
}

/// The inbound agent: accepts CONNECT streams and copies each to a new connection to `app`.
async fn serve<S>(io: S, h2cfg: H2Config, app: SocketAddr)
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut conn = h2::server::Builder::new()
        .initial_window_size(h2cfg.stream_window)
        .initial_connection_window_size(h2cfg.connection_window)
        .max_frame_size(h2cfg.max_frame_size)
        .max_concurrent_streams(200)
        .max_header_list_size(64 * 1024)
        .max_send_buffer_size(400 * 1024)
        .handshake::<_, Bytes>(io)
        .await
        .expect("HTTP/2 server handshake");
    while let Some(Ok((request, respond))) = conn.accept().await {
        tokio::spawn(deliver(request, respond, app));
    }
}

async fn deliver(request: Request<RecvStream>, mut respond: SendResponse<Bytes>, app: SocketAddr) {
    let upstream = TcpStream::connect(app).await.expect("connect to the app");
    upstream.set_nodelay(true).expect("TCP_NODELAY");
    let ok = Response::builder()
        .status(StatusCode::OK)
        .body(())
        .expect("valid response");
    let send = respond.send_response(ok, false).expect("response sent");
    let body = request.into_body();
    let _ = copy::tunnel(upstream, send, body).await;
}

fn id(sa: &str) -> Identity {
    Identity::new("cluster.local", "bench", sa).expect("valid identity")
}

/// Both agents' TLS configs, from certificates of a new in-memory CA.
struct Pki {
    client: Arc<rustls::ClientConfig>,
    server: Arc<rustls::ServerConfig>,
}

impl Pki {
    fn new() -> Self {
        let ca = LocalCa::generate().expect("in-memory CA");
        let creds = Credentials::new();
        let (client, server) = (id("client"), id("server"));
        for identity in [&client, &server] {
            let cert = ca
                .issue(identity, Duration::from_secs(3600))
                .expect("certificate issued");
            creds.publish(Arc::new(cert)).expect("certificate usable");
        }
        Self {
            client: creds
                .client_config(&client, std::slice::from_ref(&server))
                .expect("client config"),
            server: creds.server_config(&server).expect("server config"),
        }
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    /// Bytes cross both ways, and a half-close reaches the other application as EOF.
    async fn carries_both_ways(path: Path) {
        let mut t = Apps::connect(path).await;
        let message = vec![7u8; 1024 * 1024];
        let mut got = vec![0u8; message.len()];
        let (sent, read) =
            tokio::join!(t.client.write_all(&message), t.server.read_exact(&mut got));
        sent.unwrap();
        read.unwrap();
        assert!(got == message);

        t.server.write_all(b"pong").await.unwrap();
        let mut pong = [0u8; 4];
        t.client.read_exact(&mut pong).await.unwrap();
        assert_eq!(&pong, b"pong");

        t.client.shutdown().await.unwrap();
        assert_eq!(t.server.read(&mut got).await.unwrap(), 0);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn direct_carries_both_ways() {
        carries_both_ways(Path::Direct).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn plain_tunnel_carries_both_ways() {
        carries_both_ways(Path::Plain).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn tls_tunnel_carries_both_ways() {
        carries_both_ways(Path::Tls).await;
    }
}
