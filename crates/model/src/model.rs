//! Loading a whole model from disk: an HF directory or one GGUF file becomes a [`Model`]
//! (spec + transformer + tokenizer + chat template + stop ids).

use crate::chat_template::ChatTemplate;
use crate::checkpoint::WeightStore;
use crate::config::HfConfig;
use crate::error::{ModelError, Result};
use crate::families::{self, GgufReader};
use crate::tokenizer::Tokenizer;
use crate::transformer::Transformer;
use candle_core::{DType, Device};
use serde_json::Value;
use std::path::{Path, PathBuf};

pub struct Model {
    pub name: String,
    pub path: PathBuf,
    pub transformer: Transformer,
    /// Encoder-decoder models (T5): the encoder stack; `transformer` is then the decoder.
    pub encoder: Option<Transformer>,
    /// The decoder's first input id (encoder-decoder models).
    pub decoder_start_id: Option<u32>,
    pub tokenizer: Option<Tokenizer>,
    pub chat_template: ChatTemplate,
    /// Ids that end generation (the tokenizer's EOS plus the generation config's).
    pub eos_ids: Vec<u32>,
    /// How `embed` turns hidden states into one vector.
    pub pooling: Pooling,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PoolingKind {
    /// Average over the tokens.
    Mean,
    /// The first token's state (BERT's [CLS]).
    Cls,
}

/// Sentence-embedding pooling, as a sentence-transformers directory declares it
/// (`modules.json`, `1_Pooling/config.json`); mean pooling with L2 normalization otherwise.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pooling {
    pub kind: PoolingKind,
    pub normalize: bool,
    /// sentence-transformers' `max_seq_length`: longer texts are cut to it (keeping the final
    /// special token), as sentence-transformers does; callers are told when it happens.
    pub max_tokens: Option<usize>,
}

impl Default for Pooling {
    fn default() -> Self {
        Self {
            kind: PoolingKind::Mean,
            normalize: true,
            max_tokens: None,
        }
    }
}

fn read_pooling(dir: &Path) -> Result<Pooling> {
    let Some(modules) = read_json_opt(&dir.join("modules.json"))? else {
        return Ok(Pooling::default());
    };
    let list = modules.as_array().cloned().unwrap_or_default();
    let kind_of = |m: &Value| {
        m.get("type")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string()
    };
    let normalize = list.iter().any(|m| kind_of(m).ends_with(".Normalize"));
    let mut kind = PoolingKind::Mean;
    if let Some(p) = list.iter().find(|m| kind_of(m).ends_with(".Pooling")) {
        let sub = p.get("path").and_then(Value::as_str).unwrap_or("1_Pooling");
        if let Some(cfg) = read_json_opt(&dir.join(sub).join("config.json"))? {
            let flag = |k: &str| cfg.get(k).and_then(Value::as_bool).unwrap_or(false);
            kind = if flag("pooling_mode_cls_token") {
                PoolingKind::Cls
            } else if flag("pooling_mode_mean_tokens") {
                PoolingKind::Mean
            } else {
                return Err(ModelError::config(
                    &dir.join(sub).join("config.json"),
                    "only mean and CLS pooling are supported",
                ));
            };
        }
    }
    let max_tokens = read_json_opt(&dir.join("sentence_bert_config.json"))?
        .and_then(|c| c.get("max_seq_length").and_then(Value::as_u64))
        .map(|n| n as usize);
    Ok(Pooling {
        kind,
        normalize,
        max_tokens,
    })
}

/// Choices made at load time.
#[derive(Debug, Clone, Default)]
pub struct LoadOptions {
    /// Expand quantized weights to f32 (exact math on the file's weights; for reference runs).
    pub dequantize: bool,
    /// The float weights' (and activations') type; `None`: [`default_dtype`].
    pub dtype: Option<DType>,
}

/// The type a model computes in when none is asked for: f32 on the CPU; bf16 on a GPU, except
/// for quantized GGUF files, whose block matmuls take f32 activations.
pub fn default_dtype(device: &Device, quantized: bool) -> DType {
    if device.is_cpu() || quantized {
        DType::F32
    } else {
        DType::BF16
    }
}

/// Parses a `--dtype` value.
pub fn parse_dtype(name: &str) -> Result<DType> {
    match name.to_ascii_lowercase().as_str() {
        "f32" | "float32" => Ok(DType::F32),
        "f16" | "float16" | "half" => Ok(DType::F16),
        "bf16" | "bfloat16" => Ok(DType::BF16),
        other => Err(ModelError::Input(format!(
            "--dtype {other}: unknown type (use f32, f16 or bf16)"
        ))),
    }
}

