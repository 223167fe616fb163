//! `report.html`: one self-contained page (no network requests; thumbnails as PNG files in
//! `thumbs/` beside it) with a section per issue type, worst first, paginated in the page by
//! a few lines of inline JavaScript.

use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::path::Path;

use super::{write_error, Audit, AuditError, AuditRecord};
use crate::fsutil::write_atomic;

/// Longest side of a thumbnail, in pixels.
pub const THUMB: u32 = 72;

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// One sample's card: thumbnail, given and suggested label, a score.
fn card(r: &AuditRecord, score_name: &str, score: f32) -> String {
    let suggested = if r.suggested_label != r.given_label {
        format!(" → <b>{}</b>", esc(&r.suggested_label))
    } else {
        String::new()
    };
    let part = match (&r.day, &r.split) {
        (Some(d), Some(s)) => format!("<br>{d}/{s}"),
        _ => String::new(),
    };
    format!(
        "<div class=card><img src=\"thumbs/{i}.png\" alt=\"{p}\" width={THUMB} height={THUMB}>\
         <div class=meta title=\"{p}\">#{i} {g}{suggested}<br>{score_name} {score:.3}{part}</div></div>",
        i = r.index,
        p = esc(&r.path),
        g = esc(&r.given_label),
    )
}

/// A paginated section of `items` (already HTML), `page_size` per page.
fn section(
    html: &mut String,
    id: &str,
    title: &str,
    note: &str,
    items: &[String],
    page_size: usize,
) {
    let _ = write!(
        html,
        "<section id={id}><h2>{title} <small>({} found)</small></h2><p>{note}</p><div class=items data-page-size={page_size}>",
        items.len()
    );
    for it in items {
        html.push_str(it);
    }
    if items.is_empty() {
        html.push_str("<p><i>none</i></p>");
    }
    html.push_str("</div><div class=pager></div></section>\n");
}

const STYLE: &str = "body{font-family:sans-serif;margin:16px;background:#fff;color:#222}\
.card{display:inline-block;vertical-align:top;width:110px;margin:4px;padding:4px;border:1px solid #ccc;font-size:11px}\
.card img{image-rendering:pixelated;display:block;margin:auto;background:#eee}\
.meta{overflow:hidden;text-overflow:ellipsis}\
.group{display:block;margin:6px 0;padding:4px;border:2px solid #1f77b4}\
table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:2px 6px;text-align:right}\
.pager button{margin:2px}";

const SCRIPT: &str = "document.querySelectorAll('section').forEach(function(s){\
var box=s.querySelector('.items');var size=+box.dataset.pageSize;\
var items=Array.prototype.filter.call(box.children,function(c){return c.classList.contains('card')||c.classList.contains('group')});\
var pages=Math.ceil(items.length/size);var pager=s.querySelector('.pager');\
function show(p){items.forEach(function(it,i){it.style.display=(Math.floor(i/size)===p)?'':'none'});\
pager.querySelectorAll('button').forEach(function(b,i){b.disabled=(i===p)})}\
if(pages>1){for(var p=0;p<pages;p++){var b=document.createElement('button');b.textContent=p+1;\
b.onclick=(function(q){return function(){show(q)}})(p);pager.appendChild(b)}}show(0)});";

