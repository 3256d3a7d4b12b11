//! Reading OpenAI request bodies field by field, so a wrong type or value is reported with
//! the field's name (`param`) rather than as a generic parse error.

use crate::error::{ApiError, ApiResult};
use camelid_engine::json_constraint::Schema;
use serde::de::DeserializeOwned;
use serde_json::{Map, Value};
use std::sync::Arc;

pub struct Body {
    obj: Map<String, Value>,
}

/// The longest stop list OpenAI accepts.
const MAX_STOPS: usize = 4;
pub const MAX_TOP_LOGPROBS: usize = 20;

impl Body {
    pub fn parse(bytes: &[u8]) -> ApiResult<Self> {
        let value: Value = serde_json::from_slice(bytes).map_err(|e| {
            ApiError::invalid(format!("the request body is not valid JSON: {e}"), None)
                .with_code("invalid_json")
        })?;
        match value {
            Value::Object(obj) => Ok(Self { obj }),
            other => Err(ApiError::invalid(
                format!(
                    "the request body must be a JSON object, not {}",
                    type_name(&other)
                ),
                None,
            )),
        }
    }

    pub fn raw(&self, name: &str) -> Option<&Value> {
        self.obj.get(name).filter(|v| !v.is_null())
    }

    /// The field as `T`; absent and `null` are `None`.
    pub fn get<T: DeserializeOwned>(&self, name: &str, expected: &str) -> ApiResult<Option<T>> {
        match self.raw(name) {
            None => Ok(None),
            Some(v) => serde_json::from_value(v.clone()).map(Some).map_err(|_| {
                ApiError::invalid(
                    format!(
                        "invalid type for `{name}`: expected {expected}, got {}",
                        type_name(v)
                    ),
                    Some(name),
                )
                .with_code("invalid_type")
            }),
        }
    }

    pub fn number(&self, name: &str, lo: f64, hi: f64) -> ApiResult<Option<f32>> {
        let v: Option<f64> = self.get(name, "a number")?;
        if let Some(x) = v {
            if !(lo..=hi).contains(&x) {
                return Err(ApiError::invalid(
                    format!("`{name}` must be between {lo} and {hi}, got {x}"),
                    Some(name),
                )
                .with_code("invalid_value"));
            }
        }
        Ok(v.map(|x| x as f32))
    }

    pub fn count(&self, name: &str) -> ApiResult<Option<usize>> {
        self.get::<u64>(name, "a non-negative integer")
            .map(|v| v.map(|x| x as usize))
    }
}

pub fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// Fields shared by completions and chat completions.
#[derive(Debug, Clone)]
pub struct Common {
    pub model: String,
    pub max_tokens: Option<usize>,
    pub temperature: f32,
    pub top_p: f32,
    pub top_k: usize,
    pub min_p: f32,
    pub repetition_penalty: f32,
    pub presence_penalty: f32,
    pub frequency_penalty: f32,
    pub n: usize,
    pub stop: Vec<String>,
    pub seed: Option<u64>,
    pub logit_bias: Vec<(u32, f32)>,
    pub stream: bool,
    pub include_usage: bool,
    pub ignore_eos: bool,
    /// `response_format`: JSON output, constrained to this schema.
    pub json: Option<Arc<Schema>>,
}

impl Common {
    pub fn parse(b: &Body, max_n: usize, vocab: usize) -> ApiResult<Self> {
        let model = b
            .get::<String>("model", "a string")?
            .ok_or_else(|| ApiError::invalid("`model` is required", Some("model")))?;
        let n = b.count("n")?.unwrap_or(1);
        if n == 0 || n > max_n {
            return Err(ApiError::invalid(
                format!("`n` must be between 1 and {max_n}, got {n}"),
                Some("n"),
            )
            .with_code("invalid_value"));
        }
        let stop = match b.raw("stop") {
            None => Vec::new(),
            Some(Value::String(s)) => vec![s.clone()],
            Some(Value::Array(items)) => {
                let mut out = Vec::new();
                for (i, it) in items.iter().enumerate() {
                    match it {
                        Value::String(s) => out.push(s.clone()),
                        other => {
                            return Err(ApiError::invalid(
                                format!(
                                    "invalid type for `stop[{i}]`: expected a string, got {}",
                                    type_name(other)
                                ),
                                Some("stop"),
                            )
                            .with_code("invalid_type"))
                        }
                    }
                }
                if out.len() > MAX_STOPS {
                    return Err(ApiError::invalid(
                        format!(
                            "`stop` takes at most {MAX_STOPS} strings, got {}",
                            out.len()
                        ),
                        Some("stop"),
                    ));
                }
                out
            }
            Some(other) => {
                return Err(ApiError::invalid(
                    format!(
                        "invalid type for `stop`: expected a string or an array of strings, got {}",
                        type_name(other)
                    ),
                    Some("stop"),
                )
                .with_code("invalid_type"))
            }
        };
        let mut logit_bias = Vec::new();
        if let Some(map) = b.get::<Map<String, Value>>("logit_bias", "an object")? {
            for (k, v) in map {
                let id: u32 = k
                    .parse()
                    .ok()
                    .filter(|&i| (i as usize) < vocab)
                    .ok_or_else(|| {
                        ApiError::invalid(
                            format!("`logit_bias` key `{k}` is not a token id below {vocab}"),
                            Some("logit_bias"),
                        )
                    })?;
                let bias = v
                    .as_f64()
                    .filter(|x| (-100.0..=100.0).contains(x))
                    .ok_or_else(|| {
                        ApiError::invalid(
                            format!(
                                "`logit_bias` value for token {id} must be a number in [-100, 100]"
                            ),
                            Some("logit_bias"),
                        )
                    })?;
                logit_bias.push((id, bias as f32));
            }
        }
        let include_usage = match b.get::<Map<String, Value>>("stream_options", "an object")? {
            Some(o) => match o.get("include_usage") {
                None | Some(Value::Null) => false,
                Some(Value::Bool(x)) => *x,
                Some(other) => {
                    return Err(ApiError::invalid(
                        format!(
                            "invalid type for `stream_options.include_usage`: expected a boolean, got {}",
                            type_name(other)
                        ),
                        Some("stream_options"),
                    )
                    .with_code("invalid_type"))
                }
            },
            None => false,
        };
        let _user: Option<String> = b.get("user", "a string")?;
        let json = response_format(b)?;
        Ok(Self {
            model,
            max_tokens: None,
            temperature: b.number("temperature", 0.0, 2.0)?.unwrap_or(1.0),
            top_p: match b.number("top_p", 0.0, 1.0)? {
                Some(0.0) => {
                    return Err(ApiError::invalid("`top_p` must be above 0", Some("top_p")))
                }
                p => p.unwrap_or(1.0),
            },
            top_k: b
                .get::<i64>("top_k", "an integer")?
                .map(|k| k.max(0) as usize)
                .unwrap_or(0),
            min_p: b.number("min_p", 0.0, 1.0)?.unwrap_or(0.0),
            repetition_penalty: match b.number("repetition_penalty", 0.0, 10.0)? {
                Some(0.0) => {
                    return Err(ApiError::invalid(
                        "`repetition_penalty` must be above 0",
                        Some("repetition_penalty"),
                    ))
                }
                p => p.unwrap_or(1.0),
            },
            presence_penalty: b.number("presence_penalty", -2.0, 2.0)?.unwrap_or(0.0),
            frequency_penalty: b.number("frequency_penalty", -2.0, 2.0)?.unwrap_or(0.0),
            n,
            stop,
            seed: b.get::<i64>("seed", "an integer")?.map(|s| s as u64),
            logit_bias,
            stream: b.get("stream", "a boolean")?.unwrap_or(false),
            include_usage,
            ignore_eos: b.get("ignore_eos", "a boolean")?.unwrap_or(false),
            json,
        })
    }
}

