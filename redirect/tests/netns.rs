//! Root only: capture rules applied for real inside scratch network namespaces, for every
//! backend (iptables-nft, iptables-legacy, nft) × inbound mode. Checks what the tools list
//! afterwards and where TCP connections actually land. Needs `iptables nftables iproute2`;
//! without root it is skipped, unless `CI` is set, where it fails.

use std::io::{self, Read, Write};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use redirect::testing::{ScratchNetns, root_or_skip, sweep_stale};
use redirect::{
    Backend, CaptureConfig, Family, InboundMode, InstallError, Netns, RuleSet, Tools, apply,
    remove, stop_capture,
};
use socket2::{Domain, Protocol, SockAddr, Socket, Type};

/// Upper bound on every connect and accept; a broken rule shows up as a silent drop.
const WAIT: Duration = Duration::from_secs(5);

#[derive(Clone, Copy, Debug)]
enum Variant {
    IptablesNft,
    IptablesLegacy,
    Nft,
}

const VARIANTS: [Variant; 3] = [Variant::IptablesNft, Variant::IptablesLegacy, Variant::Nft];
const MODES: [InboundMode; 2] = [InboundMode::Redirect, InboundMode::Tproxy];

impl Variant {
    fn backend(self) -> Backend {
        match self {
            Variant::Nft => Backend::Nftables,
            _ => Backend::Iptables,
        }
    }

    fn tools(self) -> Tools {
        match self {
            Variant::IptablesLegacy => Tools::iptables_legacy(),
            _ => Tools::default(),
        }
    }
}

fn setup(test: &str) -> bool {
    if !root_or_skip(test) {
        return false;
    }
    for tool in [
        "ip",
        "nft",
        "iptables-restore",
        "ip6tables-restore",
        "iptables-legacy-restore",
    ] {
        let found = Command::new("sh")
            .args(["-c", &format!("command -v {tool}")])
            .output()
            .is_ok_and(|o| o.status.success());
        assert!(
            found,
            "{tool} missing: apt-get install -y iptables nftables iproute2"
        );
    }
    sweep_stale().expect("removing stale test namespaces");
    true
}

fn plan(inbound: InboundMode) -> RuleSet {
    RuleSet::plan(&CaptureConfig {
        inbound,
        ..CaptureConfig::default()
    })
    .unwrap()
}

