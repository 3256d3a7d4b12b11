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
    /// A llama.cpp mixed file type (Q4_K_M ...): `to` is its base type, and llama.cpp's
    /// per-tensor rules raise some tensors; tensors and metadata are then ordered as
    /// `llama-quantize` writes them.
    pub mix: Option<types::Mix>,
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
    /// The checkpoint tensor (canonical name) the values come from, and its shape as the
    /// loader returns it (Conv1D weights already transposed).
    source: String,
    source_dims: Vec<usize>,
    /// What turns the checkpoint's layout into the file's, in order.
    steps: Vec<Step>,
}

/// A change of layout between an HF checkpoint and the GGUF architecture (all rows of the
/// outermost dimension).
#[derive(Clone, Debug, PartialEq)]
enum Step {
    /// Keep these rows, in this order (fused-QKV reorders and splits).
    Rows(Vec<u32>),
    /// Rotate-half → pair-wise rotary over this many heads (llama.cpp's `permute`).
    Permute(usize),
    /// Scale each row to unit L2 norm (Baichuan2's NormHead).
    NormalizeRows,
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

/// `llama-quantize`'s tensor order (its `weight_name_comparer`): tensors outside the blocks first,
/// then block by block, by name within each.
fn llama_quantize_order(name: &str) -> (i64, String) {
    let layer = name
        .strip_prefix("blk.")
        .and_then(|r| r.split('.').next())
        .and_then(|i| i.parse::<i64>().ok())
        .unwrap_or(-1);
    (layer, name.to_string())
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
    let (store, mut metadata, layout) = if input.is_dir() {
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
    let mut sources = Vec::new();
    for name in store.canonical_names().0 {
        let stored = store
            .stored_shape(&name)
            .ok_or_else(|| QuantizeError::Input(format!("{name}: no shape in the checkpoint")))?;
        match &layout {
            Some(l) => sources.extend(l.outputs(&name, stored)?),
            None => sources.push((name.clone(), name, stored.clone(), stored, vec![])),
        }
    }
    match opts.mix {
        None => sources.sort_by_key(|s| order_key(&s.0)),
        Some(_) => sources.sort_by_key(|s| llama_quantize_order(&s.0)),
    }
    let has_output = sources.iter().any(|s| s.0 == "output.weight");
    let arch = metadata
        .iter()
        .find(|(k, _)| k == "general.architecture")
        .and_then(|(_, v)| v.to_string().ok().cloned())
        .unwrap_or_default();
    let is_attn_v = |n: &str| n.contains("attn_v.weight") || n.contains("attn_qkv.weight");
    let n_attn_v = sources
        .iter()
        .filter(|s| is_attn_v(&s.0) && allows_quantization(&s.0, &s.3))
        .count();
    let n_layers = sources
        .iter()
        .filter_map(|s| llama_quantize_order(&s.0).0.try_into().ok())
        .map(|l: usize| l + 1)
        .max()
        .unwrap_or(0);
    let (mut i_attn_v, mut i_ffn_down) = (0, 0);
    let meta_u64 = |k: &str| {
        metadata
            .iter()
            .find(|(key, _)| key == &format!("{arch}.{k}"))
            .and_then(|(_, v)| v.to_u64().ok().or_else(|| v.to_u32().ok().map(u64::from)))
    };
    let llama_70b = arch == "llama"
        && meta_u64("block_count") == Some(80)
        && meta_u64("attention.head_count")
            != meta_u64("attention.head_count_kv").or(meta_u64("attention.head_count"));
    let mut plan = Vec::with_capacity(sources.len());
    for (name, source, source_dims, dims, steps) in sources {
        let name = &name;
        let stored_q = if steps.is_empty() {
            store.stored_block_type(&source)
        } else {
            None
        };
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
            let want = match opts.mix {
                None => opts.to,
                Some(mix) => {
                    let t = mix.tensor_type(&types::TensorPlace {
                        name,
                        cols,
                        arch: &arch,
                        tied: !has_output,
                        attn_v: (i_attn_v, n_attn_v),
                        ffn_down: (i_ffn_down, n_layers),
                        llama_70b,
                    });
                    if is_attn_v(name) {
                        i_attn_v += 1;
                    } else if name.contains("ffn_down") {
                        i_ffn_down += 1;
                    }
                    t
                }
            };
            let t = fit(want, cols);
            if t != want {
                let note = format!(
                    "{name}: rows of {cols} values are not a multiple of {}'s block of {}; written as {}",
                    types::name(want),
                    want.block_size(),
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
        plan.push(Planned {
            info: TensorInfo {
                name: name.clone(),
                dims,
                dtype,
            },
            action,
            source,
            source_dims,
            steps,
        });
    }

    set_general(&mut metadata, opts.to, opts.mix);
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

/// One output tensor: its name, the source tensor and the source's shape as loaded, the output
/// shape, and the layout changes between them.
type Output = (String, String, Vec<usize>, Vec<usize>, Vec<Step>);

/// How an HF checkpoint's tensors become the GGUF architecture's, from the family's
/// [`families::GgufExport`] data and the spec.
struct Layout {
    export: &'static families::GgufExport,
    spec: camelid_model::ArchSpec,
    /// Canonical patterns (`blk.{i}.attn_qkv`) of weights the loader transposes.
    transposed: &'static [&'static str],
    /// The export's `renamed` patterns when the checkpoint holds them, else none.
    renamed: &'static [(&'static str, &'static str)],
}

/// `blk.3.attn_qkv.weight` → (`blk.{i}.attn_qkv`, `weight`).
fn pattern(name: &str) -> (String, &str) {
    let (base, suffix) = name.rsplit_once('.').unwrap_or((name, ""));
    let mut parts = base.splitn(3, '.');
    match (parts.next(), parts.next(), parts.next()) {
        (Some("blk"), Some(i), Some(rest)) if i.parse::<usize>().is_ok() => {
            (format!("blk.{{i}}.{rest}"), suffix)
        }
        _ => (base.to_string(), suffix),
    }
}

impl Layout {
    /// The tensors written for `name`, under the architecture's names.
    fn outputs(&self, name: &str, stored: Vec<usize>) -> Result<Vec<Output>> {
        let mut outs = self.canonical_outputs(name, stored)?;
        for out in &mut outs {
            let (pat, suffix) = pattern(&out.0);
            if let Some((_, g)) = self.renamed.iter().find(|(c, _)| *c == pat) {
                let layer = out.0.split('.').nth(1).unwrap_or("0");
                out.0 = format!("{}.{suffix}", g.replace("{i}", layer));
            }
        }
        Ok(outs)
    }

    fn canonical_outputs(&self, name: &str, stored: Vec<usize>) -> Result<Vec<Output>> {
        let (pat, suffix) = pattern(name);
        let mut dims = stored;
        if suffix == "weight" && dims.len() == 2 && self.transposed.contains(&pat.as_str()) {
            dims.reverse();
        }
        let a = &self.spec.attention;
        let e = self.export;
        let one = |steps: Vec<Step>| {
            Ok(vec![(
                name.to_string(),
                name.to_string(),
                dims.clone(),
                dims.clone(),
                steps,
            )])
        };
        match pat.as_str() {
            "blk.{i}.attn_qkv" => {
                // The rows the heads imply, checked before the row order of that length is built.
                let rows = qkv_rows(a.qkv_packing, a.heads, a.kv_heads, a.head_dim);
                if dims.first().copied() != rows {
                    return Err(QuantizeError::Input(format!(
                        "{name}: {} rows, but {} heads and {} kv heads of {} imply {}",
                        dims.first().copied().unwrap_or(0),
                        a.heads,
                        a.kv_heads,
                        a.head_dim,
                        rows.map_or("more than can exist".into(), |r| r.to_string())
                    )));
                }
                let order = qkv_order(a.qkv_packing, a.heads, a.kv_heads, a.head_dim);
                if !e.split_qkv {
                    let reorder = a.qkv_packing != camelid_model::spec::QkvPacking::Sequential;
                    return one(if reorder {
                        vec![Step::Rows(order)]
                    } else {
                        vec![]
                    });
                }
                let (q, kv) = (a.heads * a.head_dim, a.kv_heads * a.head_dim);
                let base = name
                    .strip_suffix(&format!(".attn_qkv.{suffix}"))
                    .unwrap_or(name);
                let parts = [
                    ("attn_q", 0, q, e.permute_qk.then_some(a.heads)),
                    ("attn_k", q, kv, e.permute_qk.then_some(a.kv_heads)),
                    ("attn_v", q + kv, kv, None),
                ];
                Ok(parts
                    .into_iter()
                    .map(|(part, start, len, permute)| {
                        let mut out_dims = dims.clone();
                        out_dims[0] = len;
                        let mut steps = vec![Step::Rows(order[start..start + len].to_vec())];
                        steps.extend(permute.map(Step::Permute));
                        (
                            format!("{base}.{part}.{suffix}"),
                            name.to_string(),
                            dims.clone(),
                            out_dims,
                            steps,
                        )
                    })
                    .collect())
            }
            "blk.{i}.attn_q" if e.permute_qk => one(vec![Step::Permute(a.heads)]),
            "blk.{i}.attn_k" if e.permute_qk => one(vec![Step::Permute(a.kv_heads)]),
            "output" if suffix == "weight" && self.spec.normalize_head_rows => {
                one(vec![Step::NormalizeRows])
            }
            _ => one(vec![]),
        }
    }
}

/// Rows of a fused QKV projection in `[q | k | v]` order: `order[new_row] = old_row` for a
/// checkpoint packed per head (GPT-NeoX, BLOOM) or per kv group (Falcon-40B).
/// How many rows [`qkv_order`] orders, without building it; `None` past `usize`.
fn qkv_rows(
    packing: camelid_model::spec::QkvPacking,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
) -> Option<usize> {
    use camelid_model::spec::QkvPacking;
    let per_head = match packing {
        QkvPacking::Sequential => kv_heads.max(1).checked_mul(2)?.checked_add(heads)?,
        QkvPacking::PerHead => heads.checked_mul(3)?,
        QkvPacking::PerKvGroup => (heads / kv_heads.max(1) + 2).checked_mul(kv_heads)?,
    };
    per_head.checked_mul(head_dim)
}

fn qkv_order(
    packing: camelid_model::spec::QkvPacking,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
) -> Vec<u32> {
    use camelid_model::spec::QkvPacking;
    let rows = |start: usize| (start..start + head_dim).map(|r| r as u32);
    let (mut q, mut k, mut v) = (Vec::new(), Vec::new(), Vec::new());
    match packing {
        QkvPacking::Sequential => {
            return (0..((heads + 2 * kv_heads.max(1)) * head_dim) as u32).collect()
        }
        QkvPacking::PerHead => {
            for h in 0..heads {
                q.extend(rows(3 * h * head_dim));
                k.extend(rows((3 * h + 1) * head_dim));
                v.extend(rows((3 * h + 2) * head_dim));
            }
        }
        QkvPacking::PerKvGroup => {
            let rep = heads / kv_heads.max(1);
            for g in 0..kv_heads {
                let base = g * (rep + 2) * head_dim;
                for i in 0..rep {
                    q.extend(rows(base + i * head_dim));
                }
                k.extend(rows(base + rep * head_dim));
                v.extend(rows(base + (rep + 1) * head_dim));
            }
        }
    }
    q.extend(k);
    q.extend(v);
    q
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
    let name = &p.source;
    if p.action == Action::Copy {
        let q = store.stored_quantized(name)?.ok_or_else(|| {
            QuantizeError::Input(format!("{name}: expected a quantized tensor to copy"))
        })?;
        return Ok(q.data()?.into_owned());
    }
    let mut t = store.dense(&p.source, &p.source_dims)?;
    for step in &p.steps {
        t = match step {
            Step::Rows(order) => {
                let idx = Tensor::new(order.as_slice(), t.device())?;
                t.index_select(&idx, 0)?
            }
            Step::Permute(heads) => permute_rows(&t, *heads)?,
            Step::NormalizeRows => {
                let norms = t.sqr()?.sum_keepdim(1)?.sqrt()?.clamp(1e-12, f64::MAX)?;
                t.broadcast_div(&norms)?
            }
        };
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

type Opened = (WeightStore, Vec<(String, Value)>, Option<Layout>);

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

    let mut spec = spec;
    if let Some((adapted, note)) = export.adapt.and_then(|f| f(&spec)) {
        spec = adapted;
        notes.push(note);
    }
    let arch = export.arch;
    let holds_renamed = export
        .renamed
        .iter()
        .all(|(c, _)| store.contains(&format!("{}.weight", c.replace("{i}", "0"))));
    let layout = Layout {
        export,
        spec: spec.clone(),
        transposed: family.hf_transposed,
        renamed: if holds_renamed { export.renamed } else { &[] },
    };
    // The names the file will hold (what `from_gguf` sees as tensors).
    let mut written = std::collections::HashMap::new();
    for name in store.canonical_names().0 {
        let dims = store.stored_shape(&name).unwrap_or_default();
        for out in layout.outputs(&name, dims)? {
            written.insert(out.0, Tensor::zeros(1, DType::F32, device)?);
        }
    }
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
    let has_output = written.contains_key("output.weight");
    let names = WeightStore::from_tensors(written, device);
    let reread = {
        let map: families::GgufMeta = meta.iter().cloned().collect();
        let mut reader = families::GgufReader::new(&map, dir)?;
        reader.store = Some(&names);
        let back = families::by_gguf_arch(arch)
            .and_then(|f| f.from_gguf)
            .ok_or_else(|| QuantizeError::Input(format!("no GGUF reader for {arch}")))?;
        back(&reader)?
    };
    let differ = spec_differences(
        &expected_spec(&spec, export, has_output),
        &reread,
        has_output,
    );
    if !differ.is_empty() {
        return Err(QuantizeError::Input(format!(
            "{}: this {} configuration cannot be expressed in the {arch} GGUF architecture (it would read back with other {})",
            dir.display(),
            family.name,
            differ.join(", ")
        )));
    }
    if !export.llama_cpp {
        notes.push(format!(
            "llama.cpp has no {arch} graph: the file runs in camelid only"
        ));
    }

    if let (Some(w), "llama") = (spec.attention.sliding_window, arch) {
        notes.push(format!(
            "{arch}.attention.sliding_window = {w} is written, but llama.cpp's llama architecture ignores it: past {w} tokens llama.cpp attends to the whole context and camelid to the window"
        ));
    }
    meta.extend(tokenizer_export::from_hf_dir(dir, spec.vocab_size, notes)?);
    Ok((store, meta, Some(layout)))
}

/// The spec a GGUF reader should give for a file written from `spec`: the export's layout
/// changes applied (pair-wise rotary after the q/k permutation, `[q | k | v]` or split
/// projections, a normalized head) and floats rounded to the f32 the file stores.
fn expected_spec(
    spec: &camelid_model::ArchSpec,
    export: &families::GgufExport,
    has_output: bool,
) -> camelid_model::ArchSpec {
    use camelid_model::spec::{Positions, QkvLayout, QkvPacking};
    let f32r = |x: f64| x as f32 as f64;
    let mut s = spec.clone();
    let head_dim = s.attention.head_dim;
    let a = &mut s.attention;
    a.qkv_packing = QkvPacking::Sequential;
    if export.split_qkv {
        a.qkv_layout = QkvLayout::Split;
    }
    a.clip_qkv = a.clip_qkv.map(f32r);
    s.norm.eps = f32r(s.norm.eps);
    s.normalize_head_rows = false;
    s.tied_head = !has_output;
    match &mut s.positions {
        Positions::Rotary(r) => {
            r.interleaved |= export.permute_qk;
            r.theta = f32r(r.theta);
            if head_dim > 0 {
                r.fraction = (head_dim as f64 * r.fraction).round() / head_dim as f64;
            }
        }
        Positions::Alibi { max_bias, .. } => *max_bias = f32r(*max_bias),
        _ => {}
    }
    s
}

/// The spec fields (as serialized) in which `back` differs from `want`.
fn spec_differences(
    want: &camelid_model::ArchSpec,
    back: &camelid_model::ArchSpec,
    has_output: bool,
) -> Vec<String> {
    let mut back = back.clone();
    back.family = want.family.clone();
    // Readers that leave the head to the tensors (the transformer ties it when the file has
    // no `output.weight`).
    back.tied_head |= !has_output;
    let (Ok(serde_json::Value::Object(w)), Ok(serde_json::Value::Object(b))) =
        (serde_json::to_value(want), serde_json::to_value(&back))
    else {
        return vec!["settings".into()];
    };
    let mut out = Vec::new();
    diff_json("", &w, &b, &mut out);
    out
}

/// `path (value here)` for each leaf of `want` that `back` does not have.
fn diff_json(
    prefix: &str,
    want: &serde_json::Map<String, serde_json::Value>,
    back: &serde_json::Map<String, serde_json::Value>,
    out: &mut Vec<String>,
) {
    for (k, v) in want {
        let path = format!("{prefix}{k}");
        match (v, back.get(k)) {
            (serde_json::Value::Object(a), Some(serde_json::Value::Object(b))) => {
                diff_json(&format!("{path}."), a, b, out)
            }
            (v, b) if b != Some(v) => out.push(format!("{path} ({v} here)")),
            _ => {}
        }
    }
}

/// `general.file_type`, `general.quantization_version` (when blocks are written) and
/// `general.alignment`, placed after `general.architecture`. For a mixed type, where the file
/// is what `llama-quantize` writes from camelid's F32 file, the alignment stays there and the
/// other two go last (llama.cpp's `gguf_set_val` appends).
fn set_general(meta: &mut Vec<(String, Value)>, to: GgmlDType, mix: Option<types::Mix>) {
    if let Some(mix) = mix {
        let at = meta
            .iter()
            .position(|(k, _)| !k.starts_with("general."))
            .unwrap_or(meta.len());
        meta.insert(
            at,
            (
                "general.alignment".to_string(),
                Value::U32(DEFAULT_ALIGNMENT as u32),
            ),
        );
        meta.push(("general.quantization_version".to_string(), Value::U32(2)));
        meta.push(("general.file_type".to_string(), Value::U32(mix.file_type())));
        return;
    }
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
    fn qkv_rows_counts_what_qkv_order_orders() {
        use camelid_model::spec::QkvPacking;
        for packing in [
            QkvPacking::Sequential,
            QkvPacking::PerHead,
            QkvPacking::PerKvGroup,
        ] {
            for (heads, kv) in [(4, 4), (6, 2), (8, 1), (3, 3)] {
                let order = qkv_order(packing, heads, kv, 5);
                assert_eq!(qkv_rows(packing, heads, kv, 5), Some(order.len()));
            }
        }
        assert_eq!(qkv_rows(QkvPacking::Sequential, 4, 2, usize::MAX / 4), None);
    }

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
    fn fused_qkv_orders() {
        use camelid_model::spec::QkvPacking;
        // [q0 k0 v0 | q1 k1 v1], one row per head.
        assert_eq!(
            qkv_order(QkvPacking::PerHead, 2, 2, 1),
            vec![0, 3, 1, 4, 2, 5]
        );
        // Two kv groups of two query heads: [q q k v | q q k v].
        assert_eq!(
            qkv_order(QkvPacking::PerKvGroup, 4, 2, 1),
            vec![0, 1, 4, 5, 2, 6, 3, 7]
        );
        assert_eq!(
            qkv_order(QkvPacking::Sequential, 2, 1, 2),
            (0..8).collect::<Vec<u32>>()
        );
        assert_eq!(
            pattern("blk.12.attn_qkv.weight"),
            ("blk.{i}.attn_qkv".to_string(), "weight")
        );
        assert_eq!(pattern("output.bias"), ("output".to_string(), "bias"));
    }

    #[test]
    fn llama_quantize_tensor_order() {
        let mut v = vec![
            "blk.1.attn_q.weight",
            "token_embd.weight",
            "blk.0.ffn_up.weight",
            "output_norm.weight",
            "blk.10.attn_k.weight",
        ];
        v.sort_by_key(|n| llama_quantize_order(n));
        assert_eq!(
            v,
            vec![
                "output_norm.weight",
                "token_embd.weight",
                "blk.0.ffn_up.weight",
                "blk.1.attn_q.weight",
                "blk.10.attn_k.weight"
            ]
        );
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
