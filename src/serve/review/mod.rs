//! The review page: a person looks at the samples the loop flagged and confirms or corrects
//! their labels; each answer is stored as a verified label, which later cycles trust (never
//! cut, and in the gate when no model trained on it; see [`crate::retrain`]).
//!
//! * `GET /review?page=N&per_page=K` — the gallery ([`page`]), pages rendered by the server so
//!   it shows without scripts; keys and clicks answer through the endpoints below.
//! * `GET /review/items?page=N&per_page=K` — the same page as JSON.
//! * `GET /review/image/{id}` — the image of a sample under review (only those: the path comes
//!   from the store, never from the request).
//! * `POST /review/{id}` `{"label": NAME or INDEX}` — stores the verified label (a write: it
//!   needs the API token when one is set, and one is mandatory off loopback).
//!
//! What is reviewed: the flags of the latest retrain cycle that recorded any, highest noise
//! score first, or with `--review-audit DIR` the label issues of a `bccp audit --db` report
//! (checked against the store at start).

mod audit;
mod page;

use std::path::PathBuf;

use axum::body::Bytes;
use axum::extract::{Path, RawQuery, State};
use axum::http::header::{CACHE_CONTROL, CONTENT_TYPE};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::{json, Value};

use super::error::ApiError;
use super::samples::{label_of, Label};
use super::state::AppState;
use crate::store::{Sample, SampleFilter, Store};

pub(crate) use audit::{load_audit, AuditEntries};

/// Cards per page unless asked otherwise, and the most a page holds.
const PER_PAGE: usize = 24;
const MAX_PER_PAGE: usize = 200;

/// One sample to review.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Entry {
    pub sample_id: i64,
    /// Higher: more likely mislabelled.
    pub score: f64,
    /// The label the detector suggests (a class index of the store).
    pub suggested: Option<i64>,
}

/// A card: the entry and its stored sample.
pub(crate) struct Card {
    pub entry: Entry,
    pub sample: Sample,
}

/// One page of the gallery.
pub(crate) struct Listing {
    /// What is reviewed, in words (`retrain cycle 3`, `audit /path`).
    pub origin: String,
    pub classes: Vec<String>,
    pub total: usize,
    pub page: usize,
    pub per_page: usize,
    pub cards: Vec<Card>,
}

impl Listing {
    pub fn pages(&self) -> usize {
        self.total.div_ceil(self.per_page).max(1)
    }
}

/// `page` and `per_page` of a query string (1-based pages).
fn paging(query: Option<&str>) -> Result<(usize, usize), ApiError> {
    let (mut page, mut per_page) = (1, PER_PAGE);
    for (key, value) in query
        .unwrap_or_default()
        .split('&')
        .filter_map(|kv| kv.split_once('='))
    {
        let number = || {
            value.parse::<usize>().map_err(|_| {
                ApiError::bad_request(format!("{key}={value:?} is not a whole number"))
            })
        };
        match key {
            "page" => page = number()?,
            "per_page" => per_page = number()?,
            _ => {}
        }
    }
    if page == 0 {
        return Err(ApiError::bad_request("page starts at 1"));
    }
    if !(1..=MAX_PER_PAGE).contains(&per_page) {
        return Err(ApiError::bad_request(format!(
            "per_page={per_page} must be 1 to {MAX_PER_PAGE}"
        )));
    }
    Ok((page, per_page))
}

/// The sample with id `id`, if stored.
fn sample(store: &mut dyn Store, id: i64) -> Result<Option<Sample>, ApiError> {
    let found = store.samples(
        &SampleFilter {
            after_id: id - 1,
            up_to_id: Some(id),
            ..SampleFilter::default()
        },
        1,
    )?;
    Ok(found.into_iter().next())
}

/// Everything under review, and where it comes from.
fn entries(state: &AppState, store: &mut dyn Store) -> Result<(String, Vec<Entry>), ApiError> {
    if let Some(audit) = &state.review_audit {
        return Ok((
            format!("audit {}", audit.dir.display()),
            audit.entries.clone(),
        ));
    }
    Ok(match store.flags(None)? {
        Some((retrain, flags)) => (
            format!("retrain cycle {retrain}"),
            flags
                .into_iter()
                .map(|f| Entry {
                    sample_id: f.sample_id,
                    score: f.score,
                    suggested: f.suggested,
                })
                .collect(),
        ),
        None => (
            "no retrain cycle has flagged samples yet".into(),
            Vec::new(),
        ),
    })
}