/// Runs a listing command inside `ns`; its `#` lines (timestamps) are dropped.
fn list(ns: &Netns, program: &str, args: &[&str]) -> String {
    let output = ns
        .run(|| Command::new(program).args(args).output())
        .unwrap()
        .unwrap_or_else(|err| panic!("{program}: {err}"));
    assert!(
        output.status.success(),
        "{program} {args:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .filter(|l| !l.starts_with('#'))
        .map(|l| format!("{l}\n"))
        .collect()
}

/// What the backend's own listing tools and `ip` show of the namespace's netfilter and
/// policy-routing state.
fn snapshot(ns: &Netns, variant: Variant) -> String {
    let tools = variant.tools();
    let mut out = match variant.backend() {
        Backend::Iptables => {
            let v4 = list(ns, tools.iptables_save.to_str().unwrap(), &[]);
            let v6 = list(ns, tools.ip6tables_save.to_str().unwrap(), &[]);
            format!("== v4\n{v4}== v6\n{v6}")
        }
        Backend::Nftables => list(ns, "nft", &["list", "ruleset"]),
    };
    for flag in ["-4", "-6"] {
        out += &list(ns, "ip", &[flag, "rule", "show"]);
        out += &list(ns, "ip", &[flag, "route", "show", "table", "all"]);
    }
    out
}

fn assert_installed(snapshot: &str, variant: Variant, mode: InboundMode, plan: &RuleSet) {
    match variant.backend() {
        Backend::Iptables => {
            for family in plan.families() {
                let part = match family {
                    Family::V4 => snapshot.split("== v6").next().unwrap(),
                    Family::V6 => snapshot.split("== v6").nth(1).unwrap(),
                };
                let ours = part
                    .lines()
                    .filter(|l| l.starts_with("-A AMBIENTD_"))
                    .count();
                let planned = plan.rules().iter().filter(|r| r.family == family).count();
                assert_eq!(ours, planned, "{variant:?} {mode:?} {family:?}:\n{part}");
                assert!(part.contains("-A PREROUTING -j AMBIENTD_PRERT\n"), "{part}");
                assert!(part.contains("-A OUTPUT -j AMBIENTD_OUTPUT\n"), "{part}");
                let inbound = match mode {
                    InboundMode::Redirect => "-j REDIRECT --to-ports 15006",
                    InboundMode::Tproxy => "-j TPROXY --on-port 15006",
                };
                assert!(part.contains(inbound), "{part}");
            }
        }
        Backend::Nftables => {
            assert!(snapshot.contains("table inet ambientd {"), "{snapshot}");
            let inbound = match mode {
                InboundMode::Redirect => "redirect to :15006",
                InboundMode::Tproxy => "tproxy ip6 to :15006",
            };
            assert!(snapshot.contains(inbound), "{snapshot}");
            assert!(snapshot.contains("redirect to :15001"), "{snapshot}");
        }
    }
    let rules = snapshot.matches("fwmark 0x111/0xfff lookup 100").count();
    assert_eq!(rules, 2, "one ip rule per family:\n{snapshot}");
    assert_eq!(
        snapshot.matches("local default dev lo").count(),
        2,
        "{snapshot}"
    );
}

fn assert_nothing_of_ours(snapshot: &str) {
    for needle in ["AMBIENTD", "ambientd", "0x111", "local default dev lo"] {
        assert!(
            !snapshot.contains(needle),
            "{needle} left behind:\n{snapshot}"
        );
    }
}

#[test]
fn apply_is_idempotent_and_remove_is_complete() {
    if !setup("apply_is_idempotent_and_remove_is_complete") {
        return;
    }
    for variant in VARIANTS {
        for mode in MODES {
            let scratch = ScratchNetns::create("idem").unwrap();
            let ns = scratch.open().unwrap();
            let plan = plan(mode);
            let (backend, tools) = (variant.backend(), variant.tools());
            assert_nothing_of_ours(&snapshot(&ns, variant));

            apply(&ns, &plan, backend, &tools).unwrap();
            let first = snapshot(&ns, variant);
            assert_installed(&first, variant, mode, &plan);
            apply(&ns, &plan, backend, &tools).unwrap();
            assert_eq!(
                snapshot(&ns, variant),
                first,
                "{variant:?} {mode:?}: second apply changed the ruleset"
            );

            remove(&ns, &plan, backend, &tools).unwrap();
            assert_nothing_of_ours(&snapshot(&ns, variant));
            remove(&ns, &plan, backend, &tools).unwrap();
            assert_nothing_of_ours(&snapshot(&ns, variant));
        }
    }
}

#[test]
fn switching_mode_converges_to_a_fresh_apply() {
    if !setup("switching_mode_converges_to_a_fresh_apply") {
        return;
    }
    for variant in VARIANTS {
        let (backend, tools) = (variant.backend(), variant.tools());
        let fresh = ScratchNetns::create("fresh").unwrap();
        let fresh_ns = fresh.open().unwrap();
        apply(&fresh_ns, &plan(InboundMode::Redirect), backend, &tools).unwrap();

        let switched = ScratchNetns::create("switch").unwrap();
        let switched_ns = switched.open().unwrap();
        let v4_only = RuleSet::plan(&CaptureConfig {
            inbound: InboundMode::Tproxy,
            ipv6: false,
            ..CaptureConfig::default()
        })
        .unwrap();
        apply(&switched_ns, &plan(InboundMode::Tproxy), backend, &tools).unwrap();
        apply(&switched_ns, &v4_only, backend, &tools).unwrap();
        apply(&switched_ns, &plan(InboundMode::Redirect), backend, &tools).unwrap();
        assert_eq!(
            snapshot(&switched_ns, variant),
            snapshot(&fresh_ns, variant),
            "{variant:?}: tproxy then redirect differs from redirect alone"
        );
    }
}

#[test]
fn remove_tolerates_partial_state() {
    if !setup("remove_tolerates_partial_state") {
        return;
    }
    for variant in VARIANTS {
        let scratch = ScratchNetns::create("partial").unwrap();
        let ns = scratch.open().unwrap();
        let plan = plan(InboundMode::Tproxy);
        let (backend, tools) = (variant.backend(), variant.tools());
        apply(&ns, &plan, backend, &tools).unwrap();
        scratch
            .ip(&[
                "-4",
                "route",
                "del",
                "local",
                "0.0.0.0/0",
                "dev",
                "lo",
                "table",
                "100",
            ])
            .unwrap();
        scratch
            .ip(&[
                "-6",
                "rule",
                "del",
                "fwmark",
                "0x111/0xfff",
                "lookup",
                "100",
                "pref",
                "32764",
            ])
            .unwrap();
        let (program, args): (&str, &[&str]) = match variant {
            Variant::IptablesNft => (
                "iptables-nft",
                &["-t", "mangle", "-D", "PREROUTING", "-j", "AMBIENTD_PRERT"],
            ),
            Variant::IptablesLegacy => (
                "iptables-legacy",
                &["-t", "mangle", "-D", "PREROUTING", "-j", "AMBIENTD_PRERT"],
            ),
            Variant::Nft => (
                "nft",
                &["delete", "chain", "inet", "ambientd", "nat-output"],
            ),
        };
        let out = ns
            .run(|| Command::new(program).args(args).output())
            .unwrap()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );

        remove(&ns, &plan, backend, &tools).unwrap();
        assert_nothing_of_ours(&snapshot(&ns, variant));
    }
}

