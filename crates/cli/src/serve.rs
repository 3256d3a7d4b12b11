//! `camelid serve`: the OpenAI-compatible HTTP server (crates/server) on a loaded model.

use crate::{resolve, ModelArgs};
use anyhow::{bail, Context, Result};
use camelid_engine::scheduler::SchedulerConfig;
use camelid_model::catalog;
use clap::Args;
use std::sync::Arc;

#[derive(Args, Clone)]
pub struct ServeArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Address to listen on
    #[arg(long, default_value = "127.0.0.1", value_name = "HOST")]
    pub host: String,
    /// Port to listen on (0: any free port, printed at start)
    #[arg(long, default_value_t = 8080, value_name = "PORT")]
    pub port: u16,
    /// Memory for the paged KV cache, e.g. 512MiB, 2GiB or bytes
    #[arg(long, default_value = "1GiB", value_name = "SIZE")]
    pub kv_memory: String,
    /// Positions per KV cache block
    #[arg(long, default_value_t = 16, value_name = "N")]
    pub block_size: usize,
    /// Sequences decoded together at most
    #[arg(long, default_value_t = 64, value_name = "N")]
    pub max_running: usize,
    /// Sequences waiting for a slot before requests get 429
    #[arg(long, default_value_t = 256, value_name = "N")]
    pub max_queue: usize,
    /// Tokens per forward pass at most (decode rows plus prompt chunks)
    #[arg(long, default_value_t = 512, value_name = "N")]
    pub max_step_tokens: usize,
    /// Largest `n` (choices per request)
    #[arg(long, default_value_t = 16, value_name = "N")]
    pub max_n: usize,
    /// Model name clients pass as `model` (default: the -m value's name)
    #[arg(long, value_name = "NAME")]
    pub served_model_name: Option<String>,
    /// Require `Authorization: Bearer KEY` on every /v1/ request (default: $CAMELID_API_KEY,
    /// which keeps the key out of the process list; unset, the API is open)
    #[arg(long, value_name = "KEY")]
    pub api_key: Option<String>,
}

/// `512MiB`, `2GiB`, `1.5GB`, `4096` (bytes).
pub fn parse_size(s: &str) -> Result<usize> {
    let t = s.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: f64 = num
        .parse()
        .with_context(|| format!("--kv-memory {s}: expected a size such as 512MiB or 2GiB"))?;
    let mult = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1.0,
        "k" | "kb" => 1e3,
        "kib" => 1024.0,
        "m" | "mb" => 1e6,
        "mib" => 1024.0 * 1024.0,
        "g" | "gb" => 1e9,
        "gib" => 1024.0 * 1024.0 * 1024.0,
        other => {
            bail!("--kv-memory {s}: unknown unit `{other}` (use B, KiB, MiB, GiB, KB, MB, GB)")
        }
    };
    let bytes = n * mult;
    if bytes.is_nan() || bytes < 1.0 {
        bail!("--kv-memory {s}: must be positive");
    }
    Ok(bytes as usize)
}

pub fn serve(args: &ServeArgs) -> Result<()> {
    let kv_memory = parse_size(&args.kv_memory)?;
    for (name, v) in [
        ("--block-size", args.block_size),
        ("--max-running", args.max_running),
        ("--max-queue", args.max_queue),
        ("--max-step-tokens", args.max_step_tokens),
        ("--max-n", args.max_n),
    ] {
        if v == 0 {
            bail!("{name} must be at least 1");
        }
    }
    let api_key = args
        .api_key
        .clone()
        .or_else(|| std::env::var("CAMELID_API_KEY").ok())
        .filter(|k| !k.is_empty());
    let model = Arc::new(resolve::load(&args.model)?);
    let model_id = args.served_model_name.clone().unwrap_or_else(|| {
        let m = args
            .model
            .model
            .as_deref()
            .unwrap_or(catalog::DEFAULT_MODEL);
        std::path::Path::new(m)
            .file_name()
            .map(|f| f.to_string_lossy().into_owned())
            .unwrap_or_else(|| m.to_string())
    });
    let config = camelid_server::ServerConfig {
        model_id: model_id.clone(),
        scheduler: SchedulerConfig {
            kv_memory,
            block_size: args.block_size,
            max_running: args.max_running,
            max_step_tokens: args.max_step_tokens.max(args.max_running),
            max_waiting: args.max_queue,
        },
        max_n: args.max_n,
        api_key: api_key.clone(),
    };
    let guarded = if api_key.is_some() {
        ", API key required"
    } else {
        ""
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(async move {
        let addr = format!("{}:{}", args.host, args.port);
        let listener = tokio::net::TcpListener::bind(&addr)
            .await
            .with_context(|| format!("cannot listen on {addr}"))?;
        let local = listener.local_addr()?;
        eprintln!(
            "camelid: serving {model_id} on http://{local}/v1{guarded}, chat page http://{local}/ (Ctrl-C or SIGTERM to stop)"
        );
        camelid_server::serve(listener, model, config, camelid_server::shutdown_signal())
            .await
            .context("server")?;
        eprintln!("camelid: stopped");
        Ok(())
    })
}
