//! The server on loopback with the default model (SmolLM2-135M-Instruct, pulled by the
//! catalog), driven over plain HTTP/1.1: completions and chat against the engine's own
//! generation loop, streaming, stop strings, `n`, seeds, log-probs, echo with prompt
//! log-probs against a full forward pass, embeddings, every malformed request's 4xx (and the
//! server still serving), concurrent streaming chats equal to one-at-a-time runs, client
//! disconnects, a full queue and shutdown draining.

use camelid_engine::generate::{all_logits, generate, GenerateOptions};
use camelid_engine::scheduler::SchedulerConfig;
use camelid_engine::SamplingParams;
use camelid_model::transformer::log_softmax;
use serde_json::{json, Value};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::Command;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

mod common;

use common::{model, TestServer, MODEL_ID};

fn shared() -> &'static TestServer {
    static SERVER: OnceLock<TestServer> = OnceLock::new();
    SERVER.get_or_init(|| TestServer::start(SchedulerConfig::default()))
}

struct Reply {
    status: u16,
    headers: String,
    body: String,
}

impl Reply {
    fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.body))
    }

    /// The `data:` payloads of an event stream.
    fn events(&self) -> Vec<String> {
        self.body
            .split("\n\n")
            .filter_map(|e| e.strip_prefix("data: "))
            .map(str::to_string)
            .collect()
    }
}

fn connect(addr: SocketAddr) -> TcpStream {
    let s = TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(300)))
        .expect("timeout");
    s
}

fn send(stream: &mut TcpStream, method: &str, path: &str, body: &str) {
    send_bytes(stream, method, path, "", body.as_bytes());
}

/// `headers`: extra header lines, each ending in `\r\n`.
fn send_bytes(stream: &mut TcpStream, method: &str, path: &str, headers: &str, body: &[u8]) {
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n\
         {headers}Content-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    stream
        .write_all(&[head.as_bytes(), body].concat())
        .expect("write");
}

fn dechunk(mut raw: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let Some(nl) = raw.windows(2).position(|w| w == b"\r\n") else {
            return out;
        };
        let size_text = std::str::from_utf8(&raw[..nl]).expect("chunk size");
        let size = usize::from_str_radix(size_text.trim(), 16).expect("hex size");
        if size == 0 {
            return out;
        }
        out.extend_from_slice(&raw[nl + 2..nl + 2 + size]);
        raw = &raw[nl + 2 + size + 2..];
    }
}

fn request_to(addr: SocketAddr, method: &str, path: &str, body: &str) -> Reply {
    request_bytes_to(addr, method, path, body.as_bytes())
}

fn request_bytes_to(addr: SocketAddr, method: &str, path: &str, body: &[u8]) -> Reply {
    request_with(addr, method, path, "", body)
}

fn request_with(addr: SocketAddr, method: &str, path: &str, headers: &str, body: &[u8]) -> Reply {
    let mut s = connect(addr);
    send_bytes(&mut s, method, path, headers, body);
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).expect("read");
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("header end");
    let headers = String::from_utf8(raw[..split].to_vec()).expect("headers");
    let mut body = raw[split + 4..].to_vec();
    if headers
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        body = dechunk(&body);
    }
    let status = headers[9..12].parse().expect("status");
    Reply {
        status,
        headers,
        body: String::from_utf8(body).expect("the body is UTF-8"),
    }
}

fn post(path: &str, body: Value) -> Reply {
    request_to(shared().addr, "POST", path, &body.to_string())
}

fn get(path: &str) -> Reply {
    request_to(shared().addr, "GET", path, "")
}

fn greedy_text(ids: &[u32], max_tokens: usize, stop: &[&str]) -> (String, usize) {
    let model = model();
    let opts = GenerateOptions {
        max_tokens,
        sampling: SamplingParams::greedy(),
        stop: stop.iter().map(|s| s.to_string()).collect(),
        stop_at_eos: true,
    };
    let g = generate(&model, ids, &opts, &mut |_| true).expect("generate");
    let eos = usize::from(g.finish == camelid_engine::FinishReason::Eos);
    (g.text, g.tokens.len() + eos)
}

fn chat_ids(messages: &[(&str, &str)]) -> Vec<u32> {
    let model = model();
    let msgs: Vec<_> = messages
        .iter()
        .map(|(r, c)| camelid_model::chat_template::Message::new(r, c))
        .collect();
    let text = model.chat_template.render(&msgs, true).expect("render");
    model
        .tokenizer()
        .expect("tok")
        .encode(&text, false)
        .expect("encode")
}

/// Metric value from `/metrics` text.
fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("{name} ")))
        .unwrap_or_else(|| panic!("no metric {name}"))
        .parse()
        .expect("number")
}

fn metrics_of(addr: SocketAddr) -> String {
    request_to(addr, "GET", "/metrics", "").body
}

