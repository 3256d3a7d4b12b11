//! Continuous batching on tiny random-weight checkpoints (`tests/fixtures/parity`):
//! - `Transformer::forward_batch` over a paged cache gives each sequence the logits that
//!   `forward` gives it alone (families with rotary, learned positions, ALiBi, sliding window,
//!   parallel blocks);
//! - the scheduler: batched greedy decoding yields exactly the tokens of one-at-a-time runs
//!   and of the plain generation loop; admission limits, chunked prefill, preemption by
//!   recompute, prefix-cache sharing and eviction, cancellation, prompt log-probs, and no
//!   KV block left held afterwards.

use camelid_engine::generate::{all_logits, greedy_ids};
use camelid_engine::paged_kv::{BlockPool, PagedBatch, PoolShape};
use camelid_engine::scheduler::{
    Scheduler, SchedulerConfig, SchedulerHandle, SeqDone, SeqEvent, SeqRequest, SeqSink,
    SubmitError,
};
use camelid_engine::{FinishReason, KvCache, SamplingParams};
use camelid_model::transformer::{log_softmax, BatchSeq, Logits};
use camelid_model::Model;
use candle_core::{Device, Tensor};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};

fn load(case: &str) -> Model {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures/parity")
        .join(case);
    Model::load(&dir, &Device::Cpu).expect("load fixture")
}

fn ids(n: usize, seed: usize, vocab: usize) -> Vec<u32> {
    (0..n)
        .map(|i| ((i * 31 + seed * 17 + 5) % vocab) as u32)
        .collect()
}

fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b)
        .expect("sub")
        .abs()
        .expect("abs")
        .flatten_all()
        .expect("flat")
        .max(0)
        .expect("max")
        .to_scalar::<f32>()
        .expect("scalar")
}

#[test]
fn forward_batch_matches_forward_per_sequence() {
    for case in [
        "smollm2_shape",
        "gpt2",
        "bloom",
        "mistral_swa",
        "falcon_7b_style",
        "opt_350m_style",
    ] {
        let model = load(case);
        let spec = model.spec().clone();
        let t = &model.transformer;
        let lens = [5usize, 1, 9, 3];
        let seqs: Vec<Vec<u32>> = lens
            .iter()
            .enumerate()
            .map(|(i, &n)| ids(n + 6, i, spec.vocab_size))
            .collect();
        // Reference: each sequence alone, every position's logits.
        let reference: Vec<Tensor> = seqs
            .iter()
            .map(|s| {
                let mut cache = KvCache::new(spec.layers, s.len());
                let input = Tensor::new(s.as_slice(), &Device::Cpu)
                    .expect("ids")
                    .unsqueeze(0)
                    .expect("batch");
                t.forward(&input, &mut cache, true)
                    .expect("forward")
                    .squeeze(0)
                    .expect("squeeze")
            })
            .collect();
        // Batched in four passes: the first `lens[i]` tokens, the next 4 (all logits), then
        // one token each twice (decode rows attended together).
        let shape = PoolShape {
            layers: spec.layers,
            kv_heads: spec.attention.kv_heads,
            head_dim: spec.attention.head_dim,
            block_size: 4,
        };
        let mut pool = BlockPool::new(shape, 64, &Device::Cpu);
        let tables: Vec<Vec<u32>> = seqs
            .iter()
            .map(|s| {
                (0..s.len().div_ceil(4))
                    .map(|_| pool.allocate().expect("block"))
                    .collect()
            })
            .collect();
        let mut worst = 0f32;
        for pass in 0..4 {
            let span = |n: usize| match pass {
                0 => (0, n),
                1 => (n, 4),
                p => (n + 2 + p, 1),
            };
            let inputs: Vec<BatchSeq> = seqs
                .iter()
                .zip(lens)
                .map(|(s, n)| {
                    let (a, len) = span(n);
                    BatchSeq {
                        ids: &s[a..a + len],
                        logits: Logits::All,
                    }
                })
                .collect();
            let mut batch = PagedBatch {
                pool: &mut pool,
                tables: tables.iter().map(|t| t.as_slice()).collect(),
                starts: lens.iter().map(|&n| span(n).0).collect(),
            };
            let out = t.forward_batch(&inputs, &mut batch).expect("forward_batch");
            for ((o, r), n) in out.iter().zip(&reference).zip(lens) {
                let o = o.as_ref().expect("logits");
                let (a, len) = span(n);
                let expected = r.narrow(0, a, len).expect("narrow");
                worst = worst.max(max_diff(o, &expected));
            }
        }
        eprintln!("{case}: batched vs alone, max |Δ logit| = {worst:.2e}");
        assert!(worst < 1e-4, "{case}: max |Δ logit| {worst}");
    }
}

