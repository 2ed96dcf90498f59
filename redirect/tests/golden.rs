//! Golden files: for every backend × inbound mode × IP family, the exact text handed to
//! `iptables-restore`/`ip6tables-restore` or `nft`, the `ip` commands of the return path, and
//! the text that stops the capture but keeps the return path (a pod leaving, before its drain).
//! `UPDATE_GOLDEN=1 cargo test -p redirect --test golden` rewrites them; review the diff.

use std::fmt::Write;
use std::path::{Path, PathBuf};

use redirect::{CaptureConfig, Family, InboundMode, RuleSet};

#[derive(Clone, Copy)]
enum Families {
    V4,
    V6,
    Dual,
}

impl Families {
    fn name(self) -> &'static str {
        match self {
            Families::V4 => "ipv4",
            Families::V6 => "ipv6",
            Families::Dual => "dual",
        }
    }
}

struct Case {
    backend: &'static str,
    mode: InboundMode,
    families: Families,
}

fn cases() -> Vec<Case> {
    let mut cases = Vec::new();
    for mode in [InboundMode::Redirect, InboundMode::Tproxy] {
        for families in [Families::V4, Families::V6] {
            cases.push(Case {
                backend: "iptables",
                mode,
                families,
            });
        }
        for families in [Families::V4, Families::V6, Families::Dual] {
            cases.push(Case {
                backend: "nft",
                mode,
                families,
            });
        }
    }
    cases
}

impl Case {
    fn file(&self) -> PathBuf {
        testdata().join(format!(
            "{}-{}-{}.golden",
            self.backend,
            self.mode.as_str(),
            self.families.name()
        ))
    }

    fn render(&self) -> String {
        let config = CaptureConfig {
            inbound: self.mode,
            ipv4: !matches!(self.families, Families::V6),
            ipv6: !matches!(self.families, Families::V4),
            ..CaptureConfig::default()
        };
        let plan = RuleSet::plan(&config).unwrap();
        let kept = plan.return_path();
        let mut out = String::new();
        if self.backend == "iptables" {
            let (family, tool) = match self.families {
                Families::V4 => (Family::V4, "iptables-restore"),
                _ => (Family::V6, "ip6tables-restore"),
            };
            let _ = writeln!(
                out,
                "### {tool} --noflush, into a namespace without our chains"
            );
            out.push_str(&plan.render_iptables(family));
            out.push_str("### ip\n");
            out.push_str(&plan.render_routes());
            let _ = writeln!(
                out,
                "### stop_capture: {tool} --noflush, over the rules above"
            );
            out.push_str(&kept.render_iptables_over(family, &plan));
        } else {
            out.push_str("### nft -f -\n");
            out.push_str(&plan.render_nft());
            out.push_str("### ip\n");
            out.push_str(&plan.render_routes());
            out.push_str("### stop_capture: nft -f -\n");
            out.push_str(&kept.render_nft());
        }
        out
    }
}

fn testdata() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("testdata")
}

/// A line diff (longest common subsequence); the files are small.
fn diff(want: &str, got: &str) -> String {
    let a: Vec<&str> = want.lines().collect();
    let b: Vec<&str> = got.lines().collect();
    let mut lcs = vec![vec![0usize; b.len() + 1]; a.len() + 1];
    for i in (0..a.len()).rev() {
        for j in (0..b.len()).rev() {
            lcs[i][j] = if a[i] == b[j] {
                lcs[i + 1][j + 1] + 1
            } else {
                lcs[i + 1][j].max(lcs[i][j + 1])
            };
        }
    }
    let (mut i, mut j, mut out) = (0, 0, String::new());
    while i < a.len() || j < b.len() {
        if i < a.len() && j < b.len() && a[i] == b[j] {
            let _ = writeln!(out, "  {}", a[i]);
            i += 1;
            j += 1;
        } else if j < b.len() && (i == a.len() || lcs[i][j + 1] > lcs[i + 1][j]) {
            let _ = writeln!(out, "+ {}", b[j]);
            j += 1;
        } else {
            let _ = writeln!(out, "- {}", a[i]);
            i += 1;
        }
    }
    out
}

#[test]
fn rendered_rules_match_golden_files() {
    let update = std::env::var_os("UPDATE_GOLDEN").is_some_and(|v| v == "1");
    let mut failures = Vec::new();
    for case in cases() {
        let file = case.file();
        let got = case.render();
        if update {
            std::fs::write(&file, &got).unwrap();
            continue;
        }
        match std::fs::read_to_string(&file) {
            Ok(want) if want == got => {}
            Ok(want) => failures.push(format!(
                "{} differs (- golden, + rendered):\n{}",
                file.display(),
                diff(&want, &got)
            )),
            Err(err) => failures.push(format!("{}: {err}", file.display())),
        }
    }
    assert!(
        failures.is_empty(),
        "{}\nrerun with UPDATE_GOLDEN=1 if the change is intended",
        failures.join("\n")
    );
}

#[test]
fn every_golden_file_belongs_to_a_case() {
    let known: Vec<PathBuf> = cases().iter().map(Case::file).collect();
    assert_eq!(known.len(), 10);
    for entry in std::fs::read_dir(testdata()).unwrap() {
        let path = entry.unwrap().path();
        assert!(
            known.contains(&path),
            "stale golden file {}",
            path.display()
        );
    }
}

#[test]
fn diff_marks_changed_lines() {
    assert_eq!(diff("a\nb\nc\n", "a\nx\nc\n"), "  a\n- b\n+ x\n  c\n");
}