/// Runs `f` on the store off the async runtime; 503 without a store.
async fn with_store<T: Send + 'static>(
    state: &AppState,
    f: impl FnOnce(&AppState, &mut dyn Store) -> Result<T, ApiError> + Send + 'static,
) -> Result<T, ApiError> {
    let store = state.store.clone().ok_or_else(|| {
        ApiError::unavailable("the server has no data store (--db): nothing to review")
    })?;
    let state = state.clone();
    tokio::task::spawn_blocking(move || {
        let mut store = store
            .lock()
            .map_err(|_| ApiError::internal("the store connection is poisoned"))?;
        f(&state, store.as_mut())
    })
    .await
    .map_err(|_| ApiError::internal("the store task failed"))?
}

async fn listing(state: &AppState, query: Option<String>) -> Result<Listing, ApiError> {
    let (page, per_page) = paging(query.as_deref())?;
    with_store(state, move |state, store| {
        let (origin, all) = entries(state, store)?;
        let classes = store.classes()?;
        let mut cards = Vec::new();
        for entry in all.iter().skip((page - 1) * per_page).take(per_page) {
            // A flagged sample is never deleted; skip one that vanished all the same.
            if let Some(sample) = sample(store, entry.sample_id)? {
                cards.push(Card {
                    entry: entry.clone(),
                    sample,
                });
            }
        }
        Ok(Listing {
            origin,
            classes,
            total: all.len(),
            page,
            per_page,
            cards,
        })
    })
    .await
}

fn class_json(classes: &[String], index: Option<i64>) -> Value {
    match index {
        Some(i) => json!({
            "index": i,
            "name": usize::try_from(i).ok().and_then(|i| classes.get(i)),
        }),
        None => Value::Null,
    }
}

/// The JSON of a page.
fn listing_json(l: &Listing) -> Value {
    json!({
        "origin": l.origin,
        "classes": l.classes,
        "total": l.total,
        "page": l.page,
        "per_page": l.per_page,
        "pages": l.pages(),
        "items": l.cards.iter().map(|c| json!({
            "id": c.sample.id,
            "image": format!("/review/image/{}", c.sample.id),
            "score": c.entry.score,
            "given": class_json(&l.classes, Some(c.sample.label_given)),
            "suggested": class_json(&l.classes, c.entry.suggested),
            "verified": class_json(&l.classes, c.sample.label_verified),
            "source": c.sample.source,
            "split": c.sample.split.as_str(),
        })).collect::<Vec<_>>(),
    })
}

fn counted(state: &AppState, route: &str, response: Response) -> Response {
    state
        .metrics
        .count_request(route, response.status().as_u16());
    response
}

/// `GET /review`: the gallery page.
pub(crate) async fn gallery(State(state): State<AppState>, RawQuery(q): RawQuery) -> Response {
    let response = match listing(&state, q).await {
        Ok(l) => (
            [
                (CONTENT_TYPE, "text/html; charset=utf-8"),
                (CACHE_CONTROL, "no-store"),
            ],
            page::render(&l),
        )
            .into_response(),
        Err(e) => e.into_response(),
    };
    counted(&state, "/review", response)
}

/// `GET /review/items`: a page as JSON.
pub(crate) async fn items(State(state): State<AppState>, RawQuery(q): RawQuery) -> Response {
    let response = match listing(&state, q).await {
        Ok(l) => Json(listing_json(&l)).into_response(),
        Err(e) => e.into_response(),
    };
    counted(&state, "/review/items", response)
}

fn sample_id(text: &str) -> Result<i64, ApiError> {
    text.parse::<i64>()
        .map_err(|_| ApiError::not_found(format!("no sample {text:?}: ids are whole numbers")))
}