struct TestSink {
    tx: mpsc::Sender<SeqEvent>,
    closed: Arc<AtomicBool>,
}

impl SeqSink for TestSink {
    fn send(&mut self, event: SeqEvent) -> bool {
        self.tx.send(event).is_ok()
    }
    fn is_closed(&self) -> bool {
        self.closed.load(Ordering::SeqCst)
    }
}

struct Pending {
    rx: mpsc::Receiver<SeqEvent>,
    closed: Arc<AtomicBool>,
}

impl Pending {
    /// Tokens so far and the end, if it came.
    fn drain(&self) -> (Vec<u32>, Option<SeqDone>) {
        let mut tokens = Vec::new();
        let mut done = None;
        while let Ok(e) = self.rx.try_recv() {
            match e {
                SeqEvent::Token { id, .. } => tokens.push(id),
                SeqEvent::Done(d) => done = Some(d),
            }
        }
        (tokens, done)
    }
}

fn submit(handle: &SchedulerHandle, req: SeqRequest) -> Pending {
    let (tx, rx) = mpsc::channel();
    let closed = Arc::new(AtomicBool::new(false));
    let sink = TestSink {
        tx,
        closed: closed.clone(),
    };
    handle
        .submit(vec![(req, Box::new(sink) as Box<dyn SeqSink>)])
        .expect("submit");
    Pending { rx, closed }
}

/// Steps until every sequence finished; returns each one's tokens and end.
fn run_all(s: &mut Scheduler, pending: &[Pending]) -> Vec<(Vec<u32>, SeqDone)> {
    let mut out: Vec<(Vec<u32>, Option<SeqDone>)> =
        pending.iter().map(|_| (vec![], None)).collect();
    s.poll();
    let mut steps = 0;
    while !s.is_idle() {
        s.step();
        steps += 1;
        assert!(steps < 10_000, "scheduler does not finish");
        s.poll();
        for (p, o) in pending.iter().zip(out.iter_mut()) {
            let (t, d) = p.drain();
            o.0.extend(t);
            if d.is_some() {
                o.1 = d;
            }
        }
    }
    out.into_iter()
        .map(|(t, d)| (t, d.expect("every sequence ends")))
        .collect()
}

fn scheduler(model: &Arc<Model>, config: SchedulerConfig) -> (SchedulerHandle, Scheduler) {
    Scheduler::new(model.clone(), config)
}

fn small_config() -> SchedulerConfig {
    SchedulerConfig {
        kv_memory: 1 << 20,
        block_size: 4,
        max_running: 16,
        max_step_tokens: 64,
        max_waiting: 64,
    }
}

fn prompts(vocab: usize) -> Vec<Vec<u32>> {
    [3usize, 11, 1, 7, 20, 5]
        .iter()
        .enumerate()
        .map(|(i, &n)| ids(n, i + 1, vocab))
        .collect()
}

