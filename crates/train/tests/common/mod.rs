//! Helpers shared by the training suites: fixture paths, the fixtures' flags as options,
//! relative differences, scratch directories, token files and the resume round trip.

#![allow(dead_code)]

use camelid_model::spec::ArchSpec;
use camelid_train::arch::read_config;
use camelid_train::checkpoint;
use camelid_train::data::TokenData;
use camelid_train::optim::Schedule;
use camelid_train::params::Params;
use camelid_train::trainer::{TrainOptions, Trainer};
use candle_core::{Device, Tensor};
use serde_json::Value;
use std::path::{Path, PathBuf};

pub fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures/train")
        .join(name)
}

pub fn options(h: &Value) -> TrainOptions {
    let f = |k: &str| h[k].as_f64().unwrap_or_else(|| panic!("hyper.{k}"));
    let u = |k: &str| h[k].as_u64().unwrap_or_else(|| panic!("hyper.{k}"));
    TrainOptions {
        seq_len: u("seq_len") as usize,
        batch: u("batch") as usize,
        grad_accum: u("grad_accum") as usize,
        steps: u("steps"),
        lr: f("lr"),
        min_lr: f("min_lr"),
        warmup: u("warmup"),
        schedule: h["schedule"].as_str().unwrap().parse::<Schedule>().unwrap(),
        weight_decay: f("weight_decay"),
        decay_all: false,
        beta1: f("beta1"),
        beta2: f("beta2"),
        eps: f("eps"),
        clip: f("clip"),
        dropout: f("dropout"),
        shuffle: false,
        seed: u("seed"),
        precision: h["dtype"].as_str().unwrap_or("f32").parse().unwrap(),
    }
}

/// ‖a − b‖ / ‖b‖.
pub fn rel(a: &Tensor, b: &Tensor) -> f64 {
    let a = a.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let b = b.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    assert_eq!(a.len(), b.len());
    let d: f64 = a
        .iter()
        .zip(&b)
        .map(|(x, y)| ((x - y) as f64).powi(2))
        .sum::<f64>()
        .sqrt();
    let n: f64 = b.iter().map(|y| (*y as f64).powi(2)).sum::<f64>().sqrt();
    d / n.max(1e-30)
}

/// A fresh scratch directory for one test of this process.
pub fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("camelid-train-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// `toks` written to `dir` as a raw little-endian u32 token file, opened.
pub fn token_file(toks: &[u32], dir: &Path) -> TokenData {
    let path = dir.join("tokens.u32");
    let bytes: Vec<u8> = toks.iter().flat_map(|t| t.to_le_bytes()).collect();
    std::fs::write(&path, bytes).unwrap();
    TokenData::open(&path).unwrap()
}

/// Two trainers from the same initialization: one runs `2n` steps straight; the other runs
/// `n`, is written to `ck` by `save`, loaded back from the complete checkpoint there and runs
/// `n` more. Returns both trainers and both loss sequences.
pub fn straight_and_resumed(
    spec: &ArchSpec,
    o: &TrainOptions,
    data: &TokenData,
    n: usize,
    ck: &Path,
    save: impl FnOnce(&Trainer),
) -> (Trainer, Trainer, Vec<f64>, Vec<f64>) {
    let mut straight = Trainer::new(Params::init(spec, 11, &Device::Cpu).unwrap(), o.clone());
    let losses: Vec<f64> = (0..2 * n)
        .map(|_| straight.step(data).unwrap().loss)
        .collect();
    let mut first = Trainer::new(Params::init(spec, 11, &Device::Cpu).unwrap(), o.clone());
    let mut resumed: Vec<f64> = (0..n).map(|_| first.step(data).unwrap().loss).collect();
    save(&first);
    drop(first);
    let found = checkpoint::find_complete(ck).unwrap();
    let (family, spec2, _) = read_config(&found).unwrap();
    let params = Params::load(&found, family, &spec2, &Device::Cpu).unwrap();
    let (opt, state) = checkpoint::load_state(&found, &params).unwrap();
    assert_eq!(state.step, n as u64);
    let mut second = Trainer::with_state(params, o.clone(), opt, state);
    resumed.extend((0..n).map(|_| second.step(data).unwrap().loss));
    (straight, second, losses, resumed)
}

/// Every weight of `a` equals `b`'s to the bit.
pub fn assert_same_bits(a: &Params, b: &Params) {
    for (a, b) in a.vars.iter().zip(&b.vars) {
        let a = a.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let b = b.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert!(a.iter().zip(&b).all(|(x, y)| x.to_bits() == y.to_bits()));
    }
}
