//! An SVG chart of runs over time, written by hand (no plotting crate):
//! arrivals, replicas (desired dashed, ready solid) and SLO attainment by
//! arrival time, one colour per policy, on a shared time axis.

use std::fmt::Write as _;

use crate::stats::TimeSeries;

/// One line set of the chart.
#[derive(Debug, Clone)]
pub struct ChartSeries<'a> {
    pub label: String,
    pub series: &'a TimeSeries,
}

const COLORS: &[&str] = &[
    "#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf",
    "#7f7f7f", "#bcbd22",
];

const W: f64 = 960.0;
const LEFT: f64 = 64.0;
const RIGHT: f64 = 16.0;
const PANEL_H: f64 = 170.0;
const GAP: f64 = 44.0;

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// A "nice" tick step for a range.
fn nice_step(range: f64, ticks: f64) -> f64 {
    if range <= 0.0 || !range.is_finite() {
        return 1.0;
    }
    let raw = range / ticks;
    let mag = 10f64.powf(raw.log10().floor());
    let norm = raw / mag;
    let nice = if norm <= 1.0 {
        1.0
    } else if norm <= 2.0 {
        2.0
    } else if norm <= 5.0 {
        5.0
    } else {
        10.0
    };
    nice * mag
}

struct Panel {
    top: f64,
    y_max: f64,
    x_max: f64,
}

impl Panel {
    fn x(&self, t: f64) -> f64 {
        LEFT + (W - LEFT - RIGHT) * (t / self.x_max).clamp(0.0, 1.0)
    }
    fn y(&self, v: f64) -> f64 {
        self.top + PANEL_H * (1.0 - (v / self.y_max).clamp(0.0, 1.0))
    }
}

fn axes(out: &mut String, p: &Panel, title: &str, y_unit: &str, hours: bool) {
    let _ = writeln!(
        out,
        r##"<text x="{LEFT}" y="{:.1}" font-size="13" font-weight="bold">{}</text>"##,
        p.top - 8.0,
        esc(title)
    );
    let _ = writeln!(
        out,
        r##"<rect x="{LEFT}" y="{:.1}" width="{:.1}" height="{PANEL_H}" fill="none" stroke="#999"/>"##,
        p.top,
        W - LEFT - RIGHT
    );
    let step = nice_step(p.y_max, 4.0);
    let mut v = 0.0;
    while v <= p.y_max + 1e-9 {
        let y = p.y(v);
        let _ = writeln!(
            out,
            r##"<line x1="{LEFT}" x2="{:.1}" y1="{y:.1}" y2="{y:.1}" stroke="#eee"/><text x="{:.1}" y="{:.1}" font-size="11" text-anchor="end">{}{y_unit}</text>"##,
            W - RIGHT,
            LEFT - 4.0,
            y + 4.0,
            trim_num(v)
        );
        v += step;
    }
    let scale = if hours { 3600.0 } else { 60.0 };
    let xstep = nice_step(p.x_max / scale, 8.0) * scale;
    let mut t = 0.0;
    while t <= p.x_max + 1e-9 {
        let x = p.x(t);
        let _ = writeln!(
            out,
            r##"<line x1="{x:.1}" x2="{x:.1}" y1="{:.1}" y2="{:.1}" stroke="#999"/><text x="{x:.1}" y="{:.1}" font-size="11" text-anchor="middle">{}</text>"##,
            p.top + PANEL_H,
            p.top + PANEL_H + 4.0,
            p.top + PANEL_H + 16.0,
            trim_num(t / scale)
        );
        t += xstep;
    }
}

fn trim_num(v: f64) -> String {
    if (v - v.round()).abs() < 1e-9 {
        format!("{v:.0}")
    } else {
        let s = format!("{v:.2}");
        s.trim_end_matches('0').trim_end_matches('.').to_string()
    }
}

fn polyline(out: &mut String, pts: &[(f64, f64)], color: &str, dashed: bool, width: f64) {
    if pts.is_empty() {
        return;
    }
    let mut d = String::with_capacity(pts.len() * 14);
    for (x, y) in pts {
        let _ = write!(d, "{x:.1},{y:.1} ");
    }
    let dash = if dashed {
        r#" stroke-dasharray="5,3""#
    } else {
        ""
    };
    let _ = writeln!(
        out,
        r#"<polyline fill="none" stroke="{color}" stroke-width="{width}"{dash} points="{}"/>"#,
        d.trim_end()
    );
}

