//! The loss curve as a PNG: training and validation loss against the step, read from the
//! `metrics.jsonl` log `camelid train` writes. Lines, axes, ticks and labels are drawn here on an
//! RGB bitmap (a 3×5 pixel font, scaled); the `png` crate only encodes it.

use anyhow::{bail, Context, Result};
use std::collections::BTreeMap;
use std::path::Path;

pub const WIDTH: u32 = 720;
pub const HEIGHT: u32 = 440;
pub const TRAIN_COLOR: [u8; 3] = [31, 119, 180];
pub const VAL_COLOR: [u8; 3] = [214, 39, 40];
const BLACK: [u8; 3] = [0, 0, 0];
const GRID: [u8; 3] = [225, 225, 225];
/// Font pixels per glyph pixel.
const SCALE: i64 = 2;
const LEFT: i64 = 70;
const RIGHT: i64 = 20;
const TOP: i64 = 36;
const BOTTOM: i64 = 50;

/// Training and validation losses by step (the last record wins where a step repeats).
#[derive(Debug, Default, Clone)]
pub struct Curves {
    pub train: Vec<(f64, f64)>,
    pub val: Vec<(f64, f64)>,
}

/// Reads `{"step", "loss"}` and `{"step", "val_loss"}` records; other records are skipped.
pub fn read_metrics(path: &Path) -> Result<Curves> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read metrics log {}", path.display()))?;
    let (mut train, mut val) = (BTreeMap::new(), BTreeMap::new());
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let rec: serde_json::Value = serde_json::from_str(line)
            .with_context(|| format!("{} line {}: not JSON", path.display(), i + 1))?;
        let Some(step) = rec["step"].as_u64() else {
            continue;
        };
        if let Some(l) = rec["loss"].as_f64() {
            train.insert(step, l);
        }
        if let Some(l) = rec["val_loss"].as_f64() {
            val.insert(step, l);
        }
    }
    let pts = |m: BTreeMap<u64, f64>| m.into_iter().map(|(s, l)| (s as f64, l)).collect();
    Ok(Curves {
        train: pts(train),
        val: pts(val),
    })
}

/// Renders the log at `metrics` to `out` (written to a temporary file, then renamed).
pub fn render_log(metrics: &Path, out: &Path) -> Result<()> {
    let curves = read_metrics(metrics)?;
    let png = encode_png(&render(&curves)?, WIDTH, HEIGHT)?;
    let tmp = out.with_extension("png.tmp");
    std::fs::write(&tmp, png).with_context(|| format!("cannot write {}", tmp.display()))?;
    std::fs::rename(&tmp, out).with_context(|| format!("cannot write {}", out.display()))?;
    Ok(())
}

/// PNG bytes of an RGB8 image.
pub fn encode_png(rgb: &[u8], width: u32, height: u32) -> Result<Vec<u8>> {
    let mut buf = Vec::new();
    let mut enc = png::Encoder::new(&mut buf, width, height);
    enc.set_color(png::ColorType::Rgb);
    enc.set_depth(png::BitDepth::Eight);
    let mut w = enc.write_header()?;
    w.write_image_data(rgb)?;
    w.finish()?;
    Ok(buf)
}

struct Canvas {
    px: Vec<u8>,
}

impl Canvas {
    fn set(&mut self, x: i64, y: i64, c: [u8; 3]) {
        if (0..WIDTH as i64).contains(&x) && (0..HEIGHT as i64).contains(&y) {
            let i = 3 * (y as usize * WIDTH as usize + x as usize);
            self.px[i..i + 3].copy_from_slice(&c);
        }
    }

    fn rect(&mut self, x0: i64, y0: i64, w: i64, h: i64, c: [u8; 3]) {
        for y in y0..y0 + h {
            for x in x0..x0 + w {
                self.set(x, y, c);
            }
        }
    }

