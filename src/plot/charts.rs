//! The SVG charts of `plot`, drawn with `plotters` into a string and written whole.

use std::path::{Path, PathBuf};

use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::colors::colormaps::ViridisRGB;

use super::{out_path, PlotError, PlotInput};

const SIZE: (u32, u32) = (1100, 560);
const FONT: &str = "sans-serif";
/// Colours: static (what the initial placement would have had), live, the re-plan reference,
/// rebalance rounds.
const STATIC: RGBColor = RGBColor(214, 39, 40);
const LIVE: RGBColor = RGBColor(31, 119, 180);
const REFERENCES: [RGBColor; 4] =
    [RGBColor(44, 160, 44), RGBColor(148, 103, 189), RGBColor(140, 86, 75), RGBColor(127, 127, 127)];
const ROUND: RGBColor = RGBColor(255, 127, 14);

/// Most rebalances drawn as full-height lines (more become a rug along the bottom).
const MAX_FULL_MARKS: usize = 30;

/// Most columns of a heatmap panel, and most bars of a migration panel.
const HEATMAP_COLUMNS: usize = 120;

type DrawResult<T> = Result<T, String>;

/// Draws every chart the input has data for; returns the files written.
pub(crate) fn draw_all(input: &PlotInput, dir: &Path) -> Result<Vec<PathBuf>, PlotError> {
    let mut written = Vec::new();
    let mut save = |name: &str, draw: &dyn Fn(&DrawingArea<SVGBackend, Shift>) -> DrawResult<()>| {
        let path = out_path(dir, name);
        let mut svg = String::new();
        {
            let root = SVGBackend::with_string(&mut svg, SIZE).into_drawing_area();
            root.fill(&WHITE)
                .map_err(|e| e.to_string())
                .and_then(|()| draw(&root))
                .and_then(|()| root.present().map_err(|e| e.to_string()))
        }
        .map_err(|reason| PlotError::Write { path: path.clone(), reason: format!("drawing failed: {reason}") })?;
        write_replacing(&path, svg.as_bytes()).map_err(|reason| PlotError::Write { path: path.clone(), reason })?;
        written.push(path);
        Ok::<(), PlotError>(())
    };
    save("balancedness.svg", &|root| balancedness(root, input))?;
    if input.layer_balancedness_live.is_some() || input.layer_balancedness_static.is_some() {
        save("layers.svg", &|root| layers(root, input))?;
    }
    if !input.moves.is_empty() {
        save("migrations.svg", &|root| migrations(root, input))?;
    }
    Ok(written)
}

/// A whole new file in place of `path`: written beside it under a temporary name created
/// exclusively (`O_EXCL`: a symlink planted at that name is never followed), then renamed, so
/// that a reader never sees half a chart ([`crate::output::write_output`]).
fn write_replacing(path: &Path, bytes: &[u8]) -> Result<(), String> {
    crate::output::write_output("plot", path, bytes).map_err(|e| e.to_string())
}

/// An axis tick: whole numbers on an axis that reaches 10, else as many decimals as it needs.
fn tick_label(v: f64, axis_max: f64) -> String {
    if axis_max >= 10.0 {
        format!("{v:.0}")
    } else if axis_max >= 1.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.3}")
    }
}

/// Steps are whole numbers.
fn step_label(x: &f64) -> String {
    format!("{x:.0}")
}

fn err<E: std::fmt::Display>(e: E) -> String {
    e.to_string()
}

/// The x range of the run: from the first sample's step to the end of the last one.
fn step_range(input: &PlotInput) -> (f64, f64) {
    let first = input.step[0] as f64;
    let last = *input.step.last().unwrap_or(&0) as f64 + input.stride as f64;
    (first, last.max(first + 1.0))
}

/// The x position of sample `i`: the middle of its steps.
fn sample_x(input: &PlotInput, i: usize) -> f64 {
    input.step[i] as f64 + (input.stride as f64 - 1.0) / 2.0
}

