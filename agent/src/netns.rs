//! Where the agent's sockets live: in its own network namespace ([`Net::Host`]), or inside an
//! enrolled pod's ([`Net::Pod`]).
//!
//! A socket belongs to the namespace it was created in for its whole life, and only
//! `socket()` itself has to run there. So [`PodNet`] switches the calling thread into the
//! pod's namespace, creates the socket and switches straight back: two `setns` calls, a few
//! microseconds, no thread hop — cheap enough for every proxied connection, and the socket is
//! then used from tokio like any other. Every pod socket carries the agent's mark so no capture
//! rule touches it. Installing rules, which runs programs, stays on `redirect::Netns::run`.

use std::fs::File;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use nix::sched::{CloneFlags, setns};
use socket2::{Domain, Protocol, Socket, Type};
use tokio::net::{TcpListener, TcpSocket};

/// The namespace the agent's threads return to after creating a pod socket.
#[derive(Debug, Clone)]
pub struct Home(Arc<File>);

#[derive(Debug, thiserror::Error)]
pub enum NetnsError {
    #[error("cannot open the agent's own network namespace {path}: {source}")]
    Home {
        path: &'static str,
        source: io::Error,
    },
    #[error("cannot open network namespace {path}: {source}")]
    Open { path: PathBuf, source: io::Error },
}

impl Home {
    /// The process's network namespace (that of its main thread). Open it once at start,
    /// before anything switches namespaces.
    pub fn current() -> Result<Home, NetnsError> {
        const PATH: &str = "/proc/self/ns/net";
        File::open(PATH)
            .map(|f| Home(Arc::new(f)))
            .map_err(|source| NetnsError::Home { path: PATH, source })
    }
}

/// An enrolled pod's network namespace, held open while the pod is enrolled.
#[derive(Debug)]
pub struct PodNet {
    path: PathBuf,
    file: File,
    home: Home,
    mark: u32,
    /// `IP_TRANSPARENT` on listeners (inbound mode `tproxy`).
    transparent_listeners: bool,
    /// Set once delivery had to fall back to the pod's own source address.
    fallback_logged: AtomicBool,
    /// Set once the pod's listeners were made to hand their queues on when they close.
    migration_set: AtomicBool,
}

/// The sysctl, as seen by a thread inside the namespace.
const MIGRATE_REQ: &str = "/proc/sys/net/ipv4/tcp_migrate_req";

