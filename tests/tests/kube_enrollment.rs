//! Root only: enrollment from the Kubernetes API, end to end, against the fake API server
//! (`tests::kube_api`) and real `ambientd` processes on simulated nodes.
//!
//! Node 1 runs pods a1 and a2, node 2 runs b1, all in namespace `demo`; every agent runs
//! `--enrollment kubernetes` with a kubeconfig pointing at the fake API (served inside each
//! node's namespace) and a fake host `/proc` in which each pod has a process whose cgroup
//! names its UID (systemd spelling on node 1, cgroupfs on node 2) and whose `ns/net` is the
//! pod's namespace. Steps: nothing is captured before the label; labelling `demo` enrolls
//! the running pods, annotates them and carries a1 → b1 over HBONE; a dropped watch resumes
//! and the pod opt-out label un-enrolls a2; with the history compacted (410 Gone, relist),
//! un-labelling un-enrolls the rest and their rules are gone; re-labelling enrolls again and
//! deleting b1 cleans it up; a restarted agent adopts a1 (rules unchanged, nothing duplicated)
//! and cleans up a2, which left the mesh while it was down; the API going away makes the agent
//! unready, its return ready again.

use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::time::{Duration, Instant};

use agent::demo::topology::{Namespace, OUTSIDE_IP, leftovers};
use anyhow::{Context, bail, ensure};
use k8s_openapi::api::core::v1::{Container, Pod, PodIP, PodSpec, PodStatus};
use tests::kube_api::FakeApi;
use tests::netns::{AGENT_WAIT, App, Cluster, capture_state, echo, root_or_skip};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const MODE: &str = "istio.io/dataplane-mode";
const REDIRECTION: &str = "ambient.istio.io/redirection";

fn pod(name: &str, node: &str, ip: IpAddr, ip6: IpAddr) -> Pod {
    let mut pod = Pod::default();
    pod.metadata.name = Some(name.into());
    pod.metadata.namespace = Some("demo".into());
    pod.spec = Some(PodSpec {
        node_name: Some(node.into()),
        service_account_name: Some(name.into()),
        containers: vec![Container {
            name: "app".into(),
            image: Some("app:1".into()),
            ..Container::default()
        }],
        ..PodSpec::default()
    });
    pod.status = Some(PodStatus {
        phase: Some("Running".into()),
        pod_ip: Some(ip.to_string()),
        pod_ips: Some(vec![
            PodIP { ip: ip.to_string() },
            PodIP {
                ip: ip6.to_string(),
            },
        ]),
        ..PodStatus::default()
    });
    pod
}

/// A process of pod `uid` in the fake `/proc`: its cgroup names the UID, its `ns/net` is the
/// pod's namespace.
fn fake_process(
    proc: &Path,
    pid: u32,
    uid: &str,
    netns: &Path,
    systemd: bool,
) -> anyhow::Result<()> {
    let dir = proc.join(pid.to_string());
    std::fs::create_dir_all(dir.join("ns"))?;
    let cgroup = if systemd {
        format!(
            "0::/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{}.slice/cri-containerd-{pid:x}.scope\n",
            uid.replace('-', "_")
        )
    } else {
        format!(
            "12:memory:/kubepods/besteffort/pod{uid}/{pid:x}\n0::/kubepods/besteffort/pod{uid}/{pid:x}\n"
        )
    };
    std::fs::write(dir.join("cgroup"), cgroup)?;
    std::os::unix::fs::symlink(netns, dir.join("ns").join("net"))?;
    Ok(())
}

/// `GET /healthz/ready` on the agent inside `ns`: status code and body.
async fn readiness(ns: &Namespace) -> anyhow::Result<(u16, String)> {
    let mut s = ns
        .connect("127.0.0.1:15021".parse()?, Duration::from_secs(2))
        .await?;
    s.write_all(b"GET /healthz/ready HTTP/1.1\r\nhost: agent\r\nconnection: close\r\n\r\n")
        .await?;
    let mut answer = String::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_string(&mut answer)).await??;
    let code = answer
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .context("no status line")?;
    let body = answer
        .split("\r\n\r\n")
        .nth(1)
        .unwrap_or_default()
        .to_owned();
    Ok((code, body))
}

