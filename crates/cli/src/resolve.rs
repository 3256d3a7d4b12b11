//! From `-m MODEL` to a loaded model: catalog names are pulled on first use, paths are loaded
//! as they are.

use crate::ModelArgs;
use anyhow::{bail, Context, Result};
use camelid_model::catalog;
use camelid_model::Model;
use candle_core::Device;
use std::path::PathBuf;

pub fn device(name: &str) -> Result<Device> {
    match name {
        "cpu" | "auto" => Ok(Device::Cpu),
        other if other.starts_with("cuda") => {
            bail!("--device {other}: this camelid build has no CUDA support (build with --features cuda)")
        }
        other => bail!("--device {other}: unknown device (use cpu or auto)"),
    }
}

/// Must run before any parallel work starts: candle and rayon read it once.
pub fn set_threads(threads: Option<usize>) -> Result<()> {
    if let Some(t) = threads {
        if t == 0 {
            bail!("--threads must be at least 1");
        }
        std::env::set_var("RAYON_NUM_THREADS", t.to_string());
    }
    Ok(())
}

pub fn threads_in_use() -> usize {
    candle_core::utils::get_num_threads()
}

pub fn model_path(arg: Option<&str>) -> Result<PathBuf> {
    let name = arg.unwrap_or(catalog::DEFAULT_MODEL);
    let as_path = PathBuf::from(name);
    if as_path.exists() {
        return Ok(as_path);
    }
    if let Some(entry) = catalog::find(name) {
        let path = catalog::pull(entry, &mut |line| eprintln!("camelid: {line}"))
            .with_context(|| format!("pulling {name}"))?;
        return Ok(path);
    }
    bail!("{name}: no such file or directory, and not a catalog model (see `camelid list`)")
}

pub fn load(args: &ModelArgs) -> Result<Model> {
    set_threads(args.threads)?;
    // Inference runs its large products on rayon's pool (`camelid_kernels::on_pool`); candle's
    // own spinning pool for the small element-wise ops would make a third and fourth thread
    // competing for the cores between products.
    if std::env::var_os("CANDLE_NUM_THREADS").is_none() {
        std::env::set_var("CANDLE_NUM_THREADS", "1");
    }
    // Each forward pass allocates and frees its activations (prefill: megabytes per op); kept
    // in the process, they are not zeroed pages faulted in again on every op.
    crate::train::keep_freed_memory();
    let device = device(&args.device)?;
    let path = model_path(args.model.as_deref())?;
    let spinner = indicatif::ProgressBar::new_spinner();
    spinner.set_draw_target(indicatif::ProgressDrawTarget::stderr());
    spinner.set_message(format!("loading {}", path.display()));
    spinner.enable_steady_tick(std::time::Duration::from_millis(120));
    let model = Model::load(&path, &device);
    spinner.finish_and_clear();
    Ok(model?)
}