/// `GET /review/image/{id}`: the image of a sample under review.
pub(crate) async fn image(State(state): State<AppState>, Path(id): Path<String>) -> Response {
    let result = async {
        let id = sample_id(&id)?;
        let path: PathBuf = with_store(&state, move |state, store| {
            let (_, all) = entries(state, store)?;
            if !all.iter().any(|e| e.sample_id == id) {
                return Err(ApiError::not_found(format!(
                    "sample {id} is not under review"
                )));
            }
            let s =
                sample(store, id)?.ok_or_else(|| ApiError::not_found(format!("no sample {id}")))?;
            Ok(PathBuf::from(s.image_path))
        })
        .await?;
        let bytes = tokio::task::spawn_blocking(move || {
            std::fs::read(&path).map_err(|e| {
                ApiError::not_found(format!("sample {id}'s image {}: {e}", path.display()))
            })
        })
        .await
        .map_err(|_| ApiError::internal("the image task failed"))??;
        let mime = image::guess_format(&bytes)
            .map(|f| f.to_mime_type())
            .unwrap_or("application/octet-stream");
        Ok::<_, ApiError>(
            (
                [
                    (CONTENT_TYPE, mime),
                    (CACHE_CONTROL, "private, max-age=300"),
                ],
                bytes,
            )
                .into_response(),
        )
    }
    .await;
    let response = result.unwrap_or_else(IntoResponse::into_response);
    counted(&state, "/review/image", response)
}

/// `POST /review/{id}`: a person's label for a sample, stored as its verified label.
pub(crate) async fn answer(
    State(state): State<AppState>,
    Path(id): Path<String>,
    body: Bytes,
) -> Response {
    let result = async {
        let id = sample_id(&id)?;
        let value: Value = serde_json::from_slice(&body).map_err(|e| {
            ApiError::bad_request(format!("expected JSON {{\"label\": NAME or INDEX}}: {e}"))
        })?;
        let label = match &value {
            Value::Object(o) => label_of(o.get("label"))?,
            _ => return Err(ApiError::bad_request("expected {\"label\": NAME or INDEX}")),
        };
        with_store(&state, move |_, store| {
            let classes = store.classes()?;
            let index = match label {
                Label::Index(i) if i >= 0 && (i as u64) < classes.len() as u64 => i,
                Label::Index(i) => {
                    return Err(ApiError::unprocessable(format!(
                        "label {i} is out of range: the store has {} classes (0 to {})",
                        classes.len(),
                        classes.len().saturating_sub(1)
                    )))
                }
                Label::Name(n) => match classes.iter().position(|c| *c == n) {
                    Some(i) => i as i64,
                    None => {
                        return Err(ApiError::unprocessable(format!(
                            "label {n:?} is not a class of the store ({})",
                            classes.join(", ")
                        )))
                    }
                },
            };
            if !store.set_verified_label(id, index)? {
                return Err(ApiError::not_found(format!("no sample {id} in the store")));
            }
            Ok(json!({
                "status": "verified",
                "id": id,
                "label": index,
                "class": classes[index as usize],
            }))
        })
        .await
    }
    .await;
    let response = match result {
        Ok(body) => (StatusCode::OK, Json(body)).into_response(),
        Err(e) => e.into_response(),
    };
    counted(&state, "/review/answer", response)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paging_reads_the_query_and_checks_bounds() {
        assert_eq!(paging(None).unwrap(), (1, PER_PAGE));
        assert_eq!(paging(Some("page=3&per_page=10&x=1")).unwrap(), (3, 10));
        assert!(paging(Some("page=0"))
            .unwrap_err()
            .message
            .contains("starts at 1"));
        assert!(paging(Some("page=x"))
            .unwrap_err()
            .message
            .contains("page=\"x\""));
        assert!(paging(Some("per_page=201")).is_err());
        assert!(paging(Some("per_page=0")).is_err());
    }

    #[test]
    fn pages_round_up() {
        let l = |total| Listing {
            origin: String::new(),
            classes: Vec::new(),
            total,
            page: 1,
            per_page: 10,
            cards: Vec::new(),
        };
        assert_eq!(l(0).pages(), 1);
        assert_eq!(l(10).pages(), 1);
        assert_eq!(l(11).pages(), 2);
    }
}