/// Polls `/metrics` until `ready` holds for its text, which it returns; fails saying `what`
/// after `seconds`.
fn wait_for_metrics(
    addr: SocketAddr,
    what: &str,
    seconds: u64,
    ready: impl Fn(&str) -> bool,
) -> String {
    let start = Instant::now();
    loop {
        let m = metrics_of(addr);
        if ready(&m) {
            return m;
        }
        assert!(
            start.elapsed() < Duration::from_secs(seconds),
            "{what}: {m}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn models_health_and_metrics() {
    let m = get("/v1/models").json();
    assert_eq!(m["data"][0]["id"], MODEL_ID);
    assert_eq!(m["data"][0]["max_model_len"], 8192);
    let one = get(&format!("/v1/models/{MODEL_ID}"));
    assert_eq!(one.status, 200, "{}", one.body);
    assert_eq!(one.json(), m["data"][0]);
    let unknown = get("/v1/models/org/other-model");
    assert_eq!(unknown.status, 404);
    assert_eq!(unknown.json()["error"]["code"], "model_not_found");
    assert_eq!(get("/health").status, 200);
    let text = get("/metrics").body;
    for name in [
        "camelid_queue_depth",
        "camelid_running_sequences",
        "camelid_kv_blocks_used",
        "camelid_kv_blocks_free",
        "camelid_prefix_cache_hit_rate",
        "camelid_generation_tokens_per_second",
    ] {
        metric(&text, name);
    }
    assert!(text.contains("camelid_time_to_first_token_seconds_bucket"));
    assert!(text.contains("camelid_inter_token_latency_seconds_bucket"));
    let missing = get("/v1/nothing");
    assert_eq!(missing.status, 404);
    assert!(missing.json()["error"]["message"].is_string());
}

#[test]
fn completion_equals_the_generation_loop_with_exact_usage() {
    let prompt = "The capital of France is";
    let ids = model()
        .tokenizer()
        .expect("tok")
        .encode(prompt, true)
        .expect("ids");
    let (expected, n) = greedy_text(&ids, 12, &[]);
    let r = post(
        "/v1/completions",
        json!({"model": MODEL_ID, "prompt": prompt, "max_tokens": 12, "temperature": 0}),
    );
    assert_eq!(r.status, 200, "{}", r.body);
    let v = r.json();
    assert_eq!(v["object"], "text_completion");
    assert_eq!(v["choices"][0]["text"], expected.as_str());
    assert_eq!(v["usage"]["prompt_tokens"], ids.len());
    assert_eq!(v["usage"]["completion_tokens"], n);
    assert_eq!(v["usage"]["total_tokens"], ids.len() + n);
    // Token-id prompts are accepted as they are.
    let r = post(
        "/v1/completions",
        json!({"model": MODEL_ID, "prompt": ids, "max_tokens": 12, "temperature": 0}),
    );
    assert_eq!(r.json()["choices"][0]["text"], expected.as_str());
}

#[test]
fn chat_stream_equals_chat_and_the_generation_loop() {
    let messages = [("system", "You are brief."), ("user", "Name three colors.")];
    let ids = chat_ids(&messages);
    let (expected, n) = greedy_text(&ids, 24, &[]);
    let msgs: Vec<Value> = messages
        .iter()
        .map(|(r, c)| json!({"role": r, "content": c}))
        .collect();
    let whole = post(
        "/v1/chat/completions",
        json!({"model": MODEL_ID, "messages": msgs, "max_tokens": 24, "temperature": 0}),
    )
    .json();
    assert_eq!(whole["object"], "chat.completion");
    assert_eq!(whole["choices"][0]["message"]["role"], "assistant");
    assert_eq!(whole["choices"][0]["message"]["content"], expected.as_str());
    assert_eq!(whole["usage"]["prompt_tokens"], ids.len());
    assert_eq!(whole["usage"]["completion_tokens"], n);

    let r = post(
        "/v1/chat/completions",
        json!({"model": MODEL_ID, "messages": msgs, "max_completion_tokens": 24,
               "temperature": 0, "stream": true, "stream_options": {"include_usage": true}}),
    );
    assert!(r.headers.contains("text/event-stream"));
    let events = r.events();
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"));
    let chunks: Vec<Value> = events[..events.len() - 1]
        .iter()
        .map(|e| serde_json::from_str(e).expect("chunk JSON"))
        .collect();
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    let text: String = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
        .collect();
    assert_eq!(text, expected);
    let usage = &chunks.last().expect("usage chunk")["usage"];
    assert_eq!(chunks.last().expect("last")["choices"], json!([]));
    assert_eq!(usage["prompt_tokens"], ids.len());
    assert_eq!(usage["completion_tokens"], n);
    let reasons: Vec<&Value> = chunks
        .iter()
        .map(|c| &c["choices"][0]["finish_reason"])
        .filter(|r| !r.is_null())
        .collect();
    assert_eq!(reasons.len(), 1);
}

#[test]
fn stop_strings_end_the_text_and_never_leak_into_the_stream() {
    let prompt = "Count: one, two, three, four, five,";
    let ids = model()
        .tokenizer()
        .expect("tok")
        .encode(prompt, true)
        .expect("ids");
    let (full, _) = greedy_text(&ids, 24, &[]);
    // A stop string from the middle of what the model writes.
    let chars: Vec<char> = full.chars().collect();
    assert!(chars.len() > 12, "continuation too short: {full:?}");
    let stop: String = chars[8..11].iter().collect();
    let cut = &full[..full.find(&stop).expect("stop in text")];
    for stream in [false, true] {
        let r = post(
            "/v1/completions",
            json!({"model": MODEL_ID, "prompt": prompt, "max_tokens": 24, "temperature": 0,
                   "stop": [stop, "never-appears"], "stream": stream}),
        );
        let (text, reason) = if stream {
            let ev = r.events();
            let chunks: Vec<Value> = ev[..ev.len() - 1]
                .iter()
                .map(|e| serde_json::from_str(e).expect("chunk"))
                .collect();
            let t: String = chunks
                .iter()
                .filter_map(|c| c["choices"][0]["text"].as_str())
                .collect();
            let reason = chunks.last().expect("last")["choices"][0]["finish_reason"].clone();
            (t, reason)
        } else {
            let v = r.json();
            (
                v["choices"][0]["text"].as_str().expect("text").to_string(),
                v["choices"][0]["finish_reason"].clone(),
            )
        };
        assert_eq!(text, cut, "stream={stream}");
        assert_eq!(reason, "stop");
    }
}

#[test]
fn n_choices_and_seed_reproducibility() {
    let body = json!({"model": MODEL_ID, "prompt": "Once upon a time", "max_tokens": 10,
                      "temperature": 1.0, "n": 3, "seed": 1234});
    let a = post("/v1/completions", body.clone()).json();
    let b = post("/v1/completions", body).json();
    let texts = |v: &Value| -> Vec<String> {
        v["choices"]
            .as_array()
            .expect("choices")
            .iter()
            .map(|c| c["text"].as_str().expect("text").to_string())
            .collect()
    };
    assert_eq!(texts(&a).len(), 3);
    assert_eq!(
        texts(&a),
        texts(&b),
        "the same seed must repeat the response"
    );
    assert!(
        texts(&a)[0] != texts(&a)[1] || texts(&a)[1] != texts(&a)[2],
        "choices of one request should differ: {:?}",
        texts(&a)
    );
    assert!(a["usage"]["completion_tokens"].as_u64().expect("usage") >= 3);
    let other = post(
        "/v1/completions",
        json!({"model": MODEL_ID, "prompt": "Once upon a time", "max_tokens": 10,
               "temperature": 1.0, "n": 3, "seed": 99}),
    )
    .json();
    assert_ne!(texts(&a), texts(&other));
}

#[test]
fn logprobs_and_echo_match_a_full_forward() {
    let prompt = "Paris is the capital of";
    let ids = model()
        .tokenizer()
        .expect("tok")
        .encode(prompt, true)
        .expect("ids");
    // lm-eval's loglikelihood request: echo, one greedy token, top-1 log-probs.
    let v = post(
        "/v1/completions",
        json!({"model": MODEL_ID, "prompt": prompt, "max_tokens": 1, "temperature": 0,
               "logprobs": 1, "echo": true}),
    )
    .json();
    let choice = &v["choices"][0];
    let lp = &choice["logprobs"];
    let tokens = lp["tokens"].as_array().expect("tokens");
    assert_eq!(tokens.len(), ids.len() + 1);
    assert!(lp["token_logprobs"][0].is_null());
    assert!(choice["text"].as_str().expect("text").starts_with(prompt));
    let rows = all_logits(&model(), &ids).expect("logits");
    let mut worst = 0f64;
    for i in 1..ids.len() {
        let expected = log_softmax(&rows[i - 1])[ids[i] as usize];
        let got = lp["token_logprobs"][i].as_f64().expect("logprob");
        worst = worst.max((expected - got).abs());
    }
    eprintln!("prompt log-probs vs full forward: max |Δ| = {worst:.2e}");
    assert!(worst < 1e-3, "prompt log-probs off by {worst}");
    // The sampled (greedy) token is the top alternative at its position.
    let last = ids.len();
    let top = lp["top_logprobs"][last].as_object().expect("top");
    assert_eq!(top.len(), 1);
    let (best, best_lp) = top.iter().next().expect("one");
    assert_eq!(best, tokens[last].as_str().expect("token"));
    assert!(
        (best_lp.as_f64().expect("f") - lp["token_logprobs"][last].as_f64().expect("f")).abs()
            < 1e-6
    );
    let offsets = lp["text_offset"].as_array().expect("offsets");
    assert_eq!(offsets.len(), tokens.len());
    // Streamed, the same text and log-probs arrive (prompt first).
    let r = post(
        "/v1/completions",
        json!({"model": MODEL_ID, "prompt": prompt, "max_tokens": 1, "temperature": 0,
               "logprobs": 1, "echo": true, "stream": true}),
    );
    let ev = r.events();
    let chunks: Vec<Value> = ev[..ev.len() - 1]
        .iter()
        .map(|e| serde_json::from_str(e).expect("chunk"))
        .collect();
    let text: String = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["text"].as_str())
        .collect();
    assert_eq!(text, choice["text"].as_str().expect("text"));
    let streamed: Vec<Value> = chunks
        .iter()
        .flat_map(|c| {
            c["choices"][0]["logprobs"]["token_logprobs"]
                .as_array()
                .cloned()
                .unwrap_or_default()
        })
        .collect();
    assert_eq!(&Value::Array(streamed), &lp["token_logprobs"]);

    // Chat log-probs with alternatives.
    let v = post(
        "/v1/chat/completions",
        json!({"model": MODEL_ID, "messages": [{"role": "user", "content": "Hi"}],
               "max_tokens": 5, "temperature": 0, "logprobs": true, "top_logprobs": 3}),
    )
    .json();
    let content = v["choices"][0]["logprobs"]["content"]
        .as_array()
        .expect("content");
    assert!(!content.is_empty());
    for e in content {
        let top = e["top_logprobs"].as_array().expect("top");
        assert_eq!(top.len(), 3);
        // Greedy: the chosen token is the most likely one.
        assert!(
            (top[0]["logprob"].as_f64().expect("f") - e["logprob"].as_f64().expect("f")).abs()
                < 1e-6
        );
    }
}

#[test]
fn embeddings_are_unit_vectors_per_input() {
    let v = post(
        "/v1/embeddings",
        json!({"model": MODEL_ID, "input": ["a red apple", "a green pear", "a red apple"]}),
    )
    .json();
    let data = v["data"].as_array().expect("data");
    assert_eq!(data.len(), 3);
    let vecs: Vec<Vec<f64>> = data
        .iter()
        .map(|d| {
            d["embedding"]
                .as_array()
                .expect("vec")
                .iter()
                .map(|x| x.as_f64().expect("f"))
                .collect()
        })
        .collect();
    assert_eq!(vecs[0].len(), model().spec().hidden);
    let norm: f64 = vecs[0].iter().map(|x| x * x).sum::<f64>().sqrt();
    assert!((norm - 1.0).abs() < 1e-4);
    assert_eq!(vecs[0], vecs[2]);
    assert_ne!(vecs[0], vecs[1]);
    assert!(v["usage"]["prompt_tokens"].as_u64().expect("usage") > 0);
}

#[test]
fn malformed_requests_get_openai_errors_and_the_server_keeps_serving() {
    let long_prompt: Vec<u32> = vec![42; 8200];
    let user = json!([{"role": "user", "content": "hi"}]);
    let cases: Vec<(&str, String, u16, Option<&str>)> = vec![
        ("/v1/completions", "{not json".into(), 400, None),
        ("/v1/completions", "[1,2]".into(), 400, None),
        (
            "/v1/completions",
            json!({"model": "gpt-4", "prompt": "x"}).to_string(),
            404,
            Some("model"),
        ),
        (
            "/v1/completions",
            json!({"prompt": "x"}).to_string(),
            400,
            Some("model"),
        ),
        (
            "/v1/completions",
            json!({"model": MODEL_ID, "prompt": "x", "max_tokens": "ten"}).to_string(),
            400,
            Some("max_tokens"),
        ),
        (
            "/v1/completions",
            json!({"model": MODEL_ID, "prompt": "x", "temperature": 7}).to_string(),
            400,
            Some("temperature"),
        ),
        (
            "/v1/completions",
            json!({"model": MODEL_ID, "prompt": 5}).to_string(),
            400,
            Some("prompt"),
        ),
        (
            "/v1/completions",
            json!({"model": MODEL_ID, "prompt": "x", "max_tokens": 9000}).to_string(),
            400,
            Some("max_tokens"),
        ),
        (
            "/v1/completions",
            json!({"model": MODEL_ID, "prompt": long_prompt}).to_string(),
            400,
            Some("prompt"),
        ),
        (
            "/v1/completions",
            json!({"model": MODEL_ID, "prompt": [99999999]}).to_string(),
            400,
            Some("prompt"),
        ),
        (
            "/v1/completions",
            json!({"model": MODEL_ID, "prompt": "x", "n": 100}).to_string(),
            400,
            Some("n"),
        ),
        (
            "/v1/completions",
            json!({"model": MODEL_ID, "prompt": "x", "stop": 3}).to_string(),
            400,
            Some("stop"),
        ),
        (
            "/v1/completions",
            json!({"model": MODEL_ID, "prompt": "x", "logit_bias": {"abc": 1}}).to_string(),
            400,
            Some("logit_bias"),
        ),
        (
            "/v1/chat/completions",
            json!({"model": MODEL_ID, "messages": []}).to_string(),
            400,
            Some("messages"),
        ),
        (
            "/v1/chat/completions",
            json!({"model": MODEL_ID, "messages": "hi"}).to_string(),
            400,
            Some("messages"),
        ),
        (
            "/v1/chat/completions",
            json!({"model": MODEL_ID, "messages": [{"role": "wizard", "content": "hi"}]})
                .to_string(),
            400,
            Some("messages[0].role"),
        ),
        (
            "/v1/chat/completions",
            json!({"model": MODEL_ID, "messages": [{"role": "user", "content": 3}]}).to_string(),
            400,
            Some("messages[0].content"),
        ),
        (
            "/v1/chat/completions",
            json!({"model": MODEL_ID, "messages": user, "max_completion_tokens": 100000})
                .to_string(),
            400,
            Some("max_completion_tokens"),
        ),
        (
            "/v1/chat/completions",
            json!({"model": MODEL_ID, "messages": user, "stream": "yes"}).to_string(),
            400,
            Some("stream"),
        ),
        (
            "/v1/chat/completions",
            json!({"model": MODEL_ID, "messages": user, "top_logprobs": 50, "logprobs": true})
                .to_string(),
            400,
            Some("top_logprobs"),
        ),
        (
            "/v1/embeddings",
            json!({"model": MODEL_ID, "input": ""}).to_string(),
            400,
            Some("input"),
        ),
    ];
    for (path, body, status, param) in cases {
        let r = request_to(shared().addr, "POST", path, &body);
        assert_eq!(r.status, status, "{path} {body}: {}", r.body);
        let e = &r.json()["error"];
        assert!(
            e["message"].as_str().is_some_and(|m| !m.is_empty()),
            "{body}: {e}"
        );
        assert!(e["type"].is_string());
        assert!(e.get("code").is_some() && e.get("param").is_some());
        if let Some(p) = param {
            assert_eq!(e["param"], p, "{body}");
        }
        // Still serving.
        assert_eq!(get("/health").status, 200);
    }
    // A body over the limit, and a method the route does not take: the same error shape. The
    // body is one byte over, so the server answers only after reading all of it (a longer one
    // may be answered while the client still writes, which then fails to write).
    let shell = json!({"model": MODEL_ID, "prompt": ""}).to_string().len();
    let huge = json!({"model": MODEL_ID, "prompt": "x".repeat((2 << 20) + 1 - shell)}).to_string();
    assert_eq!(huge.len(), camelid_server::MAX_BODY_BYTES + 1);
    let r = request_to(shared().addr, "POST", "/v1/completions", &huge);
    assert_eq!(r.status, 413, "{}", r.body);
    assert_eq!(r.json()["error"]["code"], "request_too_large");
    assert!(r.json()["error"]["message"]
        .as_str()
        .unwrap()
        .contains("2 MiB"));
    let r = request_to(shared().addr, "GET", "/v1/chat/completions", "");
    assert_eq!(r.status, 405, "{}", r.body);
    assert_eq!(r.json()["error"]["code"], "method_not_allowed");
    assert!(
        r.headers.to_ascii_lowercase().contains("allow: post"),
        "{}",
        r.headers
    );
    let ok = post(
        "/v1/completions",
        json!({"model": MODEL_ID, "prompt": "ok", "max_tokens": 2}),
    );
    assert_eq!(ok.status, 200);
}

/// Streams one greedy chat and returns its text.
/// Each byte of three rich requests (chat, streamed chat with tools, completion) changed: to a
/// digit, a quote and a byte that is not UTF-8. Every answer is a success or an error in
/// OpenAI's shape below 500, from many clients at once, and afterwards the server runs no
/// sequence and holds no KV block.
#[test]
fn every_byte_of_a_request_changed_gets_an_answer_and_leaks_nothing() {
    let server = TestServer::start(SchedulerConfig::default());
    let addr = server.addr;
    let user =
        json!([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]);
    let tool = json!([{"type": "function", "function": {"name": "f", "parameters":
        {"type": "object", "properties": {"a": {"type": "integer"}}}}}]);
    let bases = [
        (
            "/v1/chat/completions",
            json!({"model": MODEL_ID, "messages": user, "max_tokens": 3,
                   "max_completion_tokens": 3, "temperature": 0.5, "top_p": 0.9, "top_k": 5,
                   "n": 2, "stop": ["x"], "seed": 1, "logprobs": true, "top_logprobs": 2,
                   "presence_penalty": 0.1, "frequency_penalty": 0.1, "logit_bias": {"42": 1},
                   "response_format": {"type": "json_object"}}),
        ),
        (
            "/v1/chat/completions",
            json!({"model": MODEL_ID, "messages": user, "max_tokens": 3,
                   "max_completion_tokens": 3, "stream": true,
                   "stream_options": {"include_usage": true}, "tools": tool,
                   "tool_choice": "auto"}),
        ),
        (
            "/v1/completions",
            json!({"model": MODEL_ID, "prompt": ["a b", "c"], "max_tokens": 3, "echo": true,
                   "logprobs": 2, "min_p": 0.1, "repetition_penalty": 1.1}),
        ),
    ];
    let mut cases: Vec<(&str, Vec<u8>)> = Vec::new();
    for (path, body) in &bases {
        let good = body.to_string().into_bytes();
        for at in 0..good.len() {
            for b in [b'9', b'"', 0xff] {
                let mut bytes = good.clone();
                bytes[at] = b;
                cases.push((path, bytes));
            }
        }
    }
    let total = cases.len();
    let next = std::sync::atomic::AtomicUsize::new(0);
    let failures = std::sync::Mutex::new(Vec::new());
    let statuses = std::sync::Mutex::new(std::collections::BTreeMap::<u16, usize>::new());
    std::thread::scope(|scope| {
        for _ in 0..8 {
            scope.spawn(|| loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let Some((path, body)) = cases.get(i) else {
                    break;
                };
                let r = request_bytes_to(addr, "POST", path, body);
                *statuses.lock().unwrap().entry(r.status).or_default() += 1;
                let shown = String::from_utf8_lossy(body);
                let streamed = r.headers.contains("text/event-stream");
                let well_formed = match r.status {
                    200 if streamed => r.events().last().map(String::as_str) == Some("[DONE]"),
                    200 => serde_json::from_str::<Value>(&r.body)
                        .is_ok_and(|v| v["choices"].is_array()),
                    400..=499 => serde_json::from_str::<Value>(&r.body).is_ok_and(|v| {
                        v["error"]["message"]
                            .as_str()
                            .is_some_and(|m| !m.is_empty())
                    }),
                    _ => false,
                };
                if !well_formed {
                    failures
                        .lock()
                        .unwrap()
                        .push(format!("{path} {shown}: {} {}", r.status, r.body));
                }
            });
        }
    });
    let failures = failures.into_inner().unwrap();
    assert!(
        failures.is_empty(),
        "{} of {total} answers were not a success or an OpenAI error:\n{}",
        failures.len(),
        failures.join("\n")
    );
    let statuses = statuses.into_inner().unwrap();
    eprintln!("{total} damaged requests, answered with {statuses:?}");
    assert!(statuses.contains_key(&200) && statuses.contains_key(&400));
    wait_for_metrics(addr, "sequences or blocks left", 30, |m| {
        metric(m, "camelid_running_sequences") == 0.0 && metric(m, "camelid_kv_blocks_used") == 0.0
    });
}