fn choose_dtype(
    path: &Path,
    device: &Device,
    quantized: bool,
    opts: &LoadOptions,
) -> Result<DType> {
    match opts.dtype {
        None => Ok(default_dtype(device, quantized)),
        Some(d) if !matches!(d, DType::F32 | DType::F16 | DType::BF16) => Err(ModelError::Input(
            format!("{d:?}: weights load as f32, f16 or bf16"),
        )),
        Some(d) if quantized && d != DType::F32 => Err(ModelError::config(
            path,
            format!(
                "the file's weights are block-quantized and compute with f32 activations; {} applies to float checkpoints (use f32)",
                d.as_str()
            ),
        )),
        Some(d) => Ok(d),
    }
}

impl Model {
    pub fn load(path: &Path, device: &Device) -> Result<Self> {
        Self::load_with(path, device, &LoadOptions::default())
    }

    pub fn load_with(path: &Path, device: &Device, opts: &LoadOptions) -> Result<Self> {
        if path.is_dir() {
            load_hf_dir(path, device, opts)
        } else if path.is_file() {
            load_gguf(path, device, opts)
        } else {
            Err(ModelError::io(
                path,
                std::io::Error::new(std::io::ErrorKind::NotFound, "no such file or directory"),
            ))
        }
    }

    pub fn is_encoder_decoder(&self) -> bool {
        self.encoder.is_some()
    }

    pub fn spec(&self) -> &crate::spec::ArchSpec {
        self.transformer.spec()
    }

    /// How many large products run through candle's quantized matmul (on candle's thread pool)
    /// instead of camelid's kernels: zero when every quantized type of the file has a kernel.
    pub fn candle_quantized_products(&self) -> usize {
        self.transformer.candle_quantized_products()
            + self
                .encoder
                .as_ref()
                .map_or(0, |e| e.candle_quantized_products())
    }

    pub fn tokenizer(&self) -> Result<&Tokenizer> {
        self.tokenizer.as_ref().ok_or_else(|| {
            ModelError::tokenizer(
                &self.path,
                "the model has no tokenizer (no tokenizer.json, tokenizer.model or GGUF vocabulary); pass token ids instead",
            )
        })
    }
}

fn token_text(v: Option<&Value>) -> Option<String> {
    match v? {
        Value::String(s) => Some(s.clone()),
        Value::Object(o) => o.get("content").and_then(Value::as_str).map(str::to_string),
        _ => None,
    }
}

fn ids_of(v: Option<&Value>) -> Vec<u32> {
    match v {
        Some(Value::Number(n)) => n.as_u64().map(|x| vec![x as u32]).unwrap_or_default(),
        Some(Value::Array(a)) => a
            .iter()
            .filter_map(|x| x.as_u64())
            .map(|x| x as u32)
            .collect(),
        _ => Vec::new(),
    }
}

fn read_json_opt(path: &Path) -> Result<Option<Value>> {
    if !path.exists() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(path).map_err(|e| ModelError::io(path, e))?;
    serde_json::from_str(&text)
        .map(Some)
        .map_err(|e| ModelError::config(path, format!("invalid JSON: {e}")))
}

/// An HF model directory opened up to its weights: the config, the family its `model_type`
/// names, the spec, and the memory-mapped safetensors. Loading a model and tools that copy a
/// whole checkpoint (the quantizer) both start here.
pub struct HfCheckpoint {
    pub config: HfConfig,
    pub family: &'static families::Family,
    pub spec: crate::ArchSpec,
    pub store: WeightStore,
}

pub fn open_hf_checkpoint(dir: &Path, device: &Device) -> Result<HfCheckpoint> {
    let config_path = dir.join("config.json");
    if !config_path.exists() {
        return Err(ModelError::config(
            dir,
            "not a model directory: config.json is missing",
        ));
    }
    let config = HfConfig::read(&config_path)?;
    let model_type = config
        .model_type()
        .ok_or_else(|| config.err("missing \"model_type\""))?
        .to_string();
    let family = families::by_model_type(&model_type).ok_or_else(|| ModelError::UnknownFamily {
        path: config_path.clone(),
        model_type: model_type.clone(),
        known: families::known_model_types(),
    })?;
    let spec = (family.from_config)(&config)?;
    // Checked here, not only when the transformer loads: tools that copy the checkpoint (the
    // quantizer) size their work from the spec too.
    spec.validate().map_err(|m| config.err(m))?;
    let store =
        WeightStore::open_safetensors(dir, family.hf_tensor_names, family.hf_transposed, device)?;
    Ok(HfCheckpoint {
        config,
        family,
        spec,
        store,
    })
}

