//! `quantize`: a model (HF directory or GGUF file) → a GGUF file with its weights in one type.
//!
//! Which tensors are rounded follows llama.cpp's `llama-quant.cpp`: only 2-D `*.weight`
//! tensors, never norms, position or token-type embeddings; everything else is written as F32.
//! A row whose length the type's block does not divide falls back as llama.cpp's
//! `tensor_type_fallback` does ([`types::fit`]) and the report says so. The file is written to a
//! temporary file beside the target and renamed into place only when complete.

use crate::gguf_writer::{GgufWriter, TensorInfo, DEFAULT_ALIGNMENT};
use crate::kquants;
use crate::tokenizer_export;
use crate::types::{self, file_type, fit, is_quantized};
use camelid_model::checkpoint::WeightStore;
use camelid_model::families;
use camelid_model::model::{open_hf_checkpoint, HfCheckpoint};
use camelid_model::ModelError;
use candle_core::quantized::gguf_file::Value;
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{DType, Device, Tensor};
use std::io::BufWriter;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

#[derive(Debug, thiserror::Error)]
pub enum QuantizeError {
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error("{path}: {message}")]
    Output { path: PathBuf, message: String },
    #[error("{0}")]
    Input(String),
    #[error("interrupted: no output file was written")]
    Cancelled,
}

impl From<candle_core::Error> for QuantizeError {
    fn from(e: candle_core::Error) -> Self {
        QuantizeError::Model(ModelError::from(e))
    }
}

pub type Result<T> = std::result::Result<T, QuantizeError>;

#[derive(Debug, Clone)]
pub struct QuantizeOptions {
    /// The type of the 2-D weights.
    pub to: GgmlDType,
    /// Write `output.weight` (or, with a tied head, `token_embd.weight`) as F16 (or the target
    /// type when that is F32/BF16), as llama.cpp's `--leave-output-tensor` leaves it unrounded; a
    /// source already stored quantized is copied unchanged.
    pub keep_output: bool,
    /// Write `token_embd.weight` as F16 (a quantized source is copied unchanged).
    pub keep_embeddings: bool,
}

/// Progress, one event per tensor.
pub enum Event<'a> {
    /// The plan is made: this many tensors will be written.
    Start { tensors: usize },
    /// A tensor is about to be converted.
    Tensor {
        index: usize,
        name: &'a str,
        dtype: GgmlDType,
    },
    /// Something the user should know (fallbacks, skipped tensors).
    Note(&'a str),
}

/// What was written.
#[derive(Debug, Clone)]
pub struct Report {
    pub output: PathBuf,
    pub tensors: Vec<TensorInfo>,
    pub notes: Vec<String>,
    pub bytes: u64,
}

/// Where a tensor's values come from.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Action {
    /// Round the f32 values to the planned type.
    Convert,
    /// Copy the stored quantized blocks unchanged.
    Copy,
}

struct Planned {
    info: TensorInfo,
    action: Action,
    /// Rows reordered for pair-wise rotary: the number of heads to permute over.
    permute_heads: Option<usize>,
}

/// The default tensor order: embeddings first, blocks by layer (and name), then the head.
fn order_key(name: &str) -> (u8, usize, String) {
    let mut parts = name.splitn(3, '.');
    match (
        parts.next(),
        parts.next().and_then(|i| i.parse::<usize>().ok()),
    ) {
        (Some("blk"), Some(i)) => (1, i, name.to_string()),
        _ if name.starts_with("output") => (2, 0, name.to_string()),
        _ => (0, 0, name.to_string()),
    }
}

/// llama.cpp's `tensor_allows_quantization` for the tensors camelid's families have.
fn allows_quantization(name: &str, dims: &[usize]) -> bool {
    dims.len() >= 2
        && name.ends_with("weight")
        && !name.contains("_norm.weight")
        && name != "position_embd.weight"
        && name != "token_types.weight"
}

