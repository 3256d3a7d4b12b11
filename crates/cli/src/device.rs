//! `--device cpu|cuda[:N]|auto` and `--dtype f32|f16|bf16`: from the flags to a candle device
//! and the type the weights are given in on it.

use anyhow::{bail, Result};
use candle_core::{DType, Device};

/// What `--device` asks for, before any device is opened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceChoice {
    Cpu,
    /// A CUDA GPU by index (`cuda` is `cuda:0`).
    Cuda(usize),
    /// The first CUDA GPU when this binary has CUDA and one is present, else the CPU.
    Auto,
}

/// Whether this binary was built with CUDA (`--features cuda`, scripts/build-cuda.sh).
pub const HAS_CUDA: bool = cfg!(feature = "cuda");

pub fn parse(name: &str) -> Result<DeviceChoice> {
    let lower = name.trim().to_ascii_lowercase();
    match lower.as_str() {
        "cpu" => Ok(DeviceChoice::Cpu),
        "auto" => Ok(DeviceChoice::Auto),
        "cuda" | "gpu" => Ok(DeviceChoice::Cuda(0)),
        other => match other.strip_prefix("cuda:") {
            Some(index) => match index.parse::<usize>() {
                Ok(i) => Ok(DeviceChoice::Cuda(i)),
                Err(_) => {
                    bail!("--device {name}: the GPU index must be a number (cuda:0, cuda:1, ...)")
                }
            },
            None => bail!("--device {name}: unknown device (use cpu, cuda, cuda:N or auto)"),
        },
    }
}

/// Opens the device `--device` names.
pub fn open(name: &str) -> Result<Device> {
    match parse(name)? {
        DeviceChoice::Cpu => Ok(Device::Cpu),
        DeviceChoice::Cuda(_) if !HAS_CUDA => bail!(
            "--device {name}: this camelid binary was built without CUDA; build one with scripts/build-cuda.sh"
        ),
        DeviceChoice::Cuda(i) => Device::new_cuda(i).map_err(|e| {
            anyhow::anyhow!(
                "--device {name}: CUDA GPU {i} could not be opened: {}",
                first_line(&e.to_string())
            )
        }),
        DeviceChoice::Auto if HAS_CUDA => Ok(Device::new_cuda(0).unwrap_or(Device::Cpu)),
        DeviceChoice::Auto => Ok(Device::Cpu),
    }
}

/// Parses `--dtype` (`None`: the loader's default for the device and checkpoint).
pub fn dtype(name: Option<&str>) -> Result<Option<DType>> {
    match name {
        None => Ok(None),
        Some(n) => Ok(Some(camelid_model::model::parse_dtype(n)?)),
    }
}

/// The device as `camelid bench` reports it (llama-bench's backend column).
pub fn backend(device: &Device) -> &'static str {
    if device.is_cuda() {
        "CUDA"
    } else if device.is_metal() {
        "Metal"
    } else {
        "CPU"
    }
}

fn first_line(s: &str) -> &str {
    s.lines().next().unwrap_or(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_names_parse() {
        assert_eq!(parse("cpu").unwrap(), DeviceChoice::Cpu);
        assert_eq!(parse(" CPU ").unwrap(), DeviceChoice::Cpu);
        assert_eq!(parse("auto").unwrap(), DeviceChoice::Auto);
        assert_eq!(parse("cuda").unwrap(), DeviceChoice::Cuda(0));
        assert_eq!(parse("cuda:0").unwrap(), DeviceChoice::Cuda(0));
        assert_eq!(parse("cuda:3").unwrap(), DeviceChoice::Cuda(3));
    }

    #[test]
    fn bad_device_names_say_what_is_accepted() {
        let e = parse("tpu").unwrap_err().to_string();
        assert_eq!(
            e,
            "--device tpu: unknown device (use cpu, cuda, cuda:N or auto)"
        );
        for bad in ["cuda:", "cuda:x", "cuda:-1", "cuda:1.5"] {
            let e = parse(bad).unwrap_err().to_string();
            assert!(e.contains("the GPU index must be a number"), "{bad}: {e}");
            assert!(!e.contains('\n'), "{bad}: one line: {e}");
        }
    }

    #[test]
    fn cpu_and_auto_open_without_a_gpu() {
        assert!(open("cpu").unwrap().is_cpu());
        // Without CUDA in the binary, auto is the CPU; with it, whatever this machine has.
        let auto = open("auto").unwrap();
        assert!(HAS_CUDA || auto.is_cpu());
    }

    #[test]
    fn cuda_in_a_cpu_build_points_to_the_build_script() {
        if HAS_CUDA {
            return;
        }
        for name in ["cuda", "cuda:1"] {
            let e = open(name).unwrap_err().to_string();
            assert!(e.contains("built without CUDA"), "{e}");
            assert!(e.contains("scripts/build-cuda.sh"), "{e}");
            assert!(!e.contains('\n'), "{e}");
        }
    }

    #[test]
    fn dtypes_parse() {
        assert_eq!(dtype(None).unwrap(), None);
        assert_eq!(dtype(Some("bf16")).unwrap(), Some(DType::BF16));
        assert_eq!(dtype(Some("F16")).unwrap(), Some(DType::F16));
        assert_eq!(dtype(Some("f32")).unwrap(), Some(DType::F32));
        let e = dtype(Some("q4")).unwrap_err().to_string();
        assert_eq!(e, "--dtype q4: unknown type (use f32, f16 or bf16)");
    }
}