/// `--api-key`: the `/v1/` routes answer 401 in OpenAI's shape without the key or with another
/// one, and serve with it; the chat page, `/health` and `/metrics` stay open.
#[test]
fn an_api_key_guards_the_api_and_nothing_else() {
    let server = TestServer::start_with_key(SchedulerConfig::default(), Some("s3cret"));
    let addr = server.addr;
    let chat = json!({"model": MODEL_ID, "messages": [{"role": "user", "content": "Hi"}],
                      "max_tokens": 2})
    .to_string();
    for (headers, given) in [
        ("", false),
        ("Authorization: Bearer wrong\r\n", true),
        ("Authorization: Bearer s3cret0\r\n", true),
        ("Authorization: s3cret\r\n", false),
    ] {
        for (method, path, body) in [
            ("GET", "/v1/models", ""),
            ("POST", "/v1/chat/completions", chat.as_str()),
            ("GET", "/v1/nothing", ""),
        ] {
            let r = request_with(addr, method, path, headers, body.as_bytes());
            assert_eq!(r.status, 401, "{path} with {headers:?}: {}", r.body);
            let e = &r.json()["error"];
            assert_eq!(e["code"], "invalid_api_key");
            let says = e["message"].as_str().unwrap();
            assert_eq!(says.starts_with("Incorrect"), given, "{says}");
            assert!(r
                .headers
                .to_ascii_lowercase()
                .contains("www-authenticate: bearer"));
        }
    }
    let key = "Authorization: Bearer s3cret\r\n";
    let r = request_with(addr, "GET", "/v1/models", key, b"");
    assert_eq!(r.status, 200, "{}", r.body);
    let r = request_with(addr, "POST", "/v1/chat/completions", key, chat.as_bytes());
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.json()["usage"]["completion_tokens"], 2);
    for path in ["/", "/app.js", "/health", "/metrics"] {
        assert_eq!(request_to(addr, "GET", path, "").status, 200, "{path}");
    }
    let m = metrics_of(addr);
    assert!(m.contains("status=\"401\""), "401s are counted: {m}");
}

