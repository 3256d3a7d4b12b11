//! The serving benchmark's workload without HTTP: N sequences (the prompts of
//! `scripts/bench/serve_load.py`, greedy, `max_tokens` tokens each, EOS ignored) submitted at
//! once to the continuous-batching scheduler, stepped until all finish. Prints output tokens/s
//! and the process's CPU time, so a profile of the serving step needs no server.
//!
//! ```sh
//! cargo run --release -p camelid-engine --example batch_replay -- MODEL.gguf [SEQS] [MAX_TOKENS] [ROUNDS] [BLOCK_SIZE]
//! ```

use camelid_engine::scheduler::{ChannelSink, Scheduler, SchedulerConfig, SeqEvent, SeqRequest};
use camelid_model::Model;
use candle_core::Device;
use std::sync::{mpsc, Arc};
use std::time::Instant;

const WORDS: [&str; 16] = [
    "river", "stone", "lantern", "orchard", "copper", "meadow", "harbor", "violin", "thunder",
    "pepper", "candle", "glacier", "mosaic", "falcon", "saddle", "quartz",
];

/// `serve_load.py`'s prompt for request `i`.
fn prompt(i: usize) -> String {
    let w: Vec<&str> = (0..12)
        .map(|k| WORDS[(i * 7 + k * 3) % WORDS.len()])
        .collect();
    format!("Request {i}: write a story about {}.", w.join(" and "))
}

fn cpu_seconds() -> f64 {
    std::fs::read_to_string("/proc/self/stat")
        .ok()
        .and_then(|s| {
            let rest = s.rsplit_once(')')?.1.to_string();
            let f: Vec<&str> = rest.split_whitespace().collect();
            let ticks: f64 = f.get(11)?.parse::<f64>().ok()? + f.get(12)?.parse::<f64>().ok()?;
            Some(ticks / 100.0)
        })
        .unwrap_or(f64::NAN)
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let Some(path) = args.get(1) else {
        return Err(
            "usage: batch_replay MODEL.gguf [SEQS] [MAX_TOKENS] [ROUNDS] [BLOCK_SIZE]".into(),
        );
    };
    let arg = |i: usize, d: usize| -> Result<usize, Box<dyn std::error::Error>> {
        Ok(args.get(i).map(|s| s.parse()).transpose()?.unwrap_or(d))
    };
    let (seqs, max_tokens, rounds) = (arg(2, 32)?, arg(3, 64)?, arg(4, 2)?);
    let config = SchedulerConfig {
        block_size: arg(5, SchedulerConfig::default().block_size)?,
        ..SchedulerConfig::default()
    };
    if std::env::var_os("CANDLE_NUM_THREADS").is_none() {
        std::env::set_var("CANDLE_NUM_THREADS", "1");
    }
    let model = Arc::new(Model::load(std::path::Path::new(path), &Device::Cpu)?);
    let tok = model
        .tokenizer
        .as_ref()
        .ok_or("the model has no tokenizer")?;
    let (handle, mut scheduler) = Scheduler::new(model.clone(), config);
    let mut prompt_tokens = 0;
    let (mut steps, mut out_tokens) = (0usize, 0usize);
    let (wall, cpu) = (Instant::now(), cpu_seconds());
    for round in 0..rounds {
        let mut rxs = Vec::new();
        let mut batch = Vec::new();
        for c in 0..seqs {
            let ids = tok.encode(&prompt(c * 1000 + round), true)?;
            prompt_tokens += ids.len();
            let (tx, rx) = mpsc::channel();
            rxs.push(rx);
            batch.push((
                SeqRequest::greedy(ids, max_tokens),
                Box::new(ChannelSink(tx)) as Box<dyn camelid_engine::scheduler::SeqSink>,
            ));
        }
        handle.submit(batch).map_err(|e| e.to_string())?;
        scheduler.poll();
        while !scheduler.is_idle() {
            scheduler.step();
            steps += 1;
        }
        for rx in rxs {
            out_tokens += rx
                .try_iter()
                .filter(|e| matches!(e, SeqEvent::Token { .. }))
                .count();
        }
    }
    let (wall, cpu) = (wall.elapsed().as_secs_f64(), cpu_seconds() - cpu);
    println!(
        "{{\"seqs\": {seqs}, \"rounds\": {rounds}, \"prompt_tokens\": {prompt_tokens}, \
         \"output_tokens\": {out_tokens}, \"steps\": {steps}, \"wall_s\": {wall:.3}, \
         \"cpu_s\": {cpu:.3}, \"output_tok_per_s\": {:.1}}}",
        out_tokens as f64 / wall
    );
    Ok(())
}