impl PodNet {
    pub fn open(
        path: &Path,
        home: Home,
        mark: u32,
        transparent_listeners: bool,
    ) -> Result<PodNet, NetnsError> {
        let file = File::open(path).map_err(|source| NetnsError::Open {
            path: path.to_owned(),
            source,
        })?;
        Ok(PodNet {
            path: path.to_owned(),
            file,
            home,
            mark,
            transparent_listeners,
            fallback_logged: AtomicBool::new(false),
            migration_set: AtomicBool::new(false),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Runs `f` on this thread inside the pod's namespace, and switches straight back.
    fn within<T>(&self, f: impl FnOnce() -> T) -> io::Result<T> {
        setns(&self.file, CloneFlags::CLONE_NEWNET).map_err(io::Error::from)?;
        let result = f();
        if let Err(err) = setns(&*self.home.0, CloneFlags::CLONE_NEWNET) {
            // This runtime thread would go on serving every other pod from inside this one's
            // namespace. Nothing sane continues from there: stop, and let the supervisor
            // restart the agent (the capture rules stay, so traffic fails closed meanwhile).
            tracing::error!(netns = %self.path.display(), %err, "cannot return to the agent's network namespace; aborting");
            eprintln!(
                "ambientd: cannot return to the agent's network namespace after entering {}: {err}; aborting",
                self.path.display()
            );
            std::process::abort();
        }
        Ok(result)
    }

    /// A non-blocking TCP socket created inside the pod's namespace, not yet marked.
    pub fn raw_socket(&self, domain: Domain) -> io::Result<Socket> {
        self.within(|| {
            Socket::new(
                domain,
                Type::STREAM.nonblocking().cloexec(),
                Some(Protocol::TCP),
            )
        })?
    }

    /// Turns on `net.ipv4.tcp_migrate_req` in the pod's namespace (Linux 5.14; it covers TCP
    /// over IPv6 too), once per pod: when a listener of a SO_REUSEPORT group closes, the
    /// connections queued on it — handshake done or under way, not yet accepted — move to
    /// another listener of the group instead of being reset. An upgrade starts the new agent
    /// beside the old one, and the old one closes its listeners as it drains: without this,
    /// what was queued on them at that instant is lost.
    fn migrate_queued_connections(&self) {
        if self.migration_set.swap(true, Ordering::Relaxed) {
            return;
        }
        let opened = self.within(|| std::fs::OpenOptions::new().write(true).open(MIGRATE_REQ));
        let written = match opened {
            Ok(Ok(mut file)) => std::io::Write::write_all(&mut file, b"1"),
            Ok(Err(e)) | Err(e) => Err(e),
        };
        if let Err(error) = written {
            // Once per agent: on a kernel without it, every pod would say the same.
            static WARNED: AtomicBool = AtomicBool::new(false);
            if WARNED.swap(true, Ordering::Relaxed) {
                return;
            }
            tracing::warn!(
                netns = %self.path.display(),
                %error,
                "cannot turn on {MIGRATE_REQ}: connections queued on a listener when it \
                 closes (an upgraded agent's old one draining) are reset instead of handed to \
                 the new agent"
            );
        }
    }

    /// A TCP socket inside the pod's namespace carrying the agent's mark.
    pub fn socket(&self, domain: Domain) -> io::Result<Socket> {
        let socket = self.raw_socket(domain)?;
        socket.set_mark(self.mark)?;
        Ok(socket)
    }

    /// True the first time delivery falls back to the pod's address, so the warning is
    /// logged once per pod rather than once per connection.
    pub fn first_fallback(&self) -> bool {
        !self.fallback_logged.swap(true, Ordering::Relaxed)
    }
}

/// The namespace a connection's sockets are created in.
#[derive(Debug, Clone)]
pub enum Net {
    /// The agent's own namespace: workloads without a netns (loopback mode, tests).
    Host,
    Pod(Arc<PodNet>),
}

impl Net {
    /// A TCP socket for connecting to an address of `ip`'s family.
    pub fn tcp_socket(&self, ip: IpAddr) -> io::Result<TcpSocket> {
        match self {
            Net::Host if ip.is_ipv4() => TcpSocket::new_v4(),
            Net::Host => TcpSocket::new_v6(),
            Net::Pod(pod) => {
                let socket = pod.socket(Domain::for_address(SocketAddr::new(ip, 0)))?;
                Ok(TcpSocket::from_std_stream(socket.into()))
            }
        }
    }

    /// A listener with SO_REUSEADDR and SO_REUSEPORT (so a new agent can bind beside one that
    /// is draining) and TCP_NODELAY (for the sockets it accepts); in a pod, marked, IPv6-only
    /// for `::`, transparent in tproxy mode, and handing its queued connections to the new
    /// agent's listener when it closes ([`PodNet::migrate_queued_connections`]).
    pub fn listen(&self, addr: SocketAddr) -> io::Result<TcpListener> {
        let Net::Pod(pod) = self else {
            return crate::proxy::bind(addr);
        };
        pod.migrate_queued_connections();
        let socket = pod.socket(Domain::for_address(addr))?;
        socket.set_reuse_address(true)?;
        socket.set_reuse_port(true)?;
        socket.set_tcp_nodelay(true)?;
        if addr.is_ipv6() {
            socket.set_only_v6(true)?;
        }
        if pod.transparent_listeners {
            if addr.is_ipv4() {
                socket.set_ip_transparent_v4(true)?;
            } else {
                socket.set_ip_transparent_v6(true)?;
            }
        }
        socket.bind(&addr.into())?;
        socket.listen(1024)?;
        TcpListener::from_std(socket.into())
    }

    pub fn path(&self) -> Option<&Path> {
        match self {
            Net::Host => None,
            Net::Pod(pod) => Some(pod.path()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn open_names_the_missing_namespace() {
        let home = Home::current().unwrap();
        let err =
            PodNet::open(Path::new("/nonexistent/netns/amb-x"), home, 0x539, false).unwrap_err();
        assert!(
            err.to_string()
                .starts_with("cannot open network namespace /nonexistent/netns/amb-x: "),
            "{err}"
        );
    }

    #[test]
    fn a_file_that_is_no_namespace_gives_an_error_not_a_socket() {
        let home = Home::current().unwrap();
        let pod = PodNet::open(&std::env::current_exe().unwrap(), home, 0x539, false).unwrap();
        assert!(pod.raw_socket(Domain::IPV4).is_err());
        // The thread is still in its own namespace.
        assert_eq!(
            std::fs::read_link("/proc/thread-self/ns/net").unwrap(),
            std::fs::read_link("/proc/self/ns/net").unwrap()
        );
    }
}
