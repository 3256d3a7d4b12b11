//! Every preset trains from scratch at a tiny size, and the checkpoint it writes loads in
//! camelid with the logits of the trainer's own forward pass: in the transformers layout of
//! the family that can hold the design, or else as a camelid-native checkpoint.

use camelid_model::presets::PRESETS;
use camelid_model::spec::Positions;
use camelid_model::transformer::{KvStore, TrainMode};
use camelid_model::Model;
use camelid_train::arch::{export_config, preset_spec, Overrides, BASE_PRESETS};
use camelid_train::checkpoint;
use camelid_train::data::{batch, Order, TokenData};
use camelid_train::params::Params;
use camelid_train::trainer::{TrainOptions, Trainer};
use candle_core::{Device, Tensor};

struct NoCache;

impl KvStore for NoCache {
    fn seq_len(&self) -> usize {
        0
    }
    fn append(
        &mut self,
        _layer: usize,
        k: &Tensor,
        v: &Tensor,
    ) -> candle_core::Result<(Tensor, Tensor)> {
        Ok((k.clone(), v.clone()))
    }
}

fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

/// Which checkpoint family each preset is written as.
fn expected_family(preset: &str) -> &'static str {
    match preset {
        "llama" => "llama",
        "gpt2" | "gpt2-124m" | "gpt3-175b" | "jurassic-1-178b" | "mt-nlg-530b" => "gpt2",
        "gpt-neox" => "gpt_neox",
        "bloom" | "bloom-176b" => "bloom",
        "opt-175b" => "opt",
        // PaLM (parallel + MQA + SwiGLU, bias-free LayerNorm), LaMDA (gated GELU, T5
        // relative positions), GLM (post-norm GeGLU): no transformers class holds them.
        "palm-540b" | "lamda-137b" | "glm-130b" => "camelid",
        other => panic!("no expectation for preset {other}"),
    }
}

#[test]
fn every_preset_trains_and_reloads_with_the_trainers_logits() {
    let dir = std::env::temp_dir().join(format!("camelid-presets-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let toks: Vec<u32> = (0..4000u32).map(|i| (i * 7 + i / 13) % 50).collect();
    let path = dir.join("tokens.u32");
    let bytes: Vec<u8> = toks.iter().flat_map(|t| t.to_le_bytes()).collect();
    std::fs::write(&path, bytes).unwrap();
    let data = TokenData::open(&path).unwrap();
    let tiny = Overrides {
        layers: Some(2),
        hidden: Some(32),
        heads: Some(4),
        vocab: Some(50),
        context: Some(32),
        ..Default::default()
    };
    let names = BASE_PRESETS
        .iter()
        .copied()
        .chain(PRESETS.iter().map(|p| p.name));
    let mut trained = 0;
    for name in names {
        let spec = preset_spec(name, &tiny).unwrap();
        if spec.positions == Positions::RelativeXl {
            // Gopher and Chinchilla: the transformer does not run Transformer-XL attention.
            let err = export_config(&spec, 0.0)
                .and_then(|(_, _, s)| Params::init(&s, 1, &Device::Cpu))
                .err()
                .map(|e| e.to_string())
                .unwrap_or_default();
            assert!(err.contains("Transformer-XL"), "{name}: {err}");
            continue;
        }
        let (family, config, spec) = export_config(&spec, 0.0).unwrap();
        assert_eq!(family.name, expected_family(name), "{name}");
        let opts = TrainOptions {
            seq_len: 16,
            batch: 4,
            steps: 16,
            warmup: 2,
            lr: 1e-2,
            dropout: 0.0,
            ..Default::default()
        };
        let mut tr = Trainer::new(Params::init(&spec, 3, &Device::Cpu).unwrap(), opts);
        let losses: Vec<f64> = (0..16).map(|_| tr.step(&data).unwrap().loss).collect();
        assert!(
            losses[15] < losses[0] - 0.2,
            "{name} did not learn: {losses:?}"
        );
        let (x, _) = batch(&data, 0, 4, 16, Order::Sequential, &Device::Cpu).unwrap();
        let train_mode = TrainMode {
            differentiable: true,
            ..Default::default()
        };
        let last_forward = tr.params.logits(&x, train_mode).unwrap();
        let inference = tr.params.logits(&x, TrainMode::default()).unwrap();

        let out = dir.join(name);
        checkpoint::write_model(&out, &tr.params, family, &config, None).unwrap();
        let model = Model::load(&out, &Device::Cpu).unwrap_or_else(|e| panic!("{name}: {e}"));
        let loaded = model.transformer.forward(&x, &mut NoCache, true).unwrap();
        let exact = max_diff(&loaded, &inference);
        let vs_train = max_diff(&loaded, &last_forward);
        eprintln!(
            "{name}: {} checkpoint, loss {:.3} -> {:.3}; reloaded logits vs trainer: {exact:.1e} (inference forward), {vs_train:.1e} (training forward)",
            family.name, losses[0], losses[15]
        );
        assert_eq!(exact, 0.0, "{name}: reloaded logits differ by {exact}");
        assert!(vs_train < 1e-5, "{name}: {vs_train}");
        trained += 1;
    }
    assert_eq!(trained, BASE_PRESETS.len() + PRESETS.len() - 2);
}