/// Waits until the agent in `ns` answers `code`; returns the body.
async fn wait_readiness(ns: &Namespace, code: u16) -> anyhow::Result<String> {
    let deadline = Instant::now() + AGENT_WAIT;
    loop {
        let last = readiness(ns).await;
        if let Ok((c, body)) = &last
            && *c == code
        {
            return Ok(body.clone());
        }
        if Instant::now() > deadline {
            bail!("readiness never answered {code}; last: {last:?}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Waits until `check` holds on the fake API's view.
async fn wait_api(what: &str, check: impl Fn() -> bool) -> anyhow::Result<()> {
    let deadline = Instant::now() + AGENT_WAIT;
    while !check() {
        ensure!(
            Instant::now() < deadline,
            "{what}: not within {AGENT_WAIT:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(())
}

fn annotated(api: &FakeApi, name: &str) -> bool {
    api.pod("demo", name)
        .and_then(|p| p.metadata.annotations)
        .and_then(|a| a.get(REDIRECTION).cloned())
        .is_some_and(|v| v == "enabled")
}

/// Log lines `message` about workload `demo/<pod>`.
fn count(cluster: &Cluster, n: usize, message: &str, pod: &str) -> usize {
    cluster
        .agent(n)
        .messages(message)
        .iter()
        .filter(|f| f["pod"] == format!("demo/{pod}").as_str())
        .count()
}

async fn wait_count(
    cluster: &mut Cluster,
    n: usize,
    message: &'static str,
    pod: &str,
    at_least: usize,
) -> anyhow::Result<()> {
    let uid = format!("demo/{pod}");
    cluster
        .agent_mut(n)
        .wait_for(&format!("{message} {uid} ×{at_least}"), move |a| {
            a.messages(message)
                .iter()
                .filter(|f| f["pod"] == uid.as_str())
                .count()
                >= at_least
        })
        .await
}

fn hbone_from(cluster: &Cluster, n: usize, identity: &str) -> usize {
    cluster
        .agent(n)
        .records()
        .iter()
        .filter(|r| r["direction"] == "InboundHbone" && r["peer_identity"] == identity)
        .count()
}

/// Our rules in `ns`, without the packet counters traffic moves.
fn rules(ns: &Namespace) -> anyhow::Result<Vec<String>> {
    Ok(capture_state(ns)?
        .into_iter()
        .map(|line| {
            let mut words: Vec<&str> = line.split_whitespace().collect();
            for i in 1..words.len() {
                if matches!(words[i - 1], "packets" | "bytes") {
                    words[i] = "_";
                }
            }
            words.join(" ")
        })
        .collect())
}

/// Every agent's log so far, for failure messages.
fn all_logs(dir: &Path) -> String {
    let mut logs: Vec<_> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "log"))
        .collect();
    logs.sort();
    logs.iter()
        .map(|p| {
            format!(
                "== {}\n{}",
                p.display(),
                std::fs::read_to_string(p).unwrap_or_default()
            )
        })
        .collect()
}

async fn scenario() -> anyhow::Result<()> {
    let mut cluster = Cluster::build(&[&["a1", "a2"], &["b1"]], "iptables", "redirect")?;
    let dir = cluster.dir.path().to_owned();
    // One fake API, served on the same port inside every node's namespace.
    let mut api = FakeApi::new();
    let first = cluster.topology.node(1).ns.listen("127.0.0.1:0".parse()?)?;
    let port = first.local_addr()?.port();
    api.serve(first);
    for node in &cluster.topology.nodes[1..] {
        api.serve(node.ns.listen(SocketAddr::from(([127, 0, 0, 1], port)))?);
    }
    let kubeconfig = dir.join("kubeconfig");
    FakeApi::write_kubeconfig(&kubeconfig, port)?;
    let proc = dir.join("proc");
    std::fs::create_dir_all(&proc)?;
    api.set_namespace("demo", &[]);
    api.set_namespace("kube-system", &[]);
    let mut pid = 100;
    for (n, node) in cluster.topology.nodes.iter().enumerate() {
        for p in &node.pods {
            let uid = api.put_pod(pod(&p.name, &node.name, p.ip.into(), p.ip6.into()));
            pid += 1;
            fake_process(&proc, pid, &uid, &p.ns.path(), n == 0)?;
        }
    }
    cluster.add_args([
        "--enrollment",
        "kubernetes",
        "--kubeconfig",
        kubeconfig.to_str().context("utf-8 path")?,
        "--host-proc",
        proc.to_str().context("utf-8 path")?,
        "--kube-unready-after",
        "2s",
    ]);
    cluster.start_agent(1)?;
    cluster.start_agent(2)?;
    let (a1_ns, a2_ns, b1_ns) = {
        let t = &cluster.topology;
        (
            t.node(1).pod("a1").ns.name().to_owned(),
            t.node(1).pod("a2").ns.name().to_owned(),
            t.node(2).pod("b1").ns.name().to_owned(),
        )
    };
    let topo = &cluster.topology;
    let (a1, a2, b1) = (
        topo.node(1).pod("a1"),
        topo.node(1).pod("a2"),
        topo.node(2).pod("b1"),
    );
    let b1_addr = SocketAddr::new(b1.ip.into(), tests::netns::APP_PORT);
    let b1_addr6 = SocketAddr::new(b1.ip6.into(), tests::netns::APP_PORT);
    let b1_app = App::start(&b1.ns)?;
    let _out_app = App::start(cluster.outside())?;

    // Ready with nothing to enroll: the namespace carries no label.
    wait_readiness(&topo.node(1).ns, 200).await?;
    wait_readiness(&topo.node(2).ns, 200).await?;
    for p in [a1, a2, b1] {
        ensure!(
            capture_state(&p.ns)?.is_empty(),
            "{} captured before the label",
            p.name
        );
    }
    echo(&a1.ns, b1_addr)
        .await
        .context("a1 → b1 before the label")?;

    // Label the namespace: the running pods enroll, without restarting them.
    api.set_namespace("demo", &[(MODE, "ambient")]);
    wait_count(&mut cluster, 1, "pod enrolled", "a1", 1).await?;
    wait_count(&mut cluster, 1, "pod enrolled", "a2", 1).await?;
    wait_count(&mut cluster, 2, "pod enrolled", "b1", 1).await?;
    wait_api("pods annotated", || {
        ["a1", "a2", "b1"].iter().all(|p| annotated(&api, p))
    })
    .await?;
    let topo = &cluster.topology;
    let a1 = topo.node(1).pod("a1");
    for dst in [b1_addr, b1_addr6] {
        echo(&a1.ns, dst)
            .await
            .with_context(|| format!("a1 → b1 {dst} over HBONE"))?;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let a1_id = "spiffe://cluster.local/ns/demo/sa/a1";
    ensure!(
        hbone_from(&cluster, 2, a1_id) == 2,
        "node 2 should have two HBONE connections from a1: {:?}",
        cluster.agent(2).records()
    );
    ensure!(
        b1_app.peers().last() == Some(&IpAddr::from(a1.ip6)),
        "b1 saw {:?}",
        b1_app.peers()
    );

    // A dropped watch resumes; the pod's own label opts it out.
    api.drop_watches();
    api.label_pod("demo", "a2", MODE, Some("none"));
    wait_count(&mut cluster, 1, "pod unenrolled", "a2", 1).await?;
    wait_api("a2's annotation removed", || !annotated(&api, "a2")).await?;
    let left = capture_state(&cluster.topology.node(1).pod("a2").ns)?;
    ensure!(left.is_empty(), "{a2_ns} still has {left:#?}");
    ensure!(
        count(&cluster, 1, "pod unenrolled", "a1") == 0,
        "a1 was un-enrolled too"
    );

    // History gone (resumed watches get 410 and list again); un-label the namespace.
    api.compact();
    api.drop_watches();
    api.set_namespace("demo", &[]);
    wait_count(&mut cluster, 1, "pod unenrolled", "a1", 1).await?;
    wait_count(&mut cluster, 2, "pod unenrolled", "b1", 1).await?;
    wait_api("annotations removed", || {
        !annotated(&api, "a1") && !annotated(&api, "b1")
    })
    .await?;
    let topo = &cluster.topology;
    let (a1, b1) = (topo.node(1).pod("a1"), topo.node(2).pod("b1"));
    for (p, name) in [(a1, &a1_ns), (b1, &b1_ns)] {
        let left = capture_state(&p.ns)?;
        ensure!(left.is_empty(), "{name} still has {left:#?}");
    }
    let tunnels = hbone_from(&cluster, 2, a1_id);
    echo(&a1.ns, b1_addr)
        .await
        .context("a1 → b1 after un-labelling")?;
    tokio::time::sleep(Duration::from_millis(300)).await;
    ensure!(
        hbone_from(&cluster, 2, a1_id) == tunnels,
        "a1 → b1 went through the agents after un-labelling"
    );

    // Label again: both enroll again; a2 keeps its opt-out. Deleting b1 cleans it up.
    api.set_namespace("demo", &[(MODE, "ambient")]);
    wait_count(&mut cluster, 1, "pod enrolled", "a1", 2).await?;
    wait_count(&mut cluster, 2, "pod enrolled", "b1", 2).await?;
    echo(&cluster.topology.node(1).pod("a1").ns, b1_addr)
        .await
        .context("a1 → b1 after labelling again")?;
    ensure!(
        count(&cluster, 1, "pod enrolled", "a2") == 1,
        "a2 enrolled despite its opt-out"
    );
    api.delete_pod("demo", "b1");
    wait_count(&mut cluster, 2, "pod unenrolled", "b1", 2).await?;
    let left = capture_state(&cluster.topology.node(2).pod("b1").ns)?;
    ensure!(left.is_empty(), "deleted b1 still has {left:#?}");

    // Restart: a2 back in, then out again while node 1's agent is stopped.
    api.label_pod("demo", "a2", MODE, None);
    wait_count(&mut cluster, 1, "pod enrolled", "a2", 2).await?;
    wait_api("a1 and a2 annotated", || {
        annotated(&api, "a1") && annotated(&api, "a2")
    })
    .await?;
    let a1_rules = rules(&cluster.topology.node(1).pod("a1").ns)?;
    ensure!(!a1_rules.is_empty(), "a1 has no rules while enrolled");
    cluster.stop_agent(1).await?;
    api.label_pod("demo", "a2", MODE, Some("none"));
    let patches = api.patches();
    cluster.start_agent(1)?;
    wait_count(&mut cluster, 1, "pod enrolled", "a1", 1).await?;
    cluster
        .agent_mut(1)
        .wait_for("cleaned up a2", |a| {
            a.messages("capture rules of a pod out of the mesh cleaned up")
                .iter()
                .any(|f| f["pod"] == "demo/a2")
        })
        .await?;
    wait_readiness(&cluster.topology.node(1).ns, 200).await?;
    wait_api("a2's annotation removed after the restart", || {
        !annotated(&api, "a2")
    })
    .await?;
    ensure!(annotated(&api, "a1"), "a1 lost its annotation");
    // a1 was annotated already: the restart patches a2 only.
    ensure!(
        api.patches() == patches + 1,
        "patches after the restart: {}",
        api.patches() - patches
    );
    let topo = &cluster.topology;
    let (a1, a2) = (topo.node(1).pod("a1"), topo.node(1).pod("a2"));
    let after = rules(&a1.ns)?;
    ensure!(
        after == a1_rules,
        "a1's rules changed over the restart:\nbefore {a1_rules:#?}\nafter {after:#?}\n{}",
        all_logs(&dir)
    );
    let left = capture_state(&a2.ns)?;
    ensure!(
        left.is_empty(),
        "{a2_ns} still has {left:#?} after the restart"
    );
    // a1 is served by the new agent: its connection out of the mesh passes through it.
    echo(
        &a1.ns,
        SocketAddr::new(OUTSIDE_IP.into(), tests::netns::APP_PORT),
    )
    .await
    .context("a1 → outside after the restart")?;
    tokio::time::sleep(Duration::from_millis(300)).await;
    ensure!(
        cluster
            .agent(1)
            .records()
            .iter()
            .any(|r| r["direction"] == "OutboundPassthrough"),
        "the restarted agent did not carry a1's connection: {:?}",
        cluster.agent(1).records()
    );

    // The API goes away: unready after --kube-unready-after; back: ready again.
    api.set_down(true);
    let body = wait_readiness(&cluster.topology.node(2).ns, 503)
        .await
        .with_context(|| cluster.agent(2).log_text())?;
    ensure!(
        body.contains("kubernetes api"),
        "unready for another reason: {body}"
    );
    api.set_down(false);
    wait_readiness(&cluster.topology.node(2).ns, 200).await?;

    drop(b1_app);
    drop(cluster);
    drop(api);
    let left = leftovers()?;
    ensure!(left.is_empty(), "namespaces left behind: {left:?}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubernetes_enrollment_follows_labels_deletion_restarts_and_the_api() {
    if root_or_skip("kubernetes_enrollment_follows_labels_deletion_restarts_and_the_api") {
        tests::init_logging();
        scenario().await.unwrap();
    }
}
