use std::net::IpAddr;
use std::path::Path;

use super::*;

const NODE: &str = "node-1";
const CLUSTER: &str = "Kubernetes";

fn view(name: &str) -> PodView {
    PodView {
        uid: format!("uid-{name}"),
        namespace: "demo".into(),
        name: name.into(),
        mode: None,
        host_network: false,
        running: true,
        ips: vec![format!("198.19.1.{}", name.len()).parse().unwrap()],
    }
}

fn workload(uid: &str, name: &str, ns: &str, ip: &str, node: &str) -> Workload {
    let id = identity::Identity::new("cluster.local", ns, name).unwrap();
    let mut w = Workload::new(uid, name, id);
    w.addresses = vec![ip.parse::<IpAddr>().unwrap()];
    w.node = node.into();
    w
}

/// A mesh state with the Istio-style workload of each pod.
fn state_for(pods: &[&PodView]) -> xds::State {
    let mut state = xds::State::new();
    for p in pods {
        state.upsert_workload(workload(
            &format!("{CLUSTER}//Pod/{}/{}", p.namespace, p.name),
            &p.name,
            &p.namespace,
            &p.ips[0].to_string(),
            NODE,
        ));
    }
    state
}

/// Every pod's netns is `/ns/<uid>`.
fn netns(uid: &str) -> io::Result<Option<PathBuf>> {
    Ok(Some(Path::new("/ns").join(uid)))
}

fn no_netns(_: &str) -> io::Result<Option<PathBuf>> {
    Ok(None)
}

fn enrolled(uid: &str, pod: &PodView) -> Option<Change> {
    Some(Change::Enrolled(Pod {
        uid: uid.into(),
        netns: Some(Path::new("/ns").join(&pod.uid)),
    }))
}

fn istio_uid(pod: &PodView) -> String {
    format!("{CLUSTER}//Pod/{}/{}", pod.namespace, pod.name)
}

#[test]
fn which_pods_are_wanted() {
    let plain = view("a");
    assert!(plain.wanted(true));
    assert!(!plain.wanted(false));
    let opted_in = PodView {
        mode: Some("ambient".into()),
        ..view("a")
    };
    assert!(opted_in.wanted(false));
    let opted_out = PodView {
        mode: Some("none".into()),
        ..view("a")
    };
    assert!(!opted_out.wanted(true));
    let host = PodView {
        host_network: true,
        ..view("a")
    };
    assert!(!host.wanted(true));
    let pending = PodView {
        running: false,
        ..view("a")
    };
    assert!(!pending.wanted(true));
}

#[test]
fn a_pod_maps_to_its_workload_by_istio_uid_then_local_uid_then_name_then_ip() {
    let pod = view("web");
    let ip = pod.ips[0].to_string();
    let by = |state: &xds::State| workload_for(state, CLUSTER, NODE, &pod).map(|w| w.uid.clone());
    let mut state = xds::State::new();
    assert_eq!(by(&state), None);
    // By IP, on this node only.
    state.upsert_workload(workload("by-ip", "other", "demo", &ip, "node-2"));
    assert_eq!(by(&state), None);
    state.upsert_workload(workload("by-ip", "other", "demo", &ip, NODE));
    assert_eq!(by(&state).as_deref(), Some("by-ip"));
    // By name and namespace on this node.
    state.upsert_workload(workload("by-name", "web", "demo", "198.19.9.9", NODE));
    assert_eq!(by(&state).as_deref(), Some("by-name"));
    // The mesh file's default uid.
    state.upsert_workload(workload(
        "demo/web",
        "web",
        "demo",
        "198.19.9.8",
        "elsewhere",
    ));
    assert_eq!(by(&state).as_deref(), Some("demo/web"));
    // Istio's uid for the pod.
    state.upsert_workload(workload(&istio_uid(&pod), "web", "demo", &ip, NODE));
    assert_eq!(by(&state), Some(istio_uid(&pod)));
}

