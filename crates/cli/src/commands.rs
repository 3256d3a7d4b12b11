//! One function per subcommand.

use crate::resolve;
use crate::{ModelArgs, SamplingArgs};
use anyhow::{bail, Context, Result};
use camelid_engine::bench;
use camelid_engine::generate::{all_logits, generate, GenerateOptions, Generation};
use camelid_engine::SamplingParams;
use camelid_model::catalog;
use camelid_model::Model;
use std::io::{Read, Write};
use std::path::Path;

pub(crate) fn options(s: &SamplingArgs) -> GenerateOptions {
    GenerateOptions {
        max_tokens: s.max_tokens,
        sampling: SamplingParams {
            temperature: s.temperature,
            top_k: s.top_k,
            top_p: s.top_p,
            min_p: s.min_p,
            repeat_penalty: s.repeat_penalty,
            repeat_last_n: 64,
            presence_penalty: s.presence_penalty,
            frequency_penalty: s.frequency_penalty,
            seed: s.seed,
        },
        stop: s.stop.clone(),
        stop_at_eos: !s.ignore_eos,
    }
}

pub(crate) fn read_text(source: &str, bytes: Vec<u8>) -> Result<String> {
    String::from_utf8(bytes).map_err(|e| {
        anyhow::anyhow!(
            "{source}: not valid UTF-8 text (invalid byte at offset {})",
            e.utf8_error().valid_up_to()
        )
    })
}

fn read_stdin() -> Result<String> {
    let mut buf = Vec::new();
    std::io::stdin()
        .read_to_end(&mut buf)
        .context("reading stdin")?;
    read_text("stdin", buf)
}

fn parse_ids(list: &str) -> Result<Vec<u32>> {
    list.split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| {
            s.parse::<u32>()
                .map_err(|_| anyhow::anyhow!("--ids: \"{s}\" is not a token id (expected comma-separated non-negative integers)"))
        })
        .collect()
}

/// Writes one line to stdout; a reader that went away (`| head`) is not an error.
pub(crate) fn emit(line: &str) -> Result<()> {
    let mut out = std::io::stdout().lock();
    match writeln!(out, "{line}").and_then(|_| out.flush()) {
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        r => Ok(r?),
    }
}

pub(crate) fn print_stats(g: &Generation) {
    let pp = g.prompt_tokens as f64 / g.prefill_time.as_secs_f64().max(1e-9);
    let tg = g.tokens.len() as f64 / g.decode_time.as_secs_f64().max(1e-9);
    eprintln!(
        "\n[prompt: {} tokens, {:.1} tok/s | generated: {} tokens, {:.1} tok/s | finish: {:?}]",
        g.prompt_tokens,
        pp,
        g.tokens.len(),
        tg,
        g.finish
    );
}

fn stream_to_stdout(model: &Model, prompt: &[u32], opts: &GenerateOptions) -> Result<Generation> {
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    let g = generate(model, prompt, opts, &mut |text| {
        // A closed pipe (e.g. `| head`) ends generation quietly.
        out.write_all(text.as_bytes()).is_ok() && out.flush().is_ok()
    })?;
    Ok(g)
}

pub fn run(
    margs: &ModelArgs,
    sargs: &SamplingArgs,
    beam: &crate::beams::BeamArgs,
    file: Option<&Path>,
    prompt: Option<String>,
) -> Result<()> {
    let prompt = match (prompt, file) {
        (Some(p), _) => p,
        (None, Some(f)) => {
            let bytes = std::fs::read(f).with_context(|| format!("{}", f.display()))?;
            read_text(&f.display().to_string(), bytes)?
        }
        (None, None) => read_stdin()?,
    };
    let model = resolve::load(margs)?;
    let tok = model.tokenizer()?;
    let ids = tok.encode(&prompt, true)?;
    if beam.enabled() {
        return crate::beams::run(&model, &ids, beam, sargs.max_tokens);
    }
    let opts = options(sargs);
    let g = stream_to_stdout(&model, &ids, &opts)?;
    emit("")?;
    if sargs.stats {
        print_stats(&g);
    }
    Ok(())
}

