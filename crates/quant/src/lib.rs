//! camelid's quantizer: reads an HF model directory or a GGUF file through the model layer's
//! loaders, rounds each weight to a GGUF block type with ggml's reference rounding (candle's
//! quantizers for the 32-value blocks, [`kquants`] for the K-quants, where candle's differ; the
//! crate's tests check the bytes against ggml's) and writes a GGUF file llama.cpp loads
//! ([`gguf_writer`]). It never runs a model; it knows families only through their
//! `GgufExport` data and the shared checkpoint reader.

pub mod gguf_writer;
pub mod kquants;
pub mod quantize;
pub mod tokenizer_export;
pub mod types;

pub use quantize::{quantize, Event, QuantizeError, QuantizeOptions, Report};