fn stream_chat(addr: SocketAddr, user: &str, max_tokens: usize) -> String {
    let r = request_to(
        addr,
        "POST",
        "/v1/chat/completions",
        &json!({"model": MODEL_ID, "messages": [{"role": "user", "content": user}],
                "max_tokens": max_tokens, "temperature": 0, "stream": true})
        .to_string(),
    );
    assert_eq!(r.status, 200, "{}", r.body);
    let ev = r.events();
    assert_eq!(ev.last().map(String::as_str), Some("[DONE]"));
    ev[..ev.len() - 1]
        .iter()
        .map(|e| serde_json::from_str::<Value>(e).expect("chunk"))
        .filter_map(|c| {
            c["choices"][0]["delta"]["content"]
                .as_str()
                .map(str::to_string)
        })
        .collect()
}

#[test]
fn concurrent_streaming_chats_equal_one_at_a_time() {
    let server = TestServer::start(SchedulerConfig::default());
    let questions = [
        "What is 2+2?",
        "Name a fruit.",
        "Say hello in French.",
        "What color is the sky?",
        "Give me a word that rhymes with cat.",
        "What is the opposite of hot?",
        "Write one short sentence about dogs.",
        "How many legs does a spider have?",
    ];
    let max_tokens = 16;
    let alone: Vec<String> = questions
        .iter()
        .map(|q| stream_chat(server.addr, q, max_tokens))
        .collect();
    let clients = 64;
    let threads: Vec<_> = (0..clients)
        .map(|i| {
            let q = questions[i % questions.len()];
            let addr = server.addr;
            std::thread::spawn(move || stream_chat(addr, q, max_tokens))
        })
        .collect();
    for (i, t) in threads.into_iter().enumerate() {
        let got = t.join().expect("client thread");
        assert_eq!(got, alone[i % questions.len()], "client {i} differs");
    }
    let m = metrics_of(server.addr);
    assert_eq!(
        metric(&m, "camelid_kv_blocks_used"),
        0.0,
        "KV blocks leaked"
    );
    assert_eq!(metric(&m, "camelid_running_sequences"), 0.0);
    assert!(metric(&m, "camelid_prefix_cache_hit_tokens_total") > 0.0);
}

