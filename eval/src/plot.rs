//! Paper-style figures from result files only (no model needed): quality vs budget, quality vs speed,
//! the sensitivity heat map, and per-layer allocations. Each figure is written as PNG and SVG, to a
//! temporary name first and then renamed.
//!
//! The font (DejaVu Sans) is embedded in the binary, so figures look the same on every machine.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use alloc_core::SensitivityProfile;
use anyhow::{anyhow, Context, Result};
use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::full_palette::{BLUEGREY, BROWN, DEEPORANGE, GREY, INDIGO, ORANGE, PINK, PURPLE, TEAL};
use plotters::style::colors::colormaps::ViridisRGB;

use crate::results::{write_atomic, Record, Status};

const FONT: &[u8] = include_bytes!("../assets/DejaVuSans.ttf");
const FAMILY: &str = "sans-serif";
const SIZE: (u32, u32) = (960, 640);

/// Register the embedded font with plotters (idempotent).
fn register_font() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        // Registration fails only for an unparsable font; the embedded one is known good.
        let _ = plotters::style::register_font(FAMILY, FontStyle::Normal, FONT);
    });
}

/// A fixed colour and marker per method, so a method looks the same in every figure.
fn method_style(method: &str, i: usize) -> (RGBColor, usize) {
    let known = [
        ("full", BLACK),
        ("uniform", RGBColor(31, 119, 180)),
        ("alloc-l", RGBColor(255, 127, 14)),
        ("alloc-t", RGBColor(44, 160, 44)),
        ("alloc-l+t", RGBColor(214, 39, 40)),
        ("top-p", PURPLE),
        ("threshold", BROWN),
        ("skip", PINK),
        ("lexi", TEAL),
        ("random-l", GREY),
        ("greedy-l", INDIGO),
    ];
    let palette = [BLUEGREY, DEEPORANGE, ORANGE, TEAL, INDIGO];
    match known.iter().position(|(m, _)| *m == method) {
        Some(p) => (known[p].1, p),
        None => (palette[i % palette.len()], known.len() + i),
    }
}

/// One line of a line chart.
#[derive(Debug, Clone)]
pub struct Series {
    /// Legend label (the method).
    pub label: String,
    /// Points, sorted by x.
    pub points: Vec<(f64, f64)>,
}

/// A line chart: axes labels with units, one series per method, optional dashed reference line.
#[derive(Debug, Clone)]
pub struct LineChart {
    /// Title above the plot.
    pub title: String,
    /// x axis label (with unit).
    pub x_label: String,
    /// y axis label (with unit).
    pub y_label: String,
    /// The series.
    pub series: Vec<Series>,
    /// A horizontal dashed reference (label, y), e.g. the full-budget model.
    pub reference: Option<(String, f64)>,
}

fn bounds(chart: &LineChart) -> ((f64, f64), (f64, f64)) {
    let mut xs: Vec<f64> = chart.series.iter().flat_map(|s| s.points.iter().map(|p| p.0)).collect();
    let mut ys: Vec<f64> = chart.series.iter().flat_map(|s| s.points.iter().map(|p| p.1)).collect();
    if let Some((_, y)) = chart.reference {
        ys.push(y);
    }
    xs.retain(|v| v.is_finite());
    ys.retain(|v| v.is_finite());
    let span = |v: &[f64]| {
        let lo = v.iter().copied().fold(f64::INFINITY, f64::min);
        let hi = v.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        if !lo.is_finite() {
            return (0.0, 1.0);
        }
        let pad = ((hi - lo) * 0.08).max(1e-6 * hi.abs().max(1.0));
        (lo - pad, hi + pad)
    };
    (span(&xs), span(&ys))
}

