//! The OpenAI endpoints: validation, prompt building, submitting choices to the scheduler,
//! and answering in one JSON body or as server-sent events.

use crate::error::{ApiError, ApiResult};
use crate::request::{prompts, Body, Common, Prompt, MAX_TOP_LOGPROBS};
use crate::{unix_now, AppState};
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::State;
use axum::http::{header, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use camelid_engine::scheduler::{
    SeqDone, SeqEvent, SeqRequest, SeqSink, SubmitError, TokenLogprob,
};
use camelid_engine::{FinishReason, SamplingParams};
use camelid_model::chat_template::Message;
use camelid_model::Model;
use serde_json::{json, Value};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver, UnboundedSender};

/// One choice's events, tagged with the choice index, onto the request's channel.
struct ChoiceSink {
    index: usize,
    tx: UnboundedSender<(usize, SeqEvent)>,
}

impl SeqSink for ChoiceSink {
    fn send(&mut self, event: SeqEvent) -> bool {
        self.tx.send((self.index, event)).is_ok()
    }
    fn is_closed(&self) -> bool {
        self.tx.is_closed()
    }
}

fn record(state: &AppState, route: &'static str, r: ApiResult<Response>) -> Response {
    let resp = r.unwrap_or_else(|e| e.into_response());
    if let Ok(mut m) = state.metrics.lock() {
        m.count(route, resp.status().as_u16());
    }
    resp
}

fn check_model(state: &AppState, model: &str) -> ApiResult<()> {
    if model != state.model_id {
        return Err(ApiError::unknown_model(model, &state.model_id));
    }
    Ok(())
}

fn check_open(state: &AppState) -> ApiResult<()> {
    if state.handle.is_shutting_down() {
        return Err(ApiError::shutting_down());
    }
    Ok(())
}

/// The served model as OpenAI describes a model.
fn model_object(state: &AppState) -> Value {
    json!({
        "id": state.model_id,
        "object": "model",
        "created": state.created,
        "owned_by": "camelid",
        "max_model_len": state.context(),
    })
}

pub async fn models(State(state): State<Arc<AppState>>) -> Response {
    let body = json!({"object": "list", "data": [model_object(&state)]});
    record(&state, "/v1/models", Ok(axum::Json(body).into_response()))
}

/// `GET /v1/models/{id}` (the openai client's `models.retrieve`); ids may hold slashes.
pub async fn model(
    State(state): State<Arc<AppState>>,
    axum::extract::Path(id): axum::extract::Path<String>,
) -> Response {
    let r = check_model(&state, &id).map(|()| axum::Json(model_object(&state)).into_response());
    record(&state, "/v1/models", r)
}

pub async fn health(State(state): State<Arc<AppState>>) -> Response {
    let r = if state.handle.is_shutting_down() {
        Err(ApiError::shutting_down())
    } else {
        Ok(axum::Json(json!({"status": "ok"})).into_response())
    };
    record(&state, "/health", r)
}

pub async fn fallback(State(state): State<Arc<AppState>>, uri: Uri) -> Response {
    record(&state, "other", Err(ApiError::not_found(uri.path())))
}

pub async fn method_not_allowed(
    State(state): State<Arc<AppState>>,
    method: axum::http::Method,
    uri: Uri,
) -> Response {
    let e = ApiError::method_not_allowed(method.as_str(), uri.path());
    record(&state, "other", Err(e))
}

/// With an API key set, `/v1/` requests pass only with `Authorization: Bearer <key>`.
pub async fn require_api_key(
    State(state): State<Arc<AppState>>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let Some(key) = state.api_key.as_deref() else {
        return next.run(request).await;
    };
    if !request.uri().path().starts_with("/v1/") {
        return next.run(request).await;
    }
    let given = request
        .headers()
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    match given {
        Some(g) if same_secret(g.as_bytes(), key.as_bytes()) => next.run(request).await,
        _ => record(
            &state,
            "other",
            Err(ApiError::invalid_api_key(given.is_some())),
        ),
    }
}

