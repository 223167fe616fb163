//! Camera corruptions of Tuesday's images, exactly as DESIGN.md specifies them:
//! white boxes (snow), mosaic patches (water drops), one thick black line (broken sensor).
//!
//! Each function draws on an 8-bit image of any channel count and returns the shapes it drew,
//! so callers (and tests) can see exactly what changed.

use clap::ValueEnum;
use image::{ImageBuffer, Pixel};
use serde::{Deserialize, Serialize};

use crate::rng::Rng;

/// Which corruption `prepare` applies to Tuesday's images.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize, Deserialize)]
#[value(rename_all = "snake_case")]
#[serde(rename_all = "snake_case")]
pub enum Corruption {
    /// Leave images untouched (byte-identical copies).
    None,
    /// 10–20 filled white rectangles.
    RandomBoxes,
    /// 20–30 rectangles pixelated to 10×10 blocks.
    Mosaic,
    /// One black line across the image.
    RandomLine,
    /// One of the three above per image, uniformly.
    Mixed,
}

impl Corruption {
    /// The command-line name.
    pub fn name(self) -> &'static str {
        match self {
            Corruption::None => "none",
            Corruption::RandomBoxes => "random_boxes",
            Corruption::Mosaic => "mosaic",
            Corruption::RandomLine => "random_line",
            Corruption::Mixed => "mixed",
        }
    }
}

/// An axis-aligned rectangle in pixels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rect {
    pub x: u32,
    pub y: u32,
    pub w: u32,
    pub h: u32,
}

/// A straight thick line from `start` to `end` (pixel coordinates, edges of the image).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Line {
    pub start: (f64, f64),
    pub end: (f64, f64),
    pub width: u32,
}

impl Line {
    /// True when the pixel whose centre is (`x`+0.5, `y`+0.5) lies on the line: within
    /// `width / 2` of the segment, measured perpendicular to it, and between its ends.
    pub fn covers(&self, x: u32, y: u32) -> bool {
        let (px, py) = (f64::from(x) + 0.5, f64::from(y) + 0.5);
        let (dx, dy) = (self.end.0 - self.start.0, self.end.1 - self.start.1);
        let len2 = dx * dx + dy * dy;
        let (rx, ry) = (px - self.start.0, py - self.start.1);
        let t = (rx * dx + ry * dy) / len2;
        let distance = (rx * dy - ry * dx).abs() / len2.sqrt();
        (0.0..=1.0).contains(&t) && distance <= f64::from(self.width) / 2.0
    }
}

/// What a corruption drew.
#[derive(Debug, Clone, PartialEq)]
pub enum Applied {
    None,
    Boxes(Vec<Rect>),
    Mosaic(Vec<Rect>),
    Line(Line),
}

/// Side of a random rectangle along an axis of `extent` pixels: uniform in
/// [extent/10, extent/5], rounded inwards, at least 1 and at most `extent`.
fn side(extent: u32, rng: &mut Rng) -> u32 {
    let lo = extent.div_ceil(10).max(1);
    let hi = (extent / 5).max(lo);
    rng.range_inclusive(lo, hi).min(extent)
}

/// A rectangle sized as DESIGN.md says, placed uniformly so it fits.
fn random_rect(width: u32, height: u32, rng: &mut Rng) -> Rect {
    let w = side(width, rng);
    let h = side(height, rng);
    let x = rng.range_inclusive(0, width - w);
    let y = rng.range_inclusive(0, height - h);
    Rect { x, y, w, h }
}

fn fill<P: Pixel<Subpixel = u8>>(img: &mut ImageBuffer<P, Vec<u8>>, r: Rect, value: u8) {
    for y in r.y..r.y + r.h {
        for x in r.x..r.x + r.w {
            paint(img.get_pixel_mut(x, y), value);
        }
    }
}

/// Sets every colour channel to `value` and alpha (if any) to opaque.
fn paint<P: Pixel<Subpixel = u8>>(pixel: &mut P, value: u8) {
    let channels = pixel.channels_mut();
    let colour = match P::CHANNEL_COUNT {
        2 | 4 => channels.len() - 1,
        _ => channels.len(),
    };
    for (i, c) in channels.iter_mut().enumerate() {
        *c = if i < colour { value } else { u8::MAX };
    }
}

/// 10–20 filled white rectangles.
pub fn random_boxes<P: Pixel<Subpixel = u8>>(
    img: &mut ImageBuffer<P, Vec<u8>>,
    rng: &mut Rng,
) -> Vec<Rect> {
    let (w, h) = img.dimensions();
    let count = rng.range_inclusive(10, 20);
    let rects: Vec<Rect> = (0..count).map(|_| random_rect(w, h, rng)).collect();
    for &r in &rects {
        fill(img, r, u8::MAX);
    }
    rects
}

/// Source index (along one axis of length `n`) of output cell `i` when resampling to `m`
/// cells with nearest-neighbour sampling at cell centres.
fn nearest(i: u32, n: u32, m: u32) -> u32 {
    (((2 * u64::from(i) + 1) * u64::from(n)) / (2 * u64::from(m))) as u32
}

