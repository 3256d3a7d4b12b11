//! Weight files: Hugging Face safetensors (single or sharded) and GGUF.
//!
//! The transformer asks for tensors by their canonical name, which is llama.cpp's GGUF naming
//! (`token_embd`, `blk.{i}.attn_q`, ...). GGUF files need no translation; an HF checkpoint
//! goes through its family's name table. Shapes are checked here so that a config that does
//! not match its weights fails at load with the tensor's name.

use crate::error::{first_line, ModelError, Result};
use candle_core::quantized::{gguf_file, GgmlDType, QMatMul, QTensor};
use candle_core::{DType, Device, Tensor};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// A 2-D weight used as the right-hand side of a matmul: dense f32, or quantized blocks.
#[derive(Clone)]
pub enum Matrix {
    Dense(Tensor),
    Quantized(Arc<QTensor>),
}

/// A quantized tensor's blocks inside a mapped GGUF file.
pub struct RawTensor {
    pub dtype: GgmlDType,
    pub file: Arc<memmap2::Mmap>,
    pub range: std::ops::Range<usize>,
}

enum Source {
    Safetensors {
        files: candle_core::safetensors::MmapedSafetensors,
        /// Canonical name pattern (without `.weight`/`.bias`) → checkpoint pattern.
        names: HashMap<&'static str, &'static str>,
        /// Canonical patterns whose matrices are stored `[in, out]`.
        transposed: &'static [&'static str],
    },
    Gguf {
        content: gguf_file::Content,
        /// Shared with kernels that read quantized blocks in place ([`RawTensor`]).
        file: Arc<memmap2::Mmap>,
    },
    /// Tensors already in memory under their canonical names (a trainer's parameters).
    Memory(HashMap<String, Tensor>),
}

pub struct WeightStore {
    source: Source,
    path: PathBuf,
    device: Device,
    /// Expand quantized GGUF tensors to f32 at load (exact-math reference runs).
    dequantize: bool,
    /// The type float weights are given in (f32 unless a model is loaded in f16/bf16).
    dtype: DType,
    /// Canonical pattern → GGUF pattern for tensors a GGUF architecture names otherwise
    /// ([`crate::families::GgufExport::renamed`]).
    gguf_renamed: &'static [(&'static str, &'static str)],
}

/// Splits `blk.7.attn_q.weight` into (`blk.{i}.attn_q`, Some(7), `weight`), and an
/// encoder-decoder's `dec.blk.7.attn_q.weight` into (`dec.blk.{i}.attn_q`, Some(7), `weight`).
fn split_canonical(name: &str) -> (String, Option<usize>, &str) {
    let (base, suffix) = name.rsplit_once('.').unwrap_or((name, ""));
    let parts: Vec<&str> = base.split('.').collect();
    for b in 0..parts.len().min(2) {
        if parts[b] == "blk" && parts.len() >= b + 2 {
            if let Ok(i) = parts[b + 1].parse::<usize>() {
                let stack: String = parts[..b].iter().map(|p| format!("{p}.")).collect();
                let rest = parts[b + 2..].join(".");
                return (format!("{stack}blk.{{i}}.{rest}"), Some(i), suffix);
            }
        }
    }
    (base.to_string(), None, suffix)
}