/// A prompt as OpenAI accepts it: text, or token ids.
#[derive(Debug, Clone)]
pub enum Prompt {
    Text(String),
    Ids(Vec<u32>),
}

/// `prompt` / `input`: a string, an array of strings, an array of token ids, or an array of
/// arrays of token ids.
pub fn prompts(b: &Body, name: &str) -> ApiResult<Vec<Prompt>> {
    let bad = |what: String| ApiError::invalid(what, Some(name)).with_code("invalid_type");
    let ids = |v: &Value| -> Option<Vec<u32>> {
        v.as_array()?
            .iter()
            .map(|x| x.as_u64().and_then(|i| u32::try_from(i).ok()))
            .collect()
    };
    let out = match b.raw(name) {
        None => {
            return Err(ApiError::invalid(
                format!("`{name}` is required"),
                Some(name),
            ))
        }
        Some(Value::String(s)) => vec![Prompt::Text(s.clone())],
        Some(Value::Array(items)) if items.is_empty() => {
            return Err(ApiError::invalid(format!("`{name}` is empty"), Some(name)))
        }
        Some(v @ Value::Array(items)) => match &items[0] {
            Value::String(_) => items
                .iter()
                .map(|x| match x {
                    Value::String(s) => Ok(Prompt::Text(s.clone())),
                    o => Err(bad(format!(
                        "invalid type in `{name}`: expected strings, got {}",
                        type_name(o)
                    ))),
                })
                .collect::<ApiResult<Vec<_>>>()?,
            Value::Number(_) => vec![Prompt::Ids(ids(v).ok_or_else(|| {
                bad(format!(
                    "`{name}` must hold token ids (non-negative integers)"
                ))
            })?)],
            Value::Array(_) => items
                .iter()
                .map(|x| {
                    ids(x)
                        .map(Prompt::Ids)
                        .ok_or_else(|| bad(format!("`{name}` must hold arrays of token ids")))
                })
                .collect::<ApiResult<Vec<_>>>()?,
            o => {
                return Err(bad(format!(
                    "invalid type in `{name}`: expected strings or token ids, got {}",
                    type_name(o)
                )))
            }
        },
        Some(o) => {
            return Err(bad(format!(
                "invalid type for `{name}`: expected a string or an array, got {}",
                type_name(o)
            )))
        }
    };
    Ok(out)
}

/// `response_format`: `{"type":"text"}`, `{"type":"json_object"}` or
/// `{"type":"json_schema","json_schema":{"name":..,"schema":{..}}}`.
fn response_format(b: &Body) -> ApiResult<Option<Arc<Schema>>> {
    let param = Some("response_format");
    let Some(rf) = b.raw("response_format") else {
        return Ok(None);
    };
    let bad = |m: String| ApiError::invalid(m, param);
    let kind = rf.get("type").and_then(Value::as_str);
    match kind {
        Some("text") => Ok(None),
        Some("json_object") => Ok(Some(Arc::new(Schema::AnyObject))),
        Some("json_schema") => {
            let schema = rf
                .get("json_schema")
                .and_then(|j| j.get("schema"))
                .ok_or_else(|| bad("`response_format.json_schema.schema` is required".into()))?;
            let schema = Schema::from_json(schema)
                .map_err(|e| bad(format!("`response_format.json_schema.schema`: {e}")))?;
            Ok(Some(Arc::new(schema)))
        }
        _ => Err(bad(
            "`response_format.type` must be text, json_object or json_schema".into(),
        )),
    }
}
