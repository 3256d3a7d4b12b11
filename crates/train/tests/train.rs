//! Training behaviour beyond PyTorch parity: every parameter of every trainable layout gets a
//! gradient, the training forward equals the inference forward, resuming is bit-exact, and
//! bad input fails with a clear message.

use camelid_model::transformer::TrainMode;
use camelid_train::arch::{export_config, preset_spec, Overrides};
use camelid_train::checkpoint;
use camelid_train::data::{write_shard, TokenData};
use camelid_train::params::Params;
use camelid_train::trainer::{NonFiniteLoss, TrainOptions, Trainer};
use candle_core::{Device, Tensor};

mod common;
use common::{assert_same_bits, straight_and_resumed, tmp, token_file};

fn tiny() -> Overrides {
    Overrides {
        layers: Some(2),
        hidden: Some(16),
        heads: Some(2),
        vocab: Some(50),
        context: Some(16),
        ..Default::default()
    }
}

fn tokens(n: usize, dir: &std::path::Path) -> TokenData {
    let mut x = 12345u64;
    let toks: Vec<u32> = (0..n)
        .map(|_| {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((x >> 33) % 50) as u32
        })
        .collect();
    token_file(&toks, dir)
}

fn opts() -> TrainOptions {
    TrainOptions {
        seq_len: 8,
        batch: 2,
        steps: 6,
        warmup: 2,
        lr: 1e-2,
        dropout: 0.1,
        ..Default::default()
    }
}

const LAYOUTS: &[&str] = &[
    "llama",
    "gpt2",
    "gpt-neox",
    "bloom",
    "gpt3-175b",
    "opt-175b",
    "palm-540b",
    "lamda-137b",
    "glm-130b",
];

#[test]
fn every_parameter_receives_a_nonzero_gradient() {
    let dir = tmp("grads");
    let data = tokens(500, &dir);
    for preset in LAYOUTS {
        // As trained: in the layout of the checkpoint it will be saved as (packed QKV too).
        let spec = preset_spec(preset, &tiny()).unwrap();
        let spec = export_config(&spec, 0.0).unwrap().2;
        let params = Params::init(&spec, 7, &Device::Cpu).unwrap();
        let tr = Trainer::new(params, opts());
        let (_, grads) = tr.loss_and_grads(&data, 0).unwrap();
        for (g, name) in grads.iter().zip(&tr.params.names) {
            let norm: f32 = g.iter().map(|x| x * x).sum::<f32>().sqrt();
            assert!(
                norm > 0.0 && norm.is_finite(),
                "{preset}: {name} gradient norm {norm}"
            );
        }
    }
}

#[test]
fn fused_inference_kernels_would_leave_parameters_untrained() {
    // What the training switch exists for: candle's fused norm/softmax/rotary kernels record
    // no backward pass, so the embedding (behind all of them) gets no gradient without it.
    let spec = preset_spec("llama", &tiny()).unwrap();
    let params = Params::init(&spec, 7, &Device::Cpu).unwrap();
    let x = Tensor::new(&[[1u32, 2, 3, 4]], &Device::Cpu).unwrap();
    let loss = params.loss(&x, &x, TrainMode::default()).unwrap();
    let grads = loss.backward().unwrap();
    assert!(grads.get(params.vars[0].as_tensor()).is_none());
}

