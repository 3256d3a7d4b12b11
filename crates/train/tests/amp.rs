//! Mixed precision (`--dtype bf16|f16`): the loss follows torch.autocast's (and GradScaler's)
//! step for step within bf16/f16 rounding, the loss curve stays close to the f32 run's, the
//! master weights and checkpoints stay f32, the f16 loss scale skips an overflowing update
//! and recovers, and resuming stays bit-exact.

mod common;

use camelid_train::amp::{LossScaler, Precision};
use camelid_train::arch::{export_config, preset_spec, read_config, Overrides};
use camelid_train::checkpoint;
use camelid_train::data::TokenData;
use camelid_train::params::Params;
use camelid_train::trainer::{TrainOptions, Trainer};
use candle_core::{DType, Device, Tensor};
use common::{assert_same_bits, fixture, options, rel, straight_and_resumed, tmp, token_file};
use serde_json::Value;

/// A learnable stream: a fixed random cycle of 37 tokens with every 5th token noise.
fn tokens(n: usize, dir: &std::path::Path) -> TokenData {
    let mut x = 777u64;
    let mut next = || {
        x = x
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (x >> 33) as u32
    };
    let cycle: Vec<u32> = (0..37).map(|_| next() % 50).collect();
    let toks: Vec<u32> = (0..n)
        .map(|i| {
            if i % 5 == 4 {
                next() % 50
            } else {
                cycle[i % 37]
            }
        })
        .collect();
    token_file(&toks, dir)
}

fn tiny() -> Overrides {
    Overrides {
        layers: Some(2),
        hidden: Some(32),
        heads: Some(4),
        vocab: Some(50),
        context: Some(32),
        ..Default::default()
    }
}

fn opts(precision: Precision) -> TrainOptions {
    TrainOptions {
        seq_len: 16,
        batch: 4,
        steps: 60,
        warmup: 5,
        lr: 1e-2,
        min_lr: 1e-3,
        dropout: 0.0,
        precision,
        ..Default::default()
    }
}

/// Each case's 10 steps (the f32 parity fixtures' model, data and flags) in bf16 and f16
/// against torch.autocast (+ GradScaler for f16).
///
/// The two frameworks round at different places under autocast (torch keeps a projection's
/// output, its bias and the activation function in the low type; camelid casts each product's
/// result back to f32), so they cannot agree to f32's precision. The bound is the size of the
/// low-precision effect itself, as the reference shows it: camelid may differ from torch's
/// autocast run by at most 4× what that run differs from torch's f32 run (per-step loss, and
/// the final logits' relative norm), and never by more than one unit of the low type's
/// rounding (2^-8 bf16, 2^-11 f16). Measured worst cases are printed.
fn check_case(case: &str) {
    let dir = fixture(case);
    let amp: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("amp.json")).unwrap()).unwrap();
    let expected: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("expected.json")).unwrap()).unwrap();
    let data = TokenData::open(&dir.join("tokens.u32")).unwrap();
    let f32_losses: Vec<f64> = expected["losses"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_f64().unwrap())
        .collect();
    let want_f32 = candle_core::safetensors::load(dir.join("expected.safetensors"), &Device::Cpu)
        .unwrap()
        .remove("logits")
        .unwrap();
    for (name, precision, unit) in [
        ("bf16", Precision::Bf16, 2f64.powi(-8)),
        ("f16", Precision::F16, 2f64.powi(-11)),
    ] {
        let (family, spec, _) = read_config(&dir.join("init")).unwrap();
        let params = Params::load(&dir.join("init"), family, &spec, &Device::Cpu).unwrap();
        let mut o = options(&expected["hyper"]);
        o.precision = precision;
        let mut tr = Trainer::new(params, o);
        let want = &amp[name];
        let torch_losses: Vec<f64> = want["losses"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_f64().unwrap())
            .collect();
        let effect = torch_losses
            .iter()
            .zip(&f32_losses)
            .map(|(a, b)| (a - b).abs() / b)
            .fold(0f64, f64::max);
        let bound = (4.0 * effect).min(unit);
        let mut worst = 0f64;
        for (s, w) in torch_losses.iter().enumerate() {
            let r = tr.step(&data).unwrap();
            assert!(!r.skipped, "{case} {name}: step {} skipped", s + 1);
            let d = (r.loss - w).abs() / w;
            assert!(
                d <= bound,
                "{case} {name}: step {} loss {} vs torch {w} (rel {d:.2e} > {bound:.2e})",
                s + 1,
                r.loss
            );
            worst = worst.max(d);
        }
        if let Some(scales) = want["scales"].as_array() {
            if let Some(last) = scales.last() {
                let scale = tr.state.scaler.as_ref().unwrap().scale;
                assert_eq!(scale, last.as_f64().unwrap(), "{case} {name}: loss scale");
            }
        }
        for v in &tr.params.vars {
            assert_eq!(v.dtype(), DType::F32, "master weights stay f32");
        }
        let (x, _) = camelid_train::data::batch(
            &data,
            0,
            tr.opts.batch,
            tr.opts.seq_len,
            camelid_train::data::Order::Sequential,
            &Device::Cpu,
        )
        .unwrap();
        let logits = tr.params.logits(&x, Default::default()).unwrap();
        let want_logits: Vec<f32> = want["logits"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_f64().unwrap() as f32)
            .collect();
        let want_logits = Tensor::from_vec(want_logits, logits.shape(), &Device::Cpu).unwrap();
        let r_logits = rel(&logits, &want_logits);
        let logits_effect = rel(&want_logits, &want_f32);
        assert!(
            r_logits <= 4.0 * logits_effect,
            "{case} {name}: final logits off by {r_logits:.2e} (torch's {name} vs f32: {logits_effect:.2e})"
        );
        eprintln!(
            "{case} {name}: worst step loss vs torch autocast {worst:.1e} (torch autocast vs f32 {effect:.1e}); final logits {r_logits:.1e} (torch {logits_effect:.1e})"
        );
    }
}

