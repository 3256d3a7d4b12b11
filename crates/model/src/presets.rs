//! Named architecture presets: the designs of the LLM surveys, including closed ones with no
//! public weights, written as values of the same [`ArchSpec`] the families produce. Shapes are
//! the published ones; [`ArchSpec::parameter_count`] must land within 2% of the published size.

use crate::spec::{
    Activation, AlibiSlopes, ArchSpec, MlpSpec, NormPlacement, NormSpec, Positions, Residual,
    RotarySpec,
};

pub struct Preset {
    pub name: &'static str,
    pub title: &'static str,
    /// Parameters as published, in billions.
    pub published_billions: f64,
    /// Where the shape comes from.
    pub source: &'static str,
    pub build: fn() -> ArchSpec,
}

/// A GPT-3-style decoder: learned positions, pre-LayerNorm, GELU, biases, tied head.
fn gpt(
    name: &str,
    layers: usize,
    hidden: usize,
    heads: usize,
    head_dim: usize,
    vocab: usize,
) -> ArchSpec {
    let mut s = ArchSpec::llama_like(name);
    s.layers = layers;
    s.hidden = hidden;
    s.vocab_size = vocab;
    s.max_positions = 2048;
    s.norm = NormSpec::layer(1e-5);
    s.positions = Positions::Learned { offset: 0 };
    s.attention.heads = heads;
    s.attention.kv_heads = heads;
    s.attention.head_dim = head_dim;
    s.attention.qkv_bias = true;
    s.attention.out_bias = true;
    s.mlp = MlpSpec::new(4 * hidden, Activation::Gelu, true);
    s.tied_head = true;
    s
}

/// A bias-free RMSNorm decoder (DeepMind's Gopher family and the Google decoders).
fn bias_free(name: &str, layers: usize, hidden: usize, heads: usize, vocab: usize) -> ArchSpec {
    let mut s = gpt(name, layers, hidden, heads, 128, vocab);
    s.norm = NormSpec::rms(1e-6);
    s.attention.qkv_bias = false;
    s.attention.out_bias = false;
    s.mlp.bias = false;
    s
}