#[test]
fn batched_greedy_equals_one_at_a_time() {
    let model = Arc::new(load("smollm2_shape"));
    let vocab = model.spec().vocab_size;
    let max_tokens = 16;
    // One at a time through the plain generation loop, and through the scheduler.
    let alone: Vec<Vec<u32>> = prompts(vocab)
        .into_iter()
        .map(|p| greedy_ids(&model, &p, max_tokens).expect("generate"))
        .collect();
    for (p, expected) in prompts(vocab).into_iter().zip(&alone) {
        let (h, mut s) = scheduler(&model, small_config());
        let got = run_all(&mut s, &[submit(&h, SeqRequest::greedy(p, max_tokens))]);
        assert_eq!(&got[0].0, expected);
    }
    // All together.
    let (h, mut s) = scheduler(&model, small_config());
    let pending: Vec<Pending> = prompts(vocab)
        .into_iter()
        .map(|p| submit(&h, SeqRequest::greedy(p, max_tokens)))
        .collect();
    let got = run_all(&mut s, &pending);
    for ((tokens, done), expected) in got.iter().zip(&alone) {
        assert_eq!(tokens, expected);
        assert_eq!(done.finish, FinishReason::Length);
        assert_eq!(done.completion_tokens, max_tokens);
    }
    assert_eq!(s.pool_stats().used, 0, "blocks leaked");
}

#[test]
fn admission_respects_the_running_limit_and_the_queue() {
    let model = Arc::new(load("smollm2_shape"));
    let config = SchedulerConfig {
        max_running: 2,
        max_waiting: 4,
        ..small_config()
    };
    let (h, mut s) = scheduler(&model, config);
    let pending: Vec<Pending> = (0..4)
        .map(|i| submit(&h, SeqRequest::greedy(ids(6, i, 100), 4)))
        .collect();
    let (tx, _rx) = mpsc::channel();
    let extra = TestSink {
        tx,
        closed: Arc::new(AtomicBool::new(false)),
    };
    assert_eq!(
        h.submit(vec![(
            SeqRequest::greedy(vec![1, 2], 2),
            Box::new(extra) as Box<dyn SeqSink>
        )]),
        Err(SubmitError::QueueFull)
    );
    s.poll();
    s.step();
    let stats = h.stats();
    assert_eq!((stats.running, stats.waiting), (2, 2));
    let got = run_all(&mut s, &pending);
    assert!(got.iter().all(|(t, _)| t.len() == 4));
    // A sequence larger than the whole pool is refused up front.
    let tiny = SchedulerConfig {
        kv_memory: 1024 * 4,
        ..small_config()
    };
    let (h, _s) = scheduler(&model, tiny);
    let (tx, _rx) = mpsc::channel();
    let sink = TestSink {
        tx,
        closed: Arc::new(AtomicBool::new(false)),
    };
    assert!(matches!(
        h.submit(vec![(
            SeqRequest::greedy(ids(10, 0, 100), 10),
            Box::new(sink) as Box<dyn SeqSink>
        )]),
        Err(SubmitError::TooLarge(_))
    ));
}

#[test]
fn long_prompts_are_chunked_while_others_decode() {
    let model = Arc::new(load("smollm2_shape"));
    let vocab = model.spec().vocab_size;
    let config = SchedulerConfig {
        max_step_tokens: 6,
        ..small_config()
    };
    let (h, mut s) = scheduler(&model, config);
    let short = submit(&h, SeqRequest::greedy(ids(2, 1, vocab), 20));
    s.poll();
    s.step(); // the short prompt is read and its first token sampled
    let long_prompt = ids(40, 2, vocab);
    let long = submit(&h, SeqRequest::greedy(long_prompt.clone(), 4));
    s.poll();
    let mut short_tokens = short.drain().0;
    // 40 prompt tokens at ≤ 5 per step (one row goes to the decode): the short sequence
    // keeps getting a token every step while the long prompt is read.
    for _ in 0..7 {
        s.step();
        let (t, _) = short.drain();
        assert_eq!(t.len(), 1, "the decoding sequence stalled");
        short_tokens.extend(t);
        assert!(
            long.drain().0.is_empty(),
            "prompt read faster than the budget allows"
        );
    }
    let got = run_all(&mut s, &[short, long]);
    short_tokens.extend(&got[0].0);
    assert_eq!(
        short_tokens,
        greedy_ids(&model, &ids(2, 1, vocab), 20).expect("gen")
    );
    assert_eq!(got[1].0, greedy_ids(&model, &long_prompt, 4).expect("gen"));
}