#[test]
fn failures_name_the_namespace_and_command() {
    if !setup("failures_name_the_namespace_and_command") {
        return;
    }
    let scratch = ScratchNetns::create("err").unwrap();
    let ns = scratch.open().unwrap();
    let tools = Tools {
        nft: "/nonexistent/nft".into(),
        ..Tools::default()
    };
    let err = apply(&ns, &plan(InboundMode::Redirect), Backend::Nftables, &tools).unwrap_err();
    assert!(matches!(err, InstallError::Command { .. }));
    let text = err.to_string();
    assert!(
        text.contains(scratch.name()) && text.contains("/nonexistent/nft -f -"),
        "{text}"
    );

    // A real tool failure: the IPv6 script fed to the IPv4 binary is rejected, and the error
    // carries the tool's own stderr.
    let tools = Tools {
        ip6tables_restore: "iptables-restore".into(),
        ..Tools::default()
    };
    let err = apply(&ns, &plan(InboundMode::Redirect), Backend::Iptables, &tools).unwrap_err();
    let text = err.to_string();
    assert!(
        text.contains("iptables-restore --noflush -w 10")
            && text.contains("failed with exit status"),
        "{text}"
    );
    assert!(
        text.contains("line"),
        "stderr of iptables-restore expected: {text}"
    );
}

// ---- where connections land ----

/// A pod netns and a peer netns joined by a veth: pod 198.18.0.1 / 2001:2::1, peer
/// 198.18.0.2 / 2001:2::2. No default routes.
struct Pair {
    pod: ScratchNetns,
    peer: ScratchNetns,
}

const POD4: &str = "198.18.0.1";
const PEER4: &str = "198.18.0.2";
const POD6: &str = "2001:2::1";
const PEER6: &str = "2001:2::2";

impl Pair {
    fn create() -> Pair {
        let pod = ScratchNetns::create("pod").unwrap();
        let peer = ScratchNetns::create("peer").unwrap();
        let mut add = Command::new("ip");
        add.args([
            "link",
            "add",
            "name",
            "v0",
            "netns",
            pod.name(),
            "type",
            "veth",
            "peer",
            "name",
            "v1",
            "netns",
            peer.name(),
        ]);
        let out = add.output().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        for (ns, dev, v4, v6) in [(&pod, "v0", POD4, POD6), (&peer, "v1", PEER4, PEER6)] {
            ns.ip(&["addr", "add", &format!("{v4}/24"), "dev", dev])
                .unwrap();
            ns.ip(&["addr", "add", &format!("{v6}/64"), "dev", dev, "nodad"])
                .unwrap();
            ns.ip(&["link", "set", dev, "up"]).unwrap();
        }
        Pair { pod, peer }
    }
}

