//! Reports of sweeps: a Markdown table and an SVG plot (plotters), both
//! written atomically.

use crate::error::{Error, Result};
use plotters::prelude::*;
use std::path::Path;

/// A Markdown table: header and rows of cells.
pub fn markdown_table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut s = format!(
        "| {} |\n|{}\n",
        header.join(" | "),
        " --- |".repeat(header.len())
    );
    for r in rows {
        s += &format!("| {} |\n", r.join(" | "));
    }
    s
}

/// One line of a plot.
pub struct Series {
    pub name: String,
    pub points: Vec<(f64, f64)>,
}

impl Series {
    /// Group (name, point) pairs into one series per name, in order of first
    /// appearance, each sorted by x.
    pub fn group(items: impl IntoIterator<Item = (String, (f64, f64))>) -> Vec<Series> {
        let mut series: Vec<Series> = vec![];
        for (name, point) in items {
            match series.iter_mut().find(|s| s.name == name) {
                Some(s) => s.points.push(point),
                None => series.push(Series {
                    name,
                    points: vec![point],
                }),
            }
        }
        for s in &mut series {
            s.points.sort_by(|a, b| a.0.total_cmp(&b.0));
        }
        series
    }
}

/// Axes of a plot.
pub struct Axes<'a> {
    pub title: &'a str,
    pub x: &'a str,
    pub y: &'a str,
    pub log_x: bool,
    pub log_y: bool,
}

fn range(vals: impl Iterator<Item = f64>, log: bool) -> (f64, f64) {
    let (lo, hi) = vals.fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), v| {
        (a.min(v), b.max(v))
    });
    if !lo.is_finite() {
        return (0.1, 1.0);
    }
    if log {
        (lo / 1.5, hi * 1.5)
    } else {
        let pad = ((hi - lo) * 0.08).max(1e-3);
        (lo - pad, hi + pad)
    }
}

fn draw<'a, X, Y>(
    mut chart: ChartContext<'a, SVGBackend<'a>, Cartesian2d<X, Y>>,
    axes: &Axes,
    series: &[Series],
) -> std::result::Result<(), String>
where
    X: Ranged<ValueType = f64> + plotters::coord::ranged1d::ValueFormatter<f64>,
    Y: Ranged<ValueType = f64> + plotters::coord::ranged1d::ValueFormatter<f64>,
{
    chart
        .configure_mesh()
        .x_desc(axes.x)
        .y_desc(axes.y)
        .draw()
        .map_err(|e| e.to_string())?;
    for (i, s) in series.iter().enumerate() {
        let color = Palette99::pick(i).to_rgba();
        chart
            .draw_series(LineSeries::new(
                s.points.iter().cloned(),
                color.stroke_width(2),
            ))
            .map_err(|e| e.to_string())?
            .label(s.name.clone())
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
            });
        chart
            .draw_series(s.points.iter().map(|&p| Circle::new(p, 4, color.filled())))
            .map_err(|e| e.to_string())?;
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .position(SeriesLabelPosition::UpperRight)
        .draw()
        .map_err(|e| e.to_string())
}

/// An SVG line plot, one line per series.
pub fn plot_svg(path: &Path, axes: &Axes, series: &[Series]) -> Result<()> {
    let all = || series.iter().flat_map(|s| s.points.iter());
    let (x0, x1) = range(all().map(|p| p.0), axes.log_x);
    let (y0, y1) = range(all().map(|p| p.1), axes.log_y);
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (900, 560)).into_drawing_area();
        let run = || -> std::result::Result<(), String> {
            root.fill(&WHITE).map_err(|e| e.to_string())?;
            let mut b = ChartBuilder::on(&root);
            b.caption(axes.title, ("sans-serif", 20))
                .margin(14)
                .x_label_area_size(44)
                .y_label_area_size(70);
            match (axes.log_x, axes.log_y) {
                (true, true) => draw(
                    b.build_cartesian_2d((x0..x1).log_scale(), (y0..y1).log_scale())
                        .map_err(|e| e.to_string())?,
                    axes,
                    series,
                ),
                (true, false) => draw(
                    b.build_cartesian_2d((x0..x1).log_scale(), y0..y1)
                        .map_err(|e| e.to_string())?,
                    axes,
                    series,
                ),
                (false, true) => draw(
                    b.build_cartesian_2d(x0..x1, (y0..y1).log_scale())
                        .map_err(|e| e.to_string())?,
                    axes,
                    series,
                ),
                (false, false) => draw(
                    b.build_cartesian_2d(x0..x1, y0..y1)
                        .map_err(|e| e.to_string())?,
                    axes,
                    series,
                ),
            }?;
            root.present().map_err(|e| e.to_string())
        };
        run().map_err(|e| Error::file(path, format!("cannot draw the plot: {e}")))?;
    }
    crate::util::write_atomic(path, svg.as_bytes())
}