fn draw_line_chart<DB: DrawingBackend>(root: DrawingArea<DB, Shift>, chart: &LineChart) -> Result<()> {
    let err = |e: DrawingAreaErrorKind<DB::ErrorType>| anyhow!("drawing failed: {e:?}");
    root.fill(&WHITE).map_err(err)?;
    let ((x0, x1), (y0, y1)) = bounds(chart);
    let mut cc = ChartBuilder::on(&root)
        .caption(&chart.title, (FAMILY, 26))
        .margin(16)
        .x_label_area_size(56)
        .y_label_area_size(80)
        .build_cartesian_2d(x0..x1, y0..y1)
        .map_err(err)?;
    cc.configure_mesh()
        .x_desc(&chart.x_label)
        .y_desc(&chart.y_label)
        .label_style((FAMILY, 18))
        .axis_desc_style((FAMILY, 20))
        .light_line_style(WHITE.mix(0.0))
        .bold_line_style(BLACK.mix(0.08))
        .draw()
        .map_err(err)?;
    if let Some((label, y)) = &chart.reference {
        let y = *y;
        cc.draw_series(DashedLineSeries::new(vec![(x0, y), (x1, y)], 10, 6, BLACK.stroke_width(2)))
            .map_err(err)?
            .label(label.clone())
            .legend(move |(x, yy)| PathElement::new(vec![(x, yy), (x + 24, yy)], BLACK.stroke_width(2)));
    }
    for (i, s) in chart.series.iter().enumerate() {
        let (color, shape) = method_style(&s.label, i);
        cc.draw_series(LineSeries::new(s.points.clone(), color.stroke_width(3)))
            .map_err(err)?
            .label(s.label.clone())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 24, y)], color.stroke_width(3)));
        let fill = color.filled();
        let pts = s.points.iter().copied();
        match shape % 4 {
            0 => cc.draw_series(pts.map(|p| EmptyElement::at(p) + Circle::new((0, 0), 6, fill))).map(|_| ()),
            1 => cc.draw_series(pts.map(|p| EmptyElement::at(p) + Rectangle::new([(-5, -5), (5, 5)], fill))).map(|_| ()),
            2 => cc.draw_series(pts.map(|p| EmptyElement::at(p) + TriangleMarker::new((0, 0), 8, fill))).map(|_| ()),
            _ => cc
                .draw_series(pts.map(|p| EmptyElement::at(p) + Cross::new((0, 0), 6, color.stroke_width(3))))
                .map(|_| ()),
        }
        .map_err(err)?;
    }
    cc.configure_series_labels()
        .background_style(WHITE.mix(0.9))
        .border_style(BLACK.mix(0.3))
        .label_font((FAMILY, 17))
        .position(SeriesLabelPosition::UpperRight)
        .draw()
        .map_err(err)?;
    root.present().map_err(err)?;
    Ok(())
}

/// Draw one figure with `$draw(root, $data)` into `<stem>.png` and `<stem>.svg`, each written to a
/// temporary name and renamed. Evaluates to `Result<Vec<PathBuf>>`.
macro_rules! save_png_svg {
    ($stem:expr, $draw:ident, $data:expr) => {{
        let stem: &Path = $stem;
        (|| -> Result<Vec<PathBuf>> {
            register_font();
            let png = stem.with_extension("png");
            let tmp = stem.with_extension(format!("tmp{}.png", std::process::id()));
            {
                let root = BitMapBackend::new(&tmp, SIZE).into_drawing_area();
                if let Err(e) = $draw(root, $data) {
                    let _ = std::fs::remove_file(&tmp);
                    return Err(e);
                }
            }
            std::fs::rename(&tmp, &png).with_context(|| format!("cannot write {}", png.display()))?;
            let svg_path = stem.with_extension("svg");
            let mut svg = String::new();
            {
                let root = SVGBackend::with_string(&mut svg, SIZE).into_drawing_area();
                $draw(root, $data)?;
            }
            write_atomic(&svg_path, svg.as_bytes())?;
            Ok(vec![png, svg_path])
        })()
    }};
}

/// Write a line chart as PNG and SVG.
pub fn save_line_chart(stem: &Path, chart: &LineChart) -> Result<Vec<PathBuf>> {
    save_png_svg!(stem, draw_line_chart, chart)
}

