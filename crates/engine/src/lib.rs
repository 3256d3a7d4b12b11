//! camelid's engine: running a model. It owns the KV cache ([`kv_cache`]), the sampler
//! ([`sampling`]), the per-sequence generation loop ([`generate`]), the server's continuous
//! batching scheduler ([`scheduler`]) over a paged, prefix-cached KV pool ([`paged_kv`]),
//! throughput measurement ([`bench`]) and perplexity ([`perplexity`]). It knows the model only
//! through `camelid_model::Model` and never parses files or speaks HTTP; the server and the CLI
//! sit on top of it.

pub mod beam;
pub mod bench;
pub mod embed;
pub mod generate;
pub mod json_constraint;
pub mod kv_cache;
pub mod paged_kv;
pub mod perplexity;
pub mod sampling;
pub mod scheduler;
pub mod seq2seq;

pub use beam::{beam_search, BeamOptions, EarlyStopping, Hypothesis};
pub use generate::{generate, FinishReason, GenerateOptions, Generation};
pub use kv_cache::KvCache;
pub use sampling::{Sampler, SamplingParams};