/// Writes `report.html` and the thumbnails of every sample it shows.
pub fn write(audit: &Audit, out: &Path, page_size: usize) -> Result<(), AuditError> {
    let page_size = page_size.max(1);
    let recs = &audit.records;
    let s = &audit.summary;
    let mut shown: BTreeSet<usize> = BTreeSet::new();
    let mut html = format!(
        "<!doctype html><html><head><meta charset=utf-8><title>bccp audit</title><style>{STYLE}</style></head><body>\
         <h1>bccp audit: {} samples, {} classes</h1><p>backbone {}; k = {}; near-duplicate thresholds {:.4} (embeddings), \
         {:.4} (pixels) ({} × median nearest distance); outlier z &gt; {}; corruption z &gt; {}</p>",
        s.samples,
        s.classes.len(),
        esc(&s.options.backbone),
        s.options.k,
        s.near_duplicate_threshold,
        s.pixel_near_duplicate_threshold,
        s.options.near_factor,
        s.options.outlier_z,
        s.options.corrupt_z
    );
    // Class balance and per-class rates.
    let _ = write!(
        html,
        "<section id=classes><h2>Classes <small>(imbalance {:.2}: largest / smallest)</small></h2><table>\
         <tr><th>class</th><th>samples</th><th>share</th><th>label issues</th><th>exact dup.</th><th>near dup.</th><th>outliers</th><th>corrupted</th></tr>",
        s.imbalance_ratio
    );
    for c in &s.classes {
        let _ = write!(
            html,
            "<tr><td>{}</td><td>{}</td><td>{:.3}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            esc(&c.class), c.samples, c.share, c.label_issues, c.exact_duplicates, c.near_duplicates, c.outliers, c.corrupted
        );
    }
    html.push_str("</table></section>\n");

    let mut worst = |flag: fn(&AuditRecord) -> bool, key: fn(&AuditRecord) -> f32| {
        let mut v: Vec<&AuditRecord> = recs.iter().filter(|r| flag(r)).collect();
        v.sort_by(|a, b| key(b).total_cmp(&key(a)).then(a.index.cmp(&b.index)));
        v.iter().for_each(|r| {
            shown.insert(r.index);
        });
        v
    };
    let label: Vec<String> = worst(|r| r.label_issue, |r| r.label_score)
        .into_iter()
        .map(|r| card(r, "score", r.label_score))
        .collect();
    let outl: Vec<String> = worst(|r| r.outlier, |r| r.outlier_score)
        .into_iter()
        .map(|r| card(r, "z", r.outlier_score))
        .collect();
    let corr: Vec<String> = worst(|r| r.corrupted, |r| r.corruption_score)
        .into_iter()
        .map(|r| card(r, "score", r.corruption_score))
        .collect();
    let leaks: Vec<String> = worst(|r| r.split_leak || r.day_leak, |r| -r.nearest_distance)
        .into_iter()
        .map(|r| card(r, "nearest", r.nearest_distance))
        .collect();
    let mut groups = |gs: &[Vec<usize>]| -> Vec<String> {
        let mut order: Vec<&Vec<usize>> = gs.iter().collect();
        let closest = |g: &Vec<usize>| {
            g.iter()
                .map(|&i| recs[i].nearest_distance)
                .fold(f32::INFINITY, f32::min)
        };
        order.sort_by(|a, b| closest(a).total_cmp(&closest(b)));
        order
            .into_iter()
            .map(|g| {
                let mut h = String::from("<div class=group>");
                for &i in g {
                    shown.insert(i);
                    h.push_str(&card(&recs[i], "nearest", recs[i].nearest_distance));
                }
                h.push_str("</div>");
                h
            })
            .collect()
    };
    let exact = groups(&audit.exact_groups);
    let near = groups(&audit.near_groups);

    section(&mut html, "label", "Label issues", "Confident learning (5-fold out-of-sample probabilities of a linear head); score = 1 − probability of the given label; → the suggested label.", &label, page_size);
    section(
        &mut html,
        "exact",
        "Exact duplicates",
        "Identical file contents (SHA-256), one group per row.",
        &exact,
        page_size,
    );
    section(&mut html, "near", "Near-duplicates", "Nearest-neighbour distance under the threshold, of unit-normalised embeddings or of 16×16 centred pixel vectors; one group per row, closest first.", &near, page_size);
    section(
        &mut html,
        "leaks",
        "Leaks across splits or days",
        "Samples with an exact or near duplicate in the other split or on another day.",
        &leaks,
        page_size,
    );
    section(
        &mut html,
        "outliers",
        "Outliers",
        "Robust z-score of the distance to the k-th nearest other sample (the larger of embeddings and pixel vectors).",
        &outl,
        page_size,
    );
    section(
        &mut html,
        "corrupted",
        "Corrupted images",
        "Pixel statistics: share of saturated white 2×2 blocks plus share of black pixels cutting through the object, as a robust z-score.",
        &corr,
        page_size,
    );
    let _ = writeln!(html, "<script>{SCRIPT}</script></body></html>");

    let thumbs = out.join("thumbs");
    std::fs::create_dir_all(&thumbs).map_err(write_error(&thumbs))?;
    for &i in &shown {
        let path = thumbs.join(format!("{i}.png"));
        let img = image::open(&audit.files[i]).map_err(|e| AuditError::Image {
            path: audit.files[i].clone(),
            error: e.to_string(),
        })?;
        let filter = if img.width().max(img.height()) < THUMB {
            image::imageops::FilterType::Nearest
        } else {
            image::imageops::FilterType::Triangle
        };
        let small = img.resize(THUMB, THUMB, filter);
        let mut bytes = std::io::Cursor::new(Vec::new());
        small
            .write_to(&mut bytes, image::ImageFormat::Png)
            .map_err(|e| write_error(&path)(std::io::Error::other(e)))?;
        write_atomic(&path, bytes.get_ref()).map_err(write_error(&path))?;
    }
    let page = out.join("report.html");
    write_atomic(&page, html.as_bytes()).map_err(write_error(&page))
}