fn addr(ip: &str, port: u16) -> SocketAddr {
    SocketAddr::new(ip.parse().unwrap(), port)
}

/// A listener inside `ns` on `ip:port`; accept gives up after [`WAIT`].
fn listen(ns: &Netns, ip: &str, port: u16, transparent: bool) -> TcpListener {
    let at = addr(ip, port);
    ns.run(|| -> io::Result<TcpListener> {
        let socket = Socket::new(Domain::for_address(at), Type::STREAM, Some(Protocol::TCP))?;
        if at.is_ipv6() {
            socket.set_only_v6(true)?;
        }
        if transparent {
            match at.ip() {
                IpAddr::V4(_) => socket.set_ip_transparent_v4(true)?,
                IpAddr::V6(_) => socket.set_ip_transparent_v6(true)?,
            }
        }
        socket.set_reuse_address(true)?;
        socket.set_read_timeout(Some(WAIT))?;
        socket.bind(&at.into())?;
        socket.listen(16)?;
        Ok(socket.into())
    })
    .unwrap()
    .unwrap_or_else(|err| panic!("listen on {at}: {err}"))
}

/// Connects from inside `ns`, optionally as the agent would (socket mark, spoofed source).
fn connect(
    ns: &Netns,
    to: SocketAddr,
    mark: Option<u32>,
    from: Option<SocketAddr>,
) -> io::Result<TcpStream> {
    ns.run(|| {
        let socket = Socket::new(Domain::for_address(to), Type::STREAM, Some(Protocol::TCP))?;
        if let Some(mark) = mark {
            socket.set_mark(mark)?;
        }
        if let Some(from) = from {
            match from.ip() {
                IpAddr::V4(_) => socket.set_ip_transparent_v4(true)?,
                IpAddr::V6(_) => socket.set_ip_transparent_v6(true)?,
            }
            socket.bind(&from.into())?;
        }
        socket.connect_timeout(&to.into(), WAIT)?;
        Ok(socket.into())
    })
    .unwrap()
}

fn accept(listener: &TcpListener, what: &str) -> (TcpStream, SocketAddr) {
    listener.accept().unwrap_or_else(|err| {
        panic!(
            "{what}: nothing arrived on {:?}: {err}",
            listener.local_addr()
        )
    })
}

/// Runs `check` for every backend variant × inbound mode on a fresh pod and peer pair, with
/// the mode's capture plan applied in the pod; the namespaces are deleted after each run.
fn for_each_captured_pair(mut check: impl FnMut(Variant, InboundMode, &Netns, &Netns)) {
    for variant in VARIANTS {
        for mode in MODES {
            let pair = Pair::create();
            let pod = pair.pod.open().unwrap();
            let peer = pair.peer.open().unwrap();
            apply(&pod, &plan(mode), variant.backend(), &variant.tools()).unwrap();
            check(variant, mode, &pod, &peer);
        }
    }
}

/// The destination the client asked for: SO_ORIGINAL_DST after REDIRECT, the socket's own
/// address after TPROXY.
fn original_dst(stream: &TcpStream, tproxied: bool) -> SocketAddr {
    if tproxied {
        return stream.local_addr().unwrap();
    }
    let socket = socket2::SockRef::from(stream);
    let dst: SockAddr = match stream.local_addr().unwrap() {
        SocketAddr::V4(_) => socket.original_dst_v4(),
        SocketAddr::V6(_) => socket.original_dst_v6(),
    }
    .unwrap();
    dst.as_socket().unwrap()
}