#[test]
fn preemption_recomputes_without_changing_outputs() {
    let model = Arc::new(load("smollm2_shape"));
    let vocab = model.spec().vocab_size;
    // 2 layers × 1 kv head × 16 dims × 4 positions × 2 × 4 bytes = 1 KiB per block: 12 blocks
    // (48 positions) for 4 sequences that each grow to 30.
    let config = SchedulerConfig {
        kv_memory: 12 * 1024,
        ..small_config()
    };
    let (h, mut s) = scheduler(&model, config);
    let ps: Vec<Vec<u32>> = (0..4).map(|i| ids(10, i, vocab)).collect();
    let pending: Vec<Pending> = ps
        .iter()
        .map(|p| submit(&h, SeqRequest::greedy(p.clone(), 20)))
        .collect();
    let got = run_all(&mut s, &pending);
    for ((tokens, _), p) in got.iter().zip(&ps) {
        assert_eq!(tokens, &greedy_ids(&model, p, 20).expect("gen"));
    }
    let stats = h.stats();
    assert!(stats.preemptions > 0, "the pool was expected to run out");
    assert_eq!(stats.pool.used, 0, "blocks leaked");
}

#[test]
fn prefix_cache_shares_blocks_and_evicts_the_least_recent() {
    let model = Arc::new(load("smollm2_shape"));
    let vocab = model.spec().vocab_size;
    let config = SchedulerConfig {
        kv_memory: 16 * 1024,
        ..small_config()
    };
    let (h, mut s) = scheduler(&model, config);
    let system = ids(16, 9, vocab);
    let with_tail = |tail: u32| {
        let mut p = system.clone();
        p.extend([tail, tail + 1, tail + 2]);
        p
    };
    let first = run_all(&mut s, &[submit(&h, SeqRequest::greedy(with_tail(3), 6))]);
    assert_eq!(first[0].1.cached_tokens, 0);
    // The 16-token prefix is 4 full blocks: all reused.
    let second = run_all(&mut s, &[submit(&h, SeqRequest::greedy(with_tail(40), 6))]);
    assert_eq!(second[0].1.cached_tokens, 16);
    assert_eq!(
        second[0].0,
        greedy_ids(&model, &with_tail(40), 6).expect("gen")
    );
    let stats = h.stats();
    assert_eq!(stats.prefix_hit_tokens, 16);
    assert!(stats.pool.cached_free > 0);
    // Other prompts fill the pool: the cached prefix is evicted, least recent first.
    let others: Vec<Pending> = (0..3)
        .map(|i| submit(&h, SeqRequest::greedy(ids(30, 20 + i, vocab), 8)))
        .collect();
    run_all(&mut s, &others);
    let stats = h.stats();
    assert!(stats.pool.evictions > 0);
    assert_eq!(stats.pool.used, 0, "blocks leaked");
    let third = run_all(&mut s, &[submit(&h, SeqRequest::greedy(with_tail(3), 6))]);
    assert_eq!(third[0].0, first[0].0);
}

#[test]
fn cancellation_frees_blocks_at_once() {
    let model = Arc::new(load("smollm2_shape"));
    let (h, mut s) = scheduler(&model, small_config());
    let p = submit(&h, SeqRequest::greedy(ids(20, 1, 100), 30));
    let q = submit(&h, SeqRequest::greedy(ids(5, 2, 100), 30));
    s.poll();
    s.step();
    s.step();
    assert!(h.stats().pool.used > 0);
    p.closed.store(true, Ordering::SeqCst);
    q.closed.store(true, Ordering::SeqCst);
    s.step();
    let stats = h.stats();
    assert_eq!(stats.pool.used, 0, "cancelled sequences still hold blocks");
    assert_eq!(stats.cancelled, 2);
    assert!(s.is_idle());
}