pub fn logits(margs: &ModelArgs, ids: &str, decoder_ids: Option<&str>) -> Result<()> {
    let ids = parse_ids(ids)?;
    if ids.is_empty() {
        bail!("--ids: no token ids given");
    }
    let model = resolve::load(margs)?;
    if let Some(list) = decoder_ids {
        let dec = parse_ids(list).map_err(|e| {
            anyhow::anyhow!("{}", e.to_string().replacen("--ids", "--decoder-ids", 1))
        })?;
        if dec.is_empty() {
            bail!("--decoder-ids: no token ids given");
        }
        let rows = camelid_engine::seq2seq::decoder_logits(&model, &ids, &dec)?;
        let out = serde_json::json!({ "ids": ids, "decoder_ids": dec, "logits": rows });
        return emit(&out.to_string());
    }
    if model.is_encoder_decoder() {
        bail!("{} is an encoder-decoder model: give the decoder's ids with --decoder-ids (its first is usually the decoder start id {})", model.name, model.decoder_start_id.unwrap_or(0));
    }
    let rows = all_logits(&model, &ids)?;
    let out = serde_json::json!({ "ids": ids, "logits": rows });
    emit(&out.to_string())
}

pub fn tokenize(
    margs: &ModelArgs,
    add_special: bool,
    decode: Option<&str>,
    text: Option<String>,
) -> Result<()> {
    if let Some(list) = decode {
        let ids = parse_ids(list)?;
        let model = resolve::load(margs)?;
        let tok = model.tokenizer()?;
        let vocab = tok.vocab_size() as u32;
        if let Some(bad) = ids.iter().find(|&&i| i >= vocab) {
            bail!("--decode: token id {bad} is outside the vocabulary (size {vocab})");
        }
        return emit(&tok.decode(&ids, false)?);
    }
    let text = match text {
        Some(t) => t,
        None => read_stdin()?,
    };
    let model = resolve::load(margs)?;
    let ids = model.tokenizer()?.encode(&text, add_special)?;
    emit(&serde_json::json!({ "ids": ids }).to_string())
}

pub fn embed(margs: &ModelArgs, texts: Vec<String>) -> Result<()> {
    let texts = if texts.is_empty() {
        read_stdin()?
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(str::to_string)
            .collect()
    } else {
        texts
    };
    if texts.is_empty() {
        bail!("nothing to embed: give texts as arguments or one per line on stdin");
    }
    let model = resolve::load(margs)?;
    let mut vectors = Vec::with_capacity(texts.len());
    for (i, t) in texts.iter().enumerate() {
        let e = camelid_engine::embed::embed_text(&model, t)?;
        if let Some(n) = e.truncated_from {
            eprintln!(
                "camelid: text {}: {n} tokens cut to the model's max_seq_length of {}",
                i + 1,
                model.pooling.max_tokens.unwrap_or(0)
            );
        }
        vectors.push(e.vector);
    }
    emit(&serde_json::json!({ "model": model.name, "embeddings": vectors }).to_string())
}

pub fn pull(name: &str) -> Result<()> {
    let Some(entry) = catalog::find(name) else {
        bail!("{name}: not in the catalog (see `camelid list`)");
    };
    let path = catalog::pull(entry, &mut |line| eprintln!("camelid: {line}"))?;
    emit(&format!("{}", path.display()))?;
    Ok(())
}

pub fn list() -> Result<()> {
    emit(&format!("{:<24} {:<10} DESCRIPTION", "NAME", "STATUS"))?;
    for e in catalog::CATALOG {
        let status = if catalog::is_pulled(e) { "pulled" } else { "-" };
        let default = if e.name == catalog::DEFAULT_MODEL {
            " (default)"
        } else {
            ""
        };
        emit(&format!(
            "{:<24} {:<10} {}{}",
            e.name, status, e.description, default
        ))?;
    }
    emit(&format!(
        "\nModels are cached in {}",
        catalog::home().display()
    ))?;
    Ok(())
}