pub static PRESETS: &[Preset] = &[
    Preset {
        name: "gpt3-175b",
        title: "GPT-3 175B",
        published_billions: 175.0,
        source: "Brown et al. 2020, Table 2.1",
        build: || gpt("gpt3-175b", 96, 12288, 96, 128, 50257),
    },
    Preset {
        name: "gpt2-124m",
        title: "GPT-2 small",
        published_billions: 0.124,
        source: "Radford et al. 2019; HF gpt2 config",
        build: || {
            let mut s = gpt("gpt2-124m", 12, 768, 12, 64, 50257);
            s.max_positions = 1024;
            s.mlp.activation = Activation::GeluTanh;
            s
        },
    },
    Preset {
        name: "palm-540b",
        title: "PaLM 540B",
        published_billions: 540.0,
        source: "Chowdhery et al. 2022, Table 1 (parallel layers, MQA, SwiGLU, RoPE, no biases)",
        build: || {
            let mut s = bias_free("palm-540b", 118, 18432, 48, 256000);
            s.norm = NormSpec {
                bias: false,
                ..NormSpec::layer(1e-6)
            };
            s.attention.head_dim = 256;
            s.attention.kv_heads = 1;
            s.positions = Positions::Rotary(RotarySpec::new(10000.0, 1.0, false));
            s.mlp.activation = Activation::SwiGlu;
            s.residual = Residual::Parallel { shared_norm: true };
            s
        },
    },
    Preset {
        name: "lamda-137b",
        title: "LaMDA 137B",
        published_billions: 137.0,
        source: "Thoppilan et al. 2022, §3 (64 layers, d 8192, ffn 65536, 128 heads, gated-GELU, T5 relative attention)",
        build: || {
            let mut s = bias_free("lamda-137b", 64, 8192, 128, 32000);
            s.mlp.hidden = 65536;
            s.mlp.activation = Activation::GeGlu;
            s.positions = Positions::RelativeBuckets {
                buckets: 32,
                max_distance: 128,
            };
            s
        },
    },
    Preset {
        name: "gopher-280b",
        title: "Gopher 280B",
        published_billions: 280.0,
        source: "Rae et al. 2021, Table 1 (RMSNorm, Transformer-XL relative positions)",
        build: || {
            let mut s = bias_free("gopher-280b", 80, 16384, 128, 32000);
            s.positions = Positions::RelativeXl;
            s
        },
    },
    Preset {
        name: "chinchilla-70b",
        title: "Chinchilla 70B",
        published_billions: 70.0,
        source: "Hoffmann et al. 2022, Table 4",
        build: || {
            let mut s = bias_free("chinchilla-70b", 80, 8192, 64, 32000);
            s.positions = Positions::RelativeXl;
            s
        },
    },
    Preset {
        name: "jurassic-1-178b",
        title: "Jurassic-1 Jumbo 178B",
        published_billions: 178.0,
        source: "Lieber et al. 2021, Table 1 (76 layers, d 13824, 96 heads, 256k vocabulary)",
        build: || gpt("jurassic-1-178b", 76, 13824, 96, 144, 256000),
    },
    Preset {
        name: "mt-nlg-530b",
        title: "Megatron-Turing NLG 530B",
        published_billions: 530.0,
        source: "Smith et al. 2022, §2 (105 layers, d 20480, 128 heads)",
        build: || gpt("mt-nlg-530b", 105, 20480, 128, 160, 50257),
    },
    Preset {
        name: "glm-130b",
        title: "GLM-130B",
        published_billions: 130.0,
        source: "Zeng et al. 2022, §2 (70 layers, d 12288, 96 heads, GeGLU 32768, RoPE, DeepNorm post-LN)",
        build: || {
            let mut s = gpt("glm-130b", 70, 12288, 96, 128, 150528);
            s.norm_placement = NormPlacement::Post;
            s.positions = Positions::Rotary(RotarySpec::new(10000.0, 1.0, false));
            s.mlp.hidden = 32768;
            s.mlp.activation = Activation::GeGlu;
            s.tied_head = false;
            s
        },
    },
    Preset {
        name: "bloom-176b",
        title: "BLOOM 176B",
        published_billions: 176.0,
        source: "BigScience 2022, Table 3 (70 layers, d 14336, 112 heads, ALiBi, embedding LayerNorm)",
        build: || {
            let mut s = gpt("bloom-176b", 70, 14336, 112, 128, 250880);
            s.positions = Positions::Alibi {
                max_bias: 8.0,
                slopes: AlibiSlopes::Bloom,
                scaled: false,
            };
            s.embed_norm = true;
            s.mlp.activation = Activation::GeluTanh;
            s
        },
    },
    Preset {
        name: "opt-175b",
        title: "OPT-175B",
        published_billions: 175.0,
        source: "Zhang et al. 2022, Table 1 (96 layers, d 12288, 96 heads, ReLU)",
        build: || {
            let mut s = gpt("opt-175b", 96, 12288, 96, 128, 50272);
            s.positions = Positions::Learned { offset: 2 };
            s.mlp.activation = Activation::Relu;
            s
        },
    },
];

pub fn find(name: &str) -> Option<&'static Preset> {
    PRESETS.iter().find(|p| p.name == name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn computed_sizes_are_within_two_percent_of_published() {
        for p in PRESETS {
            let spec = (p.build)();
            spec.validate()
                .unwrap_or_else(|e| panic!("{}: {e}", p.name));
            let billions = spec.parameter_count() as f64 / 1e9;
            let off = (billions - p.published_billions) / p.published_billions;
            assert!(
                off.abs() <= 0.02,
                "{}: {billions:.2}B computed vs {}B published ({:+.2}%)",
                p.name,
                p.published_billions,
                off * 100.0
            );
        }
    }

    #[test]
    fn names_are_unique() {
        for (i, p) in PRESETS.iter().enumerate() {
            assert!(
                PRESETS[i + 1..].iter().all(|q| q.name != p.name),
                "{}",
                p.name
            );
        }
    }
}
