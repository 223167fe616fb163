//! Inline SVG charts (no script, no external request): stacked bars, lines and grouped bars
//! on one frame with a y axis and a few x labels.

use std::fmt::Write;

/// Series colours (matplotlib's tab10).
pub(crate) const PALETTE: [&str; 10] = [
    "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
    "#bcbd22", "#17becf",
];

const W: f64 = 560.0;
const H: f64 = 220.0;
const LEFT: f64 = 52.0;
const RIGHT: f64 = 12.0;
const TOP: f64 = 12.0;
const BOTTOM: f64 = 30.0;

/// Escapes text for HTML and SVG.
pub(crate) fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
        .replace('\'', "&#39;")
}

/// A round upper bound for the y axis.
fn nice_max(v: f64) -> f64 {
    if !(v.is_finite() && v > 0.0) {
        return 1.0;
    }
    let p = 10f64.powf(v.log10().floor());
    // Four intervals of a round size each.
    [1.0, 2.0, 4.0, 8.0, 10.0]
        .iter()
        .map(|m| m * p)
        .find(|&m| m >= v)
        .unwrap_or(10.0 * p)
}

fn fmt_tick(v: f64) -> String {
    if v >= 100.0 || v == v.round() {
        format!("{v:.0}")
    } else if v >= 1.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

/// The frame: axes, y ticks and x labels (every one when `all`, else the first, middle and
/// last).
fn frame(y_max: f64, unit: &str, x_labels: &[String], all: bool, body: &str) -> String {
    let mut s = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" viewBox=\"0 0 {W} {H}\" width=\"{W}\" height=\"{H}\" role=\"img\">"
    );
    let (x0, x1, y0, y1) = (LEFT, W - RIGHT, H - BOTTOM, TOP);
    for k in 0..=4 {
        let v = y_max * f64::from(k) / 4.0;
        let y = y0 - (y0 - y1) * f64::from(k) / 4.0;
        let _ = write!(
            s,
            "<line x1=\"{x0}\" y1=\"{y:.1}\" x2=\"{x1}\" y2=\"{y:.1}\" stroke=\"#e4e4e4\"/>\
             <text x=\"{:.1}\" y=\"{:.1}\" font-size=\"10\" text-anchor=\"end\" fill=\"#555\">{}</text>",
            x0 - 4.0,
            y + 3.5,
            fmt_tick(v)
        );
    }
    let _ = write!(
        s,
        "<text x=\"4\" y=\"{}\" font-size=\"10\" fill=\"#555\" transform=\"rotate(-90 10 {})\">{}</text>",
        H / 2.0,
        H / 2.0,
        escape(unit)
    );
    s.push_str(body);
    let _ = write!(
        s,
        "<line x1=\"{x0}\" y1=\"{y0}\" x2=\"{x1}\" y2=\"{y0}\" stroke=\"#888\"/>\
         <line x1=\"{x0}\" y1=\"{y0}\" x2=\"{x0}\" y2=\"{y1}\" stroke=\"#888\"/>"
    );
    let n = x_labels.len();
    if n > 0 {
        let picks: Vec<usize> = if all || n < 3 {
            (0..n).collect()
        } else {
            vec![0, n / 2, n - 1]
        };
        for i in picks {
            let x = x_at(i, n);
            let anchor = if all {
                "middle"
            } else if i == 0 {
                "start"
            } else if i == n - 1 && n > 1 {
                "end"
            } else {
                "middle"
            };
            let _ = write!(
                s,
                "<text x=\"{x:.1}\" y=\"{:.1}\" font-size=\"10\" text-anchor=\"{anchor}\" fill=\"#555\">{}</text>",
                H - BOTTOM + 14.0,
                escape(&x_labels[i])
            );
        }
    }
    s.push_str("</svg>");
    s
}

/// The centre of slot `i` of `n` along the x axis.
fn x_at(i: usize, n: usize) -> f64 {
    let slot = (W - RIGHT - LEFT) / n.max(1) as f64;
    LEFT + slot * (i as f64 + 0.5)
}

fn y_at(v: f64, y_max: f64) -> f64 {
    let y0 = H - BOTTOM;
    y0 - (y0 - TOP) * (v / y_max).clamp(0.0, 1.0)
}

/// A chart area that says there is nothing to show.
pub(crate) fn empty(message: &str) -> String {
    format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" viewBox=\"0 0 {W} {H}\" width=\"{W}\" height=\"{H}\">\
         <rect x=\"{LEFT}\" y=\"{TOP}\" width=\"{}\" height=\"{}\" fill=\"#fafafa\" stroke=\"#ddd\"/>\
         <text x=\"{}\" y=\"{}\" font-size=\"13\" text-anchor=\"middle\" fill=\"#888\">{}</text></svg>",
        W - LEFT - RIGHT,
        H - TOP - BOTTOM,
        (W + LEFT - RIGHT) / 2.0,
        H / 2.0,
        escape(message)
    )
}

/// Bars stacked per x slot: `series[k] = (colour, values per slot)`.
pub(crate) fn stacked_bars(x_labels: &[String], series: &[(&str, Vec<f64>)], unit: &str) -> String {
    let n = x_labels.len();
    let totals: Vec<f64> = (0..n)
        .map(|i| {
            series
                .iter()
                .map(|(_, v)| v.get(i).copied().unwrap_or(0.0))
                .sum()
        })
        .collect();
    let y_max = nice_max(totals.iter().copied().fold(0.0, f64::max));
    let slot = (W - RIGHT - LEFT) / n.max(1) as f64;
    let bar = (slot * 0.8).max(1.0);
    let mut body = String::new();
    for i in 0..n {
        let mut base = 0.0;
        for (colour, values) in series {
            let v = values.get(i).copied().unwrap_or(0.0);
            if v <= 0.0 {
                continue;
            }
            let (top, bottom) = (y_at(base + v, y_max), y_at(base, y_max));
            let _ = write!(
                body,
                "<rect x=\"{:.1}\" y=\"{top:.1}\" width=\"{bar:.1}\" height=\"{:.1}\" fill=\"{colour}\"/>",
                x_at(i, n) - bar / 2.0,
                (bottom - top).max(0.5)
            );
            base += v;
        }
    }
    frame(y_max, unit, x_labels, false, &body)
}