fn load_hf_dir(dir: &Path, device: &Device, opts: &LoadOptions) -> Result<Model> {
    let HfCheckpoint {
        config: cfg,
        spec,
        mut store,
        ..
    } = open_hf_checkpoint(dir, device)?;
    store.set_dtype(choose_dtype(dir, device, false, opts)?);
    let encoder = if spec.encoder_layers > 0 {
        Some(Transformer::load(spec.encoder_spec(), &store)?)
    } else {
        None
    };
    let transformer = Transformer::load_sharing(spec, &store, encoder.as_ref())?;

    let tok_cfg = read_json_opt(&dir.join("tokenizer_config.json"))?;
    let gen_cfg = read_json_opt(&dir.join("generation_config.json"))?;
    let mut tokenizer = if dir.join("tokenizer.json").exists() {
        Some(Tokenizer::from_hf_file(&dir.join("tokenizer.json"))?)
    } else if dir.join("tokenizer.model").exists() {
        Some(Tokenizer::from_sentencepiece_file(
            &dir.join("tokenizer.model"),
        )?)
    } else {
        None
    };

    let tc = tok_cfg.as_ref();
    let bos_text = token_text(tc.and_then(|t| t.get("bos_token")));
    let eos_text = token_text(tc.and_then(|t| t.get("eos_token")));
    let decoder_start_id = match &encoder {
        Some(_) => ["decoder_start_token_id", "pad_token_id"]
            .iter()
            .find_map(|k| {
                ids_of(gen_cfg.as_ref().and_then(|g| g.get(*k)))
                    .first()
                    .or(ids_of(cfg.get(k)).first())
                    .copied()
            })
            .or(Some(0)),
        None => None,
    };
    let mut eos_ids = ids_of(gen_cfg.as_ref().and_then(|g| g.get("eos_token_id")));
    eos_ids.extend(ids_of(cfg.get("eos_token_id")));
    if let Some(tok) = tokenizer.as_mut() {
        let bos = bos_text
            .as_deref()
            .and_then(|t| tok.token_to_id(t))
            .or(tok.bos_id);
        if let Some(e) = eos_text.as_deref().and_then(|t| tok.token_to_id(t)) {
            eos_ids.push(e);
        }
        eos_ids.extend(tok.eos_ids.iter().copied());
        let add_bos = tc
            .and_then(|t| t.get("add_bos_token"))
            .and_then(Value::as_bool)
            .unwrap_or(tok.add_bos);
        let eos = dedup(eos_ids.clone());
        tok.set_special(bos, eos, add_bos);
    }
    let template_src = tc
        .and_then(|t| t.get("chat_template"))
        .and_then(|v| match v {
            Value::String(s) => Some(s.clone()),
            // Newer files list named templates; "default" is the chat one.
            Value::Array(list) => list
                .iter()
                .find(|e| e.get("name").and_then(Value::as_str) == Some("default"))
                .and_then(|e| e.get("template"))
                .and_then(Value::as_str)
                .map(str::to_string),
            _ => None,
        });
    let template_src = match template_src {
        Some(s) => Some(s),
        None => {
            let jinja = dir.join("chat_template.jinja");
            if jinja.exists() {
                Some(std::fs::read_to_string(&jinja).map_err(|e| ModelError::io(&jinja, e))?)
            } else {
                None
            }
        }
    };
    let chat_template = ChatTemplate::new(
        template_src,
        bos_text.as_deref().unwrap_or(""),
        eos_text.as_deref().unwrap_or(""),
    )?;
    Ok(Model {
        name: display_name(dir),
        path: dir.to_path_buf(),
        transformer,
        encoder,
        decoder_start_id,
        tokenizer,
        chat_template,
        eos_ids: dedup(eos_ids),
        pooling: read_pooling(dir)?,
    })
}

