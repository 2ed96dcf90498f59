//! A pod's network namespace, found from the host's `/proc`: the process whose cgroup names the
//! pod's UID lives in it, so `<proc>/<pid>/ns/net` is the namespace.
//!
//! The kubelet puts every container of a pod under a cgroup that names the pod UID, in one of
//! two spellings depending on its cgroup driver: cgroupfs `/kubepods/besteffort/pod<uid>/<ctr>`
//! and systemd `…/kubepods-besteffort-pod<uid with _ for ->.slice/…`. A cgroup file line is
//! `ID:controllers:path` (v1, one line per hierarchy) or `0::path` (v2). The agent mounts the
//! host's `/proc` (at `/host/proc` in the DaemonSet); the path is configurable so tests can
//! hand it a directory of their own.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

/// The pod UID a cgroup file line names, with dashes, or `None`.
pub fn pod_uid(line: &str) -> Option<String> {
    // v1 `ID:controllers:path`, v2 `0::path`; the path may itself contain ':' (never in ours).
    let path = line.splitn(3, ':').nth(2)?;
    path.split('/').find_map(uid_in_segment)
}

/// `pod<uid>` (cgroupfs) or `…-pod<uid_with_underscores>.slice` (systemd).
fn uid_in_segment(segment: &str) -> Option<String> {
    let raw = if let Some(slice) = segment.strip_suffix(".slice") {
        slice.rsplit_once("-pod")?.1
    } else {
        segment.strip_prefix("pod")?
    };
    let uid = raw.replace('_', "-");
    is_uid(&uid).then_some(uid)
}

/// A Kubernetes UID: a UUID, 8-4-4-4-12 hex digits.
fn is_uid(s: &str) -> bool {
    let groups: Vec<&str> = s.split('-').collect();
    groups.len() == 5
        && groups
            .iter()
            .zip([8, 4, 4, 4, 12])
            .all(|(g, n)| g.len() == n && g.bytes().all(|b| b.is_ascii_hexdigit()))
}

/// `<proc>/<pid>/ns/net` of the lowest-numbered process in the pod `uid`, or `None` when no
/// process names it (the pod has not started, or runs on another node). Processes that end
/// while being read are skipped.
pub fn find_netns(proc_root: &Path, uid: &str) -> io::Result<Option<PathBuf>> {
    let uid = uid.to_ascii_lowercase();
    let mut pids: Vec<u32> = fs::read_dir(proc_root)?
        .filter_map(Result::ok)
        .filter_map(|e| e.file_name().to_str()?.parse().ok())
        .collect();
    pids.sort_unstable();
    for pid in pids {
        let dir = proc_root.join(pid.to_string());
        let Ok(cgroup) = fs::read_to_string(dir.join("cgroup")) else {
            continue;
        };
        let named = cgroup
            .lines()
            .filter_map(pod_uid)
            .any(|u| u.eq_ignore_ascii_case(&uid));
        let netns = dir.join("ns").join("net");
        if named && fs::metadata(&netns).is_ok() {
            return Ok(Some(netns));
        }
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;

    const UID: &str = "0f2b6a7e-3c1d-4e5f-8a9b-0c1d2e3f4a5b";

    #[test]
    fn cgroupfs_paths_in_v1_and_v2_lines() {
        for line in [
            "0::/kubepods/besteffort/pod0f2b6a7e-3c1d-4e5f-8a9b-0c1d2e3f4a5b/3f1c9a",
            "12:memory:/kubepods/burstable/pod0f2b6a7e-3c1d-4e5f-8a9b-0c1d2e3f4a5b/3f1c9a",
            // Guaranteed pods sit right under kubepods.
            "4:cpu,cpuacct:/kubepods/pod0f2b6a7e-3c1d-4e5f-8a9b-0c1d2e3f4a5b/3f1c9a",
        ] {
            assert_eq!(pod_uid(line).as_deref(), Some(UID), "{line}");
        }
    }

    #[test]
    fn systemd_slices_in_v1_and_v2_lines() {
        for line in [
            "0::/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod0f2b6a7e_3c1d_4e5f_8a9b_0c1d2e3f4a5b.slice/cri-containerd-3f1c9a.scope",
            "7:pids:/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod0f2b6a7e_3c1d_4e5f_8a9b_0c1d2e3f4a5b.slice/docker-3f1c9a.scope",
            "0::/kubepods.slice/kubepods-pod0f2b6a7e_3c1d_4e5f_8a9b_0c1d2e3f4a5b.slice/crio-3f1c9a.scope",
            // kubelet in its own slice (kind, some distributions).
            "0::/kubelet.slice/kubelet-kubepods.slice/kubelet-kubepods-besteffort.slice/kubelet-kubepods-besteffort-pod0f2b6a7e_3c1d_4e5f_8a9b_0c1d2e3f4a5b.slice/cri-containerd-3f1c9a.scope",
        ] {
            assert_eq!(pod_uid(line).as_deref(), Some(UID), "{line}");
        }
    }

    #[test]
    fn lines_that_name_no_pod() {
        for line in [
            "0::/",
            "0::/system.slice/containerd.service",
            "0::/user.slice/user-1000.slice/session-2.scope",
            "1:name=systemd:/kubepods/besteffort",
            // Not a UUID after `pod`.
            "0::/kubepods/besteffort/podcast/3f1c9a",
            "0::/kubepods.slice/kubepods-besteffort-pod1234.slice",
            "",
            "garbage",
        ] {
            assert_eq!(pod_uid(line), None, "{line}");
        }
    }

    #[test]
    fn the_lowest_process_of_the_pod_gives_the_namespace() {
        let proc = tempfile::tempdir().unwrap();
        let write = |pid: &str, cgroup: &str, with_ns: bool| {
            let dir = proc.path().join(pid);
            fs::create_dir_all(dir.join("ns")).unwrap();
            fs::write(dir.join("cgroup"), cgroup).unwrap();
            if with_ns {
                fs::write(dir.join("ns").join("net"), "").unwrap();
            }
        };
        write("1", "0::/init.scope\n", true);
        write(
            "40",
            &format!("0::/kubepods/besteffort/pod{UID}/app\n"),
            true,
        );
        write(
            "7",
            &format!("0::/kubepods/besteffort/pod{UID}/pause\n"),
            true,
        );
        // Another pod, and a process of ours that has gone (no ns/net left).
        write(
            "3",
            "0::/kubepods/besteffort/pod11111111-2222-3333-4444-555555555555/x\n",
            true,
        );
        write("5", &format!("0::/kubepods/pod{UID}/gone\n"), false);
        fs::create_dir_all(proc.path().join("self")).unwrap();
        assert_eq!(
            find_netns(proc.path(), UID).unwrap(),
            Some(proc.path().join("7/ns/net"))
        );
        assert_eq!(
            find_netns(proc.path(), "99999999-2222-3333-4444-555555555555").unwrap(),
            None
        );
        assert!(find_netns(&proc.path().join("missing"), UID).is_err());
    }
}
