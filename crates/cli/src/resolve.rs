//! From `-m MODEL` to a loaded model: catalog names are pulled on first use, paths are loaded
//! as they are.

use crate::ModelArgs;
use anyhow::{bail, Context, Result};
use camelid_model::catalog;
use camelid_model::model::LoadOptions;
use camelid_model::Model;
use candle_core::Device;
use std::path::PathBuf;

pub fn device(name: &str) -> Result<Device> {
    crate::device::open(name)
}

/// Must run before any parallel work starts: candle and rayon read it once.
pub fn set_threads(threads: Option<usize>) -> Result<()> {
    if let Some(t) = threads {
        if t == 0 {
            bail!("--threads must be at least 1");
        }
        std::env::set_var("RAYON_NUM_THREADS", t.to_string());
    } else if std::env::var_os("RAYON_NUM_THREADS").is_none() {
        // Fix the default once: without the variable, candle counts the cores again (parsing
        // /proc/cpuinfo) in every matmul, which the per-sequence attention products of a
        // batched step would pay dozens of times.
        let cores = candle_core::utils::get_num_threads();
        std::env::set_var("RAYON_NUM_THREADS", cores.to_string());
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
    // competing for the cores between products. Unless the model has quantized types that
    // camelid's kernels do not cover: candle runs those products on its pool (see
    // `candle_threads`).
    let pin_candle = std::env::var_os("CANDLE_NUM_THREADS").is_none();
    if pin_candle {
        std::env::set_var("CANDLE_NUM_THREADS", "1");
    }
    // Each forward pass allocates and frees its activations (prefill: megabytes per op); kept
    // in the process, they are not zeroed pages faulted in again on every op.
    crate::train::keep_freed_memory();
    let device = device(&args.device)?;
    let dtype = crate::device::dtype(args.dtype.as_deref())?;
    let path = model_path(args.model.as_deref())?;
    let spinner = indicatif::ProgressBar::new_spinner();
    spinner.set_draw_target(indicatif::ProgressDrawTarget::stderr());
    spinner.set_message(format!("loading {}", path.display()));
    spinner.enable_steady_tick(std::time::Duration::from_millis(120));
    let opts = LoadOptions {
        dtype,
        ..Default::default()
    };
    let model = Model::load_with(&path, &device, &opts);
    spinner.finish_and_clear();
    let model = model?;
    if pin_candle {
        // Candle reads the variable once, when its pool starts: at the first quantized product
        // or large element-wise op, which loading does not run.
        let threads = candle_threads(&model, threads_in_use());
        std::env::set_var("CANDLE_NUM_THREADS", threads.to_string());
    }
    Ok(model)
}

/// Threads for candle's own pool: one when camelid's kernels run every large product (the
/// pool then only runs small element-wise ops between them), all of them when some products
/// run through candle's quantized matmul (types without a camelid kernel), which would
/// otherwise run on one core.
pub fn candle_threads(model: &Model, threads: usize) -> usize {
    if model.candle_quantized_products() > 0 {
        threads
    } else {
        1
    }
}