#[test]
fn prompt_logprobs_match_the_full_forward() {
    let model = Arc::new(load("smollm2_shape"));
    let vocab = model.spec().vocab_size;
    let prompt = ids(23, 4, vocab);
    let config = SchedulerConfig {
        max_step_tokens: 8,
        ..small_config()
    };
    let (h, mut s) = scheduler(&model, config);
    let mut req = SeqRequest::greedy(prompt.clone(), 0);
    req.prompt_logprobs = true;
    req.logprobs = Some(2);
    let got = run_all(&mut s, &[submit(&h, req)]);
    let lps = got[0].1.prompt_logprobs.clone().expect("prompt logprobs");
    assert_eq!(lps.len(), prompt.len());
    assert!(lps[0].is_none());
    let rows = all_logits(&model, &prompt).expect("logits");
    let mut worst = 0f32;
    for (i, lp) in lps.iter().enumerate().skip(1) {
        let lp = lp.as_ref().expect("logprob");
        let expected = log_softmax(&rows[i - 1]);
        worst = worst.max((lp.logprob - expected[prompt[i] as usize] as f32).abs());
        assert_eq!(lp.top.len(), 2);
        assert!(lp.top[0].1 >= lp.top[1].1);
    }
    assert!(worst < 1e-4, "prompt log-prob off by {worst}");
    assert!(got[0].0.is_empty());
    assert_eq!(got[0].1.completion_tokens, 0);
}

#[test]
fn sampled_output_repeats_with_the_same_seed_across_prefix_hits() {
    let model = Arc::new(load("smollm2_shape"));
    let vocab = model.spec().vocab_size;
    let config = SchedulerConfig {
        block_size: 16,
        ..small_config()
    };
    let (h, mut s) = scheduler(&model, config);
    let sampled = |seed| {
        let mut r = SeqRequest::greedy(ids(25, 3, vocab), 30);
        r.sampling = SamplingParams {
            temperature: 1.0,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.0,
            seed,
            ..SamplingParams::default()
        };
        r
    };
    let first: Vec<Vec<u32>> = run_all(
        &mut s,
        &(0..3).map(|i| submit(&h, sampled(i))).collect::<Vec<_>>(),
    )
    .into_iter()
    .map(|(t, _)| t)
    .collect();
    let second: Vec<Vec<u32>> = run_all(
        &mut s,
        &(0..3).map(|i| submit(&h, sampled(i))).collect::<Vec<_>>(),
    )
    .into_iter()
    .map(|(t, _)| t)
    .collect();
    assert!(h.stats().prefix_hit_tokens > 0);
    assert_eq!(first, second);
    // And each equals the sequence run alone without any cache.
    for (i, expected) in first.iter().enumerate() {
        let (h, mut s) = scheduler(
            &model,
            SchedulerConfig {
                block_size: 16,
                ..small_config()
            },
        );
        let alone = run_all(&mut s, &[submit(&h, sampled(i as u64))]);
        assert_eq!(&alone[0].0, expected, "choice {i}");
    }
}

/// The default model (SmolLM2-135M-Instruct Q4_1), pulled into the cache on first use.
fn default_model() -> Arc<Model> {
    let entry = camelid_model::catalog::find(camelid_model::catalog::DEFAULT_MODEL).expect("entry");
    let path = camelid_model::catalog::pull(entry, &mut |l| eprintln!("{l}")).expect("pull");
    Arc::new(Model::load(&path, &Device::Cpu).expect("load SmolLM2"))
}

