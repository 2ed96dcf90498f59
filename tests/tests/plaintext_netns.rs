//! Root only: inbound plaintext authorization through real capture rules. A pod network
//! namespace runs the agent and an echo application behind the redirect plan; a client in a
//! peer namespace (no identity) connects to the application's address and is captured to the
//! agent's 15006. Policies in the agent's mesh file decide: rules needing an identity never let
//! it in, a source-IP rule does, and a deny added while it is connected closes it.
//! Without root it is skipped, unless `CI` is set, where it fails.

use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use agent::mesh::Status;
use redirect::testing::{ScratchNetns, root_or_skip, sweep_stale};
use redirect::{Backend, CaptureConfig, InboundMode, Netns, RuleSet, Tools, apply};
use tests::{Echo, TIMEOUT};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const POD: &str = "198.18.0.1";
const CLIENT: &str = "198.18.0.2";

fn mesh(policies: &str) -> String {
    format!(
        "workloads:\n  - name: pod\n    namespace: demo\n    addresses: [{POD}]\n    node: n\n    \
         tunnelProtocol: HBONE\npolicies:\n{policies}"
    )
}

fn allow(name: &str, matches: &str) -> String {
    format!(
        "  - name: {name}\n    namespace: demo\n    scope: NAMESPACE\n    rules: [{{clauses: [{{matches: [{matches}]}}]}}]\n"
    )
}

fn deny(name: &str, matches: &str) -> String {
    allow(name, matches).replace("scope: NAMESPACE", "scope: NAMESPACE\n    action: DENY")
}

/// Pod and client namespaces joined by a veth, capture rules in the pod.
fn namespaces() -> (ScratchNetns, ScratchNetns) {
    let pod = ScratchNetns::create("pod").unwrap();
    let client = ScratchNetns::create("cli").unwrap();
    let out = Command::new("ip")
        .args(["link", "add", "name", "v0", "netns", pod.name()])
        .args(["type", "veth", "peer", "name", "v1", "netns", client.name()])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for (ns, dev, ip) in [(&pod, "v0", POD), (&client, "v1", CLIENT)] {
        ns.ip(&["addr", "add", &format!("{ip}/24"), "dev", dev])
            .unwrap();
        ns.ip(&["link", "set", dev, "up"]).unwrap();
    }
    let plan = RuleSet::plan(&CaptureConfig {
        inbound: InboundMode::Redirect,
        ..CaptureConfig::default()
    })
    .unwrap();
    apply(
        &pod.open().unwrap(),
        &plan,
        Backend::Nftables,
        &Tools::default(),
    )
    .unwrap();
    (pod, client)
}

/// Connects from the client namespace to the application's address (captured on the way).
async fn connect(client: &Netns) -> std::io::Result<tokio::net::TcpStream> {
    let to: SocketAddr = format!("{POD}:8080").parse().unwrap();
    let stream = client
        .run(|| std::net::TcpStream::connect_timeout(&to, Duration::from_secs(5)))
        .unwrap()?;
    stream.set_nonblocking(true)?;
    tokio::net::TcpStream::from_std(stream)
}

/// Whether an echo round trip works on a new connection (a refusal is a reset or EOF).
async fn echoes(client: &Netns) -> bool {
    let Ok(mut s) = connect(client).await else {
        return false;
    };
    if s.write_all(b"hello").await.is_err() {
        return false;
    }
    let mut back = [0u8; 5];
    matches!(
        tokio::time::timeout(TIMEOUT, s.read_exact(&mut back)).await,
        Ok(Ok(_))
    ) && &back == b"hello"
}

async fn rewrite(path: &Path, status: &mut tokio::sync::watch::Receiver<Status>, text: &str) {
    let handled = status.borrow_and_update().applied;
    std::fs::write(path, text).unwrap();
    tokio::time::timeout(TIMEOUT, status.wait_for(|s| s.applied > handled))
        .await
        .expect("the agent applies the new mesh file")
        .unwrap();
}

#[test]
fn plaintext_clients_are_authorized_without_identity_and_closed_when_denied() {
    if !root_or_skip("plaintext_clients_are_authorized_without_identity_and_closed_when_denied") {
        return;
    }
    tests::init_logging();
    sweep_stale().unwrap();
    let (pod, client) = namespaces();
    let client = client.open().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("mesh.yaml");
    ca_client::LocalCa::init(&dir.path().join("ca")).unwrap();
    // Needs an identity: a plaintext client never matches it, so it is refused.
    std::fs::write(
        &path,
        mesh(&allow("any-identity", "{principals: [{presence: {}}]}")),
    )
    .unwrap();

    // Threads the runtime starts inherit the pod namespace of the thread building it.
    pod.open()
        .unwrap()
        .run(|| {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async {
                let _echo = Echo::start(format!("{POD}:8080").parse().unwrap())
                    .await
                    .unwrap();
                let cfg = tests::config(&path, &dir.path().join("ca"), "n");
                let agent = agent::app::start(cfg).await.unwrap();
                let mut status = agent.mesh_status();
                let mut events = agent.events();

                assert!(!echoes(&client).await, "no identity: refused");
                let rec = tests::record(&mut events, agent::events::Direction::InboundPlaintext)
                    .await
                    .unwrap();
                let error = rec.error.unwrap();
                assert!(
                    error.contains("none of the 1 ALLOW policies matched"),
                    "{error}"
                );
                assert_eq!(rec.src.ip().to_string(), CLIENT);

                // A rule that needs no identity lets it in.
                let from_client = allow("from-client", &format!("{{sourceIps: [{CLIENT}/32]}}"));
                rewrite(&path, &mut status, &mesh(&from_client)).await;
                assert!(echoes(&client).await, "source IP allowed");

                // A deny added while connected closes the connection.
                let mut open = connect(&client).await.unwrap();
                open.write_all(b"x").await.unwrap();
                let mut one = [0u8; 1];
                open.read_exact(&mut one).await.unwrap();
                let denied = format!(
                    "{from_client}{}",
                    deny("deny-plaintext", "{notPrincipals: [{presence: {}}]}")
                );
                rewrite(&path, &mut status, &mesh(&denied)).await;
                let mut buf = [0u8; 8];
                let res = tokio::time::timeout(TIMEOUT, open.read(&mut buf))
                    .await
                    .expect("the open connection is closed");
                assert!(matches!(res, Ok(0) | Err(_)), "got {res:?}");
                assert!(!echoes(&client).await, "denied from now on");
                agent.shutdown(Duration::from_secs(1)).await;
            });
        })
        .unwrap();
}