#[test]
fn labelling_enrolls_then_annotates_and_unlabelling_unenrolls_then_removes_it() {
    let now = Instant::now();
    let a = view("a");
    let state = state_for(&[&a]);
    let mut ledger = Ledger::new(CLUSTER, NODE);
    ledger.replace_namespaces([("demo".to_owned(), false)].into());
    ledger.replace_pods(vec![(a.clone(), false)]);
    assert_eq!(ledger.step(&state, &netns, now), None);
    assert!(ledger.annotations_to_fix().is_empty());

    ledger.set_namespace("demo", true);
    assert_eq!(
        ledger.step(&state, &netns, now),
        enrolled(&istio_uid(&a), &a)
    );
    // Not annotated before the agent says the rules are in place.
    assert!(ledger.annotations_to_fix().is_empty());
    ledger.report(Ok(()), now);
    assert_eq!(ledger.step(&state, &netns, now), None);
    assert_eq!(ledger.annotations_to_fix(), vec![(a.clone(), true)]);
    ledger.set_pod(a.clone(), true);
    assert!(ledger.annotations_to_fix().is_empty());

    ledger.set_namespace("demo", false);
    assert_eq!(
        ledger.step(&state, &netns, now),
        Some(Change::Unenrolled { uid: istio_uid(&a) })
    );
    ledger.report(Ok(()), now);
    assert_eq!(ledger.step(&state, &netns, now), None);
    assert_eq!(ledger.annotations_to_fix(), vec![(a.clone(), false)]);
    ledger.set_pod(a, false);
    assert!(ledger.annotations_to_fix().is_empty());
}

#[test]
fn the_pod_label_opts_out_and_deletion_unenrolls() {
    let now = Instant::now();
    let (a, b) = (view("a"), view("bb"));
    let state = state_for(&[&a, &b]);
    let mut ledger = Ledger::new(CLUSTER, NODE);
    ledger.replace_namespaces([("demo".to_owned(), true)].into());
    ledger.replace_pods(vec![(a.clone(), false), (b.clone(), false)]);
    assert_eq!(
        ledger.step(&state, &netns, now),
        enrolled(&istio_uid(&a), &a)
    );
    ledger.report(Ok(()), now);
    assert_eq!(
        ledger.step(&state, &netns, now),
        enrolled(&istio_uid(&b), &b)
    );
    ledger.report(Ok(()), now);
    assert_eq!(ledger.step(&state, &netns, now), None);

    ledger.set_pod(
        PodView {
            mode: Some("none".into()),
            ..a.clone()
        },
        true,
    );
    assert_eq!(
        ledger.step(&state, &netns, now),
        Some(Change::Unenrolled { uid: istio_uid(&a) })
    );
    ledger.report(Ok(()), now);
    ledger.remove_pod(&b.uid);
    assert_eq!(
        ledger.step(&state, &netns, now),
        Some(Change::Unenrolled { uid: istio_uid(&b) })
    );
    ledger.report(Ok(()), now);
    assert_eq!(ledger.step(&state, &netns, now), None);
    // The deleted pod has nothing left to annotate.
    let fixes = ledger.annotations_to_fix();
    assert_eq!(fixes.len(), 1);
    assert_eq!(fixes[0].0.uid, a.uid);
}

#[test]
fn a_pod_waits_for_its_workload_without_counting_attempts() {
    let now = Instant::now();
    let a = view("a");
    let mut ledger = Ledger::new(CLUSTER, NODE);
    ledger.replace_namespaces([("demo".to_owned(), true)].into());
    ledger.replace_pods(vec![(a.clone(), false)]);
    for _ in 0..10 {
        assert_eq!(ledger.step(&xds::State::new(), &netns, now), None);
    }
    assert_eq!(ledger.pending(), 1);
    assert_eq!(ledger.next_retry(), None);
    let state = state_for(&[&a]);
    assert_eq!(
        ledger.step(&state, &netns, now),
        enrolled(&istio_uid(&a), &a)
    );
}