/// Bit-for-bit: a sequence's log-probs do not depend on what shares its steps, on how its
/// prompt was chunked, or on whether its first blocks came from the prefix cache. On the real
/// quantized model (SmolLM2 Q4_1), whose matmuls work row by row: a dense f32 GEMM may round a
/// row differently with the row count, so the tiny f32 fixtures cannot show this.
#[test]
fn a_sequence_s_numbers_do_not_depend_on_the_batch() {
    let model = default_model();
    let vocab = model.spec().vocab_size;
    let small_config = || SchedulerConfig {
        block_size: 16,
        kv_memory: 256 << 20,
        ..small_config()
    };
    let prompt = ids(45, 5, vocab);
    let with_logprobs = || {
        let mut r = SeqRequest::greedy(prompt.clone(), 12);
        r.logprobs = Some(0);
        r
    };
    // Run `extra` other requests alongside, with a given step budget, after optional warm-up.
    let run = |max_step_tokens: usize, extra: usize, warm: bool| -> Vec<f32> {
        let config = SchedulerConfig {
            max_step_tokens,
            ..small_config()
        };
        let (h, mut s) = scheduler(&model, config);
        if warm {
            let mut p = prompt[..32].to_vec();
            p.push(1);
            run_all(&mut s, &[submit(&h, SeqRequest::greedy(p, 2))]);
        }
        let mut pending = vec![submit(&h, with_logprobs())];
        for k in 0..extra {
            pending.push(submit(
                &h,
                SeqRequest::greedy(ids(3 + 19 * k, 40 + k, vocab), 15),
            ));
        }
        let mut lps = Vec::new();
        s.poll();
        while !s.is_idle() {
            s.step();
            while let Ok(e) = pending[0].rx.try_recv() {
                if let SeqEvent::Token {
                    logprob: Some(lp), ..
                } = e
                {
                    lps.push(lp.logprob);
                }
            }
            for p in &pending[1..] {
                p.drain();
            }
        }
        if warm {
            assert!(
                h.stats().prefix_hit_tokens >= 16,
                "the warm-up prefix was not reused"
            );
        }
        lps
    };
    let alone = run(64, 0, false);
    assert_eq!(alone.len(), 12);
    for (budget, extra, warm) in [
        (64, 3, false),
        (17, 0, false),
        (20, 4, false),
        (64, 2, true),
    ] {
        let got = run(budget, extra, warm);
        assert_eq!(
            got, alone,
            "budget {budget}, {extra} others, warm cache {warm}: log-probs changed"
        );
    }
}

/// A step's sequences sample on the pool's threads when their rows are many (here 4 × 49,152
/// logits): each keeps its own seeded sampler, so seeded draws, log-probs and biased logits
/// are those of the same requests run one at a time. On the default model (the fixtures'
/// vocabularies are too small to take the parallel path).
#[test]
fn sampling_in_parallel_equals_one_at_a_time() {
    let model = default_model();
    let vocab = model.spec().vocab_size;
    let config = || SchedulerConfig {
        block_size: 16,
        kv_memory: 64 << 20,
        ..small_config()
    };
    let request = |i: usize| {
        let mut r = SeqRequest::greedy(ids(9 + 5 * i, 70 + i, vocab), 10);
        match i % 3 {
            0 => {
                r.sampling = SamplingParams {
                    temperature: 0.9,
                    seed: 11 + i as u64,
                    ..SamplingParams::default()
                };
            }
            1 => r.logprobs = Some(3),
            _ => {
                r.sampling = SamplingParams {
                    temperature: 1.2,
                    top_k: 0,
                    top_p: 1.0,
                    min_p: 0.0,
                    seed: 5,
                    ..SamplingParams::default()
                };
                r.logit_bias = vec![(13, 4.0), (198, -100.0)];
            }
        }
        r
    };
    let events = |p: &Pending| -> Vec<(u32, Option<f32>)> {
        p.rx.try_iter()
            .filter_map(|e| match e {
                SeqEvent::Token { id, logprob, .. } => Some((id, logprob.map(|l| l.logprob))),
                SeqEvent::Done(_) => None,
            })
            .collect()
    };
    // Steps until done, or fails (a request's 10 tokens take at most 11 steps here).
    let finish = |s: &mut Scheduler| {
        s.poll();
        for _ in 0..100 {
            if s.is_idle() {
                return;
            }
            s.step();
        }
        panic!("the requests did not finish");
    };
    let n = 5;
    let (h, mut s) = scheduler(&model, config());
    let pending: Vec<Pending> = (0..n).map(|i| submit(&h, request(i))).collect();
    finish(&mut s);
    let together: Vec<_> = pending.iter().map(events).collect();
    for (i, expected) in together.iter().enumerate() {
        let (h, mut s) = scheduler(&model, config());
        let p = submit(&h, request(i));
        finish(&mut s);
        let alone = events(&p);
        assert_eq!(alone.len(), 10, "request {i}");
        assert_eq!(&alone, expected, "request {i}: batched output differs");
    }
}
