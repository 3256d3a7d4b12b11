//! Continuous batching: one scheduler thread owns the paged KV pool and every sequence, and
//! runs one forward pass per step over all of them. Requests join at the next step and leave
//! when they finish; a step batches every running sequence's next token with chunks of
//! prompts still being read (so a long prompt never stalls the others' decoding), up to a
//! token budget.
//!
//! A sequence is its tokens (prompt, then everything sampled) and how many of them are in the
//! KV cache; each step computes the next stretch of the uncomputed ones, and when that reaches
//! the end, samples a token. Prefill, decode and recompute after preemption are the same
//! thing. When the pool runs out, the most recently admitted sequence is preempted: its blocks
//! go back and it waits to be recomputed (sampler state and text kept, so its output does not
//! change). Identical prompt prefixes reuse cached blocks (see [`crate::paged_kv`]).
//!
//! Results go to a [`SeqSink`] per sequence; a sink that reports itself closed (the client
//! went away) cancels its sequence, whose blocks return to the pool at the next step.

use crate::generate::{FinishReason, StopMatcher};
use crate::json_constraint::{JsonConstraint, Schema};
use crate::paged_kv::{BlockId, BlockPool, PagedBatch, PoolShape, PoolStats};
use crate::sampling::{Sampler, SamplingParams};
use camelid_model::tokenizer::DecodeStream;
use camelid_model::transformer::{log_softmax, BatchLogits, BatchSeq, Logits};
use camelid_model::Model;
use rayon::prelude::*;
use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::Instant;

#[derive(Debug, Clone)]
pub struct SchedulerConfig {
    /// Bytes of keys and values the pool holds.
    pub kv_memory: usize,
    /// Positions per KV block.
    pub block_size: usize,
    /// Sequences run at once.
    pub max_running: usize,
    /// Tokens one step computes at most (decode rows first, then prompt chunks).
    pub max_step_tokens: usize,
    /// Sequences waiting for admission before new requests are refused.
    pub max_waiting: usize,
}

impl Default for SchedulerConfig {
    fn default() -> Self {
        Self {
            kv_memory: 1 << 30,
            block_size: 16,
            max_running: 64,
            max_step_tokens: 512,
            max_waiting: 256,
        }
    }
}

/// A token's log-probability and the most likely alternatives at its position.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenLogprob {
    pub logprob: f32,
    pub top: Vec<(u32, f32)>,
}

#[derive(Debug, Clone)]
pub struct SeqRequest {
    pub prompt: Vec<u32>,
    /// Tokens to sample at most (0: only read the prompt, e.g. for its log-probs).
    pub max_tokens: usize,
    pub sampling: SamplingParams,
    /// Added to the logits before sampling (OpenAI's `logit_bias`).
    pub logit_bias: Vec<(u32, f32)>,
    pub stop: Vec<String>,
    pub stop_at_eos: bool,
    /// Report each sampled token's log-prob and this many alternatives.
    pub logprobs: Option<usize>,
    /// Report every prompt token's log-prob (from position 1 on) too.
    pub prompt_logprobs: bool,
    /// Only output matching this JSON schema (the sequence ends when the value is complete).
    pub json: Option<Arc<Schema>>,
}

impl SeqRequest {
    /// `max_tokens` greedy tokens after `prompt`, past EOS, with no stop strings, bias,
    /// log-probs or schema: the plain request of benchmarks and tests, to adjust field by field.
    pub fn greedy(prompt: Vec<u32>, max_tokens: usize) -> Self {
        SeqRequest {
            prompt,
            max_tokens,
            sampling: SamplingParams::greedy(),
            logit_bias: Vec::new(),
            stop: Vec::new(),
            stop_at_eos: false,
            logprobs: None,
            prompt_logprobs: false,
            json: None,
        }
    }
}

#[derive(Debug, Clone)]
pub enum SeqEvent {
    /// One sampled token and the text it completes (possibly empty: text is held back while
    /// it could be a partial character or the start of a stop string).
    Token {
        id: u32,
        text: String,
        logprob: Option<TokenLogprob>,
    },
    Done(SeqDone),
}

