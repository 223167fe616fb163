//! The prediction server (`bccp serve`, and `bccp up` while it re-trains): axum on tokio.
//!
//! * `POST /predict` — the reference's `{"image_path": …}` (confined to `--image-root`), a JSON
//!   batch, a multipart upload or raw `image/*` bytes → `{target, class, probability, top_k,
//!   model, version}` ([`predict`]).
//! * `POST /samples` — a user's label feedback, into the data store as a training candidate
//!   of the next retrain cycle ([`samples`]).
//! * `GET /healthz`, `/readyz`, `/model`, `/metrics` (Prometheus text), `POST /admin/reload`.
//! * `GET /dashboard` — a self-refreshing page with inline SVG charts ([`dashboard`]).
//! * `GET /review` — the flagged samples of the latest retrain cycle (or of an audit) as a
//!   gallery; `POST /review/{id}` stores a person's verified label ([`review`]).
//!
//! Requests are decoded in parallel off the async runtime and gathered into backbone batches
//! by one thread ([`batcher`]); the followed alias is polled and a new version is loaded and
//! self-tested off the request path, then swapped in atomically ([`reload`]); predictions go
//! to the store through one writer thread behind a bounded queue ([`predlog`]). Writes need a
//! bearer token, which is mandatory off loopback ([`auth`]). With `--kafka` (feature `kafka`)
//! every prediction is also published to a topic, behind its own bounded queue ([`kafkalog`]). Errors are JSON with one status
//! code per kind ([`error::ApiError`]).

mod auth;
mod batcher;
pub mod config;
mod dashboard;
pub mod error;
mod input;
mod kafkalog;
mod metrics;
pub mod model;
mod predict;
mod predlog;
pub mod reload;
mod review;
mod samples;
mod server;
mod state;
mod status;

pub use auth::Token;
pub use config::{KafkaTarget, ServeConfig, MIN_TOKEN_LEN};
pub use error::{ApiError, ServeError};
pub use model::ModelInfo;
pub use reload::ReloadOutcome;
pub use server::{start, Server};