/// Side of the downscaled mosaic grid.
pub const MOSAIC_CELLS: u32 = 10;

/// Pixelates `r`: downscale the region to 10×10 (nearest), then scale back (nearest).
pub fn mosaic_region<P: Pixel<Subpixel = u8>>(img: &mut ImageBuffer<P, Vec<u8>>, r: Rect) {
    let small: Vec<P> = (0..MOSAIC_CELLS * MOSAIC_CELLS)
        .map(|k| {
            let (cx, cy) = (k % MOSAIC_CELLS, k / MOSAIC_CELLS);
            *img.get_pixel(
                r.x + nearest(cx, r.w, MOSAIC_CELLS),
                r.y + nearest(cy, r.h, MOSAIC_CELLS),
            )
        })
        .collect();
    for y in 0..r.h {
        let cy = nearest(y, MOSAIC_CELLS, r.h);
        for x in 0..r.w {
            let cx = nearest(x, MOSAIC_CELLS, r.w);
            img.put_pixel(r.x + x, r.y + y, small[(cy * MOSAIC_CELLS + cx) as usize]);
        }
    }
}

/// 20–30 mosaic rectangles.
pub fn mosaic<P: Pixel<Subpixel = u8>>(
    img: &mut ImageBuffer<P, Vec<u8>>,
    rng: &mut Rng,
) -> Vec<Rect> {
    let (w, h) = img.dimensions();
    let count = rng.range_inclusive(20, 30);
    let rects: Vec<Rect> = (0..count).map(|_| random_rect(w, h, rng)).collect();
    for &r in &rects {
        mosaic_region(img, r);
    }
    rects
}

/// One black line, from (r, 0) to (W−r, H) or from (0, r) to (W, H−r), width in [D/10, D/5].
pub fn random_line<P: Pixel<Subpixel = u8>>(
    img: &mut ImageBuffer<P, Vec<u8>>,
    rng: &mut Rng,
) -> Line {
    let (w, h) = img.dimensions();
    let (fw, fh) = (f64::from(w), f64::from(h));
    let (start, end) = if rng.bernoulli(0.5) {
        let r = f64::from(rng.range_inclusive(0, w));
        ((r, 0.0), (fw - r, fh))
    } else {
        let r = f64::from(rng.range_inclusive(0, h));
        ((0.0, r), (fw, fh - r))
    };
    let diagonal = fw.hypot(fh);
    let lo = ((diagonal / 10.0).ceil() as u32).max(1);
    let hi = ((diagonal / 5.0).floor() as u32).max(lo);
    let line = Line {
        start,
        end,
        width: rng.range_inclusive(lo, hi),
    };
    for y in 0..h {
        for x in 0..w {
            if line.covers(x, y) {
                paint(img.get_pixel_mut(x, y), 0);
            }
        }
    }
    line
}

