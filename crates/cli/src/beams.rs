//! Beam search on `camelid run` (`--beams N`), for decoder-only and encoder-decoder models.

use crate::commands::emit;
use anyhow::{bail, Result};
use camelid_engine::beam::{beam_search, BeamOptions, EarlyStopping};
use camelid_model::Model;
use clap::Args;

#[derive(Args, Clone)]
pub struct BeamArgs {
    /// Beam search with this many beams instead of sampling (1: off)
    #[arg(long, default_value_t = 1, value_name = "N")]
    pub beams: usize,
    /// Beam search: a finished hypothesis scores sum(log p) / length^X (X > 0 favours longer)
    #[arg(
        long,
        default_value_t = 1.0,
        value_name = "X",
        allow_negative_numbers = true
    )]
    pub length_penalty: f32,
    /// Beam search stopping rule: true (once N hypotheses finished), false (when no running
    /// beam can still win, judged at its current length) or never (judged at the length limit)
    #[arg(long, default_value = "false", value_name = "WHEN", num_args = 0..=1, default_missing_value = "true")]
    pub early_stopping: EarlyStopping,
    /// Beam search: print the K best hypotheses, one per line with its score
    #[arg(long, default_value_t = 1, value_name = "K")]
    pub n_best: usize,
}

impl BeamArgs {
    pub fn enabled(&self) -> bool {
        self.beams > 1 || self.n_best > 1
    }
}

/// Runs beam search on `ids` and prints the text of the best hypothesis, or with `--n-best K`
/// K lines `score<TAB>text`.
pub fn run(model: &Model, ids: &[u32], args: &BeamArgs, max_tokens: usize) -> Result<()> {
    if args.n_best > args.beams {
        bail!(
            "--n-best {} exceeds --beams {}: beam search keeps only that many hypotheses",
            args.n_best,
            args.beams
        );
    }
    let opts = BeamOptions {
        beams: args.beams,
        length_penalty: args.length_penalty,
        early_stopping: args.early_stopping,
        n_best: args.n_best,
        max_tokens,
    };
    let hyps = beam_search(model, ids, &opts)?;
    let tok = model.tokenizer()?;
    for h in &hyps {
        let tokens: Vec<u32> = h
            .tokens
            .iter()
            .copied()
            .filter(|t| !model.eos_ids.contains(t))
            .collect();
        let text = tok.decode(&tokens, true)?;
        if args.n_best > 1 {
            emit(&format!("{:.6}\t{text}", h.score))?;
        } else {
            emit(&text)?;
        }
    }
    Ok(())
}