/// The sensitivity heat map: MoE layers (rows) x k (columns), colour = delta (log scale).
fn draw_heatmap<DB: DrawingBackend>(root: DrawingArea<DB, Shift>, profile: &SensitivityProfile) -> Result<()> {
    let err = |e: DrawingAreaErrorKind<DB::ErrorType>| anyhow!("drawing failed: {e:?}");
    root.fill(&WHITE).map_err(err)?;
    let (main, bar) = root.split_horizontally(SIZE.0 - 130);
    let n = profile.layers.len();
    let k_max = profile.full_k;
    let mut cc = ChartBuilder::on(&main)
        .caption(format!("Sensitivity of {} ({})", profile.model, profile.metric), (FAMILY, 24))
        .margin(16)
        .x_label_area_size(56)
        .y_label_area_size(70)
        .build_cartesian_2d(0.5f64..(f64::from(k_max) + 0.5), -0.5f64..(n as f64 - 0.5))
        .map_err(err)?;
    let layer_names: Vec<usize> = profile.layers.iter().map(|l| l.layer).collect();
    cc.configure_mesh()
        .disable_mesh()
        .x_desc("top-k of the layer (other layers at full k)")
        .y_desc("MoE layer")
        .x_labels(k_max as usize)
        .y_labels(n.min(30))
        .x_label_formatter(&|x| format!("{}", x.round() as i64))
        .y_label_formatter(&|y| {
            let i = y.round() as i64;
            if (0..n as i64).contains(&i) { format!("{}", layer_names[i as usize]) } else { String::new() }
        })
        .label_style((FAMILY, 16))
        .axis_desc_style((FAMILY, 19))
        .draw()
        .map_err(err)?;
    let vals: Vec<f64> = profile.layers.iter().flat_map(|l| l.delta.iter().copied()).filter(|d| *d > 0.0).collect();
    // Colours on a log scale over the positive deltas; zero or negative deltas (noise, or k = K) take the
    // bottom colour. Without any positive delta the scale is an arbitrary decade.
    let lo = vals.iter().copied().fold(f64::INFINITY, f64::min);
    let lo = if lo.is_finite() { lo.max(1e-9) } else { 1e-6 };
    let hi = vals.iter().copied().fold(0.0f64, f64::max).max(lo * 10.0);
    let scale = |d: f64| if d <= 0.0 { 0.0 } else { ((d.max(lo).ln() - lo.ln()) / (hi.ln() - lo.ln())).clamp(0.0, 1.0) };
    for (row, lp) in profile.layers.iter().enumerate() {
        for (&k, &d) in lp.k.iter().zip(&lp.delta) {
            let c = ViridisRGB::get_color(scale(d));
            let (x, y) = (f64::from(k), row as f64);
            cc.draw_series(std::iter::once(Rectangle::new([(x - 0.5, y - 0.5), (x + 0.5, y + 0.5)], c.filled())))
                .map_err(err)?;
        }
    }
    // Colour bar.
    let mut cb = ChartBuilder::on(&bar)
        .margin_top(60)
        .margin_bottom(72)
        .margin_right(10)
        .y_label_area_size(70)
        .build_cartesian_2d(0.0f64..1.0, lo.log10()..hi.log10())
        .map_err(err)?;
    cb.configure_mesh()
        .disable_mesh()
        .disable_x_axis()
        .y_desc("delta (log10)")
        .label_style((FAMILY, 14))
        .axis_desc_style((FAMILY, 15))
        .draw()
        .map_err(err)?;
    let steps = 64;
    for i in 0..steps {
        let a = lo.log10() + (hi.log10() - lo.log10()) * i as f64 / steps as f64;
        let b = lo.log10() + (hi.log10() - lo.log10()) * (i + 1) as f64 / steps as f64;
        let c = ViridisRGB::get_color(i as f64 / (steps - 1) as f64);
        cb.draw_series(std::iter::once(Rectangle::new([(0.0, a), (1.0, b)], c.filled()))).map_err(err)?;
    }
    root.present().map_err(err)?;
    Ok(())
}

/// Write the sensitivity heat map as PNG and SVG.
pub fn save_heatmap(stem: &Path, profile: &SensitivityProfile) -> Result<Vec<PathBuf>> {
    save_png_svg!(stem, draw_heatmap, profile)
}

