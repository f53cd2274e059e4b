//! `bertrain plot --run DIR`: training curves from `DIR/metrics.jsonl` as one SVG file
//! (loss, MLM/NSP accuracy, learning rate, throughput against step), written by hand so
//! it needs nothing but a browser or an image viewer to look at.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};

#[derive(clap::Args)]
pub struct PlotArgs {
    /// A run directory (holding `metrics.jsonl`).
    #[arg(long)]
    pub run: PathBuf,
    /// The SVG file to write [default: RUN/training.svg].
    #[arg(long)]
    pub output: Option<PathBuf>,
}

const WIDTH: f64 = 900.0;
const PANEL_HEIGHT: f64 = 220.0;
const MARGIN_LEFT: f64 = 80.0;
const MARGIN_RIGHT: f64 = 170.0;
const MARGIN_TOP: f64 = 30.0;
const MARGIN_BOTTOM: f64 = 35.0;
const COLORS: [&str; 4] = ["#1565c0", "#c62828", "#2e7d32", "#6a1b9a"];

/// One curve: a name, its points, and whether it is drawn as dots (sparse evaluations).
struct Series {
    name: String,
    points: Vec<(f64, f64)>,
    dots: bool,
}

pub fn run(args: PlotArgs) -> Result<()> {
    let metrics = args.run.join("metrics.jsonl");
    let text = std::fs::read_to_string(&metrics).with_context(|| {
        format!(
            "cannot read {}: is --run a bertrain run directory?",
            metrics.display()
        )
    })?;
    let svg = render(&text, &metrics)?;
    let output = args.output.unwrap_or_else(|| args.run.join("training.svg"));
    std::fs::write(&output, svg).with_context(|| format!("cannot write {}", output.display()))?;
    println!("wrote {}", output.display());
    Ok(())
}

