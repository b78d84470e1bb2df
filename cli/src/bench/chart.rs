//! The report's pictures, SVG written by hand:
//!
//! - `latency.svg`: latency percentiles (p50 … max) against the offered
//!   rate of each open-loop step, on a log scale of milliseconds; steps
//!   that did not hold are drawn hollow, and the drain and sustained maxima
//!   are marked.
//! - `stages.svg`: each stage's rate as a bar (ceilings, bare hops, edge,
//!   drain, sustained, rebuild) on a log scale, so a 300/s stage and a
//!   30,000/s ceiling are both readable.

use std::fmt::Write as _;

use super::report::{Report, Step};

const WIDTH: f64 = 940.0;
const HEIGHT: f64 = 520.0;
const LEFT: f64 = 80.0;
const RIGHT: f64 = 170.0;
const TOP: f64 = 50.0;
const BOTTOM: f64 = 60.0;
const COLOURS: [&str; 5] = ["#1b9e77", "#d95f02", "#7570b3", "#e7298a", "#666666"];

fn escape(text: &str) -> String {
    text.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;")
}

/// A round axis end at or above `v`: 1, 2, 2.5 or 5 times a power of ten.
fn round_up(v: f64) -> f64 {
    let v = v.max(1.0);
    let magnitude = 10f64.powf(v.log10().floor());
    [1.0, 2.0, 2.5, 5.0, 10.0].iter().map(|m| m * magnitude).find(|c| *c >= v).unwrap_or(10.0 * magnitude)
}

/// Decades from `lo` to `hi` covering `[min, max]` (both > 0).
fn decades(min: f64, max: f64) -> (f64, f64) {
    let lo = 10f64.powf(min.max(1e-3).log10().floor());
    let hi = 10f64.powf(max.max(lo * 10.0).log10().ceil());
    (lo, hi)
}