#[test]
fn a_client_that_disconnects_frees_its_sequence() {
    let server = TestServer::start(SchedulerConfig::default());
    let mut s = connect(server.addr);
    send(
        &mut s,
        "POST",
        "/v1/completions",
        &json!({"model": MODEL_ID, "prompt": "Tell a long story:", "max_tokens": 2000,
                "temperature": 0, "ignore_eos": true, "stream": true})
        .to_string(),
    );
    let mut buf = [0u8; 512];
    let n = s.read(&mut buf).expect("first bytes");
    assert!(n > 0);
    drop(s);
    // And one waiting for a whole (non-streamed) answer.
    let mut s = connect(server.addr);
    send(
        &mut s,
        "POST",
        "/v1/completions",
        &json!({"model": MODEL_ID, "prompt": "Tell another story:", "max_tokens": 2000,
                "temperature": 0, "ignore_eos": true})
        .to_string(),
    );
    std::thread::sleep(Duration::from_millis(500));
    drop(s);
    let m = wait_for_metrics(server.addr, "not cancelled", 60, |m| {
        metric(m, "camelid_sequences_cancelled_total") >= 2.0
    });
    assert_eq!(metric(&m, "camelid_kv_blocks_used"), 0.0);
    assert_eq!(metric(&m, "camelid_running_sequences"), 0.0);
    assert!(metric(&m, "camelid_generation_tokens_total") < 4000.0);
}