#[derive(Debug, Clone)]
pub struct SeqDone {
    pub finish: FinishReason,
    /// Text still held back at the end.
    pub text: String,
    pub prompt_tokens: usize,
    /// Sampled tokens, the EOS included.
    pub completion_tokens: usize,
    /// Prompt tokens whose keys and values came from the prefix cache.
    pub cached_tokens: usize,
    /// Per prompt token (the first has none), when asked for.
    pub prompt_logprobs: Option<Vec<Option<TokenLogprob>>>,
    pub error: Option<String>,
}

/// Where a sequence's events go. `send` returns `false` once nobody listens.
pub trait SeqSink: Send {
    fn send(&mut self, event: SeqEvent) -> bool;
    fn is_closed(&self) -> bool;
}

/// A sink over a standard channel (tests, blocking callers).
pub struct ChannelSink(pub mpsc::Sender<SeqEvent>);

impl SeqSink for ChannelSink {
    fn send(&mut self, event: SeqEvent) -> bool {
        self.0.send(event).is_ok()
    }
    fn is_closed(&self) -> bool {
        false
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SubmitError {
    QueueFull,
    ShuttingDown,
    /// The sequence could never fit in the KV pool (message says by how much).
    TooLarge(String),
}

impl std::fmt::Display for SubmitError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::QueueFull => write!(f, "the request queue is full, retry later"),
            Self::ShuttingDown => write!(f, "the server is shutting down"),
            Self::TooLarge(m) => write!(f, "{m}"),
        }
    }
}

