//! Typed access to a checkpoint's `config.json`, with errors that name the file and the key.

use crate::error::{ModelError, Result};
use serde_json::Value;
use std::path::{Path, PathBuf};

pub struct HfConfig {
    pub path: PathBuf,
    pub json: Value,
}

impl HfConfig {
    pub fn read(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| ModelError::io(path, e))?;
        let json: Value = serde_json::from_str(&text)
            .map_err(|e| ModelError::config(path, format!("invalid JSON: {e}")))?;
        if !json.is_object() {
            return Err(ModelError::config(path, "expected a JSON object"));
        }
        Ok(Self {
            path: path.to_path_buf(),
            json,
        })
    }

    pub fn from_value(path: &Path, json: Value) -> Self {
        Self {
            path: path.to_path_buf(),
            json,
        }
    }

    pub fn get(&self, key: &str) -> Option<&Value> {
        self.json.get(key).filter(|v| !v.is_null())
    }

    pub fn err(&self, message: impl Into<String>) -> ModelError {
        ModelError::config(&self.path, message)
    }

    pub fn model_type(&self) -> Option<&str> {
        self.get("model_type").and_then(Value::as_str)
    }

    /// The value at `key` converted by `conv`; absent or null is `None`, and any other value
    /// `conv` refuses is an error that names the key and says what it must be.
    fn typed<'a, T>(
        &'a self,
        key: &str,
        must_be: &str,
        conv: impl FnOnce(&'a Value) -> Option<T>,
    ) -> Result<Option<T>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => conv(v)
                .map(Some)
                .ok_or_else(|| self.err(format!("\"{key}\" must be {must_be}, got {v}"))),
        }
    }

    pub fn opt_usize(&self, key: &str) -> Result<Option<usize>> {
        self.typed(key, "a non-negative integer", |v| {
            v.as_u64().map(|x| x as usize)
        })
    }

    pub fn usize(&self, key: &str) -> Result<usize> {
        self.opt_usize(key)?
            .ok_or_else(|| self.err(format!("missing \"{key}\"")))
    }

    /// First of several alias keys that is present (families renamed fields over time).
    pub fn usize_any(&self, keys: &[&str]) -> Result<usize> {
        for k in keys {
            if let Some(v) = self.opt_usize(k)? {
                return Ok(v);
            }
        }
        Err(self.err(format!("missing \"{}\"", keys.join("\" / \""))))
    }

    pub fn opt_f64(&self, key: &str) -> Result<Option<f64>> {
        self.typed(key, "a number", Value::as_f64)
    }

    pub fn f64_or(&self, key: &str, default: f64) -> Result<f64> {
        Ok(self.opt_f64(key)?.unwrap_or(default))
    }

    pub fn bool_or(&self, key: &str, default: bool) -> Result<bool> {
        Ok(self
            .typed(key, "true or false", Value::as_bool)?
            .unwrap_or(default))
    }

    pub fn opt_str(&self, key: &str) -> Result<Option<&str>> {
        self.typed(key, "a string", Value::as_str)
    }
}
