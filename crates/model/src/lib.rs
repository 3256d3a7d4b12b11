//! camelid's model layer: what a model *is*.
//!
//! It owns the normalized architecture spec ([`spec`]), the family registry that translates
//! checkpoints into it ([`families`]), weight files ([`checkpoint`]), tokenizers
//! ([`tokenizer`]), chat templates ([`chat_template`]) and the one shared transformer
//! ([`transformer`]). It knows nothing about sampling, scheduling, HTTP or training: those
//! layers call [`transformer::Transformer::forward`] with a [`transformer::KvStore`] of their
//! own.

pub mod catalog;
pub mod chat_template;
pub mod checkpoint;
pub mod config;
pub mod error;
pub mod families;
pub mod model;
pub mod paged_attention;
pub mod presets;
pub mod rope;
pub mod rows;
pub mod spec;
pub mod tokenizer;
pub mod transformer;

pub use error::{ModelError, Result};
pub use model::Model;
pub use spec::ArchSpec;