#[test]
fn captured_traffic_reaches_the_agent_ports() {
    if !setup("captured_traffic_reaches_the_agent_ports") {
        return;
    }
    for_each_captured_pair(|variant, mode, pod, peer| {
        let case = format!("{variant:?} {mode:?}");
        let tproxy = mode == InboundMode::Tproxy;

        // Agent listeners inside the pod; apps in the pod (9090) and on the peer (8080).
        let outbound = [
            listen(pod, "0.0.0.0", 15001, false),
            listen(pod, "::", 15001, false),
        ];
        let inbound = listen(pod, "0.0.0.0", 15006, tproxy);
        let hbone = listen(pod, "0.0.0.0", 15008, tproxy);
        let pod_app = listen(pod, POD4, 9090, false);
        let peer_app = listen(peer, PEER4, 8080, false);

        // The app's outbound connections land on 15001 with the original destination.
        for (listener, peer_ip) in outbound.iter().zip([PEER4, PEER6]) {
            let to = addr(peer_ip, 8080);
            let _client = connect(pod, to, None, None)
                .unwrap_or_else(|e| panic!("{case}: connect {to}: {e}"));
            let (conn, _) = accept(listener, &format!("{case}: outbound to {to}"));
            assert_eq!(original_dst(&conn, false), to, "{case}");
        }

        // The agent's own (marked) sockets pass uncaptured.
        let _agent = connect(pod, addr(PEER4, 8080), Some(0x539), None).unwrap();
        accept(&peer_app, &format!("{case}: marked connection to the peer"));

        // The pod calling its own IP stays local.
        let _client = connect(pod, addr(POD4, 9090), None, None).unwrap();
        accept(&pod_app, &format!("{case}: pod to its own IP"));

        // Inbound plaintext lands on 15006; HBONE on 15008.
        let _client = connect(peer, addr(POD4, 8080), None, None)
            .unwrap_or_else(|e| panic!("{case}: inbound: {e}"));
        let (conn, _) = accept(&inbound, &format!("{case}: inbound to {POD4}:8080"));
        assert_eq!(original_dst(&conn, tproxy), addr(POD4, 8080), "{case}");
        let _client = connect(peer, addr(POD4, 15008), None, None).unwrap();
        let (conn, _) = accept(&hbone, &format!("{case}: inbound HBONE"));
        assert_eq!(conn.local_addr().unwrap(), addr(POD4, 15008), "{case}");

        // Return path: the agent connects to the pod's app with the peer's address as
        // source; the app's replies must come back to it, not leave the pod.
        let spoofed = addr(PEER4, 40000);
        let _agent = connect(pod, addr(POD4, 9090), Some(0x539), Some(spoofed))
            .unwrap_or_else(|e| panic!("{case}: spoofed-source connect: {e}"));
        let (_, seen) = accept(&pod_app, &format!("{case}: spoofed-source connection"));
        assert_eq!(seen, spoofed, "{case}");
    });
}

#[test]
fn inbound_without_the_agent_never_reaches_the_app() {
    if !setup("inbound_without_the_agent_never_reaches_the_app") {
        return;
    }
    for_each_captured_pair(|variant, mode, pod, peer| {
        let app = listen(pod, POD4, 8080, false);
        app.set_nonblocking(true).unwrap();
        // No listener on 15006: REDIRECT gets a reset, TPROXY drops; either way it fails.
        let result = connect(peer, addr(POD4, 8080), None, None);
        assert!(
            result.is_err(),
            "{variant:?} {mode:?}: connected around capture"
        );
        assert_eq!(
            app.accept().map(|_| ()).unwrap_err().kind(),
            io::ErrorKind::WouldBlock,
            "{variant:?} {mode:?}: the app got a connection"
        );
    });
}

/// Sends `what` on `from` and reads it on `to`, within `timeout`.
fn carries(
    from: &mut TcpStream,
    to: &mut TcpStream,
    what: &[u8],
    timeout: Duration,
) -> io::Result<()> {
    from.write_all(what)?;
    to.set_read_timeout(Some(timeout))?;
    let mut got = vec![0; what.len()];
    to.read_exact(&mut got)?;
    assert_eq!(got, what);
    Ok(())
}