#[test]
fn a_full_queue_answers_429_with_retry_after() {
    let server = TestServer::start(SchedulerConfig {
        max_running: 1,
        max_waiting: 1,
        ..SchedulerConfig::default()
    });
    let addr = server.addr;
    // Long enough replies that all four requests arrive while the first still runs.
    let threads: Vec<_> = (0..4)
        .map(|_| {
            std::thread::spawn(move || {
                request_to(
                    addr,
                    "POST",
                    "/v1/completions",
                    &json!({"model": MODEL_ID, "prompt": "Hello", "max_tokens": 128,
                            "temperature": 0, "ignore_eos": true})
                    .to_string(),
                )
            })
        })
        .collect();
    let replies: Vec<Reply> = threads.into_iter().map(|t| t.join().expect("t")).collect();
    let full: Vec<&Reply> = replies.iter().filter(|r| r.status == 429).collect();
    assert!(!full.is_empty(), "no request was refused");
    assert!(replies.iter().all(|r| r.status == 200 || r.status == 429));
    for r in full {
        assert!(r.headers.to_ascii_lowercase().contains("retry-after: 1"));
        assert_eq!(r.json()["error"]["code"], "rate_limit_exceeded");
    }
    let ok = request_to(
        addr,
        "POST",
        "/v1/completions",
        &json!({"model": MODEL_ID, "prompt": "Hello", "max_tokens": 2}).to_string(),
    );
    assert_eq!(ok.status, 200);
}