    /// A line `thick` pixels wide (Bresenham, each point drawn as a square).
    fn line(&mut self, (x0, y0): (i64, i64), (x1, y1): (i64, i64), thick: i64, c: [u8; 3]) {
        let (dx, dy) = ((x1 - x0).abs(), -(y1 - y0).abs());
        let (sx, sy) = (if x0 < x1 { 1 } else { -1 }, if y0 < y1 { 1 } else { -1 });
        let (mut x, mut y, mut err) = (x0, y0, dx + dy);
        loop {
            self.rect(x - thick / 2, y - thick / 2, thick, thick, c);
            if x == x1 && y == y1 {
                break;
            }
            let e2 = 2 * err;
            if e2 >= dy {
                err += dy;
                x += sx;
            }
            if e2 <= dx {
                err += dx;
                y += sy;
            }
        }
    }

    /// Text in the 3×5 font; `x` is the left edge, `y` the top.
    fn text(&mut self, x: i64, y: i64, s: &str, c: [u8; 3]) {
        for (k, ch) in s.chars().enumerate() {
            let rows = glyph(ch);
            for (r, bits) in rows.iter().enumerate() {
                for col in 0..3 {
                    if bits & (4 >> col) != 0 {
                        let gx = x + (k as i64 * 4 + col) * SCALE;
                        self.rect(gx, y + r as i64 * SCALE, SCALE, SCALE, c);
                    }
                }
            }
        }
    }
}

fn text_width(s: &str) -> i64 {
    (s.chars().count() as i64 * 4 - 1) * SCALE
}

/// 3×5 glyphs, one row per entry, bit 2 the leftmost pixel.
fn glyph(c: char) -> [u8; 5] {
    match c {
        '0' => [7, 5, 5, 5, 7],
        '1' => [2, 6, 2, 2, 7],
        '2' => [7, 1, 7, 4, 7],
        '3' => [7, 1, 3, 1, 7],
        '4' => [5, 5, 7, 1, 1],
        '5' => [7, 4, 7, 1, 7],
        '6' => [7, 4, 7, 5, 7],
        '7' => [7, 1, 1, 2, 2],
        '8' => [7, 5, 7, 5, 7],
        '9' => [7, 5, 7, 1, 7],
        '.' => [0, 0, 0, 0, 2],
        '-' => [0, 0, 7, 0, 0],
        'a' => [0, 6, 1, 7, 7],
        'e' => [0, 7, 7, 4, 7],
        'i' => [2, 0, 2, 2, 2],
        'k' => [4, 5, 6, 5, 5],
        'l' => [6, 2, 2, 2, 7],
        'n' => [0, 6, 5, 5, 5],
        'o' => [0, 7, 5, 5, 7],
        'p' => [0, 7, 5, 7, 4],
        'r' => [0, 7, 4, 4, 4],
        's' => [0, 7, 6, 1, 7],
        't' => [4, 7, 4, 4, 3],
        'v' => [0, 5, 5, 5, 2],
        _ => [0; 5],
    }
}

/// Tick positions: a 1-2-5 step giving about `target` ticks over [lo, hi].
fn ticks(lo: f64, hi: f64, target: f64) -> (Vec<f64>, f64) {
    let raw = (hi - lo) / target;
    let mag = 10f64.powf(raw.log10().floor());
    let step = [1.0, 2.0, 5.0, 10.0]
        .into_iter()
        .map(|m| m * mag)
        .find(|s| *s >= raw * (1.0 - 1e-9))
        .unwrap_or(10.0 * mag);
    let first = (lo / step).ceil() as i64;
    let last = (hi / step).floor() as i64;
    ((first..=last).map(|k| k as f64 * step).collect(), step)
}

fn label(v: f64, step: f64) -> String {
    let decimals = (-step.log10().floor()).max(0.0) as usize;
    format!("{v:.decimals$}")
}