/// Per-layer allocation bars: one group per MoE layer, one bar per budget.
#[derive(Debug, Clone)]
pub struct AllocationBars {
    /// Title.
    pub title: String,
    /// Model layer indices.
    pub layers: Vec<usize>,
    /// (legend label, k per layer).
    pub allocations: Vec<(String, Vec<f64>)>,
    /// The native k, drawn as a dashed line.
    pub full_k: f64,
}

fn draw_bars<DB: DrawingBackend>(root: DrawingArea<DB, Shift>, bars: &AllocationBars) -> Result<()> {
    let err = |e: DrawingAreaErrorKind<DB::ErrorType>| anyhow!("drawing failed: {e:?}");
    root.fill(&WHITE).map_err(err)?;
    let n = bars.layers.len();
    let kmax = bars.allocations.iter().flat_map(|(_, k)| k.iter().copied()).fold(bars.full_k, f64::max);
    let mut cc = ChartBuilder::on(&root)
        .caption(&bars.title, (FAMILY, 24))
        .margin(16)
        .x_label_area_size(56)
        .y_label_area_size(60)
        .build_cartesian_2d(-0.6f64..(n as f64 - 0.4), 0.0f64..(kmax * 1.45))
        .map_err(err)?;
    let names = bars.layers.clone();
    cc.configure_mesh()
        .disable_x_mesh()
        .x_desc("MoE layer")
        .y_desc("experts per token (k)")
        .x_labels(n.min(30))
        .x_label_formatter(&|x| {
            let i = x.round() as i64;
            if (0..n as i64).contains(&i) && (x - x.round()).abs() < 1e-6 { format!("{}", names[i as usize]) } else { String::new() }
        })
        .label_style((FAMILY, 15))
        .axis_desc_style((FAMILY, 19))
        .bold_line_style(BLACK.mix(0.08))
        .draw()
        .map_err(err)?;
    let groups = bars.allocations.len().max(1) as f64;
    let w = 0.8 / groups;
    let colors = [RGBColor(31, 119, 180), RGBColor(255, 127, 14), RGBColor(44, 160, 44), RGBColor(214, 39, 40), PURPLE, BROWN];
    for (g, (label, ks)) in bars.allocations.iter().enumerate() {
        let color = colors[g % colors.len()];
        let x0 = -0.4 + g as f64 * w;
        cc.draw_series(ks.iter().enumerate().map(|(i, &k)| {
            let x = i as f64 + x0;
            Rectangle::new([(x, 0.0), (x + w * 0.92, k)], color.filled())
        }))
        .map_err(err)?
        .label(label.clone())
        .legend(move |(x, y)| Rectangle::new([(x, y - 6), (x + 18, y + 6)], color.filled()));
    }
    let fk = bars.full_k;
    cc.draw_series(DashedLineSeries::new(vec![(-0.6, fk), (n as f64 - 0.4, fk)], 10, 6, BLACK.stroke_width(2)))
        .map_err(err)?
        .label(format!("native k = {fk}"))
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 24, y)], BLACK.stroke_width(2)));
    cc.configure_series_labels()
        .background_style(WHITE.mix(0.9))
        .border_style(BLACK.mix(0.3))
        .label_font((FAMILY, 16))
        .position(SeriesLabelPosition::UpperRight)
        .draw()
        .map_err(err)?;
    root.present().map_err(err)?;
    Ok(())
}

/// Write per-layer allocation bars as PNG and SVG.
pub fn save_allocation_bars(stem: &Path, bars: &AllocationBars) -> Result<Vec<PathBuf>> {
    save_png_svg!(stem, draw_bars, bars)
}

/// Points per chart (model, task) and per method (series name), in the order pushed.
type ChartPoints<P> = BTreeMap<(String, String), BTreeMap<String, Vec<P>>>;