/// Applies `kind` to `img` with randomness from `rng`.
pub fn corrupt<P: Pixel<Subpixel = u8>>(
    img: &mut ImageBuffer<P, Vec<u8>>,
    kind: Corruption,
    rng: &mut Rng,
) -> Applied {
    let kind = match kind {
        Corruption::Mixed => [
            Corruption::RandomBoxes,
            Corruption::Mosaic,
            Corruption::RandomLine,
        ][rng.below(3) as usize],
        other => other,
    };
    match kind {
        Corruption::None | Corruption::Mixed => Applied::None,
        Corruption::RandomBoxes => Applied::Boxes(random_boxes(img, rng)),
        Corruption::Mosaic => Applied::Mosaic(mosaic(img, rng)),
        Corruption::RandomLine => Applied::Line(random_line(img, rng)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use image::{Rgb, RgbImage};

    /// An image whose every pixel has a distinct colour.
    fn gradient(w: u32, h: u32) -> RgbImage {
        RgbImage::from_fn(w, h, |x, y| Rgb([(x % 256) as u8, (y % 256) as u8, 77]))
    }

    #[test]
    fn boxes_count_size_and_colour() {
        for seed in 0..20 {
            let mut img = gradient(200, 120);
            let rects = random_boxes(&mut img, &mut Rng::new(seed));
            assert!((10..=20).contains(&rects.len()));
            for r in &rects {
                assert!(
                    (20..=40).contains(&r.w) && (12..=24).contains(&r.h),
                    "{r:?}"
                );
                assert!(r.x + r.w <= 200 && r.y + r.h <= 120);
                for y in r.y..r.y + r.h {
                    for x in r.x..r.x + r.w {
                        assert_eq!(img.get_pixel(x, y), &Rgb([255, 255, 255]));
                    }
                }
            }
            // Pixels outside every box are untouched.
            let original = gradient(200, 120);
            let inside = |x: u32, y: u32| {
                rects
                    .iter()
                    .any(|r| x >= r.x && x < r.x + r.w && y >= r.y && y < r.y + r.h)
            };
            for (x, y, p) in img.enumerate_pixels() {
                if !inside(x, y) {
                    assert_eq!(p, original.get_pixel(x, y));
                }
            }
        }
    }

    #[test]
    fn mosaic_region_is_blocky_with_the_right_block_size() {
        let original = gradient(100, 100);
        let mut img = original.clone();
        let r = Rect {
            x: 10,
            y: 20,
            w: 40,
            h: 30,
        };
        mosaic_region(&mut img, r);
        // 40 px → 10 cells of 4 px; 30 px → 10 cells of 3 px; each cell is the source pixel at
        // its centre.
        for y in 0..r.h {
            for x in 0..r.w {
                let (cx, cy) = (x / 4, y / 3);
                let expected = original.get_pixel(r.x + cx * 4 + 2, r.y + cy * 3 + 1);
                assert_eq!(img.get_pixel(r.x + x, r.y + y), expected, "({x},{y})");
            }
        }
        let distinct: std::collections::HashSet<_> = (0..r.h)
            .flat_map(|y| (0..r.w).map(move |x| (x, y)))
            .map(|(x, y)| img.get_pixel(r.x + x, r.y + y).0)
            .collect();
        assert_eq!(distinct.len(), 100);
        assert_eq!(img.get_pixel(0, 0), original.get_pixel(0, 0));
    }

    #[test]
    fn mosaic_counts() {
        let mut img = gradient(64, 64);
        let rects = mosaic(&mut img, &mut Rng::new(5));
        assert!((20..=30).contains(&rects.len()));
        assert!(rects
            .iter()
            .all(|r| (7..=12).contains(&r.w) && (7..=12).contains(&r.h)));
    }

    #[test]
    fn line_is_black_and_of_the_drawn_width() {
        for seed in 0..30 {
            let (w, h) = (120u32, 90u32);
            let mut img = RgbImage::from_pixel(w, h, Rgb([255, 255, 255]));
            let line = random_line(&mut img, &mut Rng::new(seed));
            let diagonal = f64::from(w).hypot(f64::from(h));
            assert!(
                f64::from(line.width) >= diagonal / 10.0 && f64::from(line.width) <= diagonal / 5.0
            );
            let vertical = line.start.1 == 0.0 && line.end.1 == f64::from(h);
            let horizontal = line.start.0 == 0.0 && line.end.0 == f64::from(w);
            assert!(vertical || horizontal, "{line:?}");
            // Measure the width perpendicular to the line through its midpoint.
            let (dx, dy) = (line.end.0 - line.start.0, line.end.1 - line.start.1);
            let len = dx.hypot(dy);
            let (nx, ny) = (-dy / len, dx / len);
            let (mx, my) = (
                (line.start.0 + line.end.0) / 2.0,
                (line.start.1 + line.end.1) / 2.0,
            );
            let mut black = 0.0;
            let step = 0.05;
            let mut s = -diagonal;
            while s < diagonal {
                let (px, py) = (mx + s * nx, my + s * ny);
                if px >= 0.0
                    && py >= 0.0
                    && px < f64::from(w)
                    && py < f64::from(h)
                    && img.get_pixel(px as u32, py as u32).0 == [0, 0, 0]
                {
                    black += step;
                }
                s += step;
            }
            assert!(
                (black - f64::from(line.width)).abs() <= 2.0,
                "measured {black}, drawn {}",
                line.width
            );
            for (x, y, p) in img.enumerate_pixels() {
                assert_eq!(p.0 == [0, 0, 0], line.covers(x, y));
            }
        }
    }

    #[test]
    fn grey_and_alpha_images() {
        let mut grey = image::GrayImage::from_pixel(50, 50, image::Luma([128]));
        let rects = random_boxes(&mut grey, &mut Rng::new(1));
        assert_eq!(grey.get_pixel(rects[0].x, rects[0].y).0, [255]);
        let mut rgba = image::RgbaImage::from_pixel(50, 50, image::Rgba([9, 9, 9, 0]));
        random_line(&mut rgba, &mut Rng::new(2));
        assert!(rgba.pixels().any(|p| p.0 == [0, 0, 0, 255]));
    }

    #[test]
    fn mixed_uses_all_three_and_names_parse() {
        let mut seen = [false; 3];
        for seed in 0..30 {
            let mut img = gradient(40, 40);
            match corrupt(&mut img, Corruption::Mixed, &mut Rng::new(seed)) {
                Applied::Boxes(_) => seen[0] = true,
                Applied::Mosaic(_) => seen[1] = true,
                Applied::Line(_) => seen[2] = true,
                Applied::None => panic!("mixed must corrupt"),
            }
        }
        assert_eq!(seen, [true; 3]);
        crate::config::choice::assert_names_agree(|c: &Corruption| c.name());
        let err = crate::config::choice::parse::<Corruption>("corruption", "snow").unwrap_err();
        assert!(err.contains("snow") && err.contains("random_boxes"));
    }
}
