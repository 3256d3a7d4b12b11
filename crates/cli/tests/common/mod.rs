//! Helpers the CLI test suites share: run the `camelid` binary with a scratch `$CAMELID_HOME`,
//! scratch directories per suite and process, and the committed fixtures.
#![allow(dead_code)] // each suite uses a different subset

use std::path::PathBuf;
use std::process::{Command, Output};

/// `$TMP/camelid-<suite>-<pid>/<name>`, created.
pub fn scratch(suite: &str, name: &str) -> PathBuf {
    let dir = std::env::temp_dir()
        .join(format!("camelid-{suite}-{}", std::process::id()))
        .join(name);
    std::fs::create_dir_all(&dir).expect("scratch dir");
    dir
}

/// Runs `camelid ARGS` with its home in the suite's scratch directory.
pub fn camelid(suite: &str, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_camelid"))
        .args(args)
        .env("CAMELID_HOME", scratch(suite, "home"))
        .output()
        .expect("run camelid")
}

/// `tests/fixtures/<path>` at the repository root.
pub fn fixture(path: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures")
        .join(path)
}