/// Build "quality vs budget" charts from records: one chart per (model, task, metric), one series per
/// method, x = budget fraction, and the `full` method (if present) as the dashed reference.
pub fn quality_vs_budget(records: &[&Record], metric: &str, y_label: &str) -> Vec<(String, String, LineChart)> {
    let mut by_chart: ChartPoints<(f64, f64)> = BTreeMap::new();
    for r in records.iter().filter(|r| r.status == Status::Ok) {
        let Some(&v) = r.metrics.get(metric) else { continue };
        let x = f64::from(r.budget_total) / f64::from(r.full_budget.max(1));
        by_chart
            .entry((r.key.model.clone(), r.key.task.clone()))
            .or_default()
            .entry(r.key.method.clone())
            .or_default()
            .push((x, v));
    }
    by_chart
        .into_iter()
        .map(|((model, task), methods)| {
            let reference = methods.get("full").and_then(|p| p.first()).map(|&(_, y)| ("full budget".to_string(), y));
            let series = methods
                .into_iter()
                .filter(|(m, _)| m != "full")
                .map(|(label, mut points)| {
                    points.sort_by(|a, b| a.0.total_cmp(&b.0));
                    Series { label, points }
                })
                .collect();
            let chart = LineChart {
                title: format!("{model}: {task} {metric} vs activation budget"),
                x_label: "activation budget (fraction of full routed activations per token)".into(),
                y_label: y_label.into(),
                series,
                reference,
            };
            (model, task, chart)
        })
        .collect()
}

/// Build "quality vs speed" charts: x = a speed metric (tokens/s), y = a quality metric, one series per
/// method (points ordered by budget).
pub fn quality_vs_speed(records: &[&Record], metric: &str, speed: &str, y_label: &str, x_label: &str) -> Vec<(String, String, LineChart)> {
    // Speed is measured once per (model, method, budget) on the speed task; join it onto quality points.
    let mut speeds: BTreeMap<(String, String, String), f64> = BTreeMap::new();
    for r in records.iter().filter(|r| r.status == Status::Ok) {
        if let Some(&s) = r.metrics.get(speed) {
            speeds.insert((r.key.model.clone(), r.key.method.clone(), r.key.budget.clone()), s);
        }
    }
    let mut by_chart: ChartPoints<(f64, f64, f64)> = BTreeMap::new();
    for r in records.iter().filter(|r| r.status == Status::Ok) {
        let (Some(&v), Some(&s)) = (
            r.metrics.get(metric),
            speeds.get(&(r.key.model.clone(), r.key.method.clone(), r.key.budget.clone())),
        ) else {
            continue;
        };
        let b = f64::from(r.budget_total);
        by_chart.entry((r.key.model.clone(), r.key.task.clone())).or_default().entry(r.key.method.clone()).or_default().push((b, s, v));
    }
    by_chart
        .into_iter()
        .map(|((model, task), methods)| {
            let series = methods
                .into_iter()
                .map(|(label, mut pts)| {
                    pts.sort_by(|a, b| a.0.total_cmp(&b.0));
                    Series { label, points: pts.into_iter().map(|(_, s, v)| (s, v)).collect() }
                })
                .collect();
            let chart = LineChart {
                title: format!("{model}: {task} {metric} vs speed"),
                x_label: x_label.into(),
                y_label: y_label.into(),
                series,
                reference: None,
            };
            (model, task, chart)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use alloc_core::{LayerProfile, SCHEMA_VERSION};

    use super::*;

    #[test]
    fn heatmap_of_a_profile_without_positive_deltas_renders() {
        let p = SensitivityProfile {
            schema_version: SCHEMA_VERSION,
            model: "flat".into(),
            metric: "delta_nll".into(),
            full_k: 2,
            layers: vec![LayerProfile { layer: 1, k: vec![1, 2], delta: vec![-0.1, 0.0] }],
            calibration: None,
        };
        let dir = tempfile::tempdir().unwrap();
        let files = save_heatmap(&dir.path().join("h"), &p).unwrap();
        assert_eq!(files.len(), 2);
    }

    #[test]
    fn a_chart_with_one_flat_series_renders() {
        let chart = LineChart {
            title: "flat".into(),
            x_label: "x".into(),
            y_label: "y".into(),
            series: vec![Series { label: "uniform".into(), points: vec![(0.5, 3.0), (0.6, 3.0)] }],
            reference: Some(("full".into(), 3.0)),
        };
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(save_line_chart(&dir.path().join("c"), &chart).unwrap().len(), 2);
    }
}