/// The SVG for the lines of a `metrics.jsonl` (`origin` names it in errors).
pub fn render(metrics: &str, origin: &Path) -> Result<String> {
    let mut train = Vec::new();
    let mut validation = Vec::new();
    for (n, line) in metrics
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
    {
        let v: serde_json::Value = serde_json::from_str(line)
            .with_context(|| format!("{}: line {} is not JSON", origin.display(), n + 1))?;
        if v.get("split").is_some() {
            validation.push(v)
        } else {
            train.push(v)
        }
    }
    if train.is_empty() {
        bail!("{} records no training step yet", origin.display());
    }
    let series = |rows: &[serde_json::Value], key: &str, name: &str, dots: bool| Series {
        name: name.to_string(),
        points: rows
            .iter()
            .filter_map(|r| Some((r["step"].as_f64()?, r[key].as_f64()?)))
            .filter(|(_, y)| y.is_finite())
            .collect(),
        dots,
    };
    let panels = [
        (
            "loss",
            vec![
                series(&train, "loss", "loss", false),
                series(&train, "mlm_loss", "MLM loss", false),
                series(&train, "nsp_loss", "NSP loss", false),
                series(&validation, "loss", "validation loss", true),
            ],
        ),
        (
            "accuracy",
            vec![
                series(&train, "mlm_accuracy", "MLM accuracy", false),
                series(&train, "nsp_accuracy", "NSP accuracy", false),
                series(&validation, "mlm_accuracy", "validation MLM", true),
                series(&validation, "nsp_accuracy", "validation NSP", true),
            ],
        ),
        ("learning rate", vec![series(&train, "lr", "lr", false)]),
        (
            "tokens/s",
            vec![series(
                &train,
                "tokens_per_s",
                "tokens/s (all workers)",
                false,
            )],
        ),
    ];
    let height = panels.len() as f64 * PANEL_HEIGHT;
    let mut svg = String::new();
    let _ = writeln!(
        svg,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{height}" viewBox="0 0 {WIDTH} {height}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(svg, r#"<rect width="100%" height="100%" fill="white"/>"#);
    for (i, (title, series)) in panels.iter().enumerate() {
        panel(&mut svg, i as f64 * PANEL_HEIGHT, title, series);
    }
    svg.push_str("</svg>\n");
    Ok(svg)
}

fn panel(svg: &mut String, top: f64, title: &str, series: &[Series]) {
    let (x0, x1, y0, y1) = bounds(series);
    let left = MARGIN_LEFT;
    let right = WIDTH - MARGIN_RIGHT;
    let (plot_top, plot_bottom) = (top + MARGIN_TOP, top + PANEL_HEIGHT - MARGIN_BOTTOM);
    let x = |v: f64| left + (v - x0) / (x1 - x0) * (right - left);
    let y = |v: f64| plot_bottom - (v - y0) / (y1 - y0) * (plot_bottom - plot_top);
    let _ = writeln!(
        svg,
        r#"<text x="{left}" y="{}" font-weight="bold">{title}</text>"#,
        top + 18.0
    );
    let _ = writeln!(
        svg,
        r##"<path d="M{left},{plot_top} V{plot_bottom} H{right}" fill="none" stroke="#888"/>"##
    );
    for (value, pos) in [
        (y1, plot_top),
        ((y0 + y1) / 2.0, (plot_top + plot_bottom) / 2.0),
        (y0, plot_bottom),
    ] {
        let _ = writeln!(
            svg,
            r##"<text x="{}" y="{}" text-anchor="end" fill="#444">{}</text>"##,
            left - 6.0,
            pos + 4.0,
            label(value)
        );
    }
    for value in [x0, (x0 + x1) / 2.0, x1] {
        let _ = writeln!(
            svg,
            r##"<text x="{}" y="{}" text-anchor="middle" fill="#444">{}</text>"##,
            x(value),
            plot_bottom + 16.0,
            value.round()
        );
    }
    let _ = writeln!(
        svg,
        r##"<text x="{}" y="{}" text-anchor="middle" fill="#444">step</text>"##,
        (left + right) / 2.0,
        plot_bottom + 30.0
    );
    for (k, s) in series
        .iter()
        .enumerate()
        .filter(|(_, s)| !s.points.is_empty())
    {
        let color = COLORS[k % COLORS.len()];
        if s.dots {
            for &(px, py) in &s.points {
                let _ = writeln!(
                    svg,
                    r#"<circle cx="{:.1}" cy="{:.1}" r="3" fill="{color}"/>"#,
                    x(px),
                    y(py)
                );
            }
        } else {
            let mut d = String::new();
            for (j, &(px, py)) in s.points.iter().enumerate() {
                let _ = write!(
                    d,
                    "{}{:.1},{:.1}",
                    if j == 0 { "M" } else { " L" },
                    x(px),
                    y(py)
                );
            }
            let _ = writeln!(
                svg,
                r#"<path d="{d}" fill="none" stroke="{color}" stroke-width="1.5"/>"#
            );
        }
        let ly = plot_top + 14.0 * k as f64;
        let _ = writeln!(
            svg,
            r#"<rect x="{}" y="{}" width="12" height="3" fill="{color}"/>"#,
            right + 12.0,
            ly - 4.0
        );
        let _ = writeln!(
            svg,
            r#"<text x="{}" y="{ly}">{}</text>"#,
            right + 30.0,
            s.name
        );
    }
}

/// The data range of all series, widened where it is empty so every scale divides.
fn bounds(series: &[Series]) -> (f64, f64, f64, f64) {
    let points = series.iter().flat_map(|s| &s.points);
    let (mut x0, mut x1, mut y0, mut y1) = (f64::MAX, f64::MIN, f64::MAX, f64::MIN);
    for &(px, py) in points {
        (x0, x1, y0, y1) = (x0.min(px), x1.max(px), y0.min(py), y1.max(py));
    }
    if x0 > x1 {
        return (0.0, 1.0, 0.0, 1.0);
    }
    if x1 - x0 < 1e-12 {
        x1 = x0 + 1.0;
    }
    if y1 - y0 < 1e-12 {
        let pad = y0.abs().max(1e-12) * 0.05;
        (y0, y1) = (y0 - pad, y1 + pad);
    }
    (x0, x1, y0, y1)
}

fn label(v: f64) -> String {
    let a = v.abs();
    if a != 0.0 && !(1e-2..1e5).contains(&a) {
        format!("{v:.2e}")
    } else if a >= 100.0 {
        format!("{v:.0}")
    } else {
        format!("{v:.3}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn draws_every_panel_with_its_series() {
        let lines: Vec<String> = (1..=20)
            .map(|s| {
                serde_json::json!({"step": s, "loss": 10.0 - s as f64 * 0.1, "mlm_loss": 9.0, "nsp_loss": 0.7,
                    "mlm_accuracy": 0.01 * s as f64, "nsp_accuracy": 0.5, "lr": 1e-4, "tokens_per_s": 5000.0})
                .to_string()
            })
            .chain([serde_json::json!({"split": "validation", "step": 10, "loss": 9.5, "mlm_accuracy": 0.1, "nsp_accuracy": 0.6}).to_string()])
            .collect();
        let svg = render(&lines.join("\n"), Path::new("metrics.jsonl")).unwrap();
        assert!(svg.starts_with("<svg"));
        for title in ["loss", "accuracy", "learning rate", "tokens/s"] {
            assert!(svg.contains(&format!(">{title}</text>")), "{title}");
        }
        // Seven training curves (loss x3, accuracy x2, lr, throughput) as paths, and the
        // validation points as dots (loss; MLM and NSP accuracy).
        let curves = svg.matches("stroke-width=\"1.5\"").count();
        assert_eq!(curves, 7);
        assert_eq!(svg.matches("<circle").count(), 3);
        assert!(render("", Path::new("m")).is_err());
    }
}