#[test]
fn stopping_capture_keeps_the_return_path_of_delivered_connections() {
    if !setup("stopping_capture_keeps_the_return_path_of_delivered_connections") {
        return;
    }
    for_each_captured_pair(|variant, mode, pod, peer| {
        let case = format!("{variant:?} {mode:?}");
        let plan = plan(mode);
        let (backend, tools) = (variant.backend(), variant.tools());
        let pod_app = listen(pod, POD4, 9090, false);
        let peer_app = listen(peer, PEER4, 8080, false);

        // A connection the agent delivered from the peer's address before the capture
        // stopped, and one it delivers after (accepted earlier, connected late).
        let spoofed = |port| addr(PEER4, port);
        let mut before = connect(pod, addr(POD4, 9090), Some(0x539), Some(spoofed(40001)))
            .unwrap_or_else(|e| panic!("{case}: spoofed-source connect: {e}"));
        let (mut before_app, _) = accept(&pod_app, &case);
        // Connections captured before: the app's outbound one on 15001, the peer's
        // inbound one on 15006 (their NAT or socket must hold after the capture stops).
        let tproxy = mode == InboundMode::Tproxy;
        let outbound = listen(pod, "0.0.0.0", 15001, false);
        let inbound = listen(pod, "0.0.0.0", 15006, tproxy);
        let mut app_out = connect(pod, addr(PEER4, 8080), None, None).unwrap();
        let (mut agent_out, _) = accept(&outbound, &format!("{case}: outbound"));
        let mut peer_in = connect(peer, addr(POD4, 8080), None, None).unwrap();
        let (mut agent_in, _) = accept(&inbound, &format!("{case}: inbound"));
        stop_capture(pod, &plan, backend, &tools).unwrap();
        stop_capture(pod, &plan, backend, &tools).unwrap();
        let mut after = connect(pod, addr(POD4, 9090), Some(0x539), Some(spoofed(40002)))
            .unwrap_or_else(|e| panic!("{case}: spoofed-source connect after: {e}"));
        let (mut after_app, _) = accept(&pod_app, &case);
        for (agent, app) in [(&mut before, &mut before_app), (&mut after, &mut after_app)] {
            carries(app, agent, b"reply", WAIT)
                .unwrap_or_else(|e| panic!("{case}: the app's reply was lost: {e}"));
            carries(agent, app, b"request", WAIT).unwrap();
        }
        for (what, client, agent) in [
            ("outbound", &mut app_out, &mut agent_out),
            ("inbound", &mut peer_in, &mut agent_in),
        ] {
            carries(client, agent, b"more", WAIT)
                .unwrap_or_else(|e| panic!("{case}: captured {what}, to the agent: {e}"));
            carries(agent, client, b"back", WAIT)
                .unwrap_or_else(|e| panic!("{case}: captured {what}, from the agent: {e}"));
        }

        // Nothing is captured any more: both directions go straight to the apps.
        let _client = connect(peer, addr(POD4, 9090), None, None)
            .unwrap_or_else(|e| panic!("{case}: inbound after stop: {e}"));
        accept(&pod_app, &format!("{case}: inbound after stop"));
        let _client = connect(pod, addr(PEER4, 8080), None, None)
            .unwrap_or_else(|e| panic!("{case}: outbound after stop: {e}"));
        accept(&peer_app, &format!("{case}: outbound after stop"));
        let kept = snapshot(pod, variant);
        for capture in [
            "REDIRECT",
            "redirect",
            "TPROXY",
            "tproxy",
            "*nat\n:AMBIENTD",
        ] {
            assert!(!kept.contains(capture), "{case}: {capture} left:\n{kept}");
        }
        assert_eq!(
            kept.matches("fwmark 0x111/0xfff lookup 100").count(),
            2,
            "{kept}"
        );

        // Without the return path the same reply leaves the pod and is lost.
        remove(pod, &plan, backend, &tools).unwrap();
        assert_nothing_of_ours(&snapshot(pod, variant));
        assert!(
            carries(
                &mut before_app,
                &mut before,
                b"lost",
                Duration::from_millis(300)
            )
            .is_err(),
            "{case}: the reply arrived without the return path"
        );
    });
}

#[test]
fn scratch_namespaces_are_deleted_on_drop() {
    if !setup("scratch_namespaces_are_deleted_on_drop") {
        return;
    }
    let scratch = ScratchNetns::create("drop").unwrap();
    let path = scratch.path();
    assert!(Path::new(&path).exists());
    drop(scratch);
    assert!(!Path::new(&path).exists());
}
