//! `camelid train`, `camelid tokenizer train` and `camelid data prepare`: argument handling,
//! progress bars and logs around the camelid-train crate.

use crate::commands::emit;
use anyhow::{anyhow, bail, Context, Result};
use camelid_model::tokenizer::Tokenizer;
use camelid_train::amp::Precision;
use camelid_train::arch::{self, Overrides};
use camelid_train::checkpoint::{self, TrainerState};
use camelid_train::corpus;
use camelid_train::data::TokenData;
use camelid_train::optim::Schedule;
use camelid_train::params::Params;
use camelid_train::trainer::{NonFiniteLoss, TrainOptions, Trainer};
use clap::{Args, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

#[derive(Args)]
pub struct TrainArgs {
    /// Token data: a shard from `camelid data prepare`, or a raw little-endian u32 file (.u32)
    #[arg(long, value_name = "FILE")]
    data: PathBuf,
    /// Validation shard (default: val.bin next to a train.bin --data)
    #[arg(long, value_name = "FILE")]
    val: Option<PathBuf>,
    /// tokenizer.json copied into the checkpoints (default: the one next to --data)
    #[arg(long, value_name = "FILE")]
    tokenizer: Option<PathBuf>,
    /// Output directory: the final model (HF layout), checkpoint/ and metrics.jsonl
    #[arg(long, value_name = "DIR")]
    out: PathBuf,
    /// Architecture preset (see `camelid presets`; also llama, gpt2, gpt-neox, bloom).
    /// With --resume, the preset and shape flags are ignored: the checkpoint has the shape
    #[arg(long, value_name = "NAME", conflicts_with = "init")]
    preset: Option<String>,
    /// Start from this HF checkpoint directory (continued pretraining, no re-initialization)
    #[arg(long, value_name = "DIR")]
    init: Option<PathBuf>,
    /// Continue from OUT/checkpoint (bit-exact on CPU; give the same optimizer flags)
    #[arg(long)]
    resume: bool,
    /// Number of blocks
    #[arg(long, value_name = "N")]
    layers: Option<usize>,
    /// Hidden (model) width
    #[arg(long, value_name = "N")]
    hidden: Option<usize>,
    /// Attention heads (head size = hidden / heads)
    #[arg(long, value_name = "N")]
    heads: Option<usize>,
    /// Key/value heads (GQA/MQA; default: as many as --heads where the preset has MHA)
    #[arg(long, value_name = "N")]
    kv_heads: Option<usize>,
    /// MLP inner size (default: the preset's ratio to the hidden size)
    #[arg(long, value_name = "N")]
    ffn: Option<usize>,
    /// Vocabulary size (default: the shard's, else the tokenizer's, else the largest token + 1)
    #[arg(long, value_name = "N")]
    vocab: Option<usize>,
    /// Context window of the model (default: the preset's)
    #[arg(long, value_name = "N")]
    context: Option<usize>,
    /// Tokens per row
    #[arg(long, default_value_t = 64, value_name = "N")]
    seq_len: usize,
    /// Rows per micro-batch
    #[arg(long, default_value_t = 12, value_name = "N")]
    batch: usize,
    /// Micro-batches summed into each update
    #[arg(long, default_value_t = 1, value_name = "N")]
    grad_accum: usize,
    /// Total updates (the schedule's length)
    #[arg(long, default_value_t = 2000, value_name = "N")]
    steps: u64,
    /// Stop after this many updates and save, to continue later with --resume
    #[arg(long, value_name = "N")]
    stop_at: Option<u64>,
    #[arg(long, default_value_t = 1e-3, value_name = "LR")]
    lr: f64,
    #[arg(long, default_value_t = 1e-4, value_name = "LR")]
    min_lr: f64,
    /// Linear warmup updates
    #[arg(long, default_value_t = 100, value_name = "N")]
    warmup: u64,
    /// constant, linear or cosine (to --min-lr at the last step)
    #[arg(long, default_value = "cosine", value_name = "KIND")]
    schedule: String,
    #[arg(long, default_value_t = 0.1, value_name = "X")]
    weight_decay: f64,
    /// Decay every parameter, not only 2-D weights
    #[arg(long)]
    decay_all: bool,
    #[arg(long, default_value_t = 0.9, value_name = "X")]
    beta1: f64,
    #[arg(long, default_value_t = 0.99, value_name = "X")]
    beta2: f64,
    #[arg(long, default_value_t = 1e-8, value_name = "X")]
    eps: f64,
    /// Clip gradients to this global L2 norm (0: off)
    #[arg(long, default_value_t = 1.0, value_name = "X")]
    clip: f64,
    /// Dropout probability (default: the checkpoint config's, 0 for presets)
    #[arg(long, value_name = "P")]
    dropout: Option<f64>,
    /// Type of the forward and backward matmuls: f32, bf16 or f16 (mixed precision: master
    /// weights, optimizer state and checkpoints stay f32; f16 uses a dynamic loss scale)
    #[arg(long, default_value = "f32", value_name = "TYPE")]
    dtype: String,
    /// Type of the weights in the final model written to OUT: f32, bf16 or f16 (OUT/checkpoint
    /// stays f32, to resume from)
    #[arg(long, default_value = "f32", value_name = "TYPE")]
    save_dtype: String,
    /// Take batches in file order: micro-batch i, row r starts at (i·batch + r)·(seq-len + 1)
    #[arg(long)]
    no_shuffle: bool,
    #[arg(long, default_value_t = 1337, value_name = "N")]
    seed: u64,
    /// Validation every N updates (0: only at the end)
    #[arg(long, default_value_t = 250, value_name = "N")]
    eval_every: u64,
    /// Batches per validation
    #[arg(long, default_value_t = 20, value_name = "N")]
    eval_batches: usize,
    /// Checkpoint every N updates (0: only at the end)
    #[arg(long, default_value_t = 500, value_name = "N")]
    save_every: u64,
    /// Print (and log) a sampled continuation of --sample-prompt every N updates (0: never)
    #[arg(long, default_value_t = 0, value_name = "N")]
    sample_every: u64,
    #[arg(long, default_value = "\n", value_name = "TEXT")]
    sample_prompt: String,
    #[arg(long, default_value_t = 64, value_name = "N")]
    sample_tokens: usize,
    /// Draw the loss curve (training and validation loss by step, from metrics.jsonl) to this
    /// PNG, redrawn at each validation and at the end
    #[arg(long, value_name = "FILE")]
    plot: Option<PathBuf>,
    /// Compute device (cpu, or cuda[:N] in a CUDA build)
    #[arg(long, default_value = "cpu", value_name = "DEVICE")]
    device: String,
    /// CPU threads (default: all cores; on a busy machine fewer can be much faster)
    #[arg(short, long, value_name = "N")]
    threads: Option<usize>,
}

#[derive(Subcommand)]
pub enum TokenizerCommand {
    /// Train a byte-level BPE tokenizer and write DIR/tokenizer.json
    Train {
        /// Vocabulary size (256 bytes + merges + <|endoftext|>)
        #[arg(long, value_name = "N")]
        vocab: usize,
        #[arg(short, long, value_name = "DIR")]
        out: PathBuf,
        /// Text files, or .jsonl files of {"text": ...} records
        #[arg(required = true)]
        files: Vec<PathBuf>,
    },
}

#[derive(Subcommand)]
pub enum DataCommand {
    /// Tokenize text / JSONL corpora into DIR/train.bin and DIR/val.bin token shards
    Prepare {
        /// tokenizer.json, or a directory holding one
        #[arg(long, value_name = "PATH")]
        tokenizer: PathBuf,
        #[arg(short, long, value_name = "DIR")]
        out: PathBuf,
        /// Share of the tokens (the last ones) kept for validation
        #[arg(long, default_value_t = 0.1, value_name = "X")]
        val_fraction: f64,
        /// Store u32 tokens even when the vocabulary fits u16
        #[arg(long)]
        u32: bool,
        /// Text files, or .jsonl files of {"text": ...} records
        #[arg(required = true)]
        files: Vec<PathBuf>,
    },
}

pub fn tokenizer(cmd: TokenizerCommand) -> Result<()> {
    match cmd {
        TokenizerCommand::Train { vocab, out, files } => {
            let spinner = ProgressBar::new_spinner();
            spinner.set_message(format!("training a {vocab}-token byte-level BPE"));
            spinner.enable_steady_tick(std::time::Duration::from_millis(120));
            let n = corpus::train_tokenizer(&files, vocab, &out)?;
            spinner.finish_and_clear();
            emit(&format!(
                "wrote {} ({n} tokens)",
                out.join("tokenizer.json").display()
            ))?;
            Ok(())
        }
    }
}

pub fn data(cmd: DataCommand) -> Result<()> {
    match cmd {
        DataCommand::Prepare {
            tokenizer,
            out,
            val_fraction,
            u32,
            files,
        } => {
            let bar = ProgressBar::new(0).with_style(
                ProgressStyle::with_template("tokenizing {bar:30} {pos}/{len} documents {eta}")
                    .map_err(|e| anyhow!("{e}"))?,
            );
            let width = if u32 { Some(4) } else { None };
            let p = corpus::prepare(
                &tokenizer,
                &files,
                &out,
                val_fraction,
                width,
                |done, total| {
                    bar.set_length(total as u64);
                    bar.set_position(done as u64);
                },
            )?;
            bar.finish_and_clear();
            emit(&format!(
                "wrote {} ({} tokens) and {} ({} tokens): u{} tokens, vocabulary {}",
                out.join("train.bin").display(),
                p.train_tokens,
                out.join("val.bin").display(),
                p.val_tokens,
                p.width * 8,
                p.vocab
            ))?;
            Ok(())
        }
    }
}

/// `MemAvailable` from /proc/meminfo (Linux), in bytes.
fn available_memory() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// A continuation of `prompt` from the current weights (inference mode, seeded sampling).
fn sample_text(
    params: &Params,
    tok: &Tokenizer,
    prompt: &str,
    n: usize,
    seed: u64,
) -> Result<String> {
    let model = params.transformer(Default::default())?;
    let ctx = params.spec.max_positions;
    let mut cache = camelid_engine::KvCache::new(params.spec.layers, ctx);
    let mut context = tok.encode(prompt, false)?;
    context.truncate(ctx.saturating_sub(1).max(1));
    if context.is_empty() {
        context.push(0);
    }
    let mut sampler = camelid_engine::Sampler::new(camelid_engine::SamplingParams {
        seed,
        ..Default::default()
    });
    let mut input = context.clone();
    let mut out = Vec::new();
    while out.len() < n && context.len() < ctx {
        let x = candle_core::Tensor::new(input.as_slice(), &params.device)?.unsqueeze(0)?;
        let mut logits = model
            .forward(&x, &mut cache, false)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        let next = sampler.sample(&mut logits, &context, out.len());
        context.push(next);
        out.push(next);
        input = vec![next];
    }
    Ok(tok.decode(&out, true)?)
}

fn sibling(data: &Path, name: &str) -> Option<PathBuf> {
    let p = data.parent().unwrap_or(Path::new(".")).join(name);
    p.exists().then_some(p)
}

/// Keeps freed memory in the process instead of returning it to the kernel after every
/// tensor: a training step allocates and frees thousands of activation buffers, and glibc's
/// defaults turn each into fresh zeroed pages (a third of the step time at small widths).
#[cfg(all(target_os = "linux", target_env = "gnu"))]
pub(crate) fn keep_freed_memory() {
    extern "C" {
        fn mallopt(param: i32, value: i32) -> i32;
    }
    const M_TRIM_THRESHOLD: i32 = -1;
    const M_MMAP_THRESHOLD: i32 = -3;
    // SAFETY: mallopt only changes allocator thresholds; called before training allocates.
    unsafe {
        mallopt(M_MMAP_THRESHOLD, 32 << 20);
        mallopt(M_TRIM_THRESHOLD, i32::MAX);
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
pub(crate) fn keep_freed_memory() {}

pub fn train(a: TrainArgs) -> Result<()> {
    crate::resolve::set_threads(a.threads)?;
    keep_freed_memory();
    let precision: Precision = a.dtype.parse()?;
    let save_dtype = match a.save_dtype.as_str() {
        "f32" => candle_core::DType::F32,
        "bf16" => candle_core::DType::BF16,
        "f16" => candle_core::DType::F16,
        other => bail!("unknown --save-dtype \"{other}\" (f32, bf16, f16)"),
    };
    let device = crate::resolve::device(&a.device)?;
    let data = TokenData::open(&a.data)?;
    let val_path = a.val.clone().or_else(|| {
        (a.data.file_name()? == "train.bin")
            .then(|| sibling(&a.data, "val.bin"))
            .flatten()
    });
    let val = val_path.as_deref().map(TokenData::open).transpose()?;
    let tokenizer = a
        .tokenizer
        .clone()
        .or_else(|| sibling(&a.data, "tokenizer.json"));
    let ckpt_dir = a.out.join("checkpoint");
    let overrides = Overrides {
        layers: a.layers,
        hidden: a.hidden,
        heads: a.heads,
        kv_heads: a.kv_heads,
        ffn: a.ffn,
        vocab: a.vocab,
        context: a.context,
    };
    let overridden = a
        .layers
        .or(a.hidden)
        .or(a.heads)
        .or(a.kv_heads)
        .or(a.ffn)
        .or(a.vocab)
        .or(a.context)
        .is_some();

    // The architecture, its checkpoint layout and the starting weights.
    let resume_from =
        if a.resume {
            Some(checkpoint::find_complete(&ckpt_dir).ok_or_else(|| {
                anyhow!("--resume: no complete checkpoint in {}", ckpt_dir.display())
            })?)
        } else {
            None
        };
    let (family, spec, config, params) =
        if let Some(dir) = resume_from.as_deref().or(a.init.as_deref()) {
            if overridden && !a.resume {
                bail!("shape overrides apply to --preset, not to an --init checkpoint");
            }
            let (family, spec, config) = arch::read_config(dir)?;
            let params = Params::load(dir, family, &spec, &device)?;
            (family, spec, config, params)
        } else {
            let preset = a.preset.as_deref().ok_or_else(|| {
                anyhow!("give --preset NAME (a new model), --init DIR or --resume")
            })?;
            let mut overrides = overrides;
            if overrides.vocab.is_none() {
                overrides.vocab = Some(match (&tokenizer, data.vocab) {
                    (_, Some(v)) => v,
                    (Some(t), None) => {
                        camelid_model::tokenizer::Tokenizer::from_hf_file(t)?.vocab_size()
                    }
                    (None, None) => data.max_token() as usize + 1,
                });
            }
            let spec = arch::preset_spec(preset, &overrides)?;
            let (family, config, spec) = arch::export_config(&spec, a.dropout.unwrap_or(0.0))?;
            let params = Params::init(&spec, a.seed, &device)?;
            (family, spec, config, params)
        };
    if a.seq_len > spec.max_positions {
        bail!(
            "--seq-len {} exceeds the model's context of {} positions (--context)",
            a.seq_len,
            spec.max_positions
        );
    }
    for (d, name) in [(Some(&data), "training"), (val.as_ref(), "validation")] {
        if let Some(d) = d {
            let max = d.max_token() as usize;
            if max >= spec.vocab_size {
                bail!(
                    "{} data {} holds token {max}, outside the model's vocabulary of {}",
                    name,
                    d.path.display(),
                    spec.vocab_size
                );
            }
        }
    }
    if let Some(avail) = available_memory() {
        camelid_train::params::check_memory(&spec, a.batch, a.seq_len, avail)?;
    }
    let opts = TrainOptions {
        seq_len: a.seq_len,
        batch: a.batch,
        grad_accum: a.grad_accum.max(1),
        steps: a.steps,
        lr: a.lr,
        min_lr: a.min_lr,
        warmup: a.warmup,
        schedule: a.schedule.parse::<Schedule>()?,
        weight_decay: a.weight_decay,
        decay_all: a.decay_all,
        beta1: a.beta1,
        beta2: a.beta2,
        eps: a.eps,
        clip: a.clip,
        dropout: a.dropout.unwrap_or_else(|| arch::config_dropout(&config)),
        shuffle: !a.no_shuffle,
        seed: a.seed,
        precision,
    };
    let mut trainer = match &resume_from {
        Some(dir) => {
            let (opt, state) = checkpoint::load_state(dir, &params)?;
            let same = |s: &TrainerState| (s.seq_len, s.batch, s.grad_accum, s.seed);
            if same(&state) != (opts.seq_len, opts.batch, opts.grad_accum, opts.seed) {
                bail!(
                    "--resume needs the same --seq-len, --batch, --grad-accum and --seed as the checkpoint ({}, {}, {}, {})",
                    state.seq_len, state.batch, state.grad_accum, state.seed
                );
            }
            if state.dtype != opts.precision {
                bail!(
                    "--resume needs the same --dtype as the checkpoint ({})",
                    state.dtype
                );
            }
            Trainer::with_state(params, opts, opt, state)
        }
        None => Trainer::new(params, opts),
    };
    std::fs::create_dir_all(&a.out)
        .with_context(|| format!("cannot create {}", a.out.display()))?;
    if let Some(dir) = a.plot.as_deref().and_then(Path::parent) {
        if !dir.as_os_str().is_empty() && !dir.is_dir() {
            bail!("--plot: directory {} does not exist", dir.display());
        }
    }
    let log_path = a.out.join("metrics.jsonl");
    let mut log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log_path)
        .with_context(|| format!("cannot open {}", log_path.display()))?;
    eprintln!(
        "training {} ({} parameters, {} layers, hidden {}) on {} tokens; logging to {}",
        family.name,
        trainer.params.count(),
        spec.layers,
        spec.hidden,
        data.len,
        log_path.display()
    );
    let bar = ProgressBar::new(a.steps).with_style(
        ProgressStyle::with_template(
            "{bar:30} {pos}/{len} {msg} [{elapsed_precise}<{eta_precise}]",
        )
        .map_err(|e| anyhow!("{e}"))?,
    );
    bar.set_position(trainer.state.step);
    let save = |t: &Trainer| {
        checkpoint::save(
            &ckpt_dir,
            &t.params,
            &t.opt,
            &t.state,
            family,
            &config,
            tokenizer.as_deref(),
        )
    };
    let evaluate = |t: &Trainer, log: &mut std::fs::File| -> Result<Option<f64>> {
        let Some(v) = &val else { return Ok(None) };
        let loss = t.evaluate(v, a.eval_batches)?;
        let rec =
            serde_json::json!({"step": t.state.step, "val_loss": loss, "val_ppl": loss.exp()});
        writeln!(log, "{rec}")?;
        Ok(Some(loss))
    };
    let sample_tokenizer = match (&tokenizer, a.sample_every) {
        (Some(t), n) if n > 0 => Some(Tokenizer::from_hf_file(t)?),
        (None, n) if n > 0 => bail!("--sample-every needs a tokenizer (--tokenizer FILE)"),
        _ => None,
    };
    let start = Instant::now();
    let start_tokens = trainer.state.tokens_seen;
    let mut last_val = None;
    let stop = a.stop_at.unwrap_or(a.steps).min(a.steps);
    // Ctrl-C ends the run after the current update, with a checkpoint to resume from.
    crate::interrupt::catch();
    while trainer.state.step < stop {
        let t0 = Instant::now();
        let r = match trainer.step(&data) {
            Ok(r) => r,
            Err(e) if e.downcast_ref::<NonFiniteLoss>().is_some() => {
                bar.abandon();
                let kept = checkpoint::find_complete(&ckpt_dir)
                    .map(|d| format!("the last good checkpoint is kept at {}", d.display()))
                    .unwrap_or_else(|| "no checkpoint was written before it".into());
                bail!("{e}; {kept}");
            }
            Err(e) => return Err(e),
        };
        let tps = (r.tokens - start_tokens) as f64 / start.elapsed().as_secs_f64();
        let rec = serde_json::json!({
            "step": r.step, "loss": r.loss, "lr": r.lr, "grad_norm": r.grad_norm,
            "tokens": r.tokens, "tokens_per_s": tps, "step_s": t0.elapsed().as_secs_f64(),
        });
        let mut rec = rec;
        if let Some(scale) = r.loss_scale {
            rec["loss_scale"] = serde_json::json!(scale);
        }
        if r.skipped {
            rec["skipped"] = serde_json::json!(true);
            rec["grad_norm"] = serde_json::Value::Null;
            bar.println(format!(
                "step {}: gradients overflowed in f16; update skipped, loss scale lowered to {}",
                r.step,
                r.loss_scale.unwrap_or(0.0)
            ));
        }
        writeln!(log, "{rec}")?;
        bar.set_position(r.step);
        let val_msg = last_val
            .map(|v: f64| format!(" val {v:.4}"))
            .unwrap_or_default();
        bar.set_message(format!(
            "loss {:.4}{val_msg} lr {:.2e} {:.0} tok/s",
            r.loss, r.lr, tps
        ));
        if a.eval_every > 0 && r.step % a.eval_every == 0 {
            last_val = evaluate(&trainer, &mut log)?.or(last_val);
            if let Some(p) = &a.plot {
                if let Err(e) = camelid_train::plot::render_log(&log_path, p) {
                    bar.println(format!("warning: loss curve not drawn: {e:#}"));
                }
            }
        }
        if a.sample_every > 0 && r.step % a.sample_every == 0 {
            if let Some(tok) = &sample_tokenizer {
                let text = sample_text(
                    &trainer.params,
                    tok,
                    &a.sample_prompt,
                    a.sample_tokens,
                    a.seed,
                )?;
                bar.println(format!("step {}: {}{}", r.step, a.sample_prompt, text));
                writeln!(
                    log,
                    "{}",
                    serde_json::json!({"step": r.step, "sample": text})
                )?;
            }
        }
        if a.save_every > 0 && r.step % a.save_every == 0 && r.step < stop {
            save(&trainer)?;
        }
        if crate::interrupt::take() && trainer.state.step < stop {
            bar.abandon();
            save(&trainer)?;
            eprintln!(
                "camelid: interrupted after step {}; checkpoint saved in {} (continue with --resume)",
                trainer.state.step,
                ckpt_dir.display()
            );
            std::process::exit(130);
        }
    }
    bar.finish();
    let final_val = if a.eval_every == 0 || trainer.state.step % a.eval_every != 0 {
        evaluate(&trainer, &mut log)?
    } else {
        last_val
    };
    save(&trainer)?;
    checkpoint::write_model_as(
        &a.out,
        &trainer.params,
        family,
        &config,
        tokenizer.as_deref(),
        save_dtype,
    )?;
    if let Some(p) = &a.plot {
        camelid_train::plot::render_log(&log_path, p)
            .with_context(|| format!("cannot draw the loss curve to {}", p.display()))?;
    }
    let last = trainer
        .state
        .last_loss
        .map(|l| format!("{l:.4}"))
        .unwrap_or("-".into());
    let val_text = final_val
        .map(|v| format!(", validation loss {v:.4} (perplexity {:.2})", v.exp()))
        .unwrap_or_default();
    emit(&format!(
        "trained {} steps in {:.1}s: training loss {last}{val_text}; model in {}",
        trainer.state.step,
        start.elapsed().as_secs_f64(),
        a.out.display()
    ))?;
    Ok(())
}