/// The lowest balancedness shown: a tenth below the lowest value, at least 0.
fn y_floor(values: impl Iterator<Item = f64>) -> f64 {
    let min = values.fold(1.0f64, f64::min);
    ((min - 0.05) * 10.0).floor().max(0.0) / 10.0
}

fn balancedness(root: &DrawingArea<SVGBackend, Shift>, input: &PlotInput) -> DrawResult<()> {
    let (x0, x1) = step_range(input);
    let all = input
        .balancedness_live
        .iter()
        .chain(input.balancedness_static.iter().flatten())
        .chain(input.references.iter().flat_map(|(_, v)| v))
        .copied();
    let y0 = y_floor(all);
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len().max(1) as f64;
    let mut chart = ChartBuilder::on(root)
        .caption(format!("Balancedness over steps: {}", input.title), (FONT, 18))
        .margin(12)
        .x_label_area_size(48)
        .y_label_area_size(64)
        .build_cartesian_2d(x0..x1, y0..1.01)
        .map_err(err)?;
    chart
        .configure_mesh()
        .x_desc(if input.stride > 1 {
            format!("step (each point the mean of {} steps)", input.stride)
        } else {
            "step".to_string()
        })
        .y_desc("balancedness (mean GPU load / peak GPU load, 1 is perfect)")
        .axis_desc_style((FONT, 15))
        .label_style((FONT, 13))
        .x_label_formatter(&step_label)
        .light_line_style(WHITE.mix(0.0))
        .draw()
        .map_err(err)?;
    if !input.rebalance_steps.is_empty() {
        // A few rebalances: full-height lines; many (a layer switch every few steps): a rug of
        // short ticks along the bottom, which does not hide the lines.
        let n = input.rebalance_steps.len();
        let top = if n <= MAX_FULL_MARKS { 1.01 } else { y0 + (1.0 - y0) * 0.04 };
        chart
            .draw_series(
                input
                    .rebalance_steps
                    .iter()
                    .map(|&s| PathElement::new(vec![(s as f64, y0), (s as f64, top)], ROUND.mix(0.55).stroke_width(1))),
            )
            .map_err(err)?
            .label(format!("rebalance: a round or a layer switch ({n})"))
            .legend(|(x, y)| PathElement::new(vec![(x, y - 7), (x, y + 7)], ROUND.stroke_width(2)));
    }
    let points = |v: &[f64]| (0..v.len()).map(|i| (sample_x(input, i), v[i])).collect::<Vec<_>>();
    let mut line = |v: &[f64], name: &str, color: RGBColor, dashed: bool| -> DrawResult<()> {
        let label = format!("{name} (mean {:.3})", mean(v));
        let style = color.stroke_width(2);
        let series = if dashed {
            chart.draw_series(DashedLineSeries::new(points(v), 6, 4, style)).map_err(err)?
        } else {
            chart.draw_series(LineSeries::new(points(v), style)).map_err(err)?
        };
        series.label(label).legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 22, y)], color.stroke_width(2)));
        Ok(())
    };
    if let Some(stat) = &input.balancedness_static {
        line(stat, "static: the initial placement, never moved", STATIC, false)?;
    }
    for (i, (name, v)) in input.references.iter().enumerate() {
        line(v, name, REFERENCES[i % REFERENCES.len()], true)?;
    }
    line(&input.balancedness_live, &input.live_name, LIVE, false)?;
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::LowerRight)
        .label_font((FONT, 14))
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK.mix(0.4))
        .draw()
        .map_err(err)
}