#[test]
fn shutdown_drains_running_requests_and_refuses_new_ones() {
    let mut server = TestServer::start(SchedulerConfig::default());
    let addr = server.addr;
    let running = std::thread::spawn(move || {
        request_to(
            addr,
            "POST",
            "/v1/completions",
            &json!({"model": MODEL_ID, "prompt": "Once", "max_tokens": 40, "temperature": 0,
                    "ignore_eos": true, "stream": true})
            .to_string(),
        )
    });
    // Wait until it runs.
    wait_for_metrics(addr, "the request never ran", 60, |m| {
        metric(m, "camelid_running_sequences") >= 1.0
    });
    let thread = server.begin_shutdown();
    let refused = request_to(
        addr,
        "POST",
        "/v1/completions",
        &json!({"model": MODEL_ID, "prompt": "x", "max_tokens": 2}).to_string(),
    );
    assert_eq!(refused.status, 503, "{}", refused.body);
    assert_eq!(refused.json()["error"]["code"], "service_unavailable");
    let r = running.join().expect("running request");
    let ev = r.events();
    assert_eq!(ev.last().map(String::as_str), Some("[DONE]"));
    let last: Value = serde_json::from_str(&ev[ev.len() - 2]).expect("chunk");
    assert_eq!(last["choices"][0]["finish_reason"], "length");
    thread.join().expect("server stops after draining");
}

