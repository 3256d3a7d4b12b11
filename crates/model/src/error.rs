//! Errors of the model layer. Every variant names the file (or tensor, or key) and the problem,
//! so the CLI can print it as one line.

use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The file exists but its bytes are not what its format promises.
    #[error("{path}: {message}")]
    Format { path: PathBuf, message: String },
    /// A config value is missing, has the wrong type, or is inconsistent.
    #[error("{path}: {message}")]
    Config { path: PathBuf, message: String },
    #[error("{path}: unknown model_type \"{model_type}\" (camelid knows: {known})")]
    UnknownFamily {
        path: PathBuf,
        model_type: String,
        known: String,
    },
    #[error("{path}: tensor \"{name}\" {message}")]
    Tensor {
        path: PathBuf,
        name: String,
        message: String,
    },
    #[error("{path}: tokenizer: {message}")]
    Tokenizer { path: PathBuf, message: String },
    #[error("chat template: {0}")]
    Template(String),
    /// Input that the model cannot take (over-long prompt, out-of-vocabulary id, ...).
    #[error("{0}")]
    Input(String),
    #[error("tensor computation failed: {}", first_line(.0))]
    Compute(#[from] candle_core::Error),
}

impl ModelError {
    pub fn io(path: &Path, source: std::io::Error) -> Self {
        Self::Io {
            path: path.to_path_buf(),
            source,
        }
    }
    pub fn format(path: &Path, message: impl Into<String>) -> Self {
        Self::Format {
            path: path.to_path_buf(),
            message: message.into(),
        }
    }
    pub fn config(path: &Path, message: impl Into<String>) -> Self {
        Self::Config {
            path: path.to_path_buf(),
            message: message.into(),
        }
    }
    pub fn tokenizer(path: &Path, message: impl Into<String>) -> Self {
        Self::Tokenizer {
            path: path.to_path_buf(),
            message: message.into(),
        }
    }
}

pub type Result<T, E = ModelError> = std::result::Result<T, E>;

/// candle appends a backtrace to its messages when `RUST_BACKTRACE` is set; errors here are
/// one line.
pub fn first_line(e: &impl std::fmt::Display) -> String {
    e.to_string().lines().next().unwrap_or_default().to_string()
}