#[test]
fn failures_back_off_then_give_up_until_the_pod_changes() {
    let start = Instant::now();
    let a = view("a");
    let state = state_for(&[&a]);
    let mut ledger = Ledger::new(CLUSTER, NODE);
    ledger.replace_namespaces([("demo".to_owned(), true)].into());
    ledger.replace_pods(vec![(a.clone(), false)]);
    let mut now = start;
    for attempt in 1..=MAX_ATTEMPTS {
        assert_eq!(
            ledger.step(&state, &netns, now),
            enrolled(&istio_uid(&a), &a),
            "attempt {attempt}"
        );
        ledger.report(Err("iptables-restore failed".into()), now);
        // Not before the backoff.
        assert_eq!(ledger.step(&state, &netns, now), None);
        match ledger.next_retry() {
            Some(at) => {
                assert!(attempt < MAX_ATTEMPTS);
                assert_eq!(at - now, backoff(attempt));
                now = at;
            }
            None => assert_eq!(attempt, MAX_ATTEMPTS),
        }
    }
    // Given up: nothing more, however long.
    assert_eq!(
        ledger.step(&state, &netns, now + Duration::from_secs(3600)),
        None
    );
    // Until the pod changes.
    ledger.set_pod(
        PodView {
            ips: vec!["198.19.1.77".parse().unwrap()],
            ..a.clone()
        },
        false,
    );
    assert!(matches!(
        ledger.step(&state, &netns, now),
        Some(Change::Enrolled(_))
    ));
}

#[test]
fn a_pod_without_a_process_in_proc_is_retried() {
    let now = Instant::now();
    let a = view("a");
    let state = state_for(&[&a]);
    let mut ledger = Ledger::new(CLUSTER, NODE);
    ledger.replace_namespaces([("demo".to_owned(), true)].into());
    ledger.replace_pods(vec![(a.clone(), false)]);
    assert_eq!(ledger.step(&state, &no_netns, now), None);
    let at = ledger.next_retry().expect("a retry is scheduled");
    assert_eq!(
        ledger.step(&state, &netns, at),
        enrolled(&istio_uid(&a), &a)
    );
}

#[test]
fn a_restart_adopts_captured_pods_and_cleans_up_after_the_ones_that_left() {
    let now = Instant::now();
    let (kept, left) = (view("kept"), view("left"));
    // Finished while no agent ran: not running, and its namespace is gone.
    let gone = PodView {
        running: false,
        ..view("gone")
    };
    let state = state_for(&[&kept, &left]);
    let mut ledger = Ledger::new(CLUSTER, NODE);
    ledger.replace_namespaces([("demo".to_owned(), true)].into());
    let left_now = PodView {
        mode: Some("none".into()),
        ..left.clone()
    };
    // All three carry the annotation of the earlier agent.
    ledger.replace_pods(vec![
        (kept.clone(), true),
        (left_now.clone(), true),
        (gone.clone(), true),
    ]);
    let lookup = |uid: &str| {
        if uid == gone.uid {
            Ok(None)
        } else {
            netns(uid)
        }
    };
    assert_eq!(
        ledger.step(&state, &lookup, now),
        Some(Change::Cleanup {
            pod: "demo/left".into(),
            netns: Path::new("/ns").join(&left.uid),
        })
    );
    ledger.report(Ok(()), now);
    assert_eq!(
        ledger.step(&state, &lookup, now),
        enrolled(&istio_uid(&kept), &kept)
    );
    ledger.report(Ok(()), now);
    assert_eq!(ledger.step(&state, &lookup, now), None);
    let mut fixes: Vec<(String, bool)> = ledger
        .annotations_to_fix()
        .into_iter()
        .map(|(p, on)| (p.name, on))
        .collect();
    fixes.sort();
    // Nothing of ours is left in either: both lose the annotation; `kept` keeps its own.
    assert_eq!(fixes, vec![("gone".into(), false), ("left".into(), false)]);
}

#[test]
fn backoff_doubles_from_one_second_to_thirty() {
    assert_eq!(backoff(1), Duration::from_secs(1));
    assert_eq!(backoff(2), Duration::from_secs(2));
    assert_eq!(backoff(5), Duration::from_secs(16));
    assert_eq!(backoff(9), Duration::from_secs(30));
}