/// Compares every byte, so the time taken does not tell how much of a guess was right.
fn same_secret(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// The request's bytes, or the reason they could not be read in OpenAI's error shape.
fn request_body(body: Result<Bytes, BytesRejection>) -> ApiResult<Bytes> {
    body.map_err(|e| ApiError::unreadable_body(&e))
}

/// What a request turned into: one prompt per entry, each run `n` times.
struct Job {
    prompts: Vec<Vec<u32>>,
    /// Prompt text for `echo`.
    prompt_texts: Vec<String>,
    common: Common,
    max_tokens: usize,
    /// Sampled-token log-probs with this many alternatives.
    logprobs: Option<usize>,
    echo: bool,
    chat: bool,
    /// Function calling (chat only).
    tools: Option<crate::tools::Tools>,
}

fn sampling(c: &Common, choice: usize) -> SamplingParams {
    let seed = c.seed.unwrap_or_else(|| {
        // No seed: a different draw per request.
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
        t ^ 0x9E37_79B9_7F4A_7C15
    });
    SamplingParams {
        temperature: c.temperature,
        top_k: c.top_k,
        top_p: c.top_p,
        min_p: c.min_p,
        repeat_penalty: c.repetition_penalty,
        repeat_last_n: 64,
        presence_penalty: c.presence_penalty,
        frequency_penalty: c.frequency_penalty,
        // Choices of one request differ; the same seed repeats the whole response.
        seed: seed.wrapping_add(choice as u64),
    }
}

/// Context checks shared by both endpoints; returns the effective `max_tokens`.
fn budget(
    state: &AppState,
    prompt_len: usize,
    asked: Option<usize>,
    default: usize,
    param: &str,
    max_param: &str,
) -> ApiResult<usize> {
    let context = state.context();
    if prompt_len == 0 {
        return Err(ApiError::invalid("the prompt is empty", Some(param)));
    }
    if prompt_len >= context {
        return Err(ApiError::invalid(
            format!(
                "This model's maximum context length is {context} tokens, but the prompt has \
                 {prompt_len} tokens (no room for a completion)"
            ),
            Some(param),
        )
        .with_code("context_length_exceeded"));
    }
    let room = context - prompt_len;
    match asked {
        Some(m) if m > room => Err(ApiError::invalid(
            format!(
                "This model's maximum context length is {context} tokens. However, you \
                 requested {} tokens ({prompt_len} in the prompt, {m} for the completion)",
                prompt_len + m
            ),
            Some(max_param),
        )
        .with_code("context_length_exceeded")),
        Some(m) => Ok(m),
        None => Ok(default.min(room)),
    }
}

fn submit(state: &AppState, job: &Job) -> ApiResult<UnboundedReceiver<(usize, SeqEvent)>> {
    let (tx, rx) = unbounded_channel();
    let mut seqs: Vec<(SeqRequest, Box<dyn SeqSink>)> = Vec::new();
    for (p, prompt) in job.prompts.iter().enumerate() {
        for j in 0..job.common.n {
            let index = p * job.common.n + j;
            let req = SeqRequest {
                prompt: prompt.clone(),
                max_tokens: job.max_tokens,
                sampling: sampling(&job.common, j),
                logit_bias: job.common.logit_bias.clone(),
                stop: job.common.stop.clone(),
                stop_at_eos: !job.common.ignore_eos,
                logprobs: job.logprobs,
                prompt_logprobs: job.echo && job.logprobs.is_some(),
                json: job.common.json.clone(),
            };
            seqs.push((
                req,
                Box::new(ChoiceSink {
                    index,
                    tx: tx.clone(),
                }),
            ));
        }
    }
    drop(tx);
    state.handle.submit(seqs).map_err(|e| match e {
        SubmitError::QueueFull => ApiError::queue_full(),
        SubmitError::ShuttingDown => ApiError::shutting_down(),
        SubmitError::TooLarge(m) => ApiError::invalid(m, Some("max_tokens")),
    })?;
    Ok(rx)
}

fn finish_reason(f: FinishReason) -> Value {
    match f {
        FinishReason::Eos | FinishReason::Stop => json!("stop"),
        FinishReason::Length => json!("length"),
        FinishReason::Cancelled => Value::Null,
    }
}

fn token_text(model: &Model, id: u32) -> String {
    model
        .tokenizer
        .as_ref()
        .and_then(|t| t.decode(&[id], false).ok())
        .unwrap_or_default()
}

fn is_eos(model: &Model, id: u32) -> bool {
    model.eos_ids.contains(&id)
}

/// Completions-style log-probs of a run of tokens, starting at text offset `offset`.
#[derive(Default)]
struct CompletionLogprobs {
    tokens: Vec<String>,
    token_logprobs: Vec<Value>,
    top_logprobs: Vec<Value>,
    text_offset: Vec<usize>,
    offset: usize,
}

impl CompletionLogprobs {
    fn push(&mut self, model: &Model, id: u32, lp: Option<&TokenLogprob>) {
        let text = token_text(model, id);
        self.text_offset.push(self.offset);
        self.offset += text.len();
        self.tokens.push(text);
        match lp {
            Some(lp) => {
                self.token_logprobs.push(json!(lp.logprob));
                let mut top = serde_json::Map::new();
                for &(t, l) in &lp.top {
                    top.insert(token_text(model, t), json!(l));
                }
                self.top_logprobs.push(Value::Object(top));
            }
            None => {
                self.token_logprobs.push(Value::Null);
                self.top_logprobs.push(Value::Null);
            }
        }
    }

    fn take(&mut self) -> Value {
        json!({
            "tokens": std::mem::take(&mut self.tokens),
            "token_logprobs": std::mem::take(&mut self.token_logprobs),
            "top_logprobs": std::mem::take(&mut self.top_logprobs),
            "text_offset": std::mem::take(&mut self.text_offset),
        })
    }
}

fn chat_logprob(model: &Model, id: u32, lp: &TokenLogprob) -> Value {
    let entry = |t: u32, l: f32| {
        let s = token_text(model, t);
        json!({"token": s, "logprob": l, "bytes": s.as_bytes()})
    };
    let mut e = entry(id, lp.logprob);
    e["top_logprobs"] = Value::Array(lp.top.iter().map(|&(t, l)| entry(t, l)).collect());
    e
}

/// One choice being collected (non-streaming) or tracked (streaming).
#[derive(Default)]
struct Choice {
    text: String,
    completion_logprobs: CompletionLogprobs,
    chat_logprobs: Vec<Value>,
    done: Option<SeqDone>,
}

impl Choice {
    fn on_token(
        &mut self,
        model: &Model,
        job: &Job,
        id: u32,
        text: &str,
        lp: Option<&TokenLogprob>,
    ) {
        self.text.push_str(text);
        if job.logprobs.is_some() && !is_eos(model, id) {
            if job.chat {
                if let Some(lp) = lp {
                    self.chat_logprobs.push(chat_logprob(model, id, lp));
                }
            } else {
                self.completion_logprobs.push(model, id, lp);
            }
        }
    }
}

fn usage(job: &Job, choices: &[Choice]) -> Value {
    let prompt: usize = job.prompts.iter().map(Vec::len).sum();
    let completion: usize = choices
        .iter()
        .filter_map(|c| c.done.as_ref())
        .map(|d| d.completion_tokens)
        .sum();
    let cached: usize = job
        .prompts
        .iter()
        .enumerate()
        .filter_map(|(p, _)| choices.get(p * job.common.n)?.done.as_ref())
        .map(|d| d.cached_tokens)
        .sum();
    json!({
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": cached},
    })
}

/// Echo: the prompt's text (and, with log-probs, its tokens' log-probs) before the completion.
fn echo_prefix(state: &AppState, job: &Job, index: usize, done: Option<&SeqDone>, c: &mut Choice) {
    let p = index / job.common.n;
    c.text.push_str(&job.prompt_texts[p]);
    if job.logprobs.is_some() {
        let lps = done.and_then(|d| d.prompt_logprobs.as_ref());
        for (i, &id) in job.prompts[p].iter().enumerate() {
            let lp = lps.and_then(|l| l.get(i)).and_then(|x| x.as_ref());
            c.completion_logprobs.push(&state.model, id, lp);
        }
    }
}

/// Echo: the prompt's text and log-probs followed by the completion's (`c` is the finished
/// choice).
fn echo_combined(state: &AppState, job: &Job, index: usize, c: &mut Choice) -> (String, Value) {
    let mut e = Choice::default();
    echo_prefix(state, job, index, c.done.as_ref(), &mut e);
    let mut lp = e.completion_logprobs;
    let comp = std::mem::take(&mut c.completion_logprobs);
    let base = e.text.len();
    for (k, t) in comp.tokens.into_iter().enumerate() {
        lp.text_offset.push(base + comp.text_offset[k]);
        lp.tokens.push(t);
        lp.token_logprobs.push(comp.token_logprobs[k].clone());
        lp.top_logprobs.push(comp.top_logprobs[k].clone());
    }
    (format!("{}{}", e.text, c.text), lp.take())
}

pub async fn completions(
    State(state): State<Arc<AppState>>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let r = completions_inner(&state, body).await;
    record(&state, "/v1/completions", r)
}

async fn completions_inner(
    state: &Arc<AppState>,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult<Response> {
    check_open(state)?;
    let b = Body::parse(&request_body(body)?)?;
    let vocab = state.model.spec().vocab_size;
    let mut common = Common::parse(&b, state.max_n, vocab)?;
    check_model(state, &common.model)?;
    let echo: bool = b.get("echo", "a boolean")?.unwrap_or(false);
    let logprobs = b.count("logprobs")?;
    if logprobs.is_some_and(|n| n > MAX_TOP_LOGPROBS) {
        return Err(ApiError::invalid(
            format!("`logprobs` must be at most {MAX_TOP_LOGPROBS}"),
            Some("logprobs"),
        ));
    }
    let max_tokens = b.count("max_tokens")?;
    let tok = state
        .model
        .tokenizer()
        .map_err(|e| ApiError::internal(e.to_string()))?;
    let mut ids = Vec::new();
    let mut texts = Vec::new();
    for p in prompts(&b, "prompt")? {
        match p {
            Prompt::Text(t) => {
                ids.push(
                    tok.encode(&t, true)
                        .map_err(|e| ApiError::invalid(e.to_string(), Some("prompt")))?,
                );
                texts.push(t);
            }
            Prompt::Ids(v) => {
                if let Some(bad) = v.iter().find(|&&i| i as usize >= vocab) {
                    return Err(ApiError::invalid(
                        format!("token id {bad} is outside the vocabulary (size {vocab})"),
                        Some("prompt"),
                    ));
                }
                texts.push(tok.decode(&v, false).unwrap_or_default());
                ids.push(v);
            }
        }
    }
    let mut budget_tokens = usize::MAX;
    for p in &ids {
        budget_tokens = budget_tokens.min(budget(
            state,
            p.len(),
            max_tokens,
            16,
            "prompt",
            "max_tokens",
        )?);
    }
    common.max_tokens = Some(budget_tokens);
    let job = Job {
        prompts: ids,
        prompt_texts: texts,
        max_tokens: budget_tokens,
        logprobs,
        echo,
        chat: false,
        tools: None,
        common,
    };
    run(state.clone(), job).await
}

fn messages(b: &Body) -> ApiResult<Vec<Message>> {
    let items = match b.raw("messages") {
        None => {
            return Err(ApiError::invalid(
                "`messages` is required",
                Some("messages"),
            ))
        }
        Some(Value::Array(items)) => items,
        Some(o) => {
            return Err(ApiError::invalid(
                format!(
                    "invalid type for `messages`: expected an array, got {}",
                    crate::request::type_name(o)
                ),
                Some("messages"),
            )
            .with_code("invalid_type"))
        }
    };
    if items.is_empty() {
        return Err(ApiError::invalid(
            "`messages` must hold at least one message",
            Some("messages"),
        ));
    }
    let mut out = Vec::new();
    for (i, m) in items.iter().enumerate() {
        let param = format!("messages[{i}]");
        let obj = m.as_object().ok_or_else(|| {
            ApiError::invalid(format!("`{param}` must be an object"), Some(&param))
                .with_code("invalid_type")
        })?;
        let role = match obj.get("role").and_then(Value::as_str) {
            Some(r @ ("system" | "user" | "assistant" | "tool")) => r,
            Some("developer") => "system",
            Some(other) => {
                return Err(ApiError::invalid(
                    format!(
                        "`{param}.role` must be one of system, developer, user, assistant, tool; got `{other}`"
                    ),
                    Some(&format!("{param}.role")),
                )
                .with_code("invalid_value"))
            }
            None => {
                return Err(ApiError::invalid(
                    format!("`{param}.role` is required and must be a string"),
                    Some(&format!("{param}.role")),
                ))
            }
        };
        let mut content = match obj.get("content") {
            None | Some(Value::Null) if role == "assistant" => String::new(),
            Some(Value::String(s)) => s.clone(),
            Some(Value::Array(parts)) => {
                let mut s = String::new();
                for part in parts {
                    match (part.get("type").and_then(Value::as_str), part.get("text")) {
                        (Some("text"), Some(Value::String(t))) => s.push_str(t),
                        _ => {
                            return Err(ApiError::invalid(
                                format!("`{param}.content`: only text parts are supported"),
                                Some(&format!("{param}.content")),
                            ))
                        }
                    }
                }
                s
            }
            _ => {
                return Err(ApiError::invalid(
                    format!("`{param}.content` must be a string or an array of text parts"),
                    Some(&format!("{param}.content")),
                )
                .with_code("invalid_type"))
            }
        };
        if let (true, Some(Value::Array(calls))) = (role == "assistant", obj.get("tool_calls")) {
            if !content.is_empty() {
                content.push('\n');
            }
            content.push_str(&crate::tools::history_text(calls));
        }
        out.push(Message::new(role, &content));
    }
    Ok(out)
}

pub async fn chat_completions(
    State(state): State<Arc<AppState>>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let r = chat_inner(&state, body).await;
    record(&state, "/v1/chat/completions", r)
}

async fn chat_inner(
    state: &Arc<AppState>,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult<Response> {
    check_open(state)?;
    let b = Body::parse(&request_body(body)?)?;
    let vocab = state.model.spec().vocab_size;
    let mut common = Common::parse(&b, state.max_n, vocab)?;
    check_model(state, &common.model)?;
    let mut msgs = messages(&b)?;
    let tools = crate::tools::parse(&b)?;
    let logprobs: bool = b.get("logprobs", "a boolean")?.unwrap_or(false);
    let top = b.count("top_logprobs")?;
    if top.is_some_and(|n| n > MAX_TOP_LOGPROBS) {
        return Err(ApiError::invalid(
            format!("`top_logprobs` must be at most {MAX_TOP_LOGPROBS}"),
            Some("top_logprobs"),
        ));
    }
    if top.is_some() && !logprobs {
        return Err(ApiError::invalid(
            "`top_logprobs` needs `logprobs: true`",
            Some("top_logprobs"),
        ));
    }
    let (max_param, asked) = match b.count("max_completion_tokens")? {
        Some(m) => ("max_completion_tokens", Some(m)),
        None => ("max_tokens", b.count("max_tokens")?),
    };
    let model = &state.model;
    let tok = model
        .tokenizer()
        .map_err(|e| ApiError::internal(e.to_string()))?;
    let mut tool_defs = None;
    if let Some(t) = &tools {
        if model.chat_template.uses_tools() {
            tool_defs = Some(Value::Array(t.defs.clone()));
        } else {
            let block = t.system_block();
            match msgs.first_mut() {
                Some(m) if m.role == "system" => m.content = format!("{}\n\n{block}", m.content),
                _ => msgs.insert(0, Message::new("system", &block)),
            }
        }
        if let Some(schema) = t.required_schema()? {
            if common.json.is_some() {
                return Err(ApiError::invalid(
                    "`response_format` and a required tool call cannot be combined",
                    Some("tool_choice"),
                ));
            }
            common.json = Some(Arc::new(schema));
        }
    }
    let text = model
        .chat_template
        .render_with_tools(&msgs, tool_defs.as_ref(), true)
        .map_err(|e| ApiError::invalid(e.to_string(), Some("messages")))?;
    let mut ids = tok
        .encode(&text, false)
        .map_err(|e| ApiError::invalid(e.to_string(), Some("messages")))?;
    // Templates usually write the BOS text themselves; add the id only when they do not.
    let bos_text = tok.bos_id.and_then(|b| tok.id_to_token(b));
    if tok.add_bos && !bos_text.as_deref().is_some_and(|b| text.starts_with(b)) {
        if let Some(b) = tok.bos_id {
            ids.insert(0, b);
        }
    }
    let cap = state.handle.capacity_tokens().saturating_sub(ids.len());
    let max_tokens = budget(state, ids.len(), asked, cap, "messages", max_param)?;
    common.max_tokens = Some(max_tokens);
    let job = Job {
        prompts: vec![ids],
        prompt_texts: vec![text],
        max_tokens,
        logprobs: logprobs.then_some(top.unwrap_or(0)),
        echo: false,
        chat: true,
        tools,
        common,
    };
    run(state.clone(), job).await
}

fn new_id(state: &AppState, chat: bool) -> String {
    let n = state.next_id.fetch_add(1, Ordering::Relaxed);
    let prefix = if chat { "chatcmpl" } else { "cmpl" };
    format!("{prefix}-{:x}{n:x}", unix_now())
}

async fn run(state: Arc<AppState>, job: Job) -> ApiResult<Response> {
    let rx = submit(&state, &job)?;
    if job.common.stream && job.tools.is_some() {
        // Tool calls are known only once the reply is complete: sent as one chunk.
        let body = collect_value(&state, &job, rx).await?;
        Ok(stream_whole(&job, body))
    } else if job.common.stream {
        Ok(stream(state, job, rx))
    } else {
        let body = collect_value(&state, &job, rx).await?;
        Ok((StatusCode::OK, axum::Json(body)).into_response())
    }
}

/// A finished chat response as a server-sent-event stream: per choice one chunk with the
/// role and content or tool calls, one with the finish reason; then usage and `[DONE]`.
fn stream_whole(job: &Job, body: Value) -> Response {
    let mut out = String::new();
    let mut push = |choices: Value, usage: Option<&Value>| {
        let mut v = json!({
            "id": body["id"], "object": "chat.completion.chunk", "created": body["created"],
            "model": body["model"], "choices": choices,
        });
        if job.common.include_usage {
            v["usage"] = usage.cloned().unwrap_or(Value::Null);
        }
        out.push_str(&format!("data: {v}\n\n"));
    };
    for c in body["choices"].as_array().into_iter().flatten() {
        let mut delta = json!({"role": "assistant", "content": c["message"]["content"]});
        if let Some(calls) = c["message"]["tool_calls"].as_array() {
            let calls: Vec<Value> = calls
                .iter()
                .enumerate()
                .map(|(k, x)| {
                    let mut x = x.clone();
                    x["index"] = json!(k);
                    x
                })
                .collect();
            delta["tool_calls"] = Value::Array(calls);
        }
        push(
            json!([{"index": c["index"], "delta": delta, "logprobs": c["logprobs"], "finish_reason": null}]),
            None,
        );
        push(
            json!([{"index": c["index"], "delta": {}, "logprobs": null, "finish_reason": c["finish_reason"]}]),
            None,
        );
    }
    if job.common.include_usage {
        push(json!([]), Some(&body["usage"]));
    }
    out.push_str("data: [DONE]\n\n");
    Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, "text/event-stream")
        .header(header::CACHE_CONTROL, "no-cache")
        .body(axum::body::Body::from(out))
        .unwrap_or_else(|e| ApiError::internal(e.to_string()).into_response())
}

async fn collect_value(
    state: &AppState,
    job: &Job,
    mut rx: UnboundedReceiver<(usize, SeqEvent)>,
) -> ApiResult<Value> {
    let total = job.prompts.len() * job.common.n;
    let mut choices: Vec<Choice> = (0..total).map(|_| Choice::default()).collect();
    let mut left = total;
    while left > 0 {
        let Some((i, ev)) = rx.recv().await else {
            return Err(ApiError::shutting_down());
        };
        match ev {
            SeqEvent::Token { id, text, logprob } => {
                choices[i].on_token(&state.model, job, id, &text, logprob.as_ref())
            }
            SeqEvent::Done(d) => {
                if let Some(e) = &d.error {
                    return Err(ApiError::internal(e.clone()));
                }
                choices[i].text.push_str(&d.text);
                choices[i].done = Some(d);
                left -= 1;
            }
        }
    }
    let id = new_id(state, job.chat);
    let mut out = Vec::new();
    for (i, c) in choices.iter_mut().enumerate() {
        let done = c.done.clone();
        let reason = done
            .as_ref()
            .map_or(Value::Null, |d| finish_reason(d.finish));
        if job.chat {
            let logprobs = if job.logprobs.is_some() {
                json!({"content": std::mem::take(&mut c.chat_logprobs)})
            } else {
                Value::Null
            };
            let calls = job
                .tools
                .as_ref()
                .and_then(|t| crate::tools::extract(t, &c.text, &id));
            out.push(match calls {
                Some((content, calls)) => json!({
                    "index": i,
                    "message": {"role": "assistant", "content": content, "tool_calls": calls},
                    "logprobs": logprobs,
                    "finish_reason": "tool_calls",
                }),
                None => json!({
                    "index": i,
                    "message": {"role": "assistant", "content": c.text},
                    "logprobs": logprobs,
                    "finish_reason": reason,
                }),
            });
        } else {
            let (text, logprobs) = if job.echo {
                echo_combined(state, job, i, c)
            } else {
                (c.text.clone(), c.completion_logprobs.take())
            };
            out.push(json!({
                "index": i,
                "text": text,
                "logprobs": if job.logprobs.is_some() { logprobs } else { Value::Null },
                "finish_reason": reason,
            }));
        }
    }
    let body = json!({
        "id": id,
        "object": if job.chat { "chat.completion" } else { "text_completion" },
        "created": unix_now(),
        "model": state.model_id,
        "choices": out,
        "usage": usage(job, &choices),
    });
    Ok(body)
}

/// Streaming state: turns scheduler events into SSE `data:` lines.
struct Streamer {
    state: Arc<AppState>,
    job: Job,
    rx: UnboundedReceiver<(usize, SeqEvent)>,
    id: String,
    created: u64,
    choices: Vec<Choice>,
    left: usize,
    finished: bool,
    /// Lines ready to send before reading more events.
    pending: Vec<String>,
}

impl Streamer {
    fn chunk(&self, choices: Vec<Value>, usage: Option<Value>) -> String {
        let mut v = json!({
            "id": self.id,
            "object": if self.job.chat { "chat.completion.chunk" } else { "text_completion" },
            "created": self.created,
            "model": self.state.model_id,
            "choices": choices,
        });
        if self.job.common.include_usage {
            v["usage"] = usage.unwrap_or(Value::Null);
        }
        format!("data: {v}\n\n")
    }

    fn delta(&self, index: usize, text: String, logprobs: Value, finish: Value) -> Value {
        if self.job.chat {
            let delta = if text.is_empty() && !finish.is_null() {
                json!({})
            } else {
                json!({"content": text})
            };
            json!({"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish})
        } else {
            json!({"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish})
        }
    }

    fn start(&mut self) {
        let total = self.choices.len();
        for i in 0..total {
            if self.job.chat {
                let c = json!({"index": i, "delta": {"role": "assistant", "content": ""},
                    "logprobs": Value::Null, "finish_reason": Value::Null});
                let line = self.chunk(vec![c], None);
                self.pending.push(line);
            } else if self.job.echo && self.job.logprobs.is_none() {
                let text = self.job.prompt_texts[i / self.job.common.n].clone();
                self.choices[i].completion_logprobs.offset = text.len();
                let c = self.delta(i, text, Value::Null, Value::Null);
                let line = self.chunk(vec![c], None);
                self.pending.push(line);
            }
        }
    }

    fn on_event(&mut self, i: usize, ev: SeqEvent) {
        let model = self.state.model.clone();
        match ev {
            SeqEvent::Token { id, text, logprob } => {
                let before = self.choices[i].chat_logprobs.len();
                self.choices[i].on_token(&model, &self.job, id, &text, logprob.as_ref());
                if self.echo_logprobs() {
                    // Sent whole at the end, after the prompt's log-probs are known.
                    return;
                }
                let lp = if self.job.logprobs.is_none() {
                    Value::Null
                } else if self.job.chat {
                    let new = &self.choices[i].chat_logprobs[before..];
                    if new.is_empty() && text.is_empty() {
                        return;
                    }
                    json!({ "content": new })
                } else {
                    self.choices[i].completion_logprobs.take()
                };
                if text.is_empty() && lp.is_null() {
                    return;
                }
                let c = self.delta(i, text, lp, Value::Null);
                let line = self.chunk(vec![c], None);
                self.pending.push(line);
            }
            SeqEvent::Done(d) => {
                if let Some(e) = &d.error {
                    let err = ApiError::internal(e.clone());
                    self.pending.push(format!("data: {}\n\n", err.body()));
                }
                let reason = finish_reason(d.finish);
                self.choices[i].text.push_str(&d.text);
                self.choices[i].done = Some(d.clone());
                let (text, lp) = if self.echo_logprobs() {
                    echo_combined(&self.state, &self.job, i, &mut self.choices[i])
                } else if self.job.logprobs.is_some() && !self.job.chat {
                    (d.text, self.choices[i].completion_logprobs.take())
                } else {
                    (d.text, Value::Null)
                };
                let c = self.delta(i, text, lp, reason);
                let line = self.chunk(vec![c], None);
                self.pending.push(line);
                self.left -= 1;
            }
        }
    }

    fn echo_logprobs(&self) -> bool {
        self.job.echo && self.job.logprobs.is_some() && !self.job.chat
    }

    fn end(&mut self) {
        if self.job.common.include_usage {
            let u = usage(&self.job, &self.choices);
            let line = self.chunk(Vec::new(), Some(u));
            self.pending.push(line);
        }
        self.pending.push("data: [DONE]\n\n".into());
        self.finished = true;
    }
}

fn stream(state: Arc<AppState>, job: Job, rx: UnboundedReceiver<(usize, SeqEvent)>) -> Response {
    let total = job.prompts.len() * job.common.n;
    let mut s = Streamer {
        id: new_id(&state, job.chat),
        created: unix_now(),
        choices: (0..total).map(|_| Choice::default()).collect(),
        left: total,
        finished: false,
        pending: Vec::new(),
        state,
        job,
        rx,
    };
    s.start();
    let body = futures_util::stream::unfold(s, |mut s| async move {
        loop {
            if !s.pending.is_empty() {
                let out: String = s.pending.drain(..).collect();
                return Some((Ok::<Bytes, std::convert::Infallible>(Bytes::from(out)), s));
            }
            if s.finished {
                return None;
            }
            if s.left == 0 {
                s.end();
                continue;
            }
            match s.rx.recv().await {
                Some((i, ev)) => s.on_event(i, ev),
                None => {
                    // The scheduler went away (shutdown before this request ran).
                    let err = ApiError::shutting_down();
                    s.pending.push(format!("data: {}\n\n", err.body()));
                    s.finished = true;
                }
            }
        }
    });
    Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, "text/event-stream")
        .header(header::CACHE_CONTROL, "no-cache")
        .body(axum::body::Body::from_stream(body))
        .unwrap_or_else(|e| ApiError::internal(e.to_string()).into_response())
}

pub async fn embeddings(
    State(state): State<Arc<AppState>>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let r = embeddings_inner(&state, body).await;
    record(&state, "/v1/embeddings", r)
}

async fn embeddings_inner(
    state: &Arc<AppState>,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult<Response> {
    check_open(state)?;
    let b = Body::parse(&request_body(body)?)?;
    let model_name = b
        .get::<String>("model", "a string")?
        .ok_or_else(|| ApiError::invalid("`model` is required", Some("model")))?;
    check_model(state, &model_name)?;
    let base64 = match b.get::<String>("encoding_format", "a string")?.as_deref() {
        None | Some("float") => false,
        Some("base64") => true,
        Some(f) => {
            return Err(ApiError::invalid(
                format!("`encoding_format` must be float or base64, got `{f}`"),
                Some("encoding_format"),
            ))
        }
    };
    let model = state.model.clone();
    let tok = model
        .tokenizer()
        .map_err(|e| ApiError::internal(e.to_string()))?;
    let limit = model
        .pooling
        .max_tokens
        .unwrap_or(model.spec().max_positions);
    let vocab = model.spec().vocab_size;
    let mut inputs = Vec::new();
    for p in prompts(&b, "input")? {
        let ids = match p {
            Prompt::Text(t) => tok
                .encode(&t, true)
                .map_err(|e| ApiError::invalid(e.to_string(), Some("input")))?,
            Prompt::Ids(v) => v,
        };
        if ids.is_empty() {
            return Err(ApiError::invalid("an input is empty", Some("input")));
        }
        if ids.len() > limit {
            return Err(ApiError::invalid(
                format!(
                    "an input has {} tokens; this model embeds at most {limit}",
                    ids.len()
                ),
                Some("input"),
            )
            .with_code("context_length_exceeded"));
        }
        if let Some(bad) = ids.iter().find(|&&i| i as usize >= vocab) {
            return Err(ApiError::invalid(
                format!("token id {bad} is outside the vocabulary (size {vocab})"),
                Some("input"),
            ));
        }
        inputs.push(ids);
    }
    let tokens: usize = inputs.iter().map(Vec::len).sum();
    let vectors = tokio::task::spawn_blocking(move || {
        inputs
            .iter()
            .map(|ids| camelid_engine::embed::embed_ids(&model, ids))
            .collect::<camelid_model::Result<Vec<_>>>()
    })
    .await
    .map_err(|e| ApiError::internal(e.to_string()))?
    .map_err(|e| ApiError::internal(e.to_string()))?;
    let data: Vec<Value> = vectors
        .into_iter()
        .enumerate()
        .map(|(i, v)| {
            let embedding = if base64 {
                // OpenAI's base64 form: the little-endian f32 bytes.
                let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
                json!(base64_encode(&bytes))
            } else {
                json!(v)
            };
            json!({"object": "embedding", "index": i, "embedding": embedding})
        })
        .collect();
    Ok(axum::Json(json!({
        "object": "list",
        "data": data,
        "model": state.model_id,
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
    }))
    .into_response())
}

fn base64_encode(bytes: &[u8]) -> String {
    const TABLE: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (b[0] as u32) << 16 | (b[1] as u32) << 8 | b[2] as u32;
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(TABLE[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn base64_matches_rfc4648_vectors() {
        for (input, expected) in [
            ("", ""),
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            ("foob", "Zm9vYg=="),
            ("fooba", "Zm9vYmE="),
            ("foobar", "Zm9vYmFy"),
        ] {
            assert_eq!(super::base64_encode(input.as_bytes()), expected);
        }
    }
}
