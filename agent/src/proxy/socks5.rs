//! SOCKS5 (RFC 1928, no authentication, CONNECT only): enters the outbound path without
//! capture, for trying the mesh out and for tests. Off by default; bind it to localhost.
//!
//! The source workload is the local workload whose address the client connected from, so a
//! client must bind to its workload's address first; anything else is refused (fail closed).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::outbound::{self, Error};
use super::{OrigDstAddr, PeerAddr, Proxy};
use crate::events::Started;
use crate::netns::Net;

const VERSION: u8 = 5;
const NO_AUTH: u8 = 0;
const NO_ACCEPTABLE_METHOD: u8 = 0xff;
const CMD_CONNECT: u8 = 1;

/// Reply codes (RFC 1928 §6).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Reply {
    Succeeded = 0,
    GeneralFailure = 1,
    NotAllowed = 2,
    HostUnreachable = 4,
    ConnectionRefused = 5,
    TtlExpired = 6,
    CommandNotSupported = 7,
    AddressTypeNotSupported = 8,
}

impl Reply {
    fn for_error(e: &Error) -> Self {
        match e {
            Error::OwnPort(_) => Reply::NotAllowed,
            Error::NoHealthyEndpoint(_) | Error::NoAddress(_) => Reply::HostUnreachable,
            Error::Connect { source, .. } if source.kind() == std::io::ErrorKind::TimedOut => {
                Reply::TtlExpired
            }
            Error::Connect { .. } | Error::Status { .. } => Reply::ConnectionRefused,
            Error::Timeout { .. } => Reply::TtlExpired,
            _ => Reply::GeneralFailure,
        }
    }
}