fn layers(root: &DrawingArea<SVGBackend, Shift>, input: &PlotInput) -> DrawResult<()> {
    let panels: Vec<(&str, &Vec<Vec<f64>>)> = [
        ("static: the initial placement", input.layer_balancedness_static.as_ref()),
        ("live: the placement eplb keeps", input.layer_balancedness_live.as_ref()),
    ]
    .into_iter()
    .filter_map(|(n, m)| m.map(|m| (n, m)))
    .collect();
    let lo = y_floor(panels.iter().flat_map(|(_, m)| m.iter().flatten().copied()));
    let (body, bar) = root.split_horizontally(SIZE.0 - 110);
    let body = body.titled(&format!("Balancedness per layer over steps: {}", input.title), (FONT, 18)).map_err(err)?;
    let rounds = if input.rebalance_steps.is_empty() { "" } else { " (white lines: rebalance rounds)" };
    let areas = body.split_evenly((1, panels.len()));
    let (x0, x1) = step_range(input);
    for ((name, m), area) in panels.iter().zip(areas.iter()) {
        let num_layers = m[0].len();
        let mut chart = ChartBuilder::on(area)
            .caption(format!("{name}{rounds}"), (FONT, 15))
            .margin(8)
            .x_label_area_size(44)
            .y_label_area_size(52)
            .build_cartesian_2d(x0..x1, -0.5f64..num_layers as f64 - 0.5)
            .map_err(err)?;
        chart
            .configure_mesh()
            .disable_mesh()
            .x_desc("step")
            .y_desc("MoE layer")
            .axis_desc_style((FONT, 14))
            .label_style((FONT, 12))
            .y_labels(num_layers.min(16))
            .x_label_formatter(&step_label)
            .y_label_formatter(&|y| if y.fract().abs() < 1e-9 { format!("{y:.0}") } else { String::new() })
            .draw()
            .map_err(err)?;
        // At most HEATMAP_COLUMNS columns (means of neighbouring samples): the file stays small.
        let per_column = m.len().div_ceil(HEATMAP_COLUMNS).max(1);
        let columns: Vec<(f64, f64, Vec<f64>)> = (0..m.len())
            .step_by(per_column)
            .map(|i| {
                let j = (i + per_column).min(m.len());
                let end = if j < m.len() { input.step[j] as f64 } else { x1 };
                let mean =
                    (0..num_layers).map(|l| m[i..j].iter().map(|r| r[l]).sum::<f64>() / (j - i) as f64).collect();
                (input.step[i] as f64, end, mean)
            })
            .collect();
        chart
            .draw_series(columns.iter().flat_map(|(s0, s1, col)| {
                col.iter().enumerate().map(move |(layer, &b)| {
                    let c = ViridisRGB::get_color_normalized(b, lo, 1.0);
                    Rectangle::new([(*s0, layer as f64 - 0.5), (*s1, layer as f64 + 0.5)], c.filled())
                })
            }))
            .map_err(err)?;
        if !input.rebalance_steps.is_empty() {
            chart
                .draw_series(input.rebalance_steps.iter().map(|&s| {
                    PathElement::new(vec![(s as f64, -0.5), (s as f64, num_layers as f64 - 0.5)], WHITE.mix(0.8))
                }))
                .map_err(err)?;
        }
    }
    // The colour scale.
    let mut scale = ChartBuilder::on(&bar)
        .margin_top(60)
        .margin_bottom(60)
        .margin_right(10)
        .y_label_area_size(50)
        .caption("balancedness", (FONT, 13))
        .build_cartesian_2d(0f64..1.0, lo..1.0)
        .map_err(err)?;
    scale.configure_mesh().disable_mesh().disable_x_axis().label_style((FONT, 12)).draw().map_err(err)?;
    let steps = 100;
    scale
        .draw_series((0..steps).map(|k| {
            let a = lo + (1.0 - lo) * k as f64 / steps as f64;
            let b = lo + (1.0 - lo) * (k + 1) as f64 / steps as f64;
            Rectangle::new([(0.0, a), (1.0, b)], ViridisRGB::get_color_normalized(a, lo, 1.0).filled())
        }))
        .map_err(err)?;
    Ok(())
}

