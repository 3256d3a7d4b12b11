//! Products over many tokens at once (a serving step's decode rows, a prompt chunk): every
//! weight row is read from memory once per call, not once per tile of tokens.
//!
//! [`crate::matmul_group`] walks each task's rows once per tile of 4 tokens; a task's rows of a
//! large matrix (the 49152-row head) do not stay in cache between tiles, so 32 tokens read the
//! matrix 8 times. Here a task takes its rows a few at a time and runs every token tile over
//! them while they sit in L1. Each output value comes from the same tile kernel on the same
//! quantized input as in [`crate::matmul_group`], so the results are bit for bit the same, and
//! the same whichever other tokens share the call (batching never changes a row's numbers).

use crate::{ActBlock, KernelError, QMatrix, SharedOut, QK, TILE};
use std::cell::RefCell;

/// Weight rows a task keeps hot while all token tiles pass over them (16 rows of a 576-wide
/// Q8_0 matrix are 10 KiB).
const ROW_BLOCK: usize = 16;

thread_local! {
    static ACTS: RefCell<Vec<ActBlock>> = const { RefCell::new(Vec::new()) };
}

/// [`crate::matmul_group`] with each weight row read once for all `tokens` rows of `x`
/// (`[tokens, cols]`); `outs[i]` gets `[tokens, mats[i].rows]`. Up to one tile of tokens it is
/// [`crate::matmul_group`] itself.
pub fn matmul_group_many(
    mats: &[&QMatrix],
    x: &[f32],
    tokens: usize,
    outs: &mut [&mut [f32]],
) -> Result<(), KernelError> {
    // Packed matrices already stream each 8-row group once past a chunk of tokens.
    if tokens <= TILE || mats.iter().any(|m| m.packed) {
        return crate::matmul_group(mats, x, tokens, outs);
    }
    let Some(cols) = crate::check_shapes(mats, x, tokens, outs)? else {
        return Ok(());
    };
    let per_row = cols / QK;
    // Taken out of the thread-local for the call (see `matmul_group`: another pass may run a
    // product on this thread while it waits in the parallel region).
    let mut buffer = ACTS.with(|a| std::mem::take(&mut *a.borrow_mut()));
    {
        buffer.resize(tokens * per_row, ActBlock::default());
        crate::quantize_rows(x, tokens, &mut buffer, None);
        let acts = &buffer[..];
        let act = |t: usize| &acts[t * per_row..(t + 1) * per_row];
        let dsts: Vec<SharedOut> = outs.iter_mut().map(|o| SharedOut(o.as_mut_ptr())).collect();
        let spans = crate::Spans::new(mats.iter().map(|m| m.rows));
        let total = spans.total();
        let work = |range: std::ops::Range<usize>| {
            spans.for_each(range, |mi, rows| {
                let m = mats[mi];
                let (bytes, rb) = (m.data.bytes(), m.cols / QK * m.ty.block_bytes());
                let mut r0 = rows.start;
                while r0 < rows.end {
                    let r1 = (r0 + ROW_BLOCK).min(rows.end);
                    let mut t = 0;
                    while t < tokens {
                        let nt = if tokens - t >= TILE { TILE } else { 1 };
                        for r in r0..r1 {
                            let w = &bytes[r * rb..(r + 1) * rb];
                            let put = |k: usize, v: f32| {
                                // SAFETY: row `r` of matrix `mi` belongs to this task alone,
                                // and `(t + k) * rows + r` is in bounds (lengths checked).
                                unsafe { dsts[mi].write((t + k) * m.rows + r, v) }
                            };
                            if nt == TILE {
                                let v = m.dot_tile(w, [act(t), act(t + 1), act(t + 2), act(t + 3)]);
                                for (k, v) in v.into_iter().enumerate() {
                                    put(k, v);
                                }
                            } else {
                                put(0, m.dot_tile(w, [act(t)])[0]);
                            }
                        }
                        t += nt;
                    }
                    r0 = r1;
                }
            });
        };
        // Shared out in units of 8 rows, as `matmul_group` does.
        let group = crate::packed::GROUP;
        crate::parallel_units(total.div_ceil(group), tokens, &|u: std::ops::Range<
            usize,
        >| {
            work(u.start * group..(u.end * group).min(total))
        });
    }
    ACTS.with(|a| *a.borrow_mut() = buffer);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pseudo_random;
    use crate::{quantize_weights, QType};

    type Product = fn(&[&QMatrix], &[f32], usize, &mut [&mut [f32]]) -> Result<(), KernelError>;

    /// Bit for bit the values of `matmul_group`, for token counts around the tile size and
    /// matrices of several types that a task's row range crosses.
    #[test]
    fn equals_matmul_group_bit_for_bit() {
        let cols = 96;
        let mats: Vec<QMatrix> = [(QType::Q4_1, 37), (QType::Q8_0, 70), (QType::Q4_0, 5)]
            .into_iter()
            .enumerate()
            .map(|(i, (ty, rows))| {
                let w = quantize_weights(ty, &pseudo_random(rows * cols, i as u32 + 1));
                QMatrix::from_bytes(ty, rows, cols, &w).unwrap()
            })
            .collect();
        let refs: Vec<&QMatrix> = mats.iter().collect();
        for tokens in [1, 4, 5, 9, 33] {
            let x = pseudo_random(tokens * cols, 40 + tokens as u32);
            let run = |f: Product| {
                let mut outs: Vec<Vec<f32>> =
                    mats.iter().map(|m| vec![0f32; tokens * m.rows]).collect();
                let mut views: Vec<&mut [f32]> = outs.iter_mut().map(|o| &mut o[..]).collect();
                f(&refs, &x, tokens, &mut views).unwrap();
                outs
            };
            assert_eq!(run(matmul_group_many), run(crate::matmul_group), "{tokens}");
        }
    }

    /// A row's result does not depend on which other rows share the call.
    #[test]
    fn rows_are_batch_invariant() {
        let (rows, cols) = (300, 64);
        let w = quantize_weights(QType::Q8_0, &pseudo_random(rows * cols, 3));
        let m = QMatrix::from_bytes(QType::Q8_0, rows, cols, &w).unwrap();
        let tokens = 11;
        let x = pseudo_random(tokens * cols, 4);
        let mut all = vec![0f32; tokens * rows];
        matmul_group_many(&[&m], &x, tokens, &mut [&mut all]).unwrap();
        for t in 0..tokens {
            let mut one = vec![0f32; rows];
            matmul_group_many(&[&m], &x[t * cols..(t + 1) * cols], 1, &mut [&mut one]).unwrap();
            assert_eq!(&all[t * rows..(t + 1) * rows], &one[..], "token {t}");
        }
    }

    #[test]
    fn bad_shapes_are_errors() {
        let m = QMatrix::from_bytes(QType::Q8_0, 2, 32, &[0; 68]).unwrap();
        assert!(matmul_group_many(&[&m], &[0.0; 32 * 5], 5, &mut [&mut [0.0; 9]]).is_err());
        assert!(matmul_group_many(&[&m], &[0.0; 31 * 5], 5, &mut [&mut [0.0; 10]]).is_err());
    }
}
