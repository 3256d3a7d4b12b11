//! `camelid quantize` and `camelid perplexity`.

use crate::commands::emit;
use crate::interrupt::{self, INTERRUPTED};
use crate::resolve;
use crate::ModelArgs;
use anyhow::{bail, Context, Result};
use camelid_engine::perplexity::{perplexity as run_perplexity, Method};
use camelid_quant::{quantize as run_quantize, types, Event, QuantizeError, QuantizeOptions};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use std::path::Path;

fn bar(len: u64, template: &str) -> ProgressBar {
    let pb = ProgressBar::new(len);
    pb.set_draw_target(ProgressDrawTarget::stderr());
    if let Ok(style) = ProgressStyle::with_template(template) {
        pb.set_style(style.progress_chars("=> "));
    }
    pb
}

pub fn quantize(
    model: Option<&str>,
    to: &str,
    output: &Path,
    keep_output: bool,
    keep_embeddings: bool,
) -> Result<()> {
    let (to, mix) = types::parse_target(to).map_err(|e| anyhow::anyhow!("--to: {e}"))?;
    let input = resolve::model_path(model)?;
    let opts = QuantizeOptions {
        to,
        keep_output,
        keep_embeddings,
        mix,
    };
    // Ctrl-C stops the quantizer at the next tensor; it then removes its partial file.
    interrupt::catch();
    let pb = bar(0, "{bar:30} {pos}/{len} tensors  {msg}");
    let result = run_quantize(&input, output, &opts, &INTERRUPTED, &mut |e| match e {
        Event::Start { tensors } => pb.set_length(tensors as u64),
        Event::Tensor { index, name, dtype } => {
            pb.set_position(index as u64);
            pb.set_message(format!("{name} → {}", types::name(dtype)));
        }
        Event::Note(n) => pb.suspend(|| eprintln!("camelid: {n}")),
    });
    pb.finish_and_clear();
    let report = match result {
        Ok(r) => r,
        Err(QuantizeError::Cancelled) => {
            eprintln!("camelid: interrupted; {} was not written", output.display());
            std::process::exit(130);
        }
        Err(e) => return Err(e).with_context(|| format!("quantizing {}", input.display())),
    };
    for n in report.notes.iter().filter(|n| !n.contains("written as")) {
        eprintln!("camelid: {n}");
    }
    let mut counts: Vec<(&str, usize)> = Vec::new();
    for t in &report.tensors {
        let name = types::name(t.dtype);
        match counts.iter_mut().find(|(n, _)| *n == name) {
            Some(c) => c.1 += 1,
            None => counts.push((name, 1)),
        }
    }
    let summary: Vec<String> = counts.iter().map(|(n, c)| format!("{c} {n}")).collect();
    emit(&format!(
        "wrote {} ({:.1} MiB; tensors: {})",
        report.output.display(),
        report.bytes as f64 / (1024.0 * 1024.0),
        summary.join(", ")
    ))?;
    Ok(())
}

pub fn perplexity(
    args: &ModelArgs,
    file: &Path,
    ctx: usize,
    stride: Option<usize>,
    chunks: Option<usize>,
    json: bool,
) -> Result<()> {
    let bytes = std::fs::read(file).with_context(|| format!("reading {}", file.display()))?;
    let text = String::from_utf8(bytes).map_err(|e| {
        anyhow::anyhow!(
            "{}: not valid UTF-8 text (invalid byte at offset {})",
            file.display(),
            e.utf8_error().valid_up_to()
        )
    })?;
    let model = resolve::load(args)?;
    let tok = model.tokenizer()?;
    let mut ids = tok.encode(&text, true)?;
    let method = match stride {
        Some(s) => Method::Sliding { stride: s },
        None => Method::LlamaCpp,
    };
    if let Some(c) = chunks {
        if c == 0 {
            bail!("--chunks must be at least 1");
        }
        // As llama-perplexity's --chunks: only the first N chunks of ctx tokens.
        if method == Method::LlamaCpp {
            ids.truncate((c * ctx).min(ids.len()));
        } else {
            ids.truncate(((c - 1) * stride.unwrap_or(ctx) + ctx).min(ids.len()));
        }
    }
    let bos = if tok.add_bos { tok.bos_id } else { None };
    let pb = bar(0, "{bar:30} {pos}/{len} windows  eta {eta}");
    let r = run_perplexity(&model, &ids, ctx, method, bos, &mut |done, total| {
        pb.set_length(total as u64);
        pb.set_position(done as u64);
    });
    pb.finish_and_clear();
    let r = r?;
    let method_name = match method {
        Method::LlamaCpp => "llama.cpp chunks".to_string(),
        Method::Sliding { stride } => format!("sliding window, stride {stride}"),
    };
    if json {
        emit(&format!(
            "{}",
            serde_json::json!({
                "ppl": r.ppl, "ppl_stderr": r.ppl_stderr, "mean_nll": r.mean_nll,
                "scored_tokens": r.scored, "windows": r.windows, "ctx": ctx,
                "method": method_name,
            })
        ))?;
    } else {
        emit(&format!(
            "perplexity: {:.4} +/- {:.5} ({} tokens scored in {} windows of {ctx}, {method_name})",
            r.ppl, r.ppl_stderr, r.scored, r.windows
        ))?;
    }
    Ok(())
}
