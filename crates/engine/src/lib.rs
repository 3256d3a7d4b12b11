//! camelid's engine: running a model. It owns the KV cache ([`kv_cache`]), the sampler
//! ([`sampling`]), the per-sequence generation loop ([`generate`]), throughput measurement
//! ([`bench`]) and perplexity ([`perplexity`]). It knows the model only through
//! `camelid_model::Model` and never parses files or speaks HTTP; the server and the CLI sit on
//! top of it.

pub mod bench;
pub mod embed;
pub mod generate;
pub mod kv_cache;
pub mod perplexity;
pub mod sampling;

pub use generate::{generate, FinishReason, GenerateOptions, Generation};
pub use kv_cache::KvCache;
pub use sampling::{Sampler, SamplingParams};
