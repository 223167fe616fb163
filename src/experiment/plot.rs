//! PNG charts of an experiment, drawn with `plotters` into memory and encoded by `image`:
//! test accuracy by method family and noise level, and noise-detection precision vs recall.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use plotters::coord::types::RangedCoordf64;
use plotters::prelude::*;
use plotters::style::FontStyle;

use super::error::{ExperimentError, Result};
use super::report::{group, Row};
use crate::fsutil::write_atomic;
use crate::registry::metric;

/// Size of every chart, in pixels.
pub const SIZE: (u32, u32) = (900, 560);

/// Fonts tried for the labels, after `BCCP_FONT`.
const FONT_CANDIDATES: [&str; 4] = [
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/truetype/liberation/LiberationSans-Regular.ttf",
    "/usr/share/fonts/truetype/lato/Lato-Regular.ttf",
    "/System/Library/Fonts/Supplemental/Arial.ttf",
];

/// One colour per method family, in a fixed order.
const FAMILIES: [(&str, RGBColor); 8] = [
    ("clean labels", RGBColor(0, 0, 0)),
    ("no cleansing", RGBColor(127, 127, 127)),
    ("random replay", RGBColor(140, 86, 75)),
    ("closest-pair replay", RGBColor(31, 119, 180)),
    ("cut-off", RGBColor(255, 127, 14)),
    ("BCCP (cut-off + CP)", RGBColor(214, 39, 40)),
    ("cleanlab", RGBColor(44, 160, 44)),
    ("ANL-CE", RGBColor(148, 103, 189)),
];

fn colour(family: &str) -> RGBColor {
    FAMILIES
        .iter()
        .find(|(f, _)| *f == family)
        .map_or(RGBColor(23, 190, 207), |(_, c)| *c)
}

fn find_font() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("BCCP_FONT").filter(|p| !p.is_empty()) {
        return Some(PathBuf::from(p));
    }
    FONT_CANDIDATES
        .iter()
        .map(PathBuf::from)
        .find(|p| p.is_file())
}

/// Registers a TrueType font for the labels once per process.
fn ensure_font() -> Result<()> {
    static REGISTERED: OnceLock<std::result::Result<(), String>> = OnceLock::new();
    REGISTERED
        .get_or_init(|| {
            let path = find_font().ok_or_else(|| {
                format!(
                    "no TrueType font for the chart labels: install one (apt install fonts-dejavu-core) or set BCCP_FONT=/path/to/font.ttf (tried {})",
                    FONT_CANDIDATES.join(", ")
                )
            })?;
            let bytes = std::fs::read(&path)
                .map_err(|e| format!("cannot read font {}: {e}", path.display()))?;
            let leaked: &'static [u8] = Box::leak(bytes.into_boxed_slice());
            plotters::style::register_font("sans-serif", FontStyle::Normal, leaked)
                .map_err(|_| format!("{} is not a usable TrueType font", path.display()))
        })
        .clone()
        .map_err(ExperimentError::Plot)
}

/// Renders into an RGB buffer with `draw`, then writes a PNG atomically.
fn render(
    path: &Path,
    draw: impl FnOnce(&DrawingArea<BitMapBackend, plotters::coord::Shift>) -> Result<()>,
) -> Result<()> {
    ensure_font()?;
    let (w, h) = SIZE;
    let mut pixels = vec![255u8; (w * h * 3) as usize];
    {
        let root = BitMapBackend::with_buffer(&mut pixels, SIZE).into_drawing_area();
        draw(&root)?;
        root.present().map_err(err)?;
    }
    let img = image::RgbImage::from_raw(w, h, pixels)
        .ok_or_else(|| ExperimentError::Plot("chart buffer of the wrong size".into()))?;
    let mut png = Vec::new();
    img.write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png)
        .map_err(err)?;
    write_atomic(path, &png).map_err(ExperimentError::io("write", path))
}

fn err<E: std::fmt::Display>(e: E) -> ExperimentError {
    ExperimentError::Plot(e.to_string())
}

/// A chart of f64 × f64 on the whole of `root`, with its caption and axis descriptions drawn.
type Chart<'a, 'b> =
    ChartContext<'a, BitMapBackend<'b>, Cartesian2d<RangedCoordf64, RangedCoordf64>>;

fn chart<'a, 'b>(
    root: &'a DrawingArea<BitMapBackend<'b>, plotters::coord::Shift>,
    caption: &str,
    (x, y): (std::ops::Range<f64>, std::ops::Range<f64>),
    (x_desc, y_desc): (&str, &str),
) -> Result<Chart<'a, 'b>> {
    root.fill(&WHITE).map_err(err)?;
    let mut chart = ChartBuilder::on(root)
        .caption(caption, ("sans-serif", 20))
        .margin(15)
        .x_label_area_size(45)
        .y_label_area_size(60)
        .build_cartesian_2d(x, y)
        .map_err(err)?;
    chart
        .configure_mesh()
        .x_desc(x_desc)
        .y_desc(y_desc)
        .draw()
        .map_err(err)?;
    Ok(chart)
}

