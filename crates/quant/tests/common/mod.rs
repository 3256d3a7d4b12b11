//! Test inputs shared by the quantization tests.

use candle_core::Device;
use std::path::{Path, PathBuf};

/// `make_quant_fixtures.py`'s `splitmix64`.
fn splitmix64(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9E3779B97F4A7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58476D1CE4E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D049BB133111EB);
    z ^ (z >> 31)
}

/// The generated 8-layer LLaMA of `make_quant_fixtures.py mix` (`mix_tensors`, `mix_config`):
/// hidden 256, 4 heads, 1 KV head, FFN 256, vocabulary 264, tied head, no tokenizer.
pub fn mix_llama(dir: &Path) -> PathBuf {
    use candle_core::Tensor;
    let (layers, h, heads, kv, ff, v) = (8usize, 256usize, 4usize, 1usize, 256usize, 264usize);
    let hd = h / heads;
    let mut shapes: Vec<(String, Vec<usize>)> =
        vec![("model.embed_tokens.weight".into(), vec![v, h])];
    for i in 0..layers {
        let p = format!("model.layers.{i}.");
        for (n, s) in [
            ("input_layernorm.weight", vec![h]),
            ("self_attn.q_proj.weight", vec![h, h]),
            ("self_attn.k_proj.weight", vec![kv * hd, h]),
            ("self_attn.v_proj.weight", vec![kv * hd, h]),
            ("self_attn.o_proj.weight", vec![h, h]),
            ("post_attention_layernorm.weight", vec![h]),
            ("mlp.gate_proj.weight", vec![ff, h]),
            ("mlp.up_proj.weight", vec![ff, h]),
            ("mlp.down_proj.weight", vec![h, ff]),
        ] {
            shapes.push((format!("{p}{n}"), s));
        }
    }
    shapes.push(("model.norm.weight".into(), vec![h]));
    let mut tensors = std::collections::HashMap::new();
    for (t, (name, shape)) in shapes.into_iter().enumerate() {
        let n: usize = shape.iter().product();
        let norm = name.ends_with("norm.weight");
        let vals: Vec<f32> = (0..n as u64)
            .map(|e| {
                let z = splitmix64(((t as u64) << 32) | e);
                let x = ((z % 2001) as i64 - 1000) as f32 / 8192.0;
                if norm {
                    x + 1.0
                } else {
                    x
                }
            })
            .collect();
        let tensor = Tensor::from_vec(vals, shape, &Device::Cpu).unwrap();
        tensors.insert(name, tensor);
    }
    let d = dir.join("mix_llama");
    std::fs::create_dir_all(&d).unwrap();
    candle_core::safetensors::save(&tensors, d.join("model.safetensors")).unwrap();
    let config = serde_json::json!({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": h,
        "intermediate_size": ff, "num_hidden_layers": layers,
        "num_attention_heads": heads, "num_key_value_heads": kv, "vocab_size": v,
        "max_position_embeddings": 64, "rms_norm_eps": 1e-5, "hidden_act": "silu",
        "tie_word_embeddings": true,
    });
    std::fs::write(d.join("config.json"), config.to_string()).unwrap();
    d
}

/// camelid's logits on `model` for the fixture's `ids` against llama.cpp's recorded `logits`:
/// every value within `tol`, and where llama.cpp's lead is wider than twice `tol` the winner
/// must agree, on at least `min_decided` positions.
pub fn assert_logits_match(
    case: &str,
    model: &camelid_model::Model,
    rec: &serde_json::Value,
    tol: f32,
    min_decided: usize,
) {
    let ids: Vec<u32> = rec["ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap() as u32)
        .collect();
    let ours = camelid_engine::generate::all_logits(model, &ids).unwrap();
    let theirs = rec["logits"].as_array().unwrap();
    assert_eq!(ours.len(), theirs.len(), "{case}: positions");
    let argmax = |v: &[f32]| (0..v.len()).max_by(|&i, &j| v[i].total_cmp(&v[j])).unwrap();
    let (mut max_diff, mut top1_same, mut decided) = (0f32, 0, 0);
    for (o, t) in ours.iter().zip(theirs) {
        let t: Vec<f32> = t
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_f64().unwrap() as f32)
            .collect();
        assert_eq!(o.len(), t.len());
        for (a, b) in o.iter().zip(&t) {
            max_diff = max_diff.max((a - b).abs());
        }
        let best = argmax(&t);
        let second = (0..t.len())
            .filter(|&i| i != best)
            .map(|i| t[i])
            .fold(f32::NEG_INFINITY, f32::max);
        if t[best] - second > 2.0 * tol {
            decided += 1;
            top1_same += usize::from(argmax(o) == best);
        }
    }
    eprintln!(
        "{case}: max |Δlogit| camelid vs llama.cpp = {max_diff:.2e}, top-1 equal {top1_same}/{decided} decided positions"
    );
    assert!(max_diff <= tol, "{case}: max |Δlogit| {max_diff} > {tol}");
    assert_eq!(top1_same, decided, "{case}: top-1 differs");
    assert!(
        decided >= min_decided,
        "{case}: only {decided} positions decided"
    );
}