pub fn presets() -> Result<()> {
    emit(&format!(
        "{:<18} {:<26} {:>12} {:>11} {:>7}  SOURCE",
        "NAME", "DESIGN", "COMPUTED", "PUBLISHED", "DIFF"
    ))?;
    for p in camelid_model::presets::PRESETS {
        let billions = (p.build)().parameter_count() as f64 / 1e9;
        emit(&format!(
            "{:<18} {:<26} {:>11.2}B {:>10}B {:>+6.2}%  {}",
            p.name,
            p.title,
            billions,
            p.published_billions,
            (billions / p.published_billions - 1.0) * 100.0,
            p.source
        ))?;
    }
    Ok(())
}

/// Bytes of weights on disk: the GGUF file, or a directory's safetensors shards.
/// The weight type that holds most of the bytes (GGUF: per tensor type; HF: `torch_dtype`).
fn weight_type(path: &Path) -> String {
    if path.is_dir() {
        return std::fs::read_to_string(path.join("config.json"))
            .ok()
            .and_then(|s| serde_json::from_str::<serde_json::Value>(&s).ok())
            .and_then(|c| c.get("torch_dtype")?.as_str().map(str::to_string))
            .unwrap_or_else(|| "-".into());
    }
    let Ok(mut file) = std::fs::File::open(path) else {
        return "-".into();
    };
    let Ok(content) = candle_core::quantized::gguf_file::Content::read(&mut file) else {
        return "-".into();
    };
    let mut bytes: Vec<(String, usize)> = Vec::new();
    for info in content.tensor_infos.values() {
        let dtype = info.ggml_dtype;
        let n = info.shape.elem_count() / dtype.block_size() * dtype.type_size();
        let name = format!("{dtype:?}");
        match bytes.iter_mut().find(|(t, _)| *t == name) {
            Some((_, b)) => *b += n,
            None => bytes.push((name, n)),
        }
    }
    bytes
        .into_iter()
        .max_by_key(|(_, b)| *b)
        .map_or_else(|| "-".into(), |(t, _)| t)
}

fn weight_bytes(path: &Path) -> u64 {
    let len = |p: &Path| std::fs::metadata(p).map(|m| m.len()).unwrap_or(0);
    if !path.is_dir() {
        return len(path);
    }
    std::fs::read_dir(path)
        .map(|entries| {
            entries
                .flatten()
                .map(|e| e.path())
                .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
                .map(|p| len(&p))
                .sum()
        })
        .unwrap_or(0)
}

pub fn bench(margs: &ModelArgs, pp: usize, tg: usize, reps: usize, json: bool) -> Result<()> {
    if reps == 0 {
        bail!("--reps must be at least 1");
    }
    if pp == 0 && tg == 0 {
        bail!("nothing to measure: -p and -n are both 0");
    }
    let model = resolve::load(margs)?;
    let mut results = Vec::new();
    if pp > 0 {
        results.push(bench::prompt_processing(&model, pp, reps)?);
    }
    if tg > 0 {
        results.push(bench::text_generation(&model, tg, reps)?);
    }
    if json {
        return emit(&serde_json::to_string(&results)?);
    }
    let size = weight_bytes(&model.path) as f64 / (1u64 << 20) as f64;
    let params = model.spec().parameter_count() as f64 / 1e6;
    emit(
        "| model | size | params | type | backend | threads | test | t/s |\n| --- | ---: | ---: | --- | --- | ---: | --- | ---: |",
    )?;
    let wtype = weight_type(&model.path);
    for r in &results {
        emit(&format!(
            "| {} | {:.2} MiB | {:.2} M | {} | {} | {} | {} | {:.2} ± {:.2} |",
            model.name,
            size,
            params,
            wtype,
            crate::device::backend(model.transformer.device()),
            resolve::threads_in_use(),
            r.test,
            r.tokens_per_s,
            r.stddev
        ))?;
    }
    Ok(())
}