fn load_gguf(path: &Path, device: &Device, opts: &LoadOptions) -> Result<Model> {
    let (mut store, meta) = WeightStore::open_gguf(path, device)?;
    store.set_dequantize(opts.dequantize);
    let quantized = store.has_quantized() && !opts.dequantize;
    store.set_dtype(choose_dtype(path, device, quantized, opts)?);
    let mut reader = GgufReader::new(&meta, path)?;
    reader.store = Some(&store);
    let family = families::by_gguf_arch(&reader.arch)
        .filter(|f| f.from_gguf.is_some())
        .ok_or_else(|| ModelError::UnknownFamily {
            path: path.to_path_buf(),
            model_type: reader.arch.clone(),
            known: families::FAMILIES
                .iter()
                .flat_map(|f| f.gguf_archs.iter().copied())
                .collect::<Vec<_>>()
                .join(", "),
        })?;
    let from_gguf = family
        .from_gguf
        .ok_or_else(|| ModelError::format(path, "family has no GGUF reader"))?;
    let spec = from_gguf(&reader)?;
    // Tensors the architecture names apart from camelid's canonical names (Falcon-40B's norms).
    if let Some(renamed) = families::GGUF_EXPORTS
        .iter()
        .find(|e| e.family == family.name && e.arch == reader.arch)
        .map(|e| e.renamed)
        .filter(|r| {
            !r.is_empty()
                && r.iter()
                    .all(|(_, g)| store.contains(&format!("{}.weight", g.replace("{i}", "0"))))
        })
    {
        store.set_gguf_renamed(renamed);
    }
    let transformer = Transformer::load(spec, &store)?;
    let tokenizer = if meta.contains_key("tokenizer.ggml.tokens") {
        Some(Tokenizer::from_gguf_metadata(&meta, path)?)
    } else {
        None
    };
    let template_src = meta
        .get("tokenizer.chat_template")
        .and_then(|v| v.to_string().ok())
        .cloned();
    let (bos_text, eos_text) = match &tokenizer {
        Some(t) => (
            t.bos_id.and_then(|i| t.id_to_token(i)).unwrap_or_default(),
            t.eos_ids
                .first()
                .and_then(|&i| t.id_to_token(i))
                .unwrap_or_default(),
        ),
        None => (String::new(), String::new()),
    };
    let chat_template = ChatTemplate::new(template_src, &bos_text, &eos_text)?;
    let mut eos_ids: Vec<u32> = tokenizer
        .as_ref()
        .map(|t| t.eos_ids.clone())
        .unwrap_or_default();
    for key in ["tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id"] {
        if let Some(id) = meta.get(key).and_then(|v| v.to_u32().ok()) {
            eos_ids.push(id);
        }
    }
    Ok(Model {
        name: display_name(path),
        path: path.to_path_buf(),
        transformer,
        encoder: None,
        decoder_start_id: None,
        tokenizer,
        chat_template,
        eos_ids: dedup(eos_ids),
        pooling: Pooling::default(),
    })
}

fn dedup(mut v: Vec<u32>) -> Vec<u32> {
    let mut seen = std::collections::HashSet::new();
    v.retain(|x| seen.insert(*x));
    v
}

fn display_name(path: &Path) -> String {
    path.file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| path.display().to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_dtype_is_f32_on_the_cpu_and_for_quantized_files() {
        assert_eq!(default_dtype(&Device::Cpu, false), DType::F32);
        assert_eq!(default_dtype(&Device::Cpu, true), DType::F32);
    }

    #[test]
    fn dtypes_are_checked_against_the_checkpoint() {
        let path = Path::new("m.gguf");
        let with = |dtype| LoadOptions {
            dtype,
            ..Default::default()
        };
        let cpu = Device::Cpu;
        assert_eq!(
            choose_dtype(path, &cpu, false, &with(None)).unwrap(),
            DType::F32
        );
        for d in [DType::F32, DType::F16, DType::BF16] {
            assert_eq!(choose_dtype(path, &cpu, false, &with(Some(d))).unwrap(), d);
        }
        assert_eq!(
            choose_dtype(path, &cpu, true, &with(Some(DType::F32))).unwrap(),
            DType::F32
        );
        let e = choose_dtype(path, &cpu, true, &with(Some(DType::BF16)))
            .unwrap_err()
            .to_string();
        assert!(e.contains("block-quantized") && e.contains("bf16"), "{e}");
        assert!(choose_dtype(path, &cpu, false, &with(Some(DType::U32))).is_err());
        assert!(parse_dtype("int8").is_err());
        assert_eq!(parse_dtype("BF16").unwrap(), DType::BF16);
    }
}