#[test]
fn llama_mixed_precision_follows_torch_autocast() {
    check_case("llama");
}

#[test]
fn gpt2_mixed_precision_follows_torch_autocast() {
    check_case("gpt2");
}

#[test]
fn gpt_neox_mixed_precision_follows_torch_autocast() {
    check_case("gpt_neox");
}

#[test]
fn bloom_mixed_precision_follows_torch_autocast() {
    check_case("bloom");
}

/// 60 steps of a tiny model from scratch: the bf16 and f16 loss curves stay within 3% of the
/// f32 curve at every step, all three learn, and the weights stay f32 in memory and on disk.
#[test]
fn low_precision_loss_curves_stay_close_to_f32() {
    let dir = tmp("curves");
    let data = tokens(8000, &dir);
    for preset in ["llama", "gpt2"] {
        let spec = preset_spec(preset, &tiny()).unwrap();
        let (family, config, spec) = export_config(&spec, 0.0).unwrap();
        let run = |p: Precision| {
            let mut tr = Trainer::new(Params::init(&spec, 5, &Device::Cpu).unwrap(), opts(p));
            let losses: Vec<f64> = (0..60).map(|_| tr.step(&data).unwrap().loss).collect();
            (tr, losses)
        };
        let (_, f32_losses) = run(Precision::F32);
        for p in [Precision::Bf16, Precision::F16] {
            let (tr, losses) = run(p);
            let worst = losses
                .iter()
                .zip(&f32_losses)
                .map(|(a, b)| (a - b).abs() / b)
                .fold(0f64, f64::max);
            let tail = |l: &[f64]| l[50..].iter().sum::<f64>() / 10.0;
            eprintln!(
                "{preset} {p}: loss {:.4} -> {:.4} (f32 {:.4} -> {:.4}); worst step difference {worst:.2e} relative",
                losses[0],
                tail(&losses),
                f32_losses[0],
                tail(&f32_losses)
            );
            assert!(worst < 0.03, "{preset} {p}: {worst}");
            assert!(
                tail(&losses) < losses[0] - 1.0,
                "{preset} {p} did not learn"
            );
            for v in &tr.params.vars {
                assert_eq!(v.dtype(), DType::F32);
            }
            let ck = dir.join(format!("{preset}-{p}"));
            checkpoint::save(&ck, &tr.params, &tr.opt, &tr.state, family, &config, None).unwrap();
            let st =
                candle_core::safetensors::load(ck.join("model.safetensors"), &Device::Cpu).unwrap();
            assert!(st.values().all(|t| t.dtype() == DType::F32));
            // The final model may be stored in the low type (`--save-dtype`); it still loads.
            let out = dir.join(format!("{preset}-{p}-model"));
            checkpoint::write_model_as(&out, &tr.params, family, &config, None, DType::BF16)
                .unwrap();
            let st = candle_core::safetensors::load(out.join("model.safetensors"), &Device::Cpu)
                .unwrap();
            assert!(st.values().all(|t| t.dtype() == DType::BF16));
            let cfg: Value =
                serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap())
                    .unwrap();
            assert_eq!(cfg["torch_dtype"], "bfloat16");
            camelid_model::Model::load(&out, &Device::Cpu).unwrap();
        }
    }
}