/// Bucket bounds (seconds) of the latency histograms.
pub const LATENCY_BUCKETS: [f64; 12] = [
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

#[derive(Debug, Clone, Default)]
pub struct Histogram {
    /// Cumulative-ready counts per bucket of [`LATENCY_BUCKETS`] plus one for +Inf.
    pub counts: Vec<u64>,
    pub sum: f64,
    pub count: u64,
}

impl Histogram {
    fn observe(&mut self, seconds: f64) {
        if self.counts.is_empty() {
            self.counts = vec![0; LATENCY_BUCKETS.len() + 1];
        }
        let i = LATENCY_BUCKETS
            .iter()
            .position(|&b| seconds <= b)
            .unwrap_or(LATENCY_BUCKETS.len());
        self.counts[i] += 1;
        self.sum += seconds;
        self.count += 1;
    }
}

/// What `/metrics` reports, refreshed every step.
#[derive(Debug, Clone, Default)]
pub struct SchedulerStats {
    pub waiting: usize,
    pub running: usize,
    pub pool: PoolStats,
    pub block_size: usize,
    pub prompt_tokens: u64,
    pub generated_tokens: u64,
    /// Prompt tokens looked up in the prefix cache, and those found.
    pub prefix_queried_tokens: u64,
    pub prefix_hit_tokens: u64,
    pub preemptions: u64,
    pub finished: u64,
    pub cancelled: u64,
    pub steps: u64,
    pub time_to_first_token: Histogram,
    pub inter_token_latency: Histogram,
}

enum Msg {
    Submit(Box<Seq>),
    Shutdown,
}

/// The server's side of the scheduler: submit sequences, read statistics, shut down.
#[derive(Clone)]
pub struct SchedulerHandle {
    tx: mpsc::Sender<Msg>,
    waiting: Arc<AtomicUsize>,
    shutting_down: Arc<AtomicBool>,
    stats: Arc<Mutex<SchedulerStats>>,
    max_waiting: usize,
    /// Positions the whole pool holds.
    capacity_tokens: usize,
}

impl SchedulerHandle {
    /// Queues sequences together (all or none, e.g. the `n` choices of one request).
    pub fn submit(&self, requests: Vec<(SeqRequest, Box<dyn SeqSink>)>) -> Result<(), SubmitError> {
        if self.shutting_down.load(Ordering::SeqCst) {
            return Err(SubmitError::ShuttingDown);
        }
        for (r, _) in &requests {
            let need = r.prompt.len() + r.max_tokens;
            if need > self.capacity_tokens {
                return Err(SubmitError::TooLarge(format!(
                    "the request needs {need} KV positions (prompt and max_tokens) but the KV \
                     cache holds {} (raise --kv-memory)",
                    self.capacity_tokens
                )));
            }
        }
        let n = requests.len();
        let before = self.waiting.fetch_add(n, Ordering::SeqCst);
        if before + n > self.max_waiting {
            self.waiting.fetch_sub(n, Ordering::SeqCst);
            return Err(SubmitError::QueueFull);
        }
        for (req, sink) in requests {
            let seq = Box::new(Seq::new(req, sink));
            if self.tx.send(Msg::Submit(seq)).is_err() {
                return Err(SubmitError::ShuttingDown);
            }
        }
        Ok(())
    }

    pub fn stats(&self) -> SchedulerStats {
        self.stats.lock().map(|s| s.clone()).unwrap_or_default()
    }

    /// New submissions are refused from now on; queued and running sequences finish.
    pub fn shutdown(&self) {
        self.shutting_down.store(true, Ordering::SeqCst);
        let _ = self.tx.send(Msg::Shutdown);
    }

    pub fn is_shutting_down(&self) -> bool {
        self.shutting_down.load(Ordering::SeqCst)
    }

    pub fn capacity_tokens(&self) -> usize {
        self.capacity_tokens
    }
}

struct Seq {
    req: SeqRequest,
    sink: Box<dyn SeqSink>,
    tokens: Vec<u32>,
    prompt_len: usize,
    /// Positions whose keys and values are in `table`'s blocks.
    computed: usize,
    table: Vec<BlockId>,
    /// Hash of each full block of `table` named so far (the chain's links).
    hashes: Vec<u64>,
    sampler: Sampler,
    constraint: Option<JsonConstraint>,
    decode: DecodeStream,
    stops: StopMatcher,
    prompt_logprobs: Vec<Option<TokenLogprob>>,
    cached_tokens: usize,
    /// Admitted at least once (a preempted sequence comes back without being counted again).
    admitted_before: bool,
    submitted: Instant,
    last_token: Option<Instant>,
}

impl Seq {
    fn new(req: SeqRequest, sink: Box<dyn SeqSink>) -> Self {
        let prompt_logprobs = if req.prompt_logprobs {
            vec![None]
        } else {
            Vec::new()
        };
        Self {
            tokens: req.prompt.clone(),
            prompt_len: req.prompt.len(),
            sampler: Sampler::new(req.sampling.clone()),
            constraint: req.json.clone().map(JsonConstraint::new),
            stops: StopMatcher::new(&req.stop),
            req,
            sink,
            computed: 0,
            table: Vec::new(),
            hashes: Vec::new(),
            decode: DecodeStream::new(),
            prompt_logprobs,
            cached_tokens: 0,
            admitted_before: false,
            submitted: Instant::now(),
            last_token: None,
        }
    }

    fn generated(&self) -> usize {
        self.tokens.len() - self.prompt_len
    }

    fn collecting_prompt_logprobs(&self) -> bool {
        self.req.prompt_logprobs && self.prompt_logprobs.len() < self.prompt_len
    }
}

pub struct Scheduler {
    model: Arc<Model>,
    config: SchedulerConfig,
    pool: BlockPool,
    waiting: VecDeque<Seq>,
    /// In admission order: the last is preempted first.
    running: Vec<Seq>,
    rx: mpsc::Receiver<Msg>,
    waiting_count: Arc<AtomicUsize>,
    stats: Arc<Mutex<SchedulerStats>>,
    counters: SchedulerStats,
    shutting_down: bool,
    /// Each token's text, for constrained decoding (made on first use).
    token_texts: Option<Arc<Vec<String>>>,
    /// The forward pass's logits, their buffers reused from step to step.
    logits: BatchLogits,
}

/// How many allowed tokens a constrained step samples among (the most likely ones).
const CONSTRAINED_CANDIDATES: usize = 64;

/// Logits a step reads at least before its sequences sample on the pool's threads (below,
/// handing the work over costs more than it saves).
const PARALLEL_SAMPLING: usize = 1 << 16;

/// Starts the scheduler thread for `model`. It runs until [`SchedulerHandle::shutdown`] was
/// called and every sequence has finished (or every handle is dropped).
pub fn start(
    model: Arc<Model>,
    config: SchedulerConfig,
) -> (SchedulerHandle, std::thread::JoinHandle<()>) {
    let (handle, scheduler) = Scheduler::new(model, config);
    let thread = std::thread::Builder::new()
        .name("camelid-scheduler".into())
        .spawn(move || scheduler.run())
        .expect("spawn the scheduler thread");
    (handle, thread)
}

impl Scheduler {
    pub fn new(model: Arc<Model>, config: SchedulerConfig) -> (SchedulerHandle, Scheduler) {
        let spec = model.spec();
        let shape = PoolShape {
            layers: spec.layers,
            kv_heads: spec.attention.kv_heads,
            head_dim: spec.attention.head_dim,
            block_size: config.block_size.max(1),
        };
        let blocks = shape.blocks_in(config.kv_memory);
        let pool = BlockPool::new(shape, blocks, model.transformer.device());
        let (tx, rx) = mpsc::channel();
        let waiting = Arc::new(AtomicUsize::new(0));
        let stats = Arc::new(Mutex::new(SchedulerStats::default()));
        let handle = SchedulerHandle {
            tx,
            waiting: waiting.clone(),
            shutting_down: Arc::new(AtomicBool::new(false)),
            stats: stats.clone(),
            max_waiting: config.max_waiting,
            capacity_tokens: blocks * shape.block_size,
        };
        let mut s = Scheduler {
            model,
            config,
            pool,
            waiting: VecDeque::new(),
            running: Vec::new(),
            rx,
            waiting_count: waiting,
            stats,
            counters: SchedulerStats::default(),
            shutting_down: false,
            token_texts: None,
            logits: BatchLogits::default(),
        };
        s.publish();
        (handle, s)
    }

    /// The loop: take new requests, drop cancelled ones, admit, step; sleep when idle.
    pub fn run(mut self) {
        loop {
            if self.running.is_empty() && self.waiting.is_empty() {
                if self.shutting_down {
                    break;
                }
                match self.rx.recv() {
                    Ok(m) => self.receive(m),
                    Err(_) => break,
                }
            }
            while let Ok(m) = self.rx.try_recv() {
                self.receive(m);
            }
            self.step();
        }
        self.publish();
    }

    fn receive(&mut self, m: Msg) {
        match m {
            Msg::Submit(seq) => self.waiting.push_back(*seq),
            Msg::Shutdown => self.shutting_down = true,
        }
    }

    /// One scheduling round and one forward pass. Public for tests that drive it by hand.
    pub fn step(&mut self) {
        self.drop_cancelled();
        self.admit();
        if !self.running.is_empty() {
            let plan = self.plan();
            self.execute(plan);
        }
        self.counters.steps += 1;
        self.publish();
    }

    /// Every sequence queued or running has finished.
    pub fn is_idle(&self) -> bool {
        self.running.is_empty() && self.waiting.is_empty()
    }

    /// Takes messages without blocking (tests).
    pub fn poll(&mut self) {
        while let Ok(m) = self.rx.try_recv() {
            self.receive(m);
        }
    }

    pub fn pool_stats(&self) -> PoolStats {
        self.pool.stats()
    }

    fn publish(&mut self) {
        self.counters.waiting = self.waiting.len();
        self.counters.running = self.running.len();
        self.counters.pool = self.pool.stats();
        self.counters.block_size = self.pool.block_size();
        if let Ok(mut s) = self.stats.lock() {
            *s = self.counters.clone();
        }
    }

    fn drop_cancelled(&mut self) {
        let mut i = 0;
        while i < self.running.len() {
            if self.running[i].sink.is_closed() {
                let seq = self.running.remove(i);
                self.free(seq);
                self.counters.cancelled += 1;
            } else {
                i += 1;
            }
        }
        let before = self.waiting.len();
        self.waiting.retain(|s| !s.sink.is_closed());
        let gone = before - self.waiting.len();
        if gone > 0 {
            self.waiting_count.fetch_sub(gone, Ordering::SeqCst);
            self.counters.cancelled += gone as u64;
        }
    }

    fn free(&mut self, mut seq: Seq) {
        for id in seq.table.drain(..) {
            self.pool.release(id);
        }
        seq.hashes.clear();
        seq.computed = 0;
    }

    /// Moves waiting sequences to running while there is room: a running slot, and blocks for
    /// the rest of the prompt after the prefix-cache hits.
    fn admit(&mut self) {
        let bs = self.pool.block_size();
        while self.running.len() < self.config.max_running {
            let Some(mut seq) = self.waiting.pop_front() else {
                break;
            };
            // Reuse cached full blocks of the prompt, leaving at least one token to compute
            // (its logits are needed). Prompt log-probs need every position computed.
            if !seq.collecting_prompt_logprobs() && seq.table.is_empty() {
                let reusable = (seq.tokens.len() - 1) / bs;
                let mut parent = 0u64;
                let queried = (seq.prompt_len.saturating_sub(1) / bs) * bs;
                for b in 0..reusable {
                    let toks = &seq.tokens[b * bs..(b + 1) * bs];
                    match self.pool.lookup(parent, toks) {
                        Some(id) => {
                            parent = crate::paged_kv::block_hash(parent, toks);
                            seq.table.push(id);
                            seq.hashes.push(parent);
                        }
                        None => break,
                    }
                }
                seq.computed = seq.table.len() * bs;
                if !seq.admitted_before {
                    seq.cached_tokens = seq.computed.min(seq.prompt_len);
                    self.counters.prefix_queried_tokens += queried as u64;
                    self.counters.prefix_hit_tokens += seq.cached_tokens as u64;
                }
            }
            let need = (seq.tokens.len() + 1).div_ceil(bs) - seq.table.len();
            if need > self.pool.available() && !self.running.is_empty() {
                // Not now: give the hits back and wait for running sequences to free blocks.
                self.free_table(&mut seq);
                self.waiting.push_front(seq);
                break;
            }
            if !seq.admitted_before {
                self.counters.prompt_tokens += seq.prompt_len as u64;
                seq.admitted_before = true;
            }
            self.waiting_count.fetch_sub(1, Ordering::SeqCst);
            self.running.push(seq);
        }
    }

    fn free_table(&mut self, seq: &mut Seq) {
        for id in seq.table.drain(..) {
            self.pool.release(id);
        }
        seq.hashes.clear();
        seq.computed = 0;
    }

    /// How many tokens each running sequence computes this step (index-aligned with
    /// `running`), with blocks allocated for them; preempts when the pool cannot cover it.
    fn plan(&mut self) -> Vec<usize> {
        let bs = self.pool.block_size();
        loop {
            let mut budget = self.config.max_step_tokens.max(self.running.len() + bs);
            let mut take = vec![0usize; self.running.len()];
            // Decode rows first, then prompt chunks in admission order.
            for (i, s) in self.running.iter().enumerate() {
                if s.tokens.len() - s.computed == 1 {
                    take[i] = 1;
                    budget -= 1;
                }
            }
            for (i, s) in self.running.iter().enumerate() {
                let left = s.tokens.len() - s.computed;
                if left > 1 && budget > 0 {
                    // A chunk ends on a block boundary unless it reaches the end, so its
                    // pieces are the same however the budget fell (see `execute`).
                    let mut t = left.min(budget);
                    if t < left {
                        t = ((s.computed + t) / bs * bs).saturating_sub(s.computed);
                    }
                    take[i] = t;
                    budget -= t;
                }
            }
            let need: usize = self
                .running
                .iter()
                .zip(&take)
                .map(|(s, &t)| (s.computed + t).div_ceil(bs).saturating_sub(s.table.len()))
                .sum();
            if need <= self.pool.available() {
                for (s, &t) in self.running.iter_mut().zip(&take) {
                    while s.table.len() < (s.computed + t).div_ceil(bs) {
                        match self.pool.allocate() {
                            Some(id) => s.table.push(id),
                            None => unreachable!("blocks were counted before allocating"),
                        }
                    }
                }
                return take;
            }
            // Preempt by recompute: the newest sequence gives its blocks back.
            let Some(mut victim) = self.running.pop() else {
                return Vec::new();
            };
            self.free_table(&mut victim);
            self.counters.preemptions += 1;
            self.waiting_count.fetch_add(1, Ordering::SeqCst);
            self.waiting.push_front(victim);
            if self.running.is_empty() {
                return Vec::new();
            }
        }
    }

    /// Runs the planned tokens as one forward pass. Each sequence's stretch goes in as pieces
    /// that end on block boundaries, so a position's keys and values are computed by the same
    /// operations whatever else shares the step, however the prompt was chunked and whether
    /// earlier blocks came from the prefix cache: batching never changes a sequence's numbers,
    /// and a seed repeats its text.
    fn execute(&mut self, take: Vec<usize>) {
        if take.is_empty() {
            return;
        }
        let bs = self.pool.block_size();
        let model = self.model.clone();
        // (running index, start, len, last piece of its stretch)
        let mut pieces: Vec<(usize, usize, usize, bool)> = Vec::new();
        for (i, s) in self.running.iter().enumerate() {
            let end = s.computed + take[i];
            let mut p = s.computed;
            while p < end {
                let next = end.min((p / bs + 1) * bs);
                pieces.push((i, p, next - p, next == end));
                p = next;
            }
        }
        let inputs: Vec<BatchSeq> = pieces
            .iter()
            .map(|&(i, start, len, last)| {
                let s = &self.running[i];
                BatchSeq {
                    ids: &s.tokens[start..start + len],
                    logits: if s.collecting_prompt_logprobs() {
                        Logits::All
                    } else if last && start + len == s.tokens.len() {
                        Logits::Last
                    } else {
                        Logits::None
                    },
                }
            })
            .collect();
        let mut batch = PagedBatch {
            pool: &mut self.pool,
            tables: pieces
                .iter()
                .map(|&(i, ..)| self.running[i].table.as_slice())
                .collect(),
            starts: pieces.iter().map(|&(_, start, ..)| start).collect(),
        };
        let mut logits = std::mem::take(&mut self.logits);
        let result = camelid_kernels::on_pool(|| {
            model
                .transformer
                .forward_batch_into(&inputs, &mut batch, &mut logits)
        });
        drop(inputs);
        let members: Vec<usize> = (0..self.running.len()).filter(|&i| take[i] > 0).collect();
        if let Err(e) = result {
            self.logits = logits;
            // Not expected (inputs were checked on submit): fail the batch, keep serving.
            let msg = format!("forward pass failed: {e}");
            for i in members.into_iter().rev() {
                let seq = self.running.remove(i);
                self.finish(seq, FinishReason::Cancelled, Some(msg.clone()));
            }
            return;
        }
        // A sequence's pieces are consecutive members, so its rows are one stretch.
        let mut spans: Vec<Option<(usize, usize)>> = vec![None; self.running.len()];
        for (p, &(i, ..)) in pieces.iter().enumerate() {
            if let Some((first, n)) = logits.span(p) {
                spans[i] = Some(match spans[i] {
                    Some((f, m)) => (f, m + n),
                    None => (first, n),
                });
            }
        }
        let mut befores = vec![0; self.running.len()];
        for &i in &members {
            befores[i] = self.record(i, take[i]);
        }
        if self.token_texts.is_none() && self.running.iter().any(|s| s.constraint.is_some()) {
            self.token_texts = Some(Arc::new(token_texts(&self.model)));
        }
        let texts = self.token_texts.clone();
        let vocab = logits.vocab();
        // Each member's rows, split off the pass's buffer (they are in running order).
        let mut rest = logits.all_mut();
        let mut at = 0;
        let mut work = Vec::with_capacity(members.len());
        for (i, seq) in self.running.iter_mut().enumerate() {
            if take[i] == 0 {
                continue;
            }
            let rows: &mut [f32] = match spans[i] {
                Some((first, n)) => {
                    let (_, tail) = std::mem::take(&mut rest).split_at_mut((first - at) * vocab);
                    let (mine, tail) = tail.split_at_mut(n * vocab);
                    rest = tail;
                    at = first + n;
                    mine
                }
                None => &mut [],
            };
            work.push((seq, befores[i], rows));
        }
        let choose = |(seq, before, rows): &mut (&mut Seq, usize, &mut [f32])| {
            choose(
                seq,
                *before,
                rows,
                vocab,
                texts.as_deref().map(Vec::as_slice),
            )
        };
        // Sampling reads a whole vocabulary per row: the batch's rows share the pool's threads
        // (each sequence its own sampler, so the draws do not depend on the split).
        let logits_read: usize = work.iter().map(|w| w.2.len()).sum();
        let choices: Vec<Choice> = if work.len() > 1 && logits_read >= PARALLEL_SAMPLING {
            camelid_kernels::on_pool(|| work.par_iter_mut().map(choose).collect())
        } else {
            work.iter_mut().map(choose).collect()
        };
        drop(work);
        self.logits = logits;
        let mut done = Vec::new();
        for (&i, choice) in members.iter().zip(choices) {
            match self.deliver(i, choice) {
                Ok(Some(reason)) => done.push((i, reason, None)),
                Ok(None) => {}
                Err(e) => done.push((i, FinishReason::Cancelled, Some(e.to_string()))),
            }
        }
        for (i, reason, err) in done.into_iter().rev() {
            let seq = self.running.remove(i);
            self.finish(seq, reason, err);
        }
    }

    /// Records a computed stretch of `running[i]` and names the blocks it filled, so other
    /// prompts can share them. Returns how many positions were computed before.
    fn record(&mut self, i: usize, took: usize) -> usize {
        let bs = self.pool.block_size();
        let seq = &mut self.running[i];
        let before = seq.computed;
        seq.computed += took;
        while seq.hashes.len() < seq.computed / bs {
            let b = seq.hashes.len();
            let parent = seq.hashes.last().copied().unwrap_or(0);
            let h = self
                .pool
                .register(seq.table[b], parent, &seq.tokens[b * bs..(b + 1) * bs]);
            seq.hashes.push(h);
        }
        before
    }

    /// Hands a sampled token to `running[i]`'s sink, with its text and timing.
    fn deliver(&mut self, i: usize, choice: Choice) -> camelid_model::Result<Option<FinishReason>> {
        let (next, logprob, json_complete) = match choice {
            Choice::Wait => return Ok(None),
            Choice::Finish(reason) => return Ok(Some(reason)),
            Choice::Token {
                next,
                logprob,
                json_complete,
            } => (next, logprob, json_complete),
        };
        let spec_positions = self.model.spec().batched_positions();
        let eos = &self.model.eos_ids;
        let tokenizer = self.model.tokenizer.as_ref();
        let seq = &mut self.running[i];
        seq.tokens.push(next);
        let now = Instant::now();
        match seq.last_token {
            None => self
                .counters
                .time_to_first_token
                .observe((now - seq.submitted).as_secs_f64()),
            Some(t) => self
                .counters
                .inter_token_latency
                .observe((now - t).as_secs_f64()),
        }
        seq.last_token = Some(now);
        self.counters.generated_tokens += 1;
        if seq.req.stop_at_eos && eos.contains(&next) {
            if !seq.sink.send(SeqEvent::Token {
                id: next,
                text: String::new(),
                logprob,
            }) {
                return Ok(Some(FinishReason::Cancelled));
            }
            return Ok(Some(FinishReason::Eos));
        }
        let mut text = String::new();
        let mut hit = false;
        if let Some(tok) = tokenizer {
            if let Some(delta) = seq.decode.push(tok, next)? {
                let (emit, h) = seq.stops.push(&delta);
                text = emit;
                hit = h;
            }
        }
        if !seq.sink.send(SeqEvent::Token {
            id: next,
            text,
            logprob,
        }) {
            return Ok(Some(FinishReason::Cancelled));
        }
        if hit || json_complete {
            return Ok(Some(FinishReason::Stop));
        }
        if seq.generated() >= seq.req.max_tokens || seq.tokens.len() >= spec_positions {
            return Ok(Some(FinishReason::Length));
        }
        Ok(None)
    }

    fn finish(&mut self, mut seq: Seq, mut finish: FinishReason, error: Option<String>) {
        let mut text = String::new();
        let json_done = seq.constraint.as_ref().is_some_and(|c| c.is_complete());
        if error.is_none()
            && (json_done || matches!(finish, FinishReason::Eos | FinishReason::Length))
        {
            if let Some(tok) = self.model.tokenizer.as_ref() {
                let rest = seq.decode.flush(tok).ok().flatten().unwrap_or_default();
                let (emit, hit) = seq.stops.push(&rest);
                text = emit;
                if hit {
                    finish = FinishReason::Stop;
                } else {
                    text.push_str(&seq.stops.flush());
                }
            }
        }
        let done = SeqDone {
            finish,
            text,
            prompt_tokens: seq.prompt_len,
            completion_tokens: seq.generated(),
            cached_tokens: seq.cached_tokens,
            prompt_logprobs: seq
                .req
                .prompt_logprobs
                .then(|| std::mem::take(&mut seq.prompt_logprobs)),
            error,
        };
        if finish == FinishReason::Cancelled {
            self.counters.cancelled += 1;
        } else {
            self.counters.finished += 1;
        }
        seq.sink.send(SeqEvent::Done(done));
        self.free(seq);
    }
}

/// What a sequence does with the rows its stretch computed.
enum Choice {
    /// Its prompt is not all read yet.
    Wait,
    Finish(FinishReason),
    Token {
        next: u32,
        logprob: Option<TokenLogprob>,
        json_complete: bool,
    },
}

/// Every token's text (constrained decoding matches them against the schema).
fn token_texts(model: &Model) -> Vec<String> {
    match model.tokenizer.as_ref() {
        Some(t) => (0..model.spec().vocab_size as u32)
            .map(|id| t.decode(&[id], false).unwrap_or_default())
            .collect(),
        None => Vec::new(),
    }
}

/// The part of a step that reads `seq`'s logits `rows` (`[n, vocab]`, edited in place) and
/// touches only `seq`: prompt log-probs, then, when the stretch that started at `before`
/// reached the end, the next token (bias, schema mask, sampler). Sequences run it in parallel.
fn choose(
    seq: &mut Seq,
    before: usize,
    rows: &mut [f32],
    vocab: usize,
    texts: Option<&[String]>,
) -> Choice {
    let top_n = seq.req.logprobs.unwrap_or(0);
    if seq.collecting_prompt_logprobs() {
        // Row r predicts the token at position before + r + 1.
        for (r, row) in rows.chunks(vocab.max(1)).enumerate() {
            let next = before + r + 1;
            if next < seq.prompt_len && next == seq.prompt_logprobs.len() {
                let lp = log_softmax(row);
                seq.prompt_logprobs
                    .push(Some(token_logprob(&lp, seq.tokens[next], top_n)));
            }
        }
    }
    if seq.computed < seq.tokens.len() {
        return Choice::Wait;
    }
    if seq.generated() >= seq.req.max_tokens {
        return Choice::Finish(FinishReason::Length);
    }
    let Some(row) = rows.chunks_mut(vocab.max(1)).next_back() else {
        return Choice::Wait;
    };
    let logprob = seq.req.logprobs.map(|n| {
        let lp = log_softmax(row);
        (lp, n)
    });
    for &(id, bias) in &seq.req.logit_bias {
        if let Some(l) = row.get_mut(id as usize) {
            *l += bias;
        }
    }
    if let (Some(c), Some(texts)) = (&seq.constraint, texts) {
        // Keep the most likely tokens that leave the output a viable prefix.
        let mut order: Vec<u32> = (0..row.len() as u32).collect();
        order.sort_unstable_by(|&a, &b| row[b as usize].total_cmp(&row[a as usize]));
        let mut allowed = vec![false; row.len()];
        let mut found = 0;
        for &id in &order {
            if found == CONSTRAINED_CANDIDATES || row[id as usize] == f32::NEG_INFINITY {
                break;
            }
            if texts.get(id as usize).is_some_and(|t| c.allows(t)) {
                allowed[id as usize] = true;
                found += 1;
            }
        }
        if found == 0 {
            return Choice::Finish(FinishReason::Length);
        }
        for (l, ok) in row.iter_mut().zip(&allowed) {
            if !ok {
                *l = f32::NEG_INFINITY;
            }
        }
    }
    let generated = seq.generated();
    let next = seq.sampler.sample(row, &seq.tokens, generated);
    let mut json_complete = false;
    if let (Some(c), Some(texts)) = (&mut seq.constraint, texts) {
        c.push(texts.get(next as usize).map_or("", String::as_str));
        json_complete = c.is_complete();
    }
    Choice::Token {
        next,
        logprob: logprob.map(|(lp, n)| token_logprob(&lp, next, n)),
        json_complete,
    }
}

fn token_logprob(logprobs: &[f64], id: u32, top_n: usize) -> TokenLogprob {
    let logprob = logprobs
        .get(id as usize)
        .copied()
        .unwrap_or(f64::NEG_INFINITY) as f32;
    let mut top = Vec::new();
    if top_n > 0 {
        let mut idx: Vec<u32> = (0..logprobs.len() as u32).collect();
        let n = top_n.min(idx.len());
        idx.select_nth_unstable_by(n - 1, |&a, &b| {
            logprobs[b as usize].total_cmp(&logprobs[a as usize])
        });
        idx.truncate(n);
        idx.sort_by(|&a, &b| logprobs[b as usize].total_cmp(&logprobs[a as usize]));
        top = idx
            .into_iter()
            .map(|i| (i, logprobs[i as usize] as f32))
            .collect();
    }
    TokenLogprob { logprob, top }
}