fn open(s: &mut String, title: &str) {
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{HEIGHT}" viewBox="0 0 {WIDTH} {HEIGHT}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(s, r#"<rect width="100%" height="100%" fill="white"/>"#);
    let _ = writeln!(s, r#"<text x="{LEFT}" y="24" font-size="15" font-weight="bold">{}</text>"#, escape(title));
}

/// A curve of the latency chart: its name and the step's figure it draws.
type Series = (&'static str, fn(&Step) -> f64);

/// Latency percentiles against offered load.
pub fn latency(report: &Report) -> String {
    let steps: Vec<&Step> = report.e2e.steps.iter().chain(&report.e2e.half_sustained).collect();
    let (plot_w, plot_h) = (WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM);
    let x_max = round_up(steps.iter().map(|s| s.target_per_second).fold(report.e2e.max_per_second, f64::max) * 1.05);
    let values = steps.iter().flat_map(|s| [s.latency_ms.p50, s.latency_ms.max]).filter(|v| *v > 0.0);
    let (lo, hi) = decades(values.clone().fold(f64::MAX, f64::min).min(1.0), values.fold(1.0, f64::max));
    let x = |rate: f64| LEFT + rate / x_max * plot_w;
    let y = |ms: f64| TOP + plot_h - (ms.max(lo).log10() - lo.log10()) / (hi.log10() - lo.log10()) * plot_h;

    let mut s = String::new();
    open(
        &mut s,
        &format!(
            "sluice: scheduled send → visible, by offered load ({} build, {} CPUs; sustained {:.0}/s)",
            report.machine.build, report.machine.cpus, report.e2e.sustained_per_second
        ),
    );
    let mut decade = lo;
    while decade <= hi * 1.0001 {
        let gy = y(decade);
        let _ =
            writeln!(s, r##"<line x1="{LEFT}" y1="{gy:.1}" x2="{:.1}" y2="{gy:.1}" stroke="#ddd"/>"##, LEFT + plot_w);
        let _ = writeln!(s, r#"<text x="{:.1}" y="{:.1}" text-anchor="end">{decade}</text>"#, LEFT - 6.0, gy + 4.0);
        decade *= 10.0;
    }
    for i in 0..=5 {
        let rate = x_max * f64::from(i) / 5.0;
        let gx = x(rate);
        let _ =
            writeln!(s, r#"<text x="{gx:.1}" y="{:.1}" text-anchor="middle">{rate:.0}</text>"#, TOP + plot_h + 18.0);
    }
    for (label, rate, colour) in
        [("drain max", report.e2e.max_per_second, "#999"), ("sustained", report.e2e.sustained_per_second, "#333")]
    {
        if rate > 0.0 {
            let gx = x(rate);
            let _ = writeln!(
                s,
                r#"<line x1="{gx:.1}" y1="{TOP}" x2="{gx:.1}" y2="{:.1}" stroke="{colour}" stroke-dasharray="4 4"/>"#,
                TOP + plot_h
            );
            let _ = writeln!(s, r#"<text x="{:.1}" y="{:.1}" fill="{colour}">{label}</text>"#, gx + 4.0, TOP + 14.0);
        }
    }
    let _ = writeln!(
        s,
        r##"<rect x="{LEFT}" y="{TOP}" width="{plot_w:.1}" height="{plot_h:.1}" fill="none" stroke="#444"/>"##
    );
    let _ = writeln!(
        s,
        r#"<text x="{:.1}" y="{:.1}" text-anchor="middle">offered commands per second (open loop)</text>"#,
        LEFT + plot_w / 2.0,
        HEIGHT - 16.0
    );
    let _ = writeln!(
        s,
        r#"<text transform="translate(20 {:.1}) rotate(-90)" text-anchor="middle">milliseconds (log)</text>"#,
        TOP + plot_h / 2.0
    );
    // The sweep's steps are joined by lines; the latency step at half the
    // sustained maximum is drawn as squares of its own.
    let mut sorted: Vec<&Step> = report.e2e.steps.iter().collect();
    sorted.sort_by(|a, b| a.target_per_second.total_cmp(&b.target_per_second));
    let series: [Series; 5] = [
        ("p50", |s| s.latency_ms.p50),
        ("p90", |s| s.latency_ms.p90),
        ("p99", |s| s.latency_ms.p99),
        ("p99.9", |s| s.latency_ms.p999),
        ("max", |s| s.latency_ms.max),
    ];
    for (i, (name, value)) in series.iter().enumerate() {
        let colour = COLOURS[i];
        let points: Vec<String> = sorted
            .iter()
            .filter(|st| value(st) > 0.0)
            .map(|st| format!("{:.1},{:.1}", x(st.target_per_second), y(value(st))))
            .collect();
        let _ =
            writeln!(s, r#"<polyline fill="none" stroke="{colour}" stroke-width="2" points="{}"/>"#, points.join(" "));
        for st in sorted.iter().filter(|st| value(st) > 0.0) {
            let fill = if st.holds { colour } else { "white" };
            let _ = writeln!(
                s,
                r#"<circle cx="{:.1}" cy="{:.1}" r="4" fill="{fill}" stroke="{colour}" stroke-width="2"/>"#,
                x(st.target_per_second),
                y(value(st))
            );
        }
        if let Some(half) = report.e2e.half_sustained.as_ref().filter(|st| value(st) > 0.0) {
            let _ = writeln!(
                s,
                r#"<rect x="{:.1}" y="{:.1}" width="8" height="8" fill="{colour}"/>"#,
                x(half.target_per_second) - 4.0,
                y(value(half)) - 4.0
            );
        }
        let (lx, ly) = (LEFT + plot_w + 16.0, TOP + 10.0 + i as f64 * 22.0);
        let _ = writeln!(
            s,
            r#"<line x1="{lx}" y1="{ly}" x2="{}" y2="{ly}" stroke="{colour}" stroke-width="2"/><text x="{}" y="{}">{name}</text>"#,
            lx + 24.0,
            lx + 30.0,
            ly + 4.0
        );
    }
    for (i, line) in
        ["hollow: step did not hold", "square: latency step at", "half the sustained max"].iter().enumerate()
    {
        let _ = writeln!(
            s,
            r#"<text x="{}" y="{}">{line}</text>"#,
            LEFT + plot_w + 16.0,
            TOP + 10.0 + (5.0 + i as f64) * 22.0 + 4.0
        );
    }
    let _ = writeln!(s, "</svg>");
    s
}

/// Each stage's best rate.
pub fn stages(report: &Report) -> String {
    let r = &report.raw;
    let e = &report.e2e;
    let bars: Vec<(String, f64)> = vec![
        ("raw RabbitMQ publish".into(), r.amqp_publish.per_second),
        ("raw RabbitMQ consume".into(), r.amqp_consume.per_second),
        ("raw Kafka produce".into(), r.kafka_produce.per_second),
        ("raw CQL insert (rows)".into(), r.cql_insert.per_second),
        ("raw CQL batch (rows)".into(), r.cql_batch_insert.per_second),
        ("raw CQL batches across partitions (rows)".into(), r.cql_spread_batch_insert.per_second),
        ("raw CQL LWT insert".into(), r.cql_lwt_insert.per_second),
        ("bare hops (commands)".into(), report.bare.ceiling.per_second),
        ("edge single".into(), report.edge.single.commands_per_second),
        ("edge batch".into(), report.edge.batch.commands_per_second),
        ("drain: processors".into(), e.processor_per_second),
        ("drain: projector".into(), e.projector_per_second),
        ("sustained end to end".into(), e.sustained_per_second),
        ("rebuild (rows)".into(), report.rebuild.rows_per_second),
    ];
    let (label_w, plot_w) = (190.0, WIDTH - 190.0 - 120.0);
    let bar_h = (HEIGHT - TOP - 30.0) / bars.len() as f64;
    let positive = bars.iter().map(|b| b.1).filter(|v| *v > 0.0);
    let (lo, hi) = decades(positive.clone().fold(f64::MAX, f64::min).min(10.0), positive.fold(10.0, f64::max));
    let x = |v: f64| label_w + (v.max(lo).log10() - lo.log10()) / (hi.log10() - lo.log10()) * plot_w;
    let mut s = String::new();
    open(&mut s, "sluice: each stage's rate per second (log scale)");
    let mut decade = lo;
    while decade <= hi * 1.0001 {
        let gx = x(decade);
        let _ =
            writeln!(s, r##"<line x1="{gx:.1}" y1="{TOP}" x2="{gx:.1}" y2="{:.1}" stroke="#ddd"/>"##, HEIGHT - 30.0);
        let _ = writeln!(s, r#"<text x="{gx:.1}" y="{:.1}" text-anchor="middle">{decade}</text>"#, HEIGHT - 14.0);
        decade *= 10.0;
    }
    for (i, (label, value)) in bars.iter().enumerate() {
        let top = TOP + i as f64 * bar_h;
        let colour = if label.starts_with("raw") || label.starts_with("bare") { "#7570b3" } else { "#1b9e77" };
        let _ = writeln!(
            s,
            r#"<text x="{:.1}" y="{:.1}" text-anchor="end">{}</text>"#,
            label_w - 8.0,
            top + bar_h * 0.65,
            escape(label)
        );
        if *value > 0.0 {
            let _ = writeln!(
                s,
                r#"<rect x="{label_w}" y="{:.1}" width="{:.1}" height="{:.1}" fill="{colour}"/>"#,
                top + bar_h * 0.15,
                (x(*value) - label_w).max(1.0),
                bar_h * 0.7
            );
        }
        let _ = writeln!(s, r#"<text x="{:.1}" y="{:.1}">{value:.0}</text>"#, x(*value) + 6.0, top + bar_h * 0.65);
    }
    let _ = writeln!(s, "</svg>");
    s
}