/// An overflow injected by a loss scale far too large for f16: the update is skipped (weights,
/// moments and the optimizer's step count untouched), the scale halves at each overflow until
/// the gradients fit, and training then goes on learning.
#[test]
fn f16_loss_scale_skips_an_overflow_and_recovers() {
    let dir = tmp("overflow");
    let data = tokens(8000, &dir);
    let spec = preset_spec("llama", &tiny()).unwrap();
    let spec = export_config(&spec, 0.0).unwrap().2;
    let mut tr = Trainer::new(
        Params::init(&spec, 5, &Device::Cpu).unwrap(),
        opts(Precision::F16),
    );
    let first = tr.step(&data).unwrap();
    assert!(!first.skipped);
    assert_eq!(first.loss_scale, Some(65536.0));
    let before: Vec<Vec<f32>> = tr
        .params
        .vars
        .iter()
        .map(|v| v.flatten_all().unwrap().to_vec1().unwrap())
        .collect();
    let moments = tr.opt.m.clone();
    // Scaled gradients of the logits reach scale / tokens = 2^30 / 64: past f16's 65504.
    tr.state.scaler.as_mut().unwrap().scale = 2f64.powi(30);
    let r = tr.step(&data).unwrap();
    assert!(r.skipped, "the overflow was not detected");
    assert_eq!(r.loss_scale, Some(2f64.powi(29)));
    assert_eq!(tr.opt.step, 1, "the optimizer took no step");
    assert_eq!(tr.state.step, 2, "the schedule moved on");
    assert_eq!(tr.opt.m, moments);
    for (v, b) in tr.params.vars.iter().zip(&before) {
        assert_eq!(&v.flatten_all().unwrap().to_vec1::<f32>().unwrap(), b);
    }
    let mut skipped = 1;
    let mut losses = Vec::new();
    let mut first_applied = None;
    for i in 0..40 {
        let r = tr.step(&data).unwrap();
        if r.skipped {
            skipped += 1;
        } else {
            first_applied.get_or_insert(i);
            losses.push(r.loss);
        }
    }
    let scaler = tr.state.scaler.as_ref().unwrap();
    eprintln!(
        "f16: {skipped} updates skipped from 2^30 (first applied after {:?}), scale at 2^{}, loss {:.4} -> {:.4}",
        first_applied,
        scaler.scale.log2(),
        losses[0],
        losses[losses.len() - 1]
    );
    assert!(skipped > 1 && skipped < 20, "{skipped} skips");
    assert_eq!(scaler.skipped, skipped);
    assert_eq!(tr.opt.step as usize, 1 + losses.len());
    assert!(losses[losses.len() - 1] < losses[0] - 0.5, "{losses:?}");
}

#[test]
fn loss_scale_follows_gradscaler_rules() {
    let mut s = LossScaler {
        growth_interval: 3,
        ..Default::default()
    };
    s.update(false);
    s.update(false);
    assert_eq!(s.scale, 65536.0);
    s.update(false);
    assert_eq!((s.scale, s.growth_tracker), (131072.0, 0));
    s.update(false);
    s.update(true);
    assert_eq!((s.scale, s.growth_tracker, s.skipped), (65536.0, 0, 1));
    assert!(LossScaler::found_inf(&[vec![1.0], vec![f32::NAN]]));
    assert!(!LossScaler::found_inf(&[vec![1.0, -2.0]]));
    assert!("f8".parse::<Precision>().is_err());
}

/// bf16 and f16 runs resumed from a checkpoint give the same losses and weights, to the bit,
/// as uninterrupted ones (f16 with its loss scale restored).
#[test]
fn resume_is_bit_exact_in_low_precision() {
    let dir = tmp("amp-resume");
    let data = tokens(4000, &dir);
    let spec = preset_spec("gpt2-124m", &tiny()).unwrap();
    let (family, config, spec) = export_config(&spec, 0.1).unwrap();
    for p in [Precision::Bf16, Precision::F16] {
        let mut o = opts(p);
        o.dropout = 0.1;
        o.grad_accum = 2;
        let ck = dir.join(format!("checkpoint-{p}"));
        let (straight, second, losses, resumed) =
            straight_and_resumed(&spec, &o, &data, 3, &ck, |first| {
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
            });
        assert_eq!(second.state.dtype, p);
        assert_eq!(second.state.scaler.is_some(), p == Precision::F16);
        assert_eq!(losses, resumed, "{p}: losses differ after resume");
        assert_eq!(straight.state.scaler, second.state.scaler);
        assert_same_bits(&straight.params, &second.params);
    }
}