impl WeightStore {
    /// Memory-maps every safetensors file of an HF directory (the index file's shards, or all
    /// `*.safetensors` files).
    pub fn open_safetensors(
        dir: &Path,
        names: &'static [(&'static str, &'static str)],
        transposed: &'static [&'static str],
        device: &Device,
    ) -> Result<Self> {
        let index = dir.join("model.safetensors.index.json");
        let mut files: Vec<PathBuf> = Vec::new();
        if index.exists() {
            let text = std::fs::read_to_string(&index).map_err(|e| ModelError::io(&index, e))?;
            let json: serde_json::Value = serde_json::from_str(&text)
                .map_err(|e| ModelError::format(&index, format!("invalid JSON: {e}")))?;
            let map = json
                .get("weight_map")
                .and_then(|m| m.as_object())
                .ok_or_else(|| ModelError::format(&index, "missing \"weight_map\""))?;
            for f in map.values() {
                let f = f.as_str().ok_or_else(|| {
                    ModelError::format(&index, "weight_map values must be strings")
                })?;
                let p = dir.join(f);
                if !files.contains(&p) {
                    files.push(p);
                }
            }
        } else {
            let entries = std::fs::read_dir(dir).map_err(|e| ModelError::io(dir, e))?;
            for e in entries.flatten() {
                let p = e.path();
                if p.extension().is_some_and(|x| x == "safetensors") {
                    files.push(p);
                }
            }
            files.sort();
        }
        if files.is_empty() {
            return Err(ModelError::format(
                dir,
                "no *.safetensors weight files found",
            ));
        }
        for f in &files {
            check_safetensors_header(f)?;
        }
        // SAFETY: the files are mapped read-only; a file truncated underneath a running
        // process is outside what any mmap-based loader can defend against.
        let st = unsafe { candle_core::safetensors::MmapedSafetensors::multi(&files) }
            .map_err(|e| ModelError::format(&files[0], first_line(&e)))?;
        Ok(Self {
            source: Source::Safetensors {
                files: st,
                names: names.iter().copied().collect(),
                transposed,
            },
            path: dir.to_path_buf(),
            device: device.clone(),
            dequantize: false,
            dtype: DType::F32,
            gguf_renamed: &[],
        })
    }

    pub fn open_gguf(
        path: &Path,
        device: &Device,
    ) -> Result<(Self, HashMap<String, gguf_file::Value>)> {
        let file = std::fs::File::open(path).map_err(|e| ModelError::io(path, e))?;
        // SAFETY: read-only mapping of a file we only read.
        let mmap = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| ModelError::io(path, e))?;
        let mut cursor = std::io::Cursor::new(&mmap[..]);
        let mut content = gguf_file::Content::read(&mut cursor).map_err(|e| {
            ModelError::format(path, format!("not a valid GGUF file: {}", first_line(&e)))
        })?;
        let metadata = std::mem::take(&mut content.metadata);
        // Every tensor must lie inside the file: catch truncation before any work starts.
        let len = mmap.len() as u64;
        for (name, info) in &content.tensor_infos {
            // Checked: a damaged dimension must not wrap around to a size that fits.
            let Some(elems) = info
                .shape
                .dims()
                .iter()
                .try_fold(1u64, |n, &d| n.checked_mul(d as u64))
            else {
                return Err(ModelError::Tensor {
                    path: path.to_path_buf(),
                    name: name.clone(),
                    message: format!(
                        "shape {:?} has more elements than can exist",
                        info.shape.dims()
                    ),
                });
            };
            let block = info.ggml_dtype.block_size() as u64;
            let bytes = (elems / block).saturating_mul(info.ggml_dtype.type_size() as u64);
            let start = content.tensor_data_offset.saturating_add(info.offset);
            if elems % block != 0 || start.saturating_add(bytes) > len {
                return Err(ModelError::Tensor {
                    path: path.to_path_buf(),
                    name: name.clone(),
                    message: format!(
                        "needs {bytes} bytes at offset {start} but the file has {len} bytes (truncated?)"
                    ),
                });
            }
        }
        Ok((
            Self {
                source: Source::Gguf {
                    content,
                    file: Arc::new(mmap),
                },
                path: path.to_path_buf(),
                device: device.clone(),
                dequantize: false,
                dtype: DType::F32,
                gguf_renamed: &[],
            },
            metadata,
        ))
    }

    /// A store over in-memory f32 tensors named canonically, shaped as the transformer asks.
    /// The tensors are used as they are (no copy), so a trainer's variables stay tracked.
    pub fn from_tensors(tensors: HashMap<String, Tensor>, device: &Device) -> Self {
        Self {
            source: Source::Memory(tensors),
            path: PathBuf::from("<memory>"),
            device: device.clone(),
            dequantize: false,
            dtype: DType::F32,
            gguf_renamed: &[],
        }
    }

    /// Every quantized tensor is expanded to f32 at load: slower and larger, but computes the
    /// file's weights exactly (no 8-bit rounding of activations in the matmuls).
    pub fn set_dequantize(&mut self, yes: bool) {
        self.dequantize = yes;
    }

    /// Float weights are given in `dtype` (f32, f16 or bf16); quantized GGUF blocks stay as
    /// they are.
    pub fn set_dtype(&mut self, dtype: DType) {
        self.dtype = dtype;
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// Whether any tensor of a GGUF file is stored in a block-quantized type.
    pub fn has_quantized(&self) -> bool {
        match &self.source {
            Source::Gguf { content, .. } => content.tensor_infos.values().any(|i| {
                !matches!(
                    i.ggml_dtype,
                    GgmlDType::F32 | GgmlDType::F16 | GgmlDType::BF16
                )
            }),
            _ => false,
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    pub fn is_gguf(&self) -> bool {
        matches!(self.source, Source::Gguf { .. })
    }

    /// Reads a GGUF file's tensors named as in `renamed` (canonical pattern → GGUF pattern)
    /// under their canonical names.
    pub fn set_gguf_renamed(&mut self, renamed: &'static [(&'static str, &'static str)]) {
        self.gguf_renamed = renamed;
    }

    /// The name a canonical tensor has in a GGUF file.
    fn gguf_name(&self, canonical: &str) -> String {
        let (pattern, layer, suffix) = split_canonical(canonical);
        match self.gguf_renamed.iter().find(|(c, _)| *c == pattern) {
            Some((_, g)) => {
                let g = match layer {
                    Some(i) => g.replace("{i}", &i.to_string()),
                    None => g.to_string(),
                };
                if suffix.is_empty() {
                    g
                } else {
                    format!("{g}.{suffix}")
                }
            }
            None => canonical.to_string(),
        }
    }

    fn checkpoint_name(&self, canonical: &str) -> Option<String> {
        match &self.source {
            Source::Gguf { .. } => Some(self.gguf_name(canonical)),
            Source::Memory(_) => Some(canonical.to_string()),
            Source::Safetensors { names, files, .. } => {
                let (pattern, layer, suffix) = split_canonical(canonical);
                // `a|b`: checkpoints of one family name a tensor either way (with or without a
                // `transformer.` prefix, say); the first one present wins.
                let candidates: Vec<String> = names
                    .get(pattern.as_str())?
                    .split('|')
                    .map(|m| {
                        let m = match layer {
                            Some(i) => m.replace("{i}", &i.to_string()),
                            None => m.to_string(),
                        };
                        if suffix.is_empty() {
                            m
                        } else {
                            format!("{m}.{suffix}")
                        }
                    })
                    .collect();
                candidates
                    .iter()
                    .find(|c| files.get(c).is_ok())
                    .or(candidates.first())
                    .cloned()
            }
        }
    }

    pub fn contains(&self, canonical: &str) -> bool {
        let Some(name) = self.checkpoint_name(canonical) else {
            return false;
        };
        match &self.source {
            Source::Gguf { content, .. } => content.tensor_infos.contains_key(&name),
            Source::Safetensors { files, .. } => files.get(&name).is_ok(),
            Source::Memory(map) => map.contains_key(&name),
        }
    }

    fn err(&self, canonical: &str, message: impl Into<String>) -> ModelError {
        ModelError::Tensor {
            path: self.path.clone(),
            name: self
                .checkpoint_name(canonical)
                .unwrap_or_else(|| canonical.to_string()),
            message: message.into(),
        }
    }

    fn check_shape(&self, canonical: &str, got: &[usize], want: &[usize]) -> Result<()> {
        if got != want {
            return Err(self.err(
                canonical,
                format!("has shape {got:?}, but the config implies {want:?}"),
            ));
        }
        Ok(())
    }

    fn qtensor(&self, canonical: &str) -> Result<QTensor> {
        let Source::Gguf { content, file } = &self.source else {
            return Err(self.err(canonical, "is not in a GGUF file"));
        };
        let name = self.gguf_name(canonical);
        let info = content
            .tensor_infos
            .get(&name)
            .ok_or_else(|| self.err(canonical, "is missing from the checkpoint"))?;
        let dtype = info.ggml_dtype;
        let len = info.shape.elem_count() / dtype.block_size() * dtype.type_size();
        // In bounds: every tensor's range was checked against the file size at open. Built from
        // the mapping directly: one copy, not a read buffer and then a copy.
        let start = (content.tensor_data_offset + info.offset) as usize;
        let q = candle_core::quantized::ggml_file::qtensor_from_ggml(
            dtype,
            &file[start..start + len],
            info.shape.dims().to_vec(),
            &self.device,
        )
        .map_err(|e| self.err(canonical, first_line(&e)))?;
        // The tensor now owns a copy: drop the mapped pages it was read from from this
        // process's resident set, so that the bytes are not resident twice (they stay in the
        // page cache, and a later read of the mapping faults them back in).
        // SAFETY: a read-only file mapping, in bounds; DONTNEED only drops page-table entries,
        // and the bytes read back from the file. Failure is harmless.
        #[cfg(unix)]
        let _ =
            unsafe { file.unchecked_advise_range(memmap2::UncheckedAdvice::DontNeed, start, len) };
        Ok(q)
    }

    /// Every tensor of the checkpoint under its canonical name, and the checkpoint names that
    /// no entry of the family's table maps (reported, not loaded). Used by tools that copy a
    /// whole checkpoint (the quantizer); the forward pass asks for names instead.
    pub fn canonical_names(&self) -> (Vec<String>, Vec<String>) {
        match &self.source {
            Source::Gguf { content, .. } => {
                (content.tensor_infos.keys().cloned().collect(), vec![])
            }
            Source::Safetensors { files, names, .. } => {
                let mut found = Vec::new();
                let mut unmapped = Vec::new();
                for (name, _) in files.tensors() {
                    let canonical = names.iter().find_map(|(canon, stored)| {
                        stored
                            .split('|')
                            .find_map(|alt| match_pattern(alt, &name))
                            .map(|(layer, suffix)| {
                                let c = match layer {
                                    Some(i) => canon.replace("{i}", &i.to_string()),
                                    None => canon.to_string(),
                                };
                                format!("{c}{suffix}")
                            })
                    });
                    match canonical {
                        Some(c) => found.push(c),
                        None => unmapped.push(name),
                    }
                }
                (found, unmapped)
            }
            Source::Memory(tensors) => (tensors.keys().cloned().collect(), vec![]),
        }
    }

    /// The stored shape (row-major, outermost first) of a tensor, without loading it.
    pub fn stored_shape(&self, canonical: &str) -> Option<Vec<usize>> {
        let name = self.checkpoint_name(canonical)?;
        match &self.source {
            Source::Gguf { content, .. } => content
                .tensor_infos
                .get(&name)
                .map(|i| i.shape.dims().to_vec()),
            Source::Safetensors { files, .. } => files.get(&name).ok().map(|v| v.shape().to_vec()),
            Source::Memory(tensors) => tensors.get(&name).map(|t| t.dims().to_vec()),
        }
    }

    /// The block type of a GGUF tensor stored quantized, read from the header alone (`None` for
    /// float tensors and for safetensors checkpoints).
    pub fn stored_block_type(&self, canonical: &str) -> Option<GgmlDType> {
        let Source::Gguf { content, .. } = &self.source else {
            return None;
        };
        content
            .tensor_infos
            .get(&self.gguf_name(canonical))
            .map(|i| i.ggml_dtype)
            .filter(|t| !matches!(t, GgmlDType::F32 | GgmlDType::F16 | GgmlDType::BF16))
    }

    /// A GGUF tensor stored in a block-quantized type, as it is in the file (`None` for float
    /// tensors and for safetensors checkpoints).
    pub fn stored_quantized(&self, canonical: &str) -> Result<Option<QTensor>> {
        let Source::Gguf { content, .. } = &self.source else {
            return Ok(None);
        };
        match content.tensor_infos.get(&self.gguf_name(canonical)) {
            Some(info)
                if !matches!(
                    info.ggml_dtype,
                    GgmlDType::F32 | GgmlDType::F16 | GgmlDType::BF16
                ) =>
            {
                self.qtensor(canonical).map(Some)
            }
            _ => Ok(None),
        }
    }

    /// A float tensor converted to the store's type (f32 unless set), with its shape checked.
    pub fn dense(&self, canonical: &str, shape: &[usize]) -> Result<Tensor> {
        let name = self
            .checkpoint_name(canonical)
            .ok_or_else(|| self.err(canonical, "has no name in this family's tensor map"))?;
        let t = match &self.source {
            Source::Safetensors {
                files, transposed, ..
            } => {
                if files.get(&name).is_err() {
                    return Err(self.err(canonical, "is missing from the checkpoint"));
                }
                let t = files
                    .load(&name, &self.device)
                    .map_err(|e| self.err(canonical, first_line(&e)))?;
                let (pattern, _, suffix) = split_canonical(canonical);
                if suffix == "weight" && t.rank() == 2 && transposed.contains(&pattern.as_str()) {
                    t.t()?.contiguous()?
                } else {
                    t
                }
            }
            Source::Gguf { content, .. } => {
                if !content.tensor_infos.contains_key(&name) {
                    return Err(self.err(canonical, "is missing from the checkpoint"));
                }
                self.qtensor(canonical)?.dequantize(&self.device)?
            }
            Source::Memory(map) => map
                .get(&name)
                .ok_or_else(|| self.err(canonical, "is missing from the checkpoint"))?
                .clone(),
        };
        self.check_shape(canonical, t.dims(), shape)?;
        Ok(t.to_dtype(self.dtype)?)
    }

    pub fn optional_dense(&self, canonical: &str, shape: &[usize]) -> Result<Option<Tensor>> {
        if self.contains(canonical) {
            self.dense(canonical, shape).map(Some)
        } else {
            Ok(None)
        }
    }

    /// A quantized GGUF matrix `[out, in]` as the bytes of its blocks inside the mapped file,
    /// without copying them (kernels read them in place). `None` for float tensors, other
    /// checkpoint formats, or when the store dequantizes.
    pub fn quantized_raw(&self, canonical: &str, shape: &[usize]) -> Result<Option<RawTensor>> {
        let (Source::Gguf { content, file }, false) = (&self.source, self.dequantize) else {
            return Ok(None);
        };
        let Some(info) = content.tensor_infos.get(&self.gguf_name(canonical)) else {
            return Ok(None);
        };
        // F16 is read in place too (camelid's F16 kernel); F32 and BF16 are not.
        if matches!(info.ggml_dtype, GgmlDType::F32 | GgmlDType::BF16) {
            return Ok(None);
        }
        self.check_shape(canonical, info.shape.dims(), shape)?;
        let dtype = info.ggml_dtype;
        let len = info.shape.elem_count() / dtype.block_size() * dtype.type_size();
        // In bounds: every tensor's range was checked against the file size at open.
        let start = (content.tensor_data_offset + info.offset) as usize;
        Ok(Some(RawTensor {
            dtype,
            file: file.clone(),
            range: start..start + len,
        }))
    }

    /// A matmul weight `[out, in]`: quantized GGUF blocks stay quantized, floats take the
    /// store's type.
    pub fn matrix(&self, canonical: &str, shape: &[usize]) -> Result<Matrix> {
        if let (Source::Gguf { content, .. }, false) = (&self.source, self.dequantize) {
            if let Some(info) = content.tensor_infos.get(&self.gguf_name(canonical)) {
                if !matches!(
                    info.ggml_dtype,
                    GgmlDType::F32 | GgmlDType::F16 | GgmlDType::BF16
                ) {
                    let q = self.qtensor(canonical)?;
                    self.check_shape(canonical, q.shape().dims(), shape)?;
                    return Ok(Matrix::Quantized(Arc::new(q)));
                }
            }
        }
        self.dense(canonical, shape).map(Matrix::Dense)
    }
}

impl Matrix {
    pub fn out_dim(&self) -> usize {
        match self {
            Matrix::Dense(t) => t.dims()[0],
            Matrix::Quantized(q) => q.shape().dims()[0],
        }
    }

    pub fn to_qmatmul(&self) -> Result<QMatMul> {
        Ok(match self {
            Matrix::Dense(t) => QMatMul::Tensor(t.clone()),
            Matrix::Quantized(q) => QMatMul::from_arc(q.clone())?,
        })
    }

    /// Rows `[start, start+len)` as a dense f32 tensor (used to split fused projections).
    pub fn rows(&self, start: usize, len: usize) -> Result<Matrix> {
        match self {
            Matrix::Dense(t) => Ok(Matrix::Dense(t.narrow(0, start, len)?.contiguous()?)),
            Matrix::Quantized(q) => Ok(Matrix::Dense(
                q.dequantize(&q.device())?
                    .narrow(0, start, len)?
                    .contiguous()?,
            )),
        }
    }
}

/// Matches a checkpoint name against a table pattern (`model.layers.{i}.mlp.up_proj`):
/// returns the layer index (if the pattern has one) and the rest of the name (`.weight`).
fn match_pattern(pattern: &str, name: &str) -> Option<(Option<usize>, String)> {
    let rest_of = |rest: &str| -> Option<String> {
        (rest.is_empty() || rest.starts_with('.')).then(|| rest.to_string())
    };
    match pattern.split_once("{i}") {
        None => rest_of(name.strip_prefix(pattern)?).map(|r| (None, r)),
        Some((pre, post)) => {
            let tail = name.strip_prefix(pre)?;
            let digits = tail.chars().take_while(char::is_ascii_digit).count();
            let layer = tail[..digits].parse::<usize>().ok()?;
            let r = rest_of(tail[digits..].strip_prefix(post)?)?;
            Some((Some(layer), r))
        }
    }
}

/// Reads a safetensors header and checks every tensor's byte range against the file size, so a
/// truncated download is reported with its file name instead of failing later.
fn check_safetensors_header(path: &Path) -> Result<()> {
    use std::io::Read;
    let mut f = std::fs::File::open(path).map_err(|e| ModelError::io(path, e))?;
    let len = f.metadata().map_err(|e| ModelError::io(path, e))?.len();
    let mut n = [0u8; 8];
    f.read_exact(&mut n)
        .map_err(|_| ModelError::format(path, "truncated safetensors file (no header)"))?;
    let header_len = u64::from_le_bytes(n);
    if header_len > 100_000_000 || 8 + header_len > len {
        return Err(ModelError::format(
            path,
            format!("safetensors header claims {header_len} bytes but the file has {len} (truncated or not safetensors)"),
        ));
    }
    let mut header = vec![0u8; header_len as usize];
    f.read_exact(&mut header)
        .map_err(|e| ModelError::io(path, e))?;
    let json: serde_json::Value = serde_json::from_slice(&header)
        .map_err(|e| ModelError::format(path, format!("safetensors header is not JSON: {e}")))?;
    let data_len = len - 8 - header_len;
    if let Some(obj) = json.as_object() {
        for (name, info) in obj {
            if name == "__metadata__" {
                continue;
            }
            let end = info
                .get("data_offsets")
                .and_then(|o| o.get(1))
                .and_then(|e| e.as_u64())
                .ok_or_else(|| {
                    ModelError::format(path, format!("tensor \"{name}\" has no data_offsets"))
                })?;
            if end > data_len {
                return Err(ModelError::Tensor {
                    path: path.to_path_buf(),
                    name: name.clone(),
                    message: format!(
                        "ends at byte {end} of the data section, but the file holds only {data_len} (truncated?)"
                    ),
                });
            }
        }
    }
    Ok(())
}
