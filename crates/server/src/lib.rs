//! camelid's OpenAI-compatible HTTP server: `/v1/models`, `/v1/completions`,
//! `/v1/chat/completions`, `/v1/embeddings`, `/health` and `/metrics` (Prometheus text), and
//! a chat page at `/` (`webui.rs`).
//!
//! It owns HTTP, request validation, the OpenAI JSON shapes, server-sent-event streaming,
//! `response_format` (turned into the engine's JSON-schema constraint) and function calling
//! (`tools.rs`).
//! Generation is the engine's continuous-batching scheduler (`camelid_engine::scheduler`),
//! reached through a [`SchedulerHandle`]: each choice of a request is one sequence whose
//! events come back over a channel. The server holds no model logic and no KV cache; when a
//! client goes away its channel closes, which cancels the sequence in the engine.

mod error;
mod metrics;
mod openai;
mod request;
mod tools;
mod webui;

pub use error::ApiError;

use axum::routing::{get, post};
use axum::Router;
use camelid_engine::scheduler::{self, SchedulerConfig, SchedulerHandle};
use camelid_model::Model;
use std::future::Future;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// The name clients pass as `model`.
    pub model_id: String,
    pub scheduler: SchedulerConfig,
    /// The largest `n` (choices per request) accepted.
    pub max_n: usize,
    /// When set, every `/v1/` request must carry `Authorization: Bearer <key>`; the chat page,
    /// `/health` and `/metrics` stay open.
    pub api_key: Option<String>,
}

pub(crate) struct AppState {
    pub model: Arc<Model>,
    pub handle: SchedulerHandle,
    pub model_id: String,
    pub created: u64,
    pub max_n: usize,
    pub api_key: Option<String>,
    pub next_id: AtomicU64,
    pub metrics: Mutex<metrics::HttpMetrics>,
}

impl AppState {
    pub fn context(&self) -> usize {
        self.model.spec().batched_positions()
    }
}

pub(crate) fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Serves `model` on `listener` until `shutdown` resolves; then refuses new requests (503),
/// lets queued and running ones finish, and returns once the scheduler has stopped.
pub async fn serve(
    listener: tokio::net::TcpListener,
    model: Arc<Model>,
    config: ServerConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let (handle, thread) = scheduler::start(model.clone(), config.scheduler.clone());
    let state = Arc::new(AppState {
        model,
        handle: handle.clone(),
        model_id: config.model_id.clone(),
        created: unix_now(),
        max_n: config.max_n,
        api_key: config.api_key.clone(),
        next_id: AtomicU64::new(1),
        metrics: Mutex::new(metrics::HttpMetrics::default()),
    });
    let app = router(state);
    let drain = async move {
        shutdown.await;
        handle.shutdown();
        // Keep answering (503 to new work) until every accepted sequence has finished.
        while !thread.is_finished() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    axum::serve(listener, app)
        .with_graceful_shutdown(drain)
        .await
}

/// The largest request body read; a larger one is answered 413 in OpenAI's error shape.
pub const MAX_BODY_BYTES: usize = 2 << 20;

fn router(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/", get(webui::index))
        .route("/style.css", get(webui::style))
        .route("/app.js", get(webui::script))
        .route("/v1/models", get(openai::models))
        .route("/v1/models/{*id}", get(openai::model))
        .route("/v1/completions", post(openai::completions))
        .route("/v1/chat/completions", post(openai::chat_completions))
        .route("/v1/embeddings", post(openai::embeddings))
        .route("/health", get(openai::health))
        .route("/metrics", get(metrics::metrics))
        .fallback(openai::fallback)
        .method_not_allowed_fallback(openai::method_not_allowed)
        .layer(axum::extract::DefaultBodyLimit::max(MAX_BODY_BYTES))
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            openai::require_api_key,
        ))
        .with_state(state)
}

/// Resolves on SIGTERM or Ctrl-C.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
}
