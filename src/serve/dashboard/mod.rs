//! `GET /dashboard`: a page for a person, served by bccp itself and refreshing itself
//! (`?refresh=SECONDS`, default 5): predictions per second by class, latency p50/p95, the
//! served version over time (from the store's `predictions` table), each retrain cycle's gate
//! accuracy per day with its decision and the share the cut-off dropped or relabelled (`retrains`), and the
//! server's own counters. Charts are inline SVG: the page makes no other request.

mod series;
mod svg;

use std::fmt::Write;

use axum::extract::{Query, State};
use axum::http::header::{CACHE_CONTROL, CONTENT_TYPE};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;

use super::state::AppState;
use crate::store::{Prediction, Retrain};
use series::{Cycles, Timeline};
use svg::{escape, PALETTE};

/// Predictions read for the charts (the most recent).
const RECENT: usize = 20_000;
/// Challengers shown.
const CYCLES: usize = 12;

#[derive(Debug, Deserialize)]
pub(crate) struct PageQuery {
    refresh: Option<u32>,
}

pub(crate) async fn page(State(state): State<AppState>, Query(q): Query<PageQuery>) -> Response {
    let refresh = q.refresh.unwrap_or(5).clamp(1, 3600);
    let data = match state.store.clone() {
        Some(store) => tokio::task::spawn_blocking(move || {
            let mut s = store
                .lock()
                .map_err(|_| "the store connection is poisoned".to_owned())?;
            let predictions = s.recent_predictions(RECENT).map_err(|e| e.to_string())?;
            let retrains = s.retrains().map_err(|e| e.to_string())?;
            Ok::<_, String>((predictions, retrains))
        })
        .await
        .unwrap_or_else(|_| Err("the store task failed".into())),
        None => Err("no data store (--db): predictions and retrain cycles are not recorded".into()),
    };
    let html = render(&state, refresh, data);
    state.metrics.count_request("/dashboard", 200);
    (
        [
            (CONTENT_TYPE, "text/html; charset=utf-8"),
            (CACHE_CONTROL, "no-store"),
        ],
        html,
    )
        .into_response()
}

/// `HH:MM:SS` of a Unix time (UTC).
fn clock(t: i64) -> String {
    let s = crate::data::timestamp::format_utc(t);
    s.get(11..19).unwrap_or(&s).to_owned()
}

fn render(
    state: &AppState,
    refresh: u32,
    data: Result<(Vec<Prediction>, Vec<Retrain>), String>,
) -> String {
    let model = state.model.current();
    let classes: Vec<String> = model
        .as_ref()
        .map(|m| m.info.classes.clone())
        .unwrap_or_default();
    let class_name = |c: i64| {
        usize::try_from(c)
            .ok()
            .and_then(|i| classes.get(i).cloned())
            .unwrap_or_else(|| format!("class {c}"))
    };
    let m = &state.metrics;
    let mut html = String::new();
    let _ = write!(
        html,
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta http-equiv=\"refresh\" content=\"{refresh}\">\
         <meta name=\"viewport\" content=\"width=device-width\">\
         <title>bccp serve — dashboard</title><style>{STYLE}</style></head><body>\
         <h1>bccp serve</h1><p class=\"sub\">"
    );
    match &model {
        Some(m) => {
            let _ = write!(
                html,
                "serving <b>{}:{}</b> ({}), {} on {} px, loaded {}",
                escape(&m.info.name),
                m.info.version,
                escape(&m.info.spec),
                escape(&m.info.backbone),
                m.info.image_size,
                escape(&m.info.loaded_at)
            );
        }
        None => {
            let _ = write!(
                html,
                "no model served yet: {}",
                escape(&state.model.not_ready())
            );
        }
    }
    let _ = write!(
        html,
        " · refreshes every {refresh} s · {}</p><div class=\"stats\">",
        crate::store::now_utc()
    );
    for (label, value) in [
        ("requests", m.total_requests().to_string()),
        ("server errors", m.server_errors().to_string()),
        ("images predicted", m.batch_size_sum().to_string()),
        (
            "reloads ok / failed",
            format!(
                "{} / {}",
                m.reloads("success"),
                m.reloads("load_failed") + m.reloads("self_test_failed")
            ),
        ),
        ("feedback accepted", m.samples("accepted").to_string()),
        (
            "logged / dropped",
            format!("{} / {}", m.log_written(), m.log_dropped()),
        ),
    ] {
        let _ = write!(
            html,
            "<div><b>{}</b><span>{label}</span></div>",
            escape(&value)
        );
    }
    html.push_str("</div><div class=\"grid\">");
    match data {
        Err(e) => {
            let _ = write!(
                html,
                "<section><h2>Data store</h2>{}</section>",
                svg::empty(&e)
            );
        }
        Ok((predictions, retrains)) => {
            charts(&mut html, &predictions, &class_name);
            cycles(&mut html, &retrains);
        }
    }
    html.push_str("</div></body></html>");
    html
}