#[test]
fn training_forward_equals_inference_forward() {
    let x = Tensor::new(
        &[[1u32, 2, 3, 4, 5, 6], [7, 8, 9, 10, 11, 12]],
        &Device::Cpu,
    )
    .unwrap();
    for preset in LAYOUTS {
        let spec = preset_spec(preset, &tiny()).unwrap();
        let params = Params::init(&spec, 3, &Device::Cpu).unwrap();
        let a = params.logits(&x, TrainMode::default()).unwrap();
        let mode = TrainMode {
            differentiable: true,
            dropout: None,
            compute: None,
        };
        let b = params.logits(&x, mode).unwrap();
        let diff = (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(diff < 1e-5, "{preset}: training forward differs by {diff}");
    }
}

#[test]
fn resume_continues_bit_exactly() {
    let dir = tmp("resume");
    let data = tokens(2000, &dir);
    let spec = preset_spec("gpt2-124m", &tiny()).unwrap();
    let (family, config, spec) = export_config(&spec, 0.1).unwrap();
    let mut o = opts();
    o.grad_accum = 2;
    let ck = dir.join("checkpoint");
    let (straight, second, losses, resumed) =
        straight_and_resumed(&spec, &o, &data, 3, &ck, |first| {
            let save = || {
                checkpoint::save(
                    &ck,
                    &first.params,
                    &first.opt,
                    &first.state,
                    family,
                    &config,
                    None,
                )
                .unwrap()
            };
            save();
            // A second save replaces the first atomically and leaves no temporary behind.
            save();
            assert!(!dir.join("checkpoint.tmp").exists() && !dir.join("checkpoint.old").exists());
        });
    assert_eq!(losses, resumed, "losses differ after resume");
    assert_same_bits(&straight.params, &second.params);
}

#[test]
fn interrupted_save_falls_back_to_the_previous_checkpoint() {
    let dir = tmp("interrupted");
    let spec = preset_spec("llama", &tiny()).unwrap();
    let (family, config, spec) = export_config(&spec, 0.0).unwrap();
    let tr = Trainer::new(Params::init(&spec, 1, &Device::Cpu).unwrap(), opts());
    let ck = dir.join("checkpoint");
    checkpoint::save(&ck, &tr.params, &tr.opt, &tr.state, family, &config, None).unwrap();
    // A crash after moving the previous checkpoint aside but before the rename into place.
    std::fs::rename(&ck, dir.join("checkpoint.old")).unwrap();
    std::fs::create_dir_all(dir.join("checkpoint.tmp")).unwrap();
    assert_eq!(
        checkpoint::find_complete(&ck),
        Some(dir.join("checkpoint.old"))
    );
    // A crash mid-write leaves a directory without trainer_state.json: not complete.
    std::fs::create_dir_all(&ck).unwrap();
    std::fs::write(ck.join("config.json"), "{}").unwrap();
    assert_eq!(
        checkpoint::find_complete(&ck),
        Some(dir.join("checkpoint.old"))
    );
}

#[test]
fn nan_loss_stops_with_the_step_number() {
    let dir = tmp("nan");
    let data = tokens(500, &dir);
    let spec = preset_spec("llama", &tiny()).unwrap();
    let mut tr = Trainer::new(Params::init(&spec, 1, &Device::Cpu).unwrap(), opts());
    tr.step(&data).unwrap();
    let v = &tr.params.vars[0];
    v.set(&(v.as_tensor() * f64::NAN).unwrap()).unwrap();
    let err = tr.step(&data).unwrap_err();
    let nf = err
        .downcast_ref::<NonFiniteLoss>()
        .expect("a NonFiniteLoss");
    assert_eq!(nf.step, 1);
    assert!(err.to_string().contains("at step 2"), "{err}");
    assert_eq!(tr.state.step, 1, "no update applied");
}

#[test]
fn bad_data_and_presets_are_clear_errors() {
    let dir = tmp("bad");
    let e = |r: anyhow::Result<TokenData>| r.err().map(|e| e.to_string()).unwrap_or_default();

    let empty = dir.join("empty.bin");
    write_shard(&empty, &[], 2, 100).unwrap();
    let d = TokenData::open(&empty).unwrap();
    let err = camelid_train::data::batch(
        &d,
        0,
        1,
        8,
        camelid_train::data::Order::Sequential,
        &Device::Cpu,
    );
    assert!(err.unwrap_err().to_string().contains("fewer than one row"));

    let good = dir.join("good.bin");
    write_shard(&good, &[1, 2, 3], 2, 100).unwrap();
    let mut bytes = std::fs::read(&good).unwrap();
    bytes[12] = 3;
    let bad = dir.join("width.bin");
    std::fs::write(&bad, &bytes).unwrap();
    assert!(e(TokenData::open(&bad)).contains("3 bytes per token"));

    let truncated = dir.join("short.bin");
    std::fs::write(&truncated, &std::fs::read(&good).unwrap()[..35]).unwrap();
    assert!(e(TokenData::open(&truncated)).contains("promises 3 tokens"));

    // A count whose byte size wraps around to the header's own size (2^63 tokens × 2 bytes).
    let empty_bytes = std::fs::read(&empty).unwrap();
    let mut bytes = empty_bytes.clone();
    bytes[24..32].copy_from_slice(&(1u64 << 63).to_le_bytes());
    let wraps = dir.join("wraps.bin");
    std::fs::write(&wraps, &bytes).unwrap();
    assert!(e(TokenData::open(&wraps)).contains("more than 2^64"));

    let text = dir.join("corpus.txt");
    std::fs::write(&text, "hello").unwrap();
    assert!(e(TokenData::open(&text)).contains("not a camelid token shard"));

    let odd = dir.join("odd.u32");
    std::fs::write(&odd, [1u8, 2, 3]).unwrap();
    assert!(e(TokenData::open(&odd)).contains("not a multiple of 4"));

    // A header whose vocabulary does not fit its u16 tokens.
    let mut bytes = std::fs::read(&good).unwrap();
    bytes[16..20].copy_from_slice(&70000u32.to_le_bytes());
    let big = dir.join("big.bin");
    std::fs::write(&big, &bytes).unwrap();
    assert!(e(TokenData::open(&big)).contains("does not fit u16"));

    let wide = write_shard(&dir.join("wide.bin"), &[1], 2, 70000);
    assert!(wide.unwrap_err().to_string().contains("does not fit u16"));

    let unknown = preset_spec("gpt5", &Overrides::default())
        .unwrap_err()
        .to_string();
    assert!(unknown.contains("unknown preset \"gpt5\"") && unknown.contains("gpt2-124m"));

    // No transformers class holds PaLM's block: it is written camelid-native, saying why.
    let palm = preset_spec("palm-540b", &tiny()).unwrap();
    let (family, cfg, _) = export_config(&palm, 0.0).unwrap();
    assert_eq!(family.name, "camelid");
    let note = cfg["transformers_note"].as_str().unwrap_or_default();
    assert!(note.contains("transformers has no architecture"), "{note}");
    let err = camelid_train::arch::transformers_config(&palm, 0.0)
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert!(
        err.contains("cannot be written as a transformers checkpoint"),
        "{err}"
    );
}

#[test]
fn survey_presets_export_to_their_transformers_family() {
    for (preset, model_type) in [
        ("gpt2-124m", "gpt2"),
        ("gpt3-175b", "gpt2"),
        ("bloom-176b", "bloom"),
        ("opt-175b", "opt"),
    ] {
        let spec = preset_spec(preset, &tiny()).unwrap();
        let (family, cfg, _) = export_config(&spec, 0.0).unwrap();
        assert_eq!(family.name, model_type, "{preset}");
        assert_eq!(cfg["model_type"], model_type);
    }
}

#[test]
fn initialization_follows_the_family_reference() {
    let o = Overrides {
        layers: Some(4),
        hidden: Some(64),
        heads: Some(4),
        vocab: Some(500),
        context: Some(64),
        ..Default::default()
    };
    let std_of = |p: &Params, name: &str| -> f64 {
        let i = p.names.iter().position(|n| n == name).unwrap();
        let v = p.vars[i].flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let mean = v.iter().map(|&x| x as f64).sum::<f64>() / v.len() as f64;
        (v.iter().map(|&x| (x as f64 - mean).powi(2)).sum::<f64>() / v.len() as f64).sqrt()
    };
    for (preset, scaled) in [("gpt2", true), ("llama", false), ("bloom", false)] {
        let spec = export_config(&preset_spec(preset, &o).unwrap(), 0.0)
            .unwrap()
            .2;
        let p = Params::init(&spec, 5, &Device::Cpu).unwrap();
        let emb = std_of(&p, "token_embd.weight");
        assert!((emb - 0.02).abs() < 0.001, "{preset}: embedding std {emb}");
        let down = std_of(&p, "blk.0.ffn_down.weight");
        let want = if scaled {
            0.02 / (2.0 * 4f64).sqrt()
        } else {
            0.02
        };
        assert!(
            (down - want).abs() < 0.05 * want,
            "{preset}: ffn_down std {down} vs {want}"
        );
        let norm = p
            .names
            .iter()
            .position(|n| n == "blk.0.attn_norm.weight")
            .unwrap();
        let w = p.vars[norm]
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        assert!(w.iter().all(|&x| x == 1.0));
        // The same seed gives the same weights.
        let q = Params::init(&spec, 5, &Device::Cpu).unwrap();
        for (a, b) in p.vars.iter().zip(&q.vars) {
            let (a, b) = (a.flatten_all().unwrap(), b.flatten_all().unwrap());
            assert_eq!(a.to_vec1::<f32>().unwrap(), b.to_vec1::<f32>().unwrap());
        }
    }
}