#[derive(Debug, thiserror::Error)]
enum HandshakeError {
    #[error("I/O: {0}")]
    Io(#[from] std::io::Error),
    #[error("not SOCKS version 5 (got {0})")]
    Version(u8),
    #[error("client offers no 'no authentication' method")]
    NoMethod,
    #[error("command {0} is not CONNECT")]
    Command(u8),
    #[error("address type {0} is not supported (IPv4 and IPv6 only)")]
    AddressType(u8),
}

impl HandshakeError {
    fn reply(&self) -> Option<Reply> {
        match self {
            HandshakeError::Command(_) => Some(Reply::CommandNotSupported),
            HandshakeError::AddressType(_) => Some(Reply::AddressTypeNotSupported),
            _ => None,
        }
    }
}

async fn send_reply(client: &mut TcpStream, reply: Reply) -> std::io::Result<()> {
    // The bound address is not meaningful here; report 0.0.0.0:0 like most proxies.
    client
        .write_all(&[VERSION, reply as u8, 0, 1, 0, 0, 0, 0, 0, 0])
        .await
}

async fn handshake(client: &mut TcpStream) -> Result<SocketAddr, HandshakeError> {
    let mut head = [0u8; 2];
    client.read_exact(&mut head).await?;
    if head[0] != VERSION {
        return Err(HandshakeError::Version(head[0]));
    }
    let mut methods = vec![0u8; head[1] as usize];
    client.read_exact(&mut methods).await?;
    if !methods.contains(&NO_AUTH) {
        client.write_all(&[VERSION, NO_ACCEPTABLE_METHOD]).await?;
        return Err(HandshakeError::NoMethod);
    }
    client.write_all(&[VERSION, NO_AUTH]).await?;
    let mut req = [0u8; 4];
    client.read_exact(&mut req).await?;
    if req[0] != VERSION {
        return Err(HandshakeError::Version(req[0]));
    }
    let ip = match req[3] {
        1 => {
            let mut b = [0u8; 4];
            client.read_exact(&mut b).await?;
            IpAddr::V4(Ipv4Addr::from(b))
        }
        4 => {
            let mut b = [0u8; 16];
            client.read_exact(&mut b).await?;
            IpAddr::V6(Ipv6Addr::from(b))
        }
        other => return Err(HandshakeError::AddressType(other)),
    };
    let port = client.read_u16().await?;
    if req[1] != CMD_CONNECT {
        return Err(HandshakeError::Command(req[1]));
    }
    Ok(SocketAddr::new(ip, port))
}

/// Serves one SOCKS5 client: the handshake, the connect and the reply are boxed and gone once
/// the reply went out, then the outbound [`Session`](outbound::Session) copies, as for a
/// captured connection (the task holds only the session).
pub fn handle(
    proxy: Arc<Proxy>,
    mut client: TcpStream,
    peer: PeerAddr,
) -> impl Future<Output = ()> + Send {
    super::Phases::new(async move {
        let dst = match handshake(&mut client).await {
            Ok(dst) => OrigDstAddr(dst),
            Err(e) => {
                if let Some(reply) = e.reply() {
                    let _ = send_reply(&mut client, reply).await;
                }
                tracing::debug!(src = %peer.0, error = %e, "SOCKS5 handshake failed");
                return None;
            }
        };
        let source = proxy
            .state
            .workload_by_ip("", peer.0.ip())
            .filter(|w| w.node == proxy.cfg.node_name);
        let Some(source) = source else {
            tracing::warn!(src = %peer.0, dst = %dst.0, "SOCKS5 client is not a local workload; refused");
            let _ = send_reply(&mut client, Reply::NotAllowed).await;
            return None;
        };
        let started = Started::now();
        // SOCKS5 clients are in the agent's namespace: workloads served on loopback addresses.
        // The client sends nothing before the reply, so there is no first flight to send.
        let caller = outbound::Client {
            addr: peer,
            early: None,
        };
        let opened = outbound::open(&proxy, &Net::Host, &source, caller, dst).await;
        let reply = match &opened {
            Ok(_) => Reply::Succeeded,
            Err(e) => Reply::for_error(e),
        };
        if send_reply(&mut client, reply).await.is_err() {
            return None;
        }
        Some(outbound::Session::new(
            proxy, source, client, peer, dst, started, opened,
        ))
    })
}

/// The client half, for the demo and tests: connects from `bind` (a workload's address) to the
/// SOCKS5 listener at `socks` and asks for `dst`. Returns the stream once the agent reported
/// success, or the reply code it refused with.
pub async fn connect(
    socks: SocketAddr,
    bind: IpAddr,
    dst: SocketAddr,
) -> std::io::Result<Result<TcpStream, Reply>> {
    let socket = if socks.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.bind(SocketAddr::new(bind, 0))?;
    let mut stream = socket.connect(socks).await?;
    stream.set_nodelay(true)?;
    stream.write_all(&[VERSION, 1, NO_AUTH]).await?;
    let mut choice = [0u8; 2];
    stream.read_exact(&mut choice).await?;
    if choice != [VERSION, NO_AUTH] {
        return Err(std::io::Error::other(format!(
            "SOCKS5 server chose method {:?}",
            choice
        )));
    }
    let mut req = vec![VERSION, CMD_CONNECT, 0];
    match dst.ip() {
        IpAddr::V4(ip) => {
            req.push(1);
            req.extend_from_slice(&ip.octets());
        }
        IpAddr::V6(ip) => {
            req.push(4);
            req.extend_from_slice(&ip.octets());
        }
    }
    req.extend_from_slice(&dst.port().to_be_bytes());
    stream.write_all(&req).await?;
    let mut reply = [0u8; 10];
    stream.read_exact(&mut reply).await?;
    let code = reply[1];
    if code == Reply::Succeeded as u8 {
        return Ok(Ok(stream));
    }
    let reply = [
        Reply::GeneralFailure,
        Reply::NotAllowed,
        Reply::HostUnreachable,
        Reply::ConnectionRefused,
        Reply::TtlExpired,
        Reply::CommandNotSupported,
        Reply::AddressTypeNotSupported,
    ]
    .into_iter()
    .find(|r| *r as u8 == code)
    .unwrap_or(Reply::GeneralFailure);
    Ok(Err(reply))
}
