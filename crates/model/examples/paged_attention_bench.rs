//! Times the serving step's attention alone ([`camelid_model::paged_attention::attend`]): a
//! decode step of `SEQS` sequences of `CONTEXT` positions each (spread as 0.5×..1.5× around it)
//! over `LAYERS` layers, SmolLM2-135M's geometry (9 heads, 3 KV heads, head size 64), the blocks
//! shuffled over a pool larger than the last-level cache. Prints milliseconds per step.
//!
//! ```sh
//! cargo run --release -p camelid-model --example paged_attention_bench -- [SEQS] [CONTEXT] [STEPS]
//! ```

use camelid_model::paged_attention::{attend, Geometry, KvPages, Member};
use std::time::Instant;

fn main() {
    let args: Vec<usize> = std::env::args()
        .skip(1)
        .map(|a| a.parse().expect("numbers: SEQS CONTEXT STEPS"))
        .collect();
    let arg = |i: usize, d: usize| args.get(i).copied().unwrap_or(d);
    let (seqs, context, steps) = (arg(0, 32), arg(1, 68), arg(2, 50));
    let (heads, kv_heads, hd, bs) = (9, 3, 64, 16);
    // `LAYERS=1` keeps the pool in cache (the arithmetic alone).
    let layers: usize = std::env::var("LAYERS")
        .ok()
        .and_then(|l| l.parse().ok())
        .unwrap_or(30);
    let g = Geometry {
        heads,
        kv_heads,
        head_dim: hd,
        scale: 0.125,
        window: None,
        alibi: None,
    };
    // Sequence i has `starts[i]` cached positions and decodes one more.
    let starts: Vec<usize> = (0..seqs)
        .map(|i| (context / 2 + i * context / seqs.max(1)).max(1))
        .collect();
    let blocks_per: Vec<usize> = starts.iter().map(|s| (s + 1).div_ceil(bs)).collect();
    let pool_blocks: usize = blocks_per.iter().sum();
    // A fixed shuffle of the pool's blocks over the sequences.
    let mut order: Vec<u32> = (0..pool_blocks as u32).collect();
    let mut s = 12345u64;
    for i in (1..order.len()).rev() {
        s = s
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        order.swap(i, (s >> 33) as usize % (i + 1));
    }
    let mut tables = Vec::new();
    let mut at = 0;
    for &n in &blocks_per {
        tables.push(order[at..at + n].to_vec());
        at += n;
    }
    let table_refs: Vec<&[u32]> = tables.iter().map(|t| t.as_slice()).collect();
    let per_layer = pool_blocks * kv_heads * bs * hd;
    let fill = |seed: usize| -> Vec<f32> {
        (0..per_layer)
            .map(|i| (((i * 2654435761 + seed) >> 7) % 2001) as f32 / 1000.0 - 1.0)
            .collect()
    };
    let mut keys: Vec<Vec<f32>> = (0..layers).map(|l| fill(2 * l)).collect();
    let mut values: Vec<Vec<f32>> = (0..layers).map(|l| fill(2 * l + 1)).collect();
    let members: Vec<Member> = starts
        .iter()
        .enumerate()
        .map(|(i, &start)| Member {
            start,
            offset: i,
            len: 1,
        })
        .collect();
    let q: Vec<f32> = (0..heads * seqs * hd)
        .map(|i| ((i * 7919) % 201) as f32 / 100.0 - 1.0)
        .collect();
    let k = vec![0.1f32; kv_heads * seqs * hd];
    let v = vec![0.2f32; kv_heads * seqs * hd];
    let mut out = vec![0f32; heads * seqs * hd];
    let mut best = f64::INFINITY;
    let mut sum = 0.0;
    for step in 0..steps + 2 {
        let t = Instant::now();
        for l in 0..layers {
            let pages = KvPages {
                keys: &mut keys[l],
                values: &mut values[l],
                tables: &table_refs,
                block_size: bs,
            };
            attend(&g, &members, &q, &k, &v, pages, &mut out).expect("attend");
        }
        let ms = t.elapsed().as_secs_f64() * 1e3;
        // Two warm-up steps.
        if step >= 2 {
            best = best.min(ms);
            sum += ms;
        }
    }
    let kv_mb = 2.0
        * (starts.iter().map(|s| s + 1).sum::<usize>() * kv_heads * hd * 4 * layers) as f64
        / 1e6;
    println!(
        "{{\"seqs\": {seqs}, \"context\": {context}, \"threads\": {}, \"kv_read_mb\": {kv_mb:.1}, \
         \"best_ms\": {best:.3}, \"mean_ms\": {:.3}, \"check\": {}}}",
        rayon::current_num_threads(),
        sum / steps as f64,
        out.iter().sum::<f32>()
    );
}