fn charts(html: &mut String, predictions: &[Prediction], class_name: &dyn Fn(i64) -> String) {
    let Some(t) = Timeline::of(predictions) else {
        for title in [
            "Predictions per second by class",
            "Latency",
            "Served version",
        ] {
            let _ = write!(
                html,
                "<section><h2>{title}</h2>{}</section>",
                svg::empty("no predictions yet")
            );
        }
        return;
    };
    let labels: Vec<String> = t.starts.iter().map(|&s| clock(s)).collect();
    let colour = |k: usize| PALETTE[k % PALETTE.len()];
    let series: Vec<(&str, Vec<f64>)> = t
        .rate
        .iter()
        .enumerate()
        .map(|(k, r)| (colour(k), r.clone()))
        .collect();
    let legend: Vec<(String, &str)> = t
        .classes
        .iter()
        .enumerate()
        .map(|(k, &c)| (class_name(c), colour(k)))
        .collect();
    let _ = write!(
        html,
        "<section id=\"rate\"><h2>Predictions per second by class <small>({} s buckets, last {} predictions)</small></h2>{}{}</section>",
        t.width,
        predictions.len(),
        svg::stacked_bars(&labels, &series, "predictions/s"),
        svg::legend(&legend)
    );
    let _ = write!(
        html,
        "<section id=\"latency\"><h2>Latency, p50 and p95 <small>(ms, request received to answer)</small></h2>{}{}</section>",
        svg::lines(&labels, &[(PALETTE[0], t.p50.clone()), (PALETTE[3], t.p95.clone())], "ms", false),
        svg::legend(&[("p50".into(), PALETTE[0]), ("p95".into(), PALETTE[3])])
    );
    let versions: Vec<Option<f64>> = t.version.iter().map(|v| v.map(|v| v as f64)).collect();
    let _ = write!(
        html,
        "<section id=\"version\"><h2>Served version</h2>{}</section>",
        svg::lines(&labels, &[(PALETTE[2], versions)], "version", true)
    );
}

fn cycles(html: &mut String, retrains: &[Retrain]) {
    let c = Cycles::of(retrains, CYCLES);
    if c.rows.is_empty() {
        let _ = write!(
            html,
            "<section id=\"gate\"><h2>Retrain cycles</h2>{}</section>",
            svg::empty("no retrain cycle yet")
        );
        return;
    }
    let labels: Vec<String> = c
        .rows
        .iter()
        .map(|r| format!("#{} {}", r.cycle, r.method))
        .collect();
    let groups: Vec<Vec<Option<f64>>> = c.rows.iter().map(|r| r.per_day.clone()).collect();
    let legend: Vec<(String, &str)> = c
        .days
        .iter()
        .enumerate()
        .map(|(k, d)| (d.clone(), PALETTE[k % PALETTE.len()]))
        .collect();
    let _ = write!(
        html,
        "<section id=\"gate\" class=\"wide\"><h2>Retrain cycles: gate accuracy per day</h2>{}{}<table><tr><th>cycle</th><th>started</th><th>trigger</th><th>challenger</th><th>method</th><th>cut (dropped or relabelled)</th>",
        svg::grouped_bars(&labels, &groups, 1.0, "gate accuracy"),
        svg::legend(&legend)
    );
    for d in &c.days {
        let _ = write!(html, "<th>gate {}</th>", escape(d));
    }
    html.push_str("<th>gate</th><th>decision</th></tr>");
    let pct = |v: Option<f64>| v.map_or("–".to_owned(), |v| format!("{:.1}%", 100.0 * v));
    let acc = |v: Option<f64>| v.map_or("–".to_owned(), |v| format!("{v:.4}"));
    for r in &c.rows {
        let _ = write!(
            html,
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td>",
            r.cycle,
            escape(&r.started),
            escape(&r.trigger),
            escape(&r.challenger),
            escape(&r.method),
            pct(r.cut_share)
        );
        for v in &r.per_day {
            let _ = write!(html, "<td>{}</td>", acc(*v));
        }
        let class = if r.decision == "promoted" { "ok" } else { "no" };
        let _ = write!(
            html,
            "<td>{}</td><td class=\"{class}\">{}</td></tr>",
            acc(r.gate),
            escape(&r.decision)
        );
    }
    html.push_str("</table></section>");
}

const STYLE: &str = "body{font:14px/1.4 system-ui,sans-serif;margin:16px 24px;color:#222;background:#fff}\
h1{font-size:20px;margin:0 0 4px}h2{font-size:14px;margin:0 0 6px}small{color:#777;font-weight:normal}\
.sub{color:#555;margin:0 0 12px}.stats{display:flex;gap:12px;flex-wrap:wrap;margin-bottom:12px}\
.stats div{border:1px solid #ddd;border-radius:6px;padding:6px 12px}.stats b{display:block;font-size:18px}\
.stats span{color:#666;font-size:12px}.grid{display:flex;flex-wrap:wrap;gap:16px}\
section{border:1px solid #e2e2e2;border-radius:6px;padding:10px}section.wide{flex-basis:100%}\
.legend{display:flex;gap:10px;flex-wrap:wrap;font-size:12px}.legend i{display:inline-block;width:10px;height:10px;margin-right:4px}\
table{border-collapse:collapse;font-size:12px;margin-top:8px}td,th{border-bottom:1px solid #eee;padding:3px 8px;text-align:left}\
td.ok{color:#1a7f37;font-weight:bold}td.no{color:#9a3412}";