/// The official `openai` Python package against the server, when a Python that has it is
/// around: `$CAMELID_PYTHON` (CI installs the package into a venv), else `python3`.
#[test]
fn the_official_openai_python_client() {
    let python = std::env::var("CAMELID_PYTHON").unwrap_or_else(|_| "python3".into());
    let usable = Command::new(&python)
        .args(["-c", "import openai"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !usable {
        eprintln!(
            "skipped: {python} cannot import openai (set CAMELID_PYTHON to a Python that can)"
        );
        return;
    }
    let script =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/python/openai_client.py");
    let out = Command::new(&python)
        .arg(script)
        .arg(format!("http://{}/v1", shared().addr))
        .arg(MODEL_ID)
        .output()
        .expect("run the openai client script");
    let stdout = String::from_utf8_lossy(&out.stdout);
    eprintln!("{stdout}");
    assert!(
        out.status.success(),
        "openai client checks failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn response_format_json_object_and_json_schema_give_valid_json() {
    let v = post(
        "/v1/chat/completions",
        json!({"model": MODEL_ID, "temperature": 0, "max_tokens": 120,
               "messages": [{"role": "user", "content": "Return a JSON object with keys city and country for Paris."}],
               "response_format": {"type": "json_object"}}),
    )
    .json();
    let content = v["choices"][0]["message"]["content"]
        .as_str()
        .expect("content");
    assert_eq!(v["choices"][0]["finish_reason"], "stop", "{content}");
    let parsed: Value = serde_json::from_str(content).expect("json_object output parses");
    assert!(parsed.is_object(), "{content}");

    let schema = json!({
        "type": "object",
        "properties": {
            "name": {"type": "string"},
            "age": {"type": "integer"},
            "pet": {"enum": ["cat", "dog"]}
        },
        "required": ["name", "age", "pet"]
    });
    for temperature in [0.0, 1.0] {
        let v = post(
            "/v1/chat/completions",
            json!({"model": MODEL_ID, "temperature": temperature, "seed": 3, "max_tokens": 120,
                   "messages": [{"role": "user", "content": "Invent a person. Answer in JSON."}],
                   "response_format": {"type": "json_schema",
                                       "json_schema": {"name": "person", "schema": schema}}}),
        )
        .json();
        let content = v["choices"][0]["message"]["content"]
            .as_str()
            .expect("content");
        assert_eq!(v["choices"][0]["finish_reason"], "stop", "{content}");
        let p: Value = serde_json::from_str(content).expect("json_schema output parses");
        assert!(p["name"].is_string(), "{content}");
        assert!(p["age"].is_i64() || p["age"].is_u64(), "{content}");
        assert!(p["pet"] == "cat" || p["pet"] == "dog", "{content}");
        assert_eq!(p.as_object().map(|o| o.len()), Some(3), "{content}");
    }
    let bad = post(
        "/v1/chat/completions",
        json!({"model": MODEL_ID, "messages": [{"role": "user", "content": "x"}],
               "response_format": {"type": "json_schema",
                                   "json_schema": {"name": "x", "schema": {"type": "date"}}}}),
    );
    assert_eq!(bad.status, 400);
    assert_eq!(bad.json()["error"]["param"], "response_format");
}

#[test]
fn tools_required_calls_parse_and_follow_the_schema() {
    let tools = json!([
        {"type": "function", "function": {"name": "get_weather",
            "description": "Current weather in a city",
            "parameters": {"type": "object",
                "properties": {"city": {"type": "string"},
                               "unit": {"enum": ["celsius", "fahrenheit"]}},
                "required": ["city", "unit"]}}},
        {"type": "function", "function": {"name": "get_time",
            "parameters": {"type": "object", "properties": {"zone": {"type": "string"}},
                           "required": ["zone"]}}}
    ]);
    let user = json!([{"role": "user", "content": "What is the weather in Paris?"}]);
    for (choice, stream) in [
        (
            json!({"type": "function", "function": {"name": "get_weather"}}),
            false,
        ),
        (json!("required"), false),
        (
            json!({"type": "function", "function": {"name": "get_weather"}}),
            true,
        ),
    ] {
        let r = post(
            "/v1/chat/completions",
            json!({"model": MODEL_ID, "messages": user, "tools": tools, "tool_choice": choice,
                   "temperature": 0, "max_tokens": 80, "stream": stream}),
        );
        assert_eq!(r.status, 200, "{}", r.body);
        let (calls, reason) = if stream {
            let ev = r.events();
            let first: Value = serde_json::from_str(&ev[0]).expect("chunk");
            let last: Value = serde_json::from_str(&ev[1]).expect("chunk");
            (
                first["choices"][0]["delta"]["tool_calls"].clone(),
                last["choices"][0]["finish_reason"].clone(),
            )
        } else {
            let v = r.json();
            (
                v["choices"][0]["message"]["tool_calls"].clone(),
                v["choices"][0]["finish_reason"].clone(),
            )
        };
        assert_eq!(reason, "tool_calls", "{}", r.body);
        let call = &calls[0];
        assert_eq!(call["type"], "function");
        let name = call["function"]["name"].as_str().expect("name");
        let args: Value =
            serde_json::from_str(call["function"]["arguments"].as_str().expect("args"))
                .expect("arguments are JSON");
        match name {
            "get_weather" => {
                assert!(args["city"].is_string(), "{args}");
                assert!(
                    args["unit"] == "celsius" || args["unit"] == "fahrenheit",
                    "{args}"
                );
            }
            "get_time" => assert!(args["zone"].is_string(), "{args}"),
            other => panic!("unknown function {other}"),
        }
    }
    // A conversation that carries an earlier call and its result renders and runs.
    let history = json!([
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": null, "tool_calls": [{"id": "call_1", "type": "function",
            "function": {"name": "get_weather", "arguments": "{\"city\": \"Paris\", \"unit\": \"celsius\"}"}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "{\"temperature\": 21}"}
    ]);
    let r = post(
        "/v1/chat/completions",
        json!({"model": MODEL_ID, "messages": history, "tools": tools, "max_tokens": 8,
               "temperature": 0}),
    );
    assert_eq!(r.status, 200, "{}", r.body);
    let bad = post(
        "/v1/chat/completions",
        json!({"model": MODEL_ID, "messages": user, "tools": tools,
               "tool_choice": {"type": "function", "function": {"name": "nope"}}}),
    );
    assert_eq!(bad.status, 400);
    assert_eq!(bad.json()["error"]["param"], "tool_choice");
}