/// Lines over the x slots (`None` leaves a gap); `step` draws a staircase (a level held until
/// it changes).
pub(crate) fn lines(
    x_labels: &[String],
    series: &[(&str, Vec<Option<f64>>)],
    unit: &str,
    step: bool,
) -> String {
    let n = x_labels.len();
    let top = series
        .iter()
        .flat_map(|(_, v)| v.iter().flatten())
        .copied()
        .fold(0.0, f64::max);
    let y_max = nice_max(top * 1.05);
    let mut body = String::new();
    for (colour, values) in series {
        let mut points = String::new();
        let mut last: Option<(f64, f64)> = None;
        let flush = |points: &mut String, body: &mut String| {
            if !points.is_empty() {
                let _ = write!(
                    body,
                    "<polyline points=\"{points}\" fill=\"none\" stroke=\"{colour}\" stroke-width=\"3\" stroke-linejoin=\"round\"/>"
                );
                points.clear();
            }
        };
        for i in 0..n {
            match values.get(i).copied().flatten() {
                Some(v) => {
                    let (x, y) = (x_at(i, n), y_at(v, y_max));
                    if step {
                        if let Some((_, ly)) = last {
                            let _ = write!(points, "{x:.1},{ly:.1} ");
                        }
                    }
                    let _ = write!(points, "{x:.1},{y:.1} ");
                    // A lone point still shows.
                    let _ = write!(
                        body,
                        "<circle cx=\"{x:.1}\" cy=\"{y:.1}\" r=\"2.5\" fill=\"{colour}\"/>"
                    );
                    last = Some((x, y));
                }
                None if !step => {
                    flush(&mut points, &mut body);
                    last = None;
                }
                None => {}
            }
        }
        flush(&mut points, &mut body);
    }
    frame(y_max, unit, x_labels, false, &body)
}

/// Bars grouped per x slot: `groups[g] = values per series` (colours by series index), on a
/// fixed y range `0..y_max`.
pub(crate) fn grouped_bars(
    labels: &[String],
    groups: &[Vec<Option<f64>>],
    y_max: f64,
    unit: &str,
) -> String {
    let n = labels.len();
    let slot = (W - RIGHT - LEFT) / n.max(1) as f64;
    let per = groups.iter().map(Vec::len).max().unwrap_or(1).max(1);
    let bar = (slot * 0.8 / per as f64).max(1.0);
    let mut body = String::new();
    for (g, values) in groups.iter().enumerate() {
        for (k, v) in values.iter().enumerate() {
            let Some(v) = v else { continue };
            let top = y_at(*v, y_max);
            let x = x_at(g, n) - slot * 0.4 + bar * k as f64;
            let _ = write!(
                body,
                "<rect x=\"{x:.1}\" y=\"{top:.1}\" width=\"{:.1}\" height=\"{:.1}\" fill=\"{}\"><title>{:.4}</title></rect>",
                (bar - 1.0).max(1.0),
                (H - BOTTOM - top).max(0.5),
                PALETTE[k % PALETTE.len()],
                v
            );
        }
    }
    frame(y_max, unit, labels, true, &body)
}

/// A legend: coloured squares and names.
pub(crate) fn legend(items: &[(String, &str)]) -> String {
    let mut s = String::from("<div class=\"legend\">");
    for (name, colour) in items {
        let _ = write!(
            s,
            "<span><i style=\"background:{colour}\"></i>{}</span>",
            escape(name)
        );
    }
    s.push_str("</div>");
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn charts_hold_their_shapes_and_escape_text() {
        assert_eq!(nice_max(0.0), 1.0);
        assert_eq!(nice_max(7.3), 8.0);
        assert_eq!(nice_max(0.42), 0.8);
        assert_eq!(nice_max(120.0), 200.0);
        let labels: Vec<String> = vec!["a".into(), "b<".into(), "c".into()];
        let bars = stacked_bars(
            &labels,
            &[
                ("#1f77b4", vec![1.0, 0.0, 2.0]),
                ("#ff7f0e", vec![1.0, 1.0, 0.0]),
            ],
            "/s",
        );
        assert_eq!(bars.matches("<rect").count(), 4);
        assert!(bars.contains("b&lt;") && !bars.contains("b<"));
        let l = lines(
            &labels,
            &[("#2ca02c", vec![Some(1.0), None, Some(3.0)])],
            "ms",
            false,
        );
        assert_eq!(l.matches("<polyline").count(), 2, "a gap splits the line");
        let s = lines(
            &labels,
            &[("#2ca02c", vec![Some(1.0), None, Some(3.0)])],
            "v",
            true,
        );
        assert_eq!(
            s.matches("<polyline").count(),
            1,
            "a step line holds its level"
        );
        let g = grouped_bars(
            &labels,
            &[vec![Some(0.5), None], vec![Some(0.7), Some(0.9)], vec![]],
            1.0,
            "acc",
        );
        assert_eq!(g.matches("<rect").count(), 3);
        assert_eq!(
            g.matches("<text").count(),
            5 + 1 + 3,
            "every group is labelled"
        );
        assert!(empty("no <data>").contains("no &lt;data&gt;"));
        assert!(legend(&[("x&y".into(), "#000")]).contains("x&amp;y"));
    }
}
