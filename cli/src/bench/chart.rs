//! The latency chart (`latency.svg`), written by hand: one percentile
//! distribution per open-loop rate, HdrHistogram style — the x axis is the
//! percentile on a log scale of 1/(1-p), so the tail gets the room, and the
//! y axis is milliseconds. Solid lines are the latency from the scheduled
//! send to the readable order; dashed lines, in the same colour, are the
//! generator's own lag.

use std::fmt::Write as _;

use super::report::{Report, Step};

const WIDTH: f64 = 940.0;
const HEIGHT: f64 = 520.0;
const LEFT: f64 = 70.0;
const RIGHT: f64 = 280.0;
const TOP: f64 = 50.0;
const BOTTOM: f64 = 60.0;
const COLOURS: [&str; 6] = ["#1b9e77", "#d95f02", "#7570b3", "#e7298a", "#66a61e", "#e6ab02"];
/// The right end of the x axis: the 99.999th percentile.
const MAX_NINES: f64 = 5.0;

/// x position of a percentile: log10(1 / (1 - p)), 0 at p0, 5 at p99.999.
fn nines(percentile: f64) -> f64 {
    let rest = (1.0 - percentile / 100.0).max(10f64.powf(-MAX_NINES));
    (-rest.log10()).clamp(0.0, MAX_NINES)
}

/// A round upper bound for the y axis.
fn ceiling(max: f64) -> f64 {
    let max = max.max(1.0);
    let magnitude = 10f64.powf(max.log10().floor());
    [1.0, 2.0, 2.5, 5.0, 10.0].iter().map(|m| m * magnitude).find(|c| *c >= max).unwrap_or(10.0 * magnitude)
}

fn escape(text: &str) -> String {
    text.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;")
}

pub fn svg(report: &Report) -> String {
    let steps: &[Step] = &report.e2e.steps;
    let plot_w = WIDTH - LEFT - RIGHT;
    let plot_h = HEIGHT - TOP - BOTTOM;
    let y_max = ceiling(
        steps
            .iter()
            .flat_map(|s| s.latency_ms.curve.iter().chain(&s.generator_lag_ms.curve))
            .filter(|(p, _)| *p <= 99.999)
            .map(|(_, ms)| *ms)
            .fold(0.0, f64::max),
    );
    let x = |p: f64| LEFT + nines(p) / MAX_NINES * plot_w;
    let y = |ms: f64| TOP + plot_h - (ms.min(y_max) / y_max) * plot_h;

    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{HEIGHT}" viewBox="0 0 {WIDTH} {HEIGHT}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(s, r#"<rect width="100%" height="100%" fill="white"/>"#);
    let _ = writeln!(
        s,
        r#"<text x="{LEFT}" y="24" font-size="15" font-weight="bold">{}</text>"#,
        escape(&format!(
            "sluice: POST → read model, open loop ({} build, {} CPUs; max {:.0}/s)",
            report.machine.build, report.machine.cpus, report.e2e.max_per_second
        ))
    );
    // Grid and axes.
    for (i, label) in ["0%", "90%", "99%", "99.9%", "99.99%", "99.999%"].iter().enumerate() {
        let gx = LEFT + i as f64 / MAX_NINES * plot_w;
        let _ = writeln!(s, r##"<line x1="{gx:.1}" y1="{TOP}" x2="{gx:.1}" y2="{:.1}" stroke="#ddd"/>"##, TOP + plot_h);
        let _ = writeln!(s, r#"<text x="{gx:.1}" y="{:.1}" text-anchor="middle">{label}</text>"#, TOP + plot_h + 18.0);
    }
    for i in 0..=5 {
        let ms = y_max * f64::from(i) / 5.0;
        let gy = y(ms);
        let _ =
            writeln!(s, r##"<line x1="{LEFT}" y1="{gy:.1}" x2="{:.1}" y2="{gy:.1}" stroke="#ddd"/>"##, LEFT + plot_w);
        let _ = writeln!(s, r#"<text x="{:.1}" y="{:.1}" text-anchor="end">{ms:.0}</text>"#, LEFT - 6.0, gy + 4.0);
    }
    let _ = writeln!(
        s,
        r##"<rect x="{LEFT}" y="{TOP}" width="{plot_w:.1}" height="{plot_h:.1}" fill="none" stroke="#444"/>"##
    );
    let _ = writeln!(
        s,
        r#"<text x="{:.1}" y="{:.1}" text-anchor="middle">percentile</text>"#,
        LEFT + plot_w / 2.0,
        HEIGHT - 16.0
    );
    let _ = writeln!(
        s,
        r#"<text transform="translate(18 {:.1}) rotate(-90)" text-anchor="middle">milliseconds</text>"#,
        TOP + plot_h / 2.0
    );
    // One solid and one dashed line per step, and the legend.
    for (i, step) in steps.iter().enumerate() {
        let colour = COLOURS[i % COLOURS.len()];
        for (curve, dash) in
            [(&step.latency_ms.curve, ""), (&step.generator_lag_ms.curve, r#" stroke-dasharray="5 4""#)]
        {
            if curve.is_empty() {
                continue;
            }
            let points: Vec<String> = curve
                .iter()
                .filter(|(p, _)| *p <= 99.999)
                .map(|(p, ms)| format!("{:.1},{:.1}", x(*p), y(*ms)))
                .collect();
            let _ = writeln!(
                s,
                r#"<polyline fill="none" stroke="{colour}" stroke-width="2"{dash} points="{}"/>"#,
                points.join(" ")
            );
        }
        let ly = TOP + 10.0 + i as f64 * 36.0;
        let lx = LEFT + plot_w + 16.0;
        let _ = writeln!(
            s,
            r#"<line x1="{lx}" y1="{ly}" x2="{}" y2="{ly}" stroke="{colour}" stroke-width="2"/>"#,
            lx + 24.0
        );
        let _ = writeln!(
            s,
            r#"<text x="{}" y="{}">{:.0}% = {:.0}/s: p99 {:.1} ms</text>"#,
            lx + 30.0,
            ly + 4.0,
            step.fraction * 100.0,
            step.target_per_second,
            step.latency_ms.p99
        );
        let _ = writeln!(
            s,
            r#"<line x1="{lx}" y1="{}" x2="{}" y2="{}" stroke="{colour}" stroke-width="2" stroke-dasharray="5 4"/>"#,
            ly + 16.0,
            lx + 24.0,
            ly + 16.0
        );
        let _ = writeln!(
            s,
            r#"<text x="{}" y="{}">generator lag p99 {:.1} ms</text>"#,
            lx + 30.0,
            ly + 20.0,
            step.generator_lag_ms.p99
        );
    }
    let _ = writeln!(s, "</svg>");
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_spread_on_a_log_scale() {
        assert_eq!(nines(0.0), 0.0);
        assert!((nines(90.0) - 1.0).abs() < 1e-9);
        assert!((nines(99.9) - 3.0).abs() < 1e-9);
        assert_eq!(nines(100.0), MAX_NINES);
    }

    #[test]
    fn the_axis_ends_on_a_round_number() {
        assert_eq!(ceiling(37.0), 50.0);
        assert_eq!(ceiling(101.0), 200.0);
        assert_eq!(ceiling(0.2), 1.0);
    }
}