/// Render `runs` (the first one's arrivals are drawn) over `duration_s`.
pub fn render(title: &str, duration_s: f64, runs: &[ChartSeries<'_>]) -> String {
    let hours = duration_s > 3.0 * 3600.0;
    let legend_rows = runs.len().div_ceil(3) as f64;
    let top0 = 62.0 + 18.0 * legend_rows;
    let h = top0 + 3.0 * (PANEL_H + GAP) + 8.0;
    let mut out = String::new();
    let _ = writeln!(
        out,
        r##"<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{h:.0}" viewBox="0 0 {W} {h:.0}" font-family="sans-serif"><rect width="100%" height="100%" fill="white"/>"##
    );
    let _ = writeln!(
        out,
        r##"<text x="{LEFT}" y="22" font-size="15" font-weight="bold">{}</text>"##,
        esc(title)
    );
    for (i, r) in runs.iter().enumerate() {
        let col = (i % 3) as f64;
        let row = (i / 3) as f64;
        let x = LEFT + col * 300.0;
        let y = 42.0 + row * 18.0;
        let c = COLORS[i % COLORS.len()];
        let _ = writeln!(
            out,
            r##"<line x1="{x}" x2="{:.0}" y1="{y}" y2="{y}" stroke="{c}" stroke-width="3"/><text x="{:.0}" y="{:.0}" font-size="12">{}</text>"##,
            x + 22.0,
            x + 28.0,
            y + 4.0,
            esc(&r.label)
        );
    }
    let x_unit = if hours { "hours" } else { "minutes" };
    // Panel 1: arrivals.
    if let Some(first) = runs.first() {
        let s = first.series;
        let rates: Vec<f64> = s
            .arrivals
            .iter()
            .map(|&a| f64::from(a) / s.bucket_s)
            .collect();
        let y_max = rates.iter().cloned().fold(0.0, f64::max).max(1e-9) * 1.05;
        let p = Panel {
            top: top0,
            y_max,
            x_max: duration_s,
        };
        axes(
            &mut out,
            &p,
            &format!("Arrivals (requests/s) vs time ({x_unit})"),
            "",
            hours,
        );
        let pts: Vec<(f64, f64)> = rates
            .iter()
            .enumerate()
            .map(|(i, r)| (p.x((i as f64 + 0.5) * s.bucket_s), p.y(*r)))
            .collect();
        polyline(&mut out, &pts, "#444", false, 1.2);
    }
    // Panel 2: replicas.
    let y_max = runs
        .iter()
        .flat_map(|r| r.series.replicas.iter().map(|(_, d, rd)| (*d).max(*rd)))
        .max()
        .unwrap_or(1)
        .max(1) as f64
        * 1.08;
    let p = Panel {
        top: top0 + PANEL_H + GAP,
        y_max,
        x_max: duration_s,
    };
    axes(
        &mut out,
        &p,
        "Replicas: desired (dashed), ready (solid)",
        "",
        hours,
    );
    for (i, r) in runs.iter().enumerate() {
        let c = COLORS[i % COLORS.len()];
        let desired: Vec<(f64, f64)> = r
            .series
            .replicas
            .iter()
            .map(|(t, d, _)| (p.x(*t), p.y(f64::from(*d))))
            .collect();
        let ready: Vec<(f64, f64)> = r
            .series
            .replicas
            .iter()
            .map(|(t, _, rd)| (p.x(*t), p.y(f64::from(*rd))))
            .collect();
        polyline(&mut out, &desired, c, true, 1.0);
        polyline(&mut out, &ready, c, false, 1.6);
    }
    // Panel 3: attainment.
    let p = Panel {
        top: top0 + 2.0 * (PANEL_H + GAP),
        y_max: 100.0,
        x_max: duration_s,
    };
    axes(
        &mut out,
        &p,
        "SLO attainment by arrival time (%)",
        "%",
        hours,
    );
    for (i, r) in runs.iter().enumerate() {
        let c = COLORS[i % COLORS.len()];
        let s = r.series;
        let pts: Vec<(f64, f64)> = s
            .done
            .iter()
            .zip(&s.met)
            .enumerate()
            .filter(|(_, (d, _))| **d > 0)
            .map(|(k, (d, m))| {
                (
                    p.x((k as f64 + 0.5) * s.bucket_s),
                    p.y(100.0 * f64::from(*m) / f64::from(*d)),
                )
            })
            .collect();
        polyline(&mut out, &pts, c, false, 1.4);
    }
    out.push_str("</svg>\n");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chart_is_well_formed_svg_with_one_line_per_series() {
        let s = TimeSeries {
            bucket_s: 60.0,
            arrivals: vec![10, 20, 30],
            met: vec![10, 19, 25],
            done: vec![10, 20, 30],
            replicas: vec![(0.0, 2, 2), (60.0, 3, 2), (120.0, 3, 3)],
        };
        let svg = render(
            "t",
            180.0,
            &[
                ChartSeries {
                    label: "a<b".into(),
                    series: &s,
                },
                ChartSeries {
                    label: "c".into(),
                    series: &s,
                },
            ],
        );
        assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
        // arrivals + 2 × (desired, ready, attainment)
        assert_eq!(svg.matches("<polyline").count(), 7);
        assert!(svg.contains("a&lt;b"));
    }
}