/// The chart as RGB8 pixels, WIDTH × HEIGHT.
pub fn render(c: &Curves) -> Result<Vec<u8>> {
    let all = c.train.iter().chain(&c.val).filter(|p| p.1.is_finite());
    let (mut x_max, mut y_lo, mut y_hi) = (0f64, f64::INFINITY, f64::NEG_INFINITY);
    let mut n = 0;
    for &(s, l) in all {
        x_max = x_max.max(s);
        y_lo = y_lo.min(l);
        y_hi = y_hi.max(l);
        n += 1;
    }
    if n == 0 {
        bail!("the metrics log has no finite loss to plot");
    }
    let x_max = x_max.max(1.0);
    if y_hi - y_lo < 1e-6 {
        y_lo -= 0.5;
        y_hi += 0.5;
    }
    let pad = 0.05 * (y_hi - y_lo);
    let (y_lo, y_hi) = (y_lo - pad, y_hi + pad);

    let mut cv = Canvas {
        px: vec![255; (WIDTH * HEIGHT * 3) as usize],
    };
    let (pw, ph) = (WIDTH as i64 - LEFT - RIGHT, HEIGHT as i64 - TOP - BOTTOM);
    let to_px = |s: f64, l: f64| {
        let x = LEFT + ((s / x_max) * pw as f64).round() as i64;
        let y = TOP + ph - (((l - y_lo) / (y_hi - y_lo)) * ph as f64).round() as i64;
        (x, y)
    };

    let (yt, ys) = ticks(y_lo, y_hi, 8.0);
    for &v in &yt {
        let (_, y) = to_px(0.0, v);
        cv.line((LEFT + 1, y), (LEFT + pw, y), 1, GRID);
        cv.line((LEFT - 6, y), (LEFT, y), 1, BLACK);
        let s = label(v, ys);
        cv.text(LEFT - 10 - text_width(&s), y - 5, &s, BLACK);
    }
    let (xt, xs) = ticks(0.0, x_max, 8.0);
    for &v in &xt {
        let (x, _) = to_px(v, y_lo);
        cv.line((x, TOP), (x, TOP + ph - 1), 1, GRID);
        cv.line((x, TOP + ph), (x, TOP + ph + 6), 1, BLACK);
        let s = label(v, xs.max(1.0));
        cv.text(x - text_width(&s) / 2, TOP + ph + 10, &s, BLACK);
    }
    cv.line((LEFT, TOP), (LEFT, TOP + ph), 1, BLACK);
    cv.line((LEFT, TOP + ph), (LEFT + pw, TOP + ph), 1, BLACK);
    cv.text(
        LEFT + pw / 2 - text_width("step") / 2,
        HEIGHT as i64 - 18,
        "step",
        BLACK,
    );
    cv.text(8, TOP - 22, "loss", BLACK);

    let finite = |v: &[(f64, f64)]| -> Vec<(i64, i64)> {
        v.iter()
            .filter(|p| p.1.is_finite())
            .map(|&(s, l)| to_px(s, l))
            .collect()
    };
    let train = finite(&c.train);
    for w in train.windows(2) {
        cv.line(w[0], w[1], 1, TRAIN_COLOR);
    }
    let val = finite(&c.val);
    for w in val.windows(2) {
        cv.line(w[0], w[1], 2, VAL_COLOR);
    }
    // Markers: every validation point, and a lone training point (no line to show it).
    if let [p] = train[..] {
        cv.rect(p.0 - 3, p.1 - 3, 7, 7, TRAIN_COLOR);
    }
    for &(x, y) in &val {
        cv.rect(x - 3, y - 3, 7, 7, VAL_COLOR);
    }

    // Legend, top right.
    let lx = LEFT + pw - 150;
    cv.line((lx, TOP - 20), (lx + 24, TOP - 20), 2, TRAIN_COLOR);
    cv.text(lx + 30, TOP - 25, "train", BLACK);
    cv.line((lx + 80, TOP - 20), (lx + 104, TOP - 20), 2, VAL_COLOR);
    cv.text(lx + 110, TOP - 25, "val", BLACK);
    Ok(cv.px)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ticks_are_round() {
        let (t, s) = ticks(2.9, 5.9, 6.0);
        assert_eq!(s, 0.5);
        assert_eq!(t.first().copied(), Some(3.0));
        assert_eq!(label(3.0, s), "3.0");
        let (t, s) = ticks(0.0, 300.0, 8.0);
        assert_eq!(s, 50.0);
        assert_eq!(t.len(), 7);
        assert_eq!(label(250.0, s), "250");
    }
}
