//! `--svg`: a hand-written bar chart of every figure's ratio to `direct` — one row per figure,
//! one bar per mode, a line at 1 (as fast as direct) and the mesh target as a mark.

use std::fmt::Write as _;

use super::Mode;
use super::report::{Figure, Machine, Target};

const ROW: f64 = 22.0;
const BAR: f64 = 8.0;
const LABEL_W: f64 = 330.0;
const PLOT_W: f64 = 520.0;
const TOP: f64 = 56.0;
/// Ratios beyond this are drawn clipped, with their value written.
const MAX_RATIO: f64 = 8.0;

fn colour(mode: Mode) -> &'static str {
    match mode {
        Mode::Direct => "#888888",
        Mode::Mesh => "#2b6cb0",
        Mode::Tcp => "#dd8452",
    }
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// The chart as an SVG document.
pub fn svg(figures: &[Figure], machine: &Machine) -> String {
    let rows: Vec<&Figure> = figures.iter().filter(|f| !f.ratios.is_empty()).collect();
    let modes: Vec<Mode> = rows
        .first()
        .map(|f| f.ratios.iter().map(|(m, _)| *m).collect())
        .unwrap_or_default();
    let scale_max = rows
        .iter()
        .flat_map(|f| {
            let target = match f.target {
                Some(Target::RatioAtLeast(x) | Target::RatioAtMost(x)) => Some(x),
                _ => None,
            };
            f.ratios.iter().filter_map(|(_, r)| *r).chain(target)
        })
        .fold(1.0_f64, f64::max)
        .min(MAX_RATIO)
        * 1.1;
    let x = |ratio: f64| LABEL_W + PLOT_W * ratio.min(scale_max) / scale_max;
    let height = TOP + ROW * rows.len() as f64 + 40.0;
    let width = LABEL_W + PLOT_W + 70.0;
    let mut out = String::new();
    let _ = writeln!(
        out,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{width:.0}" height="{height:.0}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(
        out,
        r##"<rect width="100%" height="100%" fill="white"/><text x="10" y="20" font-size="15">ambientd bench: each figure ÷ direct (same run)</text><text x="10" y="50" fill="#555">{}</text>"##,
        escape(&machine.describe())
    );
    let mut legend_x = LABEL_W;
    for &m in &modes {
        let _ = writeln!(
            out,
            r#"<rect x="{legend_x:.0}" y="28" width="12" height="10" fill="{}"/><text x="{:.0}" y="37">{m}</text>"#,
            colour(m),
            legend_x + 16.0
        );
        legend_x += 70.0;
    }
    let _ = writeln!(
        out,
        r#"<line x1="{legend_x:.0}" y1="27" x2="{legend_x:.0}" y2="39" stroke="crimson" stroke-width="3"/><text x="{:.0}" y="37">mesh target</text>"#,
        legend_x + 6.0
    );
    for (i, f) in rows.iter().enumerate() {
        let y = TOP + ROW * i as f64;
        if i % 2 == 0 {
            let _ = writeln!(
                out,
                r##"<rect x="0" y="{y:.1}" width="{width:.0}" height="{ROW}" fill="#f4f6f8"/>"##
            );
        }
        let _ = writeln!(
            out,
            r#"<text x="{:.0}" y="{:.1}" text-anchor="end">{}</text>"#,
            LABEL_W - 8.0,
            y + 15.0,
            escape(f.label.trim())
        );
        let n = f.ratios.len().max(1) as f64;
        for (j, (m, r)) in f.ratios.iter().enumerate() {
            let by = y + (ROW - BAR * n) / 2.0 + BAR * j as f64;
            match r {
                Some(r) => {
                    let _ = writeln!(
                        out,
                        r#"<rect x="{LABEL_W}" y="{by:.1}" width="{:.1}" height="{:.1}" fill="{}"><title>{m}: {r:.2}x</title></rect>"#,
                        x(*r) - LABEL_W,
                        BAR - 1.0,
                        colour(*m)
                    );
                    // How far the ratio moved between repeats, across the bar.
                    if let Some((_, Some((lo, hi)))) = f.ratio_ranges.get(j) {
                        let _ = writeln!(
                            out,
                            r#"<line x1="{0:.1}" y1="{1:.1}" x2="{2:.1}" y2="{1:.1}" stroke="black" stroke-width="1.5"><title>{m} over the repeats: {lo:.2}x to {hi:.2}x</title></line>"#,
                            x(*lo),
                            by + (BAR - 1.0) / 2.0,
                            x(*hi)
                        );
                    }
                    if *r > scale_max || j + 1 == f.ratios.len() || n == 1.0 {
                        let _ = writeln!(
                            out,
                            r#"<text x="{:.1}" y="{:.1}" font-size="9">{r:.2}</text>"#,
                            x(*r) + 3.0,
                            by + BAR - 1.0
                        );
                    }
                }
                None => {
                    let _ = writeln!(
                        out,
                        r#"<text x="{:.1}" y="{:.1}" font-size="9">{m}: n/a</text>"#,
                        LABEL_W + 3.0,
                        by + BAR - 1.0
                    );
                }
            }
        }
        if let Some(Target::RatioAtLeast(t) | Target::RatioAtMost(t)) = f.target {
            let _ = writeln!(
                out,
                r#"<line x1="{0:.1}" y1="{1:.1}" x2="{0:.1}" y2="{2:.1}" stroke="crimson" stroke-width="3"><title>mesh target {3}{t:.2}x</title></line>"#,
                x(t),
                y + 2.0,
                y + ROW - 2.0,
                if matches!(f.target, Some(Target::RatioAtLeast(_))) {
                    "≥"
                } else {
                    "≤"
                }
            );
        }
    }
    let bottom = TOP + ROW * rows.len() as f64;
    let _ = writeln!(
        out,
        r#"<line x1="{0:.1}" y1="{TOP}" x2="{0:.1}" y2="{bottom:.1}" stroke="black" stroke-dasharray="4 3"/><text x="{0:.1}" y="{1:.1}" text-anchor="middle">1 = direct</text>"#,
        x(1.0),
        bottom + 16.0
    );
    let _ = writeln!(
        out,
        r#"<line x1="{LABEL_W}" y1="{TOP}" x2="{LABEL_W}" y2="{bottom:.1}" stroke="black"/><text x="{LABEL_W}" y="{:.1}" text-anchor="middle">0</text><text x="{:.1}" y="{:.1}" text-anchor="middle">{:.1}</text>"#,
        bottom + 16.0,
        LABEL_W + PLOT_W,
        bottom + 16.0,
        scale_max
    );
    out.push_str("</svg>\n");
    out
}
