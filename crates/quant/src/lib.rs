//! camelid's quantizer: reads an HF model directory or a GGUF file through the model layer's
//! loaders, rounds each weight to a GGUF block type (candle's quantizers, which follow ggml's
//! reference rounding: see the crate's tests) and writes a GGUF file llama.cpp loads
//! ([`gguf_writer`]). It never runs a model; it knows families only through their
//! `GgufExport` data and the shared checkpoint reader.

pub mod gguf_writer;
pub mod quantize;
pub mod tokenizer_export;
pub mod types;

pub use quantize::{quantize, Event, QuantizeError, QuantizeOptions, Report};
