//! Checkpoints: a transformers directory (config.json, model.safetensors, tokenizer.json)
//! plus the optimizer moments (`optimizer.safetensors`) and the loop's position
//! (`trainer_state.json`), enough to continue bit-exactly.
//!
//! Writes are atomic: everything goes to `<dir>.tmp`, then the previous checkpoint is moved
//! to `<dir>.old`, the new one renamed into place, and only then is `.old` removed. A crash at
//! any point leaves either the previous or the new checkpoint complete.

use crate::amp::{LossScaler, Precision};
use crate::optim::AdamW;
use crate::params::Params;
use anyhow::{anyhow, bail, Context, Result};
use camelid_model::families::Family;
use candle_core::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// Where the loop stands. The data order and dropout masks are functions of the seed and the
/// step, so this is all the data-loader state there is.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct TrainerState {
    /// Updates completed.
    pub step: u64,
    pub seed: u64,
    pub tokens_seen: u64,
    pub seq_len: usize,
    pub batch: usize,
    pub grad_accum: usize,
    pub last_loss: Option<f64>,
    /// The matmul type (`--dtype`); checkpoints before mixed precision were f32.
    #[serde(default)]
    pub dtype: Precision,
    /// The dynamic loss scale of f16 training.
    #[serde(default)]
    pub scaler: Option<LossScaler>,
}

/// Writes an HF model directory (config + f32 weights + tokenizer) into `dir`, creating it.
pub fn write_model(
    dir: &Path,
    params: &Params,
    family: &Family,
    config: &Value,
    tokenizer: Option<&Path>,
) -> Result<()> {
    write_model_as(dir, params, family, config, tokenizer, DType::F32)
}

/// [`write_model`] with the weights stored as `dtype` (F32, BF16 or F16; the config's
/// `torch_dtype` says which). Checkpoints to resume from are always f32.
pub fn write_model_as(
    dir: &Path,
    params: &Params,
    family: &Family,
    config: &Value,
    tokenizer: Option<&Path>,
    dtype: DType,
) -> Result<()> {
    let torch_dtype = match dtype {
        DType::F32 => "float32",
        DType::BF16 => "bfloat16",
        DType::F16 => "float16",
        other => bail!("cannot store weights as {other:?} (f32, bf16, f16)"),
    };
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let mut config = config.clone();
    if config.get("torch_dtype").is_some() || dtype != DType::F32 {
        config["torch_dtype"] = serde_json::json!(torch_dtype);
    }
    let text = serde_json::to_string_pretty(&config)?;
    std::fs::write(dir.join("config.json"), text + "\n")?;
    let mut tensors = params.hf_tensors(family)?;
    for t in tensors.values_mut() {
        *t = t.to_dtype(dtype)?;
    }
    candle_core::safetensors::save(&tensors, dir.join("model.safetensors"))?;
    if let Some(t) = tokenizer {
        std::fs::copy(t, dir.join("tokenizer.json"))
            .with_context(|| format!("cannot copy {}", t.display()))?;
    }
    Ok(())
}

fn sync_dir(dir: &Path) -> Result<()> {
    for e in std::fs::read_dir(dir)?.flatten() {
        if e.path().is_file() {
            std::fs::File::open(e.path())?.sync_all()?;
        }
    }
    Ok(())
}

/// Saves model, optimizer and loop state atomically as `dir`.
pub fn save(
    dir: &Path,
    params: &Params,
    opt: &AdamW,
    state: &TrainerState,
    family: &Family,
    config: &Value,
    tokenizer: Option<&Path>,
) -> Result<()> {
    let tmp = with_suffix(dir, "tmp");
    let old = with_suffix(dir, "old");
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp)?;
    }
    write_model(&tmp, params, family, config, tokenizer)?;
    let mut moments = HashMap::new();
    for (i, name) in params.names.iter().enumerate() {
        let shape = params.vars[i].dims().to_vec();
        moments.insert(
            format!("m.{name}"),
            Tensor::from_slice(&opt.m[i], shape.clone(), &Device::Cpu)?,
        );
        moments.insert(
            format!("v.{name}"),
            Tensor::from_slice(&opt.v[i], shape, &Device::Cpu)?,
        );
    }
    candle_core::safetensors::save(&moments, tmp.join("optimizer.safetensors"))?;
    let opt_state = serde_json::json!({
        "step": opt.step, "beta1": opt.beta1, "beta2": opt.beta2, "eps": opt.eps,
        "weight_decay": opt.weight_decay,
    });
    let st = serde_json::json!({ "trainer": state, "optimizer": opt_state });
    // Written last: its presence marks a complete checkpoint.
    std::fs::write(
        tmp.join("trainer_state.json"),
        serde_json::to_string_pretty(&st)?,
    )?;
    sync_dir(&tmp)?;
    if dir.exists() {
        if old.exists() {
            std::fs::remove_dir_all(&old)?;
        }
        std::fs::rename(dir, &old)?;
    }
    std::fs::rename(&tmp, dir)?;
    if old.exists() {
        std::fs::remove_dir_all(&old)?;
    }
    Ok(())
}

fn with_suffix(dir: &Path, suffix: &str) -> PathBuf {
    let mut s = dir.as_os_str().to_owned();
    s.push(".");
    s.push(suffix);
    PathBuf::from(s)
}

/// The complete checkpoint at `dir`, or the previous one kept as `<dir>.old` when a save
/// was interrupted between its renames.
pub fn find_complete(dir: &Path) -> Option<PathBuf> {
    [dir.to_path_buf(), with_suffix(dir, "old")]
        .into_iter()
        .find(|d| d.join("trainer_state.json").is_file())
}

/// Restores the optimizer and loop state saved with `params`' names.
pub fn load_state(dir: &Path, params: &Params) -> Result<(AdamW, TrainerState)> {
    let path = dir.join("trainer_state.json");
    let text = std::fs::read_to_string(&path)
        .with_context(|| format!("cannot read {}", path.display()))?;
    let st: Value = serde_json::from_str(&text)
        .with_context(|| format!("{} is not valid JSON", path.display()))?;
    let state: TrainerState = serde_json::from_value(st["trainer"].clone())
        .with_context(|| format!("{}: bad \"trainer\" entry", path.display()))?;
    let o = &st["optimizer"];
    let f = |k: &str| {
        o[k].as_f64()
            .ok_or_else(|| anyhow!("{}: optimizer.{k} missing", path.display()))
    };
    let sizes: Vec<usize> = params.vars.iter().map(|v| v.elem_count()).collect();
    let mut opt = AdamW::new(
        &sizes,
        f("beta1")?,
        f("beta2")?,
        f("eps")?,
        f("weight_decay")?,
    );
    opt.step = o["step"]
        .as_u64()
        .ok_or_else(|| anyhow!("{}: optimizer.step missing", path.display()))?;
    let moments = candle_core::safetensors::load(dir.join("optimizer.safetensors"), &Device::Cpu)?;
    for (i, name) in params.names.iter().enumerate() {
        for (which, buf) in [("m", &mut opt.m[i]), ("v", &mut opt.v[i])] {
            let t = moments.get(&format!("{which}.{name}")).ok_or_else(|| {
                anyhow!("{}: optimizer state lacks {which}.{name}", dir.display())
            })?;
            let data = t.flatten_all()?.to_vec1::<f32>()?;
            if data.len() != buf.len() {
                bail!(
                    "{}: optimizer state {which}.{name} has the wrong size",
                    dir.display()
                );
            }
            *buf = data;
        }
    }
    Ok((opt, state))
}
