//! The device the device-generic tests run on: `CAMELID_TEST_DEVICE` (`cpu`, the default, or
//! `cuda` / `cuda:N` in a binary built with `--features cuda`). The same parity tests then check
//! a GPU against the same fixtures, at the tolerance for that device.
#![allow(dead_code)]

use candle_core::{DType, Device};

pub fn device() -> Device {
    let name = std::env::var("CAMELID_TEST_DEVICE").unwrap_or_else(|_| "cpu".into());
    match name.as_str() {
        "cpu" => Device::Cpu,
        cuda if cuda.starts_with("cuda") => {
            let index = cuda
                .strip_prefix("cuda:")
                .map(|i| i.parse().expect("CAMELID_TEST_DEVICE=cuda:N"))
                .unwrap_or(0);
            Device::new_cuda(index).unwrap_or_else(|e| {
                panic!("CAMELID_TEST_DEVICE={name}: {e} (a binary built with --features cuda, on a machine with a GPU)")
            })
        }
        other => panic!("CAMELID_TEST_DEVICE={other}: use cpu, cuda or cuda:N"),
    }
}

/// f32 logits agree with the fixtures within this: summation order is all that differs on the
/// CPU; a GPU's kernels (cuBLAS, fused softmax/norms) reorder more.
pub fn f32_tolerance(device: &Device) -> f32 {
    if device.is_cpu() {
        1e-4
    } else {
        1e-3
    }
}

/// The largest |a - b| over all rows, and that relative to the largest |b|.
pub fn max_diff(got: &[Vec<f32>], want: &[Vec<f32>]) -> (f32, f32) {
    assert_eq!(got.len(), want.len(), "positions");
    let mut worst = 0f32;
    let mut scale = 0f32;
    for (row, reference) in got.iter().zip(want) {
        assert_eq!(row.len(), reference.len(), "vocabulary size");
        for (a, b) in row.iter().zip(reference) {
            worst = worst.max((a - b).abs());
            scale = scale.max(b.abs());
        }
    }
    (worst, worst / scale.max(f32::MIN_POSITIVE))
}

pub fn dtype_name(dtype: DType) -> &'static str {
    dtype.as_str()
}

/// Loads a model on the test device in f32 (a GPU's default is bf16).
pub fn load_f32(path: &std::path::Path) -> camelid_model::Result<camelid_model::Model> {
    let opts = camelid_model::model::LoadOptions {
        dtype: Some(DType::F32),
        ..Default::default()
    };
    camelid_model::Model::load_with(path, &device(), &opts)
}

/// `tests/fixtures` of the repository: `CAMELID_FIXTURES` when set (test binaries carried to
/// another machine, where the build's path does not exist), else found from this crate.
pub fn fixtures() -> std::path::PathBuf {
    match std::env::var_os("CAMELID_FIXTURES") {
        Some(dir) => dir.into(),
        None => std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures"),
    }
}