/// Quantizes `input` into `output`. `cancel` is polled between tensors (a Ctrl-C handler sets
/// it); on any error or cancellation the temporary file is removed and `output` is untouched.
pub fn quantize(
    input: &Path,
    output: &Path,
    opts: &QuantizeOptions,
    cancel: &AtomicBool,
    on_event: &mut dyn FnMut(Event),
) -> Result<Report> {
    let dir = match output.parent() {
        Some(p) if p.as_os_str().is_empty() => Path::new("."),
        Some(p) => p,
        None => Path::new("."),
    };
    if !dir.is_dir() {
        return Err(QuantizeError::Output {
            path: output.to_path_buf(),
            message: format!("the output directory {} does not exist", dir.display()),
        });
    }
    if output.is_dir() {
        return Err(QuantizeError::Output {
            path: output.to_path_buf(),
            message: "is a directory; give a file name ending in .gguf".into(),
        });
    }
    let device = Device::Cpu;
    let mut notes = Vec::new();
    let (store, mut metadata, permute) = if input.is_dir() {
        open_hf(input, &device, &mut notes)?
    } else if input.is_file() {
        open_gguf(input, &device)?
    } else {
        return Err(ModelError::io(
            input,
            std::io::Error::new(std::io::ErrorKind::NotFound, "no such file or directory"),
        )
        .into());
    };

    // The plan: every tensor's output type, decided before anything is written.
    let (mut names, _) = store.canonical_names();
    names.sort_by_key(|n| order_key(n));
    let has_output = names.iter().any(|n| n == "output.weight");
    let mut plan = Vec::with_capacity(names.len());
    for name in &names {
        let dims = store
            .stored_shape(name)
            .ok_or_else(|| QuantizeError::Input(format!("{name}: no shape in the checkpoint")))?;
        let stored_q = store.stored_block_type(name);
        let is_head = name == "output.weight" || (!has_output && name == "token_embd.weight");
        let keep =
            (opts.keep_output && is_head) || (opts.keep_embeddings && name == "token_embd.weight");
        let (dtype, action) = if !allows_quantization(name, &dims) {
            (GgmlDType::F32, Action::Convert)
        } else if keep {
            match stored_q {
                Some(q) => (q, Action::Copy),
                // F16, unless the file's type is already a float type.
                None if is_quantized(opts.to) => (GgmlDType::F16, Action::Convert),
                None => (opts.to, Action::Convert),
            }
        } else {
            let cols = *dims.last().unwrap_or(&0);
            let t = fit(opts.to, cols);
            if t != opts.to {
                let note = format!(
                    "{name}: rows of {cols} values are not a multiple of {}'s block of {}; written as {}",
                    types::name(opts.to),
                    opts.to.block_size(),
                    types::name(t)
                );
                on_event(Event::Note(&note));
                notes.push(note);
            }
            if stored_q == Some(t) {
                (t, Action::Copy)
            } else {
                (t, Action::Convert)
            }
        };
        let permute_heads = permute.as_ref().and_then(|p| p.heads_for(name));
        plan.push(Planned {
            info: TensorInfo {
                name: name.clone(),
                dims,
                dtype,
            },
            action,
            permute_heads,
        });
    }

    set_general(&mut metadata, opts.to);
    let infos: Vec<TensorInfo> = plan.iter().map(|p| p.info.clone()).collect();

    // Write into a temporary file beside the target; rename when complete.
    let file_name = output
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "model.gguf".into());
    let tmp = TempFile(dir.join(format!(".{file_name}.partial-{}", std::process::id())));
    let out_err = |e: std::io::Error| QuantizeError::Output {
        path: output.to_path_buf(),
        message: e.to_string(),
    };
    let file = std::fs::File::create(&tmp.0).map_err(out_err)?;
    let mut w = GgufWriter::new(
        BufWriter::with_capacity(1 << 20, file),
        &metadata,
        &infos,
        DEFAULT_ALIGNMENT,
    )
    .map_err(out_err)?;
    on_event(Event::Start {
        tensors: plan.len(),
    });
    for (index, p) in plan.iter().enumerate() {
        if cancel.load(Ordering::Relaxed) {
            return Err(QuantizeError::Cancelled);
        }
        on_event(Event::Tensor {
            index,
            name: &p.info.name,
            dtype: p.info.dtype,
        });
        let bytes = tensor_bytes(&store, p)?;
        w.write_tensor(&p.info.name, &bytes).map_err(out_err)?;
    }
    let writer = w.finish().map_err(out_err)?;
    let file = writer.into_inner().map_err(|e| out_err(e.into_error()))?;
    file.sync_all().map_err(out_err)?;
    drop(file);
    if cancel.load(Ordering::Relaxed) {
        return Err(QuantizeError::Cancelled);
    }
    std::fs::rename(&tmp.0, output).map_err(out_err)?;
    std::mem::forget(tmp);
    let bytes = std::fs::metadata(output).map(|m| m.len()).unwrap_or(0);
    Ok(Report {
        output: output.to_path_buf(),
        tensors: infos,
        notes,
        bytes,
    })
}

/// Removes the partial file unless it was renamed into place.
struct TempFile(PathBuf);

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// q/k row permutation of LLaMA-family HF checkpoints (llama.cpp's `LlamaModel.permute`).
struct Permute {
    heads: usize,
    kv_heads: usize,
}

