//! Helpers shared by the PyTorch comparison suites: fixture paths, the fixtures' flags as
//! options, relative differences.

#![allow(dead_code)]

use camelid_train::optim::Schedule;
use camelid_train::trainer::TrainOptions;
use candle_core::Tensor;
use serde_json::Value;
use std::path::PathBuf;

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
