//! `/metrics` in Prometheus' text format: HTTP requests by route and status, the scheduler's
//! queue and batch, KV blocks, prefix-cache hit rate, token counters and latency histograms.

use crate::AppState;
use axum::extract::State;
use axum::http::header;
use axum::response::IntoResponse;
use camelid_engine::scheduler::{Histogram, LATENCY_BUCKETS};
use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::Arc;
use std::time::Instant;

#[derive(Default)]
pub struct HttpMetrics {
    requests: BTreeMap<(&'static str, u16), u64>,
    /// Generated-token count at the previous scrape, for the tokens/s gauge.
    last: Option<(Instant, u64)>,
}

impl HttpMetrics {
    pub fn count(&mut self, route: &'static str, status: u16) {
        *self.requests.entry((route, status)).or_default() += 1;
    }
}

fn histogram(out: &mut String, name: &str, help: &str, h: &Histogram) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
    let mut acc = 0;
    for (i, b) in LATENCY_BUCKETS.iter().enumerate() {
        acc += h.counts.get(i).copied().unwrap_or(0);
        let _ = writeln!(out, "{name}_bucket{{le=\"{b}\"}} {acc}");
    }
    let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {}", h.count);
    let _ = writeln!(out, "{name}_sum {}", h.sum);
    let _ = writeln!(out, "{name}_count {}", h.count);
}

fn metric(out: &mut String, name: &str, kind: &str, help: &str, value: impl std::fmt::Display) {
    let _ = writeln!(
        out,
        "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}"
    );
}

pub async fn metrics(State(state): State<Arc<AppState>>) -> impl IntoResponse {
    let s = state.handle.stats();
    let mut out = String::new();
    let (requests, rate) = match state.metrics.lock() {
        Ok(mut m) => {
            let now = Instant::now();
            let rate = match m.last {
                Some((t, n)) if now > t => {
                    s.generated_tokens.saturating_sub(n) as f64 / (now - t).as_secs_f64()
                }
                _ => 0.0,
            };
            m.last = Some((now, s.generated_tokens));
            (m.requests.clone(), rate)
        }
        Err(_) => (BTreeMap::new(), 0.0),
    };
    let _ = writeln!(
        out,
        "# HELP camelid_http_requests_total HTTP requests by route and status.\n# TYPE camelid_http_requests_total counter"
    );
    for ((route, status), n) in requests {
        let _ = writeln!(
            out,
            "camelid_http_requests_total{{route=\"{route}\",status=\"{status}\"}} {n}"
        );
    }
    metric(
        &mut out,
        "camelid_queue_depth",
        "gauge",
        "Sequences waiting for admission.",
        s.waiting,
    );
    metric(
        &mut out,
        "camelid_running_sequences",
        "gauge",
        "Sequences in the running batch.",
        s.running,
    );
    metric(
        &mut out,
        "camelid_kv_blocks_total",
        "gauge",
        "KV cache blocks in the pool.",
        s.pool.total,
    );
    metric(
        &mut out,
        "camelid_kv_blocks_used",
        "gauge",
        "KV blocks held by sequences.",
        s.pool.used,
    );
    metric(
        &mut out,
        "camelid_kv_blocks_free",
        "gauge",
        "KV blocks not held (free or cached).",
        s.pool.total - s.pool.used,
    );
    metric(
        &mut out,
        "camelid_kv_blocks_cached",
        "gauge",
        "Unheld KV blocks kept for prefix reuse.",
        s.pool.cached_free,
    );
    metric(
        &mut out,
        "camelid_kv_block_size",
        "gauge",
        "Positions per KV block.",
        s.block_size,
    );
    metric(
        &mut out,
        "camelid_prefix_cache_queried_tokens_total",
        "counter",
        "Prompt tokens looked up in the prefix cache.",
        s.prefix_queried_tokens,
    );
    metric(
        &mut out,
        "camelid_prefix_cache_hit_tokens_total",
        "counter",
        "Prompt tokens whose KV came from the prefix cache.",
        s.prefix_hit_tokens,
    );
    let hit_rate = if s.prefix_queried_tokens > 0 {
        s.prefix_hit_tokens as f64 / s.prefix_queried_tokens as f64
    } else {
        0.0
    };
    metric(
        &mut out,
        "camelid_prefix_cache_hit_rate",
        "gauge",
        "Hit tokens over queried tokens.",
        hit_rate,
    );
    metric(
        &mut out,
        "camelid_kv_evictions_total",
        "counter",
        "Cached KV blocks evicted.",
        s.pool.evictions,
    );
    metric(
        &mut out,
        "camelid_preemptions_total",
        "counter",
        "Sequences preempted (recomputed later).",
        s.preemptions,
    );
    metric(
        &mut out,
        "camelid_prompt_tokens_total",
        "counter",
        "Prompt tokens admitted.",
        s.prompt_tokens,
    );
    metric(
        &mut out,
        "camelid_generation_tokens_total",
        "counter",
        "Tokens sampled.",
        s.generated_tokens,
    );
    metric(
        &mut out,
        "camelid_generation_tokens_per_second",
        "gauge",
        "Tokens sampled per second since the previous scrape.",
        rate,
    );
    metric(
        &mut out,
        "camelid_sequences_finished_total",
        "counter",
        "Sequences that ran to an end.",
        s.finished,
    );
    metric(
        &mut out,
        "camelid_sequences_cancelled_total",
        "counter",
        "Sequences cancelled (client gone).",
        s.cancelled,
    );
    metric(
        &mut out,
        "camelid_scheduler_steps_total",
        "counter",
        "Scheduler steps.",
        s.steps,
    );
    histogram(
        &mut out,
        "camelid_time_to_first_token_seconds",
        "From submission to the first sampled token.",
        &s.time_to_first_token,
    );
    histogram(
        &mut out,
        "camelid_inter_token_latency_seconds",
        "Between consecutive tokens of a sequence.",
        &s.inter_token_latency,
    );
    if let Ok(mut m) = state.metrics.lock() {
        m.count("/metrics", 200);
    }
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], out)
}
