//! camelid's training layer: next-token pretraining of any spec the engine runs.
//!
//! The forward pass is the one shared transformer ([`camelid_model::transformer`]) switched to
//! its differentiable training mode, over weights held as candle [`candle_core::Var`]s
//! ([`params`]). Around it: the architecture as a checkpoint layout ([`arch`]), tokenizer
//! training and corpus preparation ([`corpus`]), token data ([`data`]), AdamW and
//! learning-rate schedules ([`optim`]), mixed precision ([`amp`]), checkpoints with optimizer
//! and data-loader state ([`checkpoint`]) and the loop itself ([`trainer`]).

pub mod amp;
pub mod arch;
pub mod checkpoint;
pub mod corpus;
pub mod data;
pub mod optim;
pub mod params;
pub mod plot;
pub mod trainer;