impl Permute {
    fn heads_for(&self, name: &str) -> Option<usize> {
        let base = name.rsplit_once('.').map(|(b, _)| b).unwrap_or(name);
        if base.ends_with(".attn_q") {
            Some(self.heads)
        } else if base.ends_with(".attn_k") {
            Some(self.kv_heads)
        } else {
            None
        }
    }
}

/// `w.reshape(heads, 2, rows/heads/2, ...).swapaxes(1, 2)`: rotate-half rows → pair-wise.
fn permute_rows(t: &Tensor, heads: usize) -> Result<Tensor> {
    let dims = t.dims().to_vec();
    let rows = dims[0];
    if heads == 0 || !rows.is_multiple_of(2 * heads) {
        return Err(QuantizeError::Input(format!(
            "cannot permute {rows} rows over {heads} heads for pair-wise rotary"
        )));
    }
    let rest: usize = dims[1..].iter().product();
    Ok(t.reshape((heads, 2, rows / heads / 2, rest))?
        .transpose(1, 2)?
        .contiguous()?
        .reshape(dims)?)
}

fn tensor_bytes(store: &WeightStore, p: &Planned) -> Result<Vec<u8>> {
    let name = &p.info.name;
    if p.action == Action::Copy {
        let q = store.stored_quantized(name)?.ok_or_else(|| {
            QuantizeError::Input(format!("{name}: expected a quantized tensor to copy"))
        })?;
        return Ok(q.data()?.into_owned());
    }
    let mut t = store.dense(name, &p.info.dims)?;
    if let Some(heads) = p.permute_heads {
        t = permute_rows(&t, heads)?;
    }
    encode(&t, p.info.dtype)
}

/// The bytes of `t` (f32) stored as `dtype`: ggml's reference quantizers ([`kquants`] for the
/// K-quants, candle's for the 32-value blocks, which match ggml's), IEEE round-to-nearest-even
/// for F16/BF16 (what ggml's conversions do).
pub fn encode(t: &Tensor, dtype: GgmlDType) -> Result<Vec<u8>> {
    let flat = t.flatten_all()?;
    Ok(match dtype {
        GgmlDType::F32 => flat
            .to_dtype(DType::F32)?
            .to_vec1::<f32>()?
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect(),
        GgmlDType::F16 => flat
            .to_dtype(DType::F16)?
            .to_vec1::<half::f16>()?
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect(),
        GgmlDType::BF16 => flat
            .to_dtype(DType::BF16)?
            .to_vec1::<half::bf16>()?
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect(),
        GgmlDType::Q4K | GgmlDType::Q5K | GgmlDType::Q6K => {
            let x = flat.to_dtype(DType::F32)?.to_vec1::<f32>()?;
            let mut out = Vec::with_capacity(x.len() / dtype.block_size() * dtype.type_size());
            match dtype {
                GgmlDType::Q4K => kquants::quantize_q4_k(&x, &mut out),
                GgmlDType::Q5K => kquants::quantize_q5_k(&x, &mut out),
                _ => kquants::quantize_q6_k(&x, &mut out),
            }
            out
        }
        q => QTensor::quantize(t, q)?.data()?.into_owned(),
    })
}

type Opened = (WeightStore, Vec<(String, Value)>, Option<Permute>);

fn open_gguf(path: &Path, device: &Device) -> Result<Opened> {
    let (store, meta) = WeightStore::open_gguf(path, device)?;
    // Everything is copied but what describes the new file.
    let arch = meta
        .get("general.architecture")
        .and_then(|v| v.to_string().ok())
        .cloned()
        .ok_or_else(|| ModelError::format(path, "GGUF metadata has no general.architecture"))?;
    let mut keys: Vec<&String> = meta.keys().collect();
    keys.sort();
    let mut out = vec![("general.architecture".to_string(), Value::String(arch))];
    for k in keys {
        if !matches!(
            k.as_str(),
            "general.architecture"
                | "general.file_type"
                | "general.quantization_version"
                | "general.alignment"
        ) {
            out.push((k.clone(), meta[k].clone()));
        }
    }
    Ok((store, out, None))
}