fn migrations(root: &DrawingArea<SVGBackend, Shift>, input: &PlotInput) -> DrawResult<()> {
    let root = root.titled(&format!("Migrations per round: {}", input.title), (FONT, 18)).map_err(err)?;
    let (top, bottom) = root.split_vertically(SIZE.1 / 2 - 10);
    // Many rounds (a layer switch every few steps) are summed into at most HEATMAP_COLUMNS bins.
    let (x0, x1) = step_range(input);
    let bin_steps = if input.moves.len() > HEATMAP_COLUMNS { ((x1 - x0) / HEATMAP_COLUMNS as f64).ceil() } else { 0.0 };
    let mut bins: Vec<super::RoundMoves> = Vec::new();
    for m in &input.moves {
        let start =
            if bin_steps > 0.0 { x0 + ((m.step as f64 - x0) / bin_steps).floor() * bin_steps } else { m.step as f64 };
        match bins.last_mut().filter(|b| b.step as f64 == start) {
            Some(b) => {
                b.bytes += m.bytes;
                b.seconds += m.seconds;
                b.worst_step_seconds = b.worst_step_seconds.max(m.worst_step_seconds);
            }
            None => bins.push(super::RoundMoves { step: start as usize, ..m.clone() }),
        }
    }
    let unit = if bin_steps > 0.0 { format!("{bin_steps:.0} steps") } else { "round".to_string() };
    let bars = |f: &dyn Fn(&super::RoundMoves) -> f64| bins.iter().map(|m| (m.step, f(m))).collect::<Vec<_>>();
    let mib = bars(&|m| m.bytes as f64 / (1 << 20) as f64);
    let total: f64 = mib.iter().map(|b| b.1).sum();
    let moved = format!("bytes moved between ranks per {unit} (total {total:.1} MiB)");
    let x_desc = if bin_steps > 0.0 { format!("step (bars of {unit})") } else { "step of the round".to_string() };
    bar_panel(&top, input, &x_desc, "moved (MiB)", &[(moved, LIVE.filled(), mib)])?;
    bar_panel(
        &bottom,
        input,
        &x_desc,
        "migration time (ms)",
        &[
            (format!("all layers migrated per {unit}"), ROUND.mix(0.45).filled(), bars(&|m| m.seconds * 1e3)),
            ("the longest stall of one step".into(), ROUND.filled(), bars(&|m| m.worst_step_seconds * 1e3)),
        ],
    )
}

/// Bars of one legend entry: its label, its style, and `(step, value)` pairs.
type Bars = (String, ShapeStyle, Vec<(usize, f64)>);

/// One panel of bars at the rounds' steps: `(legend, style, [(step, value)])`, drawn in order
/// (later ones in front), the axis up to the largest value.
fn bar_panel(
    area: &DrawingArea<SVGBackend, Shift>,
    input: &PlotInput,
    x_desc: &str,
    y_desc: &str,
    series: &[Bars],
) -> DrawResult<()> {
    let (x0, x1) = step_range(input);
    let width = ((x1 - x0) / 120.0).max(0.5);
    // Headroom above the tallest bar for the legend.
    let max = series.iter().flat_map(|(_, _, b)| b.iter().map(|p| p.1)).fold(0.0, f64::max).max(1e-9) * 1.45;
    let mut chart = ChartBuilder::on(area)
        .margin(10)
        .x_label_area_size(44)
        .y_label_area_size(72)
        .build_cartesian_2d(x0..x1, 0.0..max)
        .map_err(err)?;
    chart
        .configure_mesh()
        .x_desc(x_desc)
        .y_desc(y_desc)
        .axis_desc_style((FONT, 14))
        .label_style((FONT, 12))
        .y_label_formatter(&|v| tick_label(*v, max))
        .x_label_formatter(&step_label)
        .light_line_style(WHITE.mix(0.0))
        .draw()
        .map_err(err)?;
    for (label, style, bars) in series {
        let style = *style;
        chart
            .draw_series(bars.iter().map(|&(s, v)| Rectangle::new([(s as f64, 0.0), (s as f64 + width, v)], style)))
            .map_err(err)?
            .label(label)
            .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 14, y + 5)], style));
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperRight)
        .label_font((FONT, 13))
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK.mix(0.4))
        .draw()
        .map_err(err)
}