/// The legend of the labelled series, at `position`.
fn legend<'a, 'b: 'a>(chart: &mut Chart<'a, 'b>, position: SeriesLabelPosition) -> Result<()> {
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .position(position)
        .label_font(("sans-serif", 14))
        .draw()
        .map_err(err)
}

/// `accuracy.png`: for each family, the configuration with the best mean test accuracy over
/// the noise levels, as a line over the user accuracy; the clean-label accuracy as a dashed
/// ceiling.
pub fn accuracy_chart(rows: &[Row], path: &Path) -> Result<()> {
    let g = group(rows);
    let levels: Vec<(f64, &String)> = g
        .levels
        .iter()
        .filter_map(|l| l.parse::<f64>().ok().map(|v| (v, l)))
        .collect();
    // (family, its best configuration's points)
    let mut lines: Vec<(String, Vec<(f64, f64)>)> = Vec::new();
    for (family, _) in FAMILIES.iter().skip(1) {
        let best = g
            .configs
            .iter()
            .filter(|(_, f)| f == family)
            .map(|(c, _)| {
                let pts: Vec<(f64, f64)> = levels
                    .iter()
                    .filter_map(|(v, l)| g.stat(c, l, metric::TEST_ACCURACY).map(|s| (*v, s.0)))
                    .collect();
                let mean = pts.iter().map(|p| p.1).sum::<f64>() / pts.len().max(1) as f64;
                (c, pts, mean)
            })
            .filter(|(_, pts, _)| !pts.is_empty())
            .max_by(|a, b| a.2.total_cmp(&b.2));
        if let Some((_, pts, _)) = best {
            lines.push((family.to_string(), pts));
        }
    }
    let ceiling = g
        .configs
        .iter()
        .find(|(_, f)| f == "clean labels")
        .and_then(|(c, _)| g.stat(c, "clean", metric::TEST_ACCURACY))
        .map(|s| s.0);
    let ys = lines
        .iter()
        .flat_map(|l| l.1.iter().map(|p| p.1))
        .chain(ceiling);
    let (lo, hi) = ys.fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), y| {
        (a.min(y), b.max(y))
    });
    let (lo, hi) = if lo.is_finite() {
        ((lo - 0.02).max(0.0), (hi + 0.02).min(1.0))
    } else {
        (0.0, 1.0)
    };
    let (x0, x1) = levels
        .iter()
        .fold((1.0f64, 0.0f64), |(a, b), (v, _)| (a.min(*v), b.max(*v)));
    let (x0, x1) = if x0 < x1 {
        (x0 - 0.02, x1 + 0.02)
    } else {
        (x0 - 0.1, x0 + 0.1)
    };
    render(path, |root| {
        let mut chart = chart(
            root,
            "Test accuracy by method and label noise (best configuration per family)",
            (x0..x1, lo..hi),
            ("users' label accuracy", "test accuracy"),
        )?;
        if let Some(c) = ceiling {
            let style = ShapeStyle::from(&BLACK).stroke_width(1);
            chart
                .draw_series(DashedLineSeries::new(vec![(x0, c), (x1, c)], 8, 6, style))
                .map_err(err)?
                .label(format!("clean labels ({c:.3})"))
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], BLACK));
        }
        for (family, pts) in &lines {
            let col = colour(family);
            chart
                .draw_series(LineSeries::new(pts.clone(), col.stroke_width(2)))
                .map_err(err)?
                .label(family.clone())
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 20, y)], col.stroke_width(2))
                });
            chart
                .draw_series(pts.iter().map(|&p| Circle::new(p, 4, col.filled())))
                .map_err(err)?;
        }
        legend(&mut chart, SeriesLabelPosition::LowerRight)
    })
}

/// `detection.png`: precision against recall of every configuration that flags samples, one
/// point per noise level, coloured by family.
pub fn detection_chart(rows: &[Row], path: &Path) -> Result<()> {
    let g = group(rows);
    let mut points: Vec<(String, (f64, f64))> = Vec::new();
    for (config, family) in &g.configs {
        for level in g.levels.iter().filter(|l| *l != "clean") {
            let p = g.stat(config, level, metric::NOISE_PRECISION);
            let r = g.stat(config, level, metric::NOISE_RECALL);
            if let (Some(p), Some(r)) = (p, r) {
                points.push((family.clone(), (r.0, p.0)));
            }
        }
    }
    render(path, |root| {
        let mut chart = chart(
            root,
            "Noise detection: precision vs recall of the flagged samples",
            (0.0..1.0, 0.0..1.0),
            (
                "recall (share of wrong labels flagged)",
                "precision (share of flagged that are wrong)",
            ),
        )?;
        for (family, col) in FAMILIES {
            let pts: Vec<(f64, f64)> = points
                .iter()
                .filter(|(f, _)| f == family)
                .map(|(_, p)| *p)
                .collect();
            if pts.is_empty() {
                continue;
            }
            chart
                .draw_series(
                    pts.into_iter()
                        .map(move |p| Circle::new(p, 5, col.filled())),
                )
                .map_err(err)?
                .label(family)
                .legend(move |(x, y)| Circle::new((x + 10, y), 5, col.filled()));
        }
        legend(&mut chart, SeriesLabelPosition::LowerLeft)
    })
}