fn open_hf(dir: &Path, device: &Device, notes: &mut Vec<String>) -> Result<Opened> {
    let HfCheckpoint {
        family,
        spec,
        store,
        ..
    } = open_hf_checkpoint(dir, device)?;
    let export = families::gguf_export(family.name).ok_or_else(|| {
        QuantizeError::Input(format!(
            "{}: writing GGUF from an HF {} checkpoint is not supported (supported: {}); quantize a GGUF of it instead",
            dir.display(),
            family.name,
            families::GGUF_EXPORTS
                .iter()
                .map(|e| e.family)
                .collect::<Vec<_>>()
                .join(", ")
        ))
    })?;
    let (_, unmapped) = store.canonical_names();
    for name in unmapped {
        let note = format!(
            "{name}: not a tensor of the {} layout, skipped",
            family.name
        );
        notes.push(note);
    }

    let arch = export.arch;
    let mut meta = vec![
        (
            "general.architecture".to_string(),
            Value::String(arch.into()),
        ),
        (
            "general.name".to_string(),
            Value::String(
                dir.file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_default(),
            ),
        ),
    ];
    meta.extend((export.metadata)(&spec, arch)?);

    // What the file says must read back into the same spec, or camelid and llama.cpp would
    // run a different model from the checkpoint's.
    let reread = {
        let map: families::GgufMeta = meta.iter().cloned().collect();
        let reader = families::GgufReader::new(&map, dir)?;
        let back = families::by_gguf_arch(arch)
            .and_then(|f| f.from_gguf)
            .ok_or_else(|| QuantizeError::Input(format!("no GGUF reader for {arch}")))?;
        back(&reader)?
    };
    let (a, b) = (&spec.attention, &reread.attention);
    let same = spec.hidden == reread.hidden
        && spec.layers == reread.layers
        && spec.mlp.hidden == reread.mlp.hidden
        && spec.mlp.bias == reread.mlp.bias
        && a.heads == b.heads
        && a.kv_heads == b.kv_heads
        && a.head_dim == b.head_dim
        && a.qkv_bias == b.qkv_bias
        && a.out_bias == b.out_bias
        && a.sliding_window == b.sliding_window
        && (spec.norm.eps as f32) == (reread.norm.eps as f32);
    if !same {
        return Err(QuantizeError::Input(format!(
            "{}: this {} configuration (biases or attention layout) cannot be expressed in llama.cpp's {arch} GGUF metadata",
            dir.display(),
            family.name
        )));
    }

    if let (Some(w), "llama") = (spec.attention.sliding_window, arch) {
        notes.push(format!(
            "{arch}.attention.sliding_window = {w} is written, but llama.cpp's llama architecture ignores it: past {w} tokens llama.cpp attends to the whole context and camelid to the window"
        ));
    }
    meta.extend(tokenizer_export::from_hf_dir(dir, spec.vocab_size, notes)?);
    let permute = export.permute_qk.then_some(Permute {
        heads: spec.attention.heads,
        kv_heads: spec.attention.kv_heads,
    });
    Ok((store, meta, permute))
}

/// `general.file_type`, `general.quantization_version` (when blocks are written) and
/// `general.alignment`, placed after `general.architecture`.
fn set_general(meta: &mut Vec<(String, Value)>, to: GgmlDType) {
    let mut extra = vec![("general.file_type".to_string(), Value::U32(file_type(to)))];
    if is_quantized(to) {
        extra.push(("general.quantization_version".to_string(), Value::U32(2)));
    }
    extra.push((
        "general.alignment".to_string(),
        Value::U32(DEFAULT_ALIGNMENT as u32),
    ));
    let at = meta
        .iter()
        .position(|(k, _)| !k.starts_with("general."))
        .unwrap_or(meta.len());
    for (i, kv) in extra.into_iter().enumerate() {
        meta.insert(at + i, kv);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn permutation_matches_llama_cpp_converter() {
        // 2 heads of dim 4, one column: rows [h0: 0 1 2 3, h1: 4 5 6 7]
        // numpy: w.reshape(2, 2, 2, 1).swapaxes(1, 2) → [0 2 1 3 4 6 5 7]
        let t = Tensor::arange(0f32, 8., &Device::Cpu)
            .unwrap()
            .reshape((8, 1))
            .unwrap();
        let p: Vec<f32> = permute_rows(&t, 2)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        assert_eq!(p, vec![0., 2., 1., 3., 4., 6., 5., 7.]);
    }

    #[test]
    fn order_and_rules() {
        let mut v = vec![
            "output.weight",
            "blk.10.attn_q.weight",
            "blk.2.ffn_up.weight",
            "token_embd.weight",
            "output_norm.weight",
        ];
        v.sort_by_key(|n| order_key(n));
        assert_eq!(
            v,
            vec![
                "token_embd.weight",
                "blk.2.ffn_up.weight",
                "blk.10.attn_q.weight",
                "output.weight",
                "output_norm.weight"
            ]
        );
        assert!(!allows_quantization("blk.0.attn_norm.weight", &[64]));
        assert!(!allows_quantization("blk.0.attn_q.bias", &[64, 64]));
        assert!(allows_quantization("blk.0.attn_q.weight", &[64, 64]));
    }
}
