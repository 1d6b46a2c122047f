//! The PNG chart of `roe eval`: per task, grouped bars of the main configurations.

use std::path::Path;

use anyhow::{anyhow, Result};
use plotters::prelude::*;
use plotters::style::{register_font, FontStyle};

use crate::eval::EvalReport;

/// Fonts tried for the labels (plotters draws text with ab_glyph from a TTF file; no system
/// font service is needed). Without any, the chart is drawn without text.
const FONT_PATHS: [&str; 3] = [
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/TTF/DejaVuSans.ttf",
];

pub(crate) fn load_font() -> bool {
    let path = std::env::var("ROE_CHART_FONT")
        .ok()
        .into_iter()
        .chain(FONT_PATHS.iter().map(|s| s.to_string()))
        .find(|p| Path::new(p).is_file());
    let Some(path) = path else {
        return false;
    };
    match std::fs::read(&path) {
        // plotters keeps the font for the life of the process.
        Ok(bytes) => {
            register_font("sans-serif", FontStyle::Normal, Box::leak(bytes.into())).is_ok()
        }
        Err(_) => false,
    }
}

const SERIES: [(&str, RGBColor); 5] = [
    ("bare", RGBColor(150, 150, 150)),
    ("oracle LoRA", RGBColor(31, 119, 180)),
    ("RoE-routed", RGBColor(44, 160, 44)),
    ("merged all", RGBColor(255, 127, 14)),
    ("leave-one-out", RGBColor(214, 39, 40)),
];

fn values(r: &EvalReport) -> Vec<(String, [f64; 5])> {
    let mut rows: Vec<(String, [f64; 5])> = r
        .tasks
        .iter()
        .map(|t| {
            (
                t.task.clone(),
                [
                    t.bare,
                    t.oracle_lora,
                    t.routed,
                    t.merged_all,
                    t.leave_one_out,
                ],
            )
        })
        .collect();
    let n = rows.len().max(1) as f64;
    let mut mean = [0f64; 5];
    for (_, v) in &rows {
        for (m, x) in mean.iter_mut().zip(v) {
            *m += x / n;
        }
    }
    rows.push(("MEAN".into(), mean));
    rows
}

/// Draws the chart into `path` (PNG).
pub fn draw(r: &EvalReport, path: &Path) -> Result<()> {
    let with_text = load_font();
    let rows = values(r);
    let root = BitMapBackend::new(path, (1800, 720)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| anyhow!("chart: {e}"))?;
    let mut builder = ChartBuilder::on(&root);
    builder.margin(20);
    if with_text {
        builder
            .caption(
                "Accuracy per task: bare, oracle, RoE-routed, merged, leave-one-out",
                ("sans-serif", 26),
            )
            .x_label_area_size(150)
            .y_label_area_size(60);
    }
    let n = rows.len();
    let mut chart = builder
        .build_cartesian_2d(0f64..n as f64, 0f64..1.05f64)
        .map_err(|e| anyhow!("chart: {e}"))?;
    if with_text {
        chart
            .configure_mesh()
            .disable_x_mesh()
            .x_labels(0)
            .y_desc("accuracy / F1")
            .draw()
            .map_err(|e| anyhow!("chart: {e}"))?;
        // Task names under their group, drawn at pixel positions (plotters' own x labels
        // fall on round numbers, not on group centres).
        let style = ("sans-serif", 15)
            .into_font()
            .transform(FontTransform::Rotate90)
            .color(&BLACK);
        for (i, (name, _)) in rows.iter().enumerate() {
            let (px, py) = chart.backend_coord(&(i as f64 + 0.5, 0.0));
            root.draw(&Text::new(name.clone(), (px + 7, py + 8), style.clone()))
                .map_err(|e| anyhow!("chart: {e}"))?;
        }
    }
    let width = 0.8 / SERIES.len() as f64;
    for (s, (label, color)) in SERIES.iter().enumerate() {
        let bars = rows.iter().enumerate().map(|(i, (_, v))| {
            let x0 = i as f64 + 0.1 + s as f64 * width;
            Rectangle::new([(x0, 0.0), (x0 + width, v[s])], color.filled())
        });
        let series = chart.draw_series(bars).map_err(|e| anyhow!("chart: {e}"))?;
        if with_text {
            let c = *color;
            series
                .label(*label)
                .legend(move |(x, y)| Rectangle::new([(x, y - 6), (x + 14, y + 6)], c.filled()));
        }
    }
    if with_text {
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperRight)
            .background_style(WHITE.mix(0.9))
            .border_style(BLACK)
            .label_font(("sans-serif", 16))
            .draw()
            .map_err(|e| anyhow!("chart: {e}"))?;
    } else {
        tracing::warn!("no TTF font found (set ROE_CHART_FONT): chart drawn without text");
    }
    root.present().map_err(|e| anyhow!("chart: {e}"))?;
    Ok(())
}
