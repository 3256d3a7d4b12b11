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
