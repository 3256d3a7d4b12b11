//! Token data: camelid shards (a 32-byte header, then u16 or u32 tokens) or raw
//! little-endian u32 files, memory-mapped; and the batches the trainer reads from them.
//!
//! Shard header: magic `CMLDTOK1`, format version (u32, 1), bytes per token (u32, 2 or 4),
//! vocabulary size (u32), reserved (u32, 0), token count (u64); all little-endian.

use anyhow::{bail, Context, Result};
use candle_core::{Device, Tensor};
use rand::{Rng, SeedableRng};
use std::io::Write;
use std::path::{Path, PathBuf};

pub const MAGIC: &[u8; 8] = b"CMLDTOK1";
pub const HEADER_LEN: usize = 32;

/// A memory-mapped token sequence.
pub struct TokenData {
    pub path: PathBuf,
    map: memmap2::Mmap,
    offset: usize,
    /// Bytes per token: 2 or 4.
    pub width: usize,
    pub len: usize,
    /// The vocabulary size a shard declares (`None` for raw files).
    pub vocab: Option<usize>,
}

impl TokenData {
    /// Opens a shard (by its magic) or, for a name ending in `.u32`, a raw u32 file.
    pub fn open(path: &Path) -> Result<Self> {
        let file = std::fs::File::open(path)
            .with_context(|| format!("cannot open token data {}", path.display()))?;
        // SAFETY: mapped read-only; the trainer never writes its inputs.
        let map = unsafe { memmap2::Mmap::map(&file) }
            .with_context(|| format!("cannot map {}", path.display()))?;
        let (offset, width, len, vocab) = Self::layout(path, &map)?;
        Ok(Self {
            path: path.to_path_buf(),
            map,
            offset,
            width,
            len,
            vocab,
        })
    }

    /// (data offset, bytes per token, token count, declared vocabulary) of a file's bytes.
    fn layout(path: &Path, bytes: &[u8]) -> Result<(usize, usize, usize, Option<usize>)> {
        if bytes.len() >= 8 && &bytes[..8] == MAGIC {
            if bytes.len() < HEADER_LEN {
                bail!("{}: shard header is truncated", path.display());
            }
            let u32_at =
                |i: usize| u32::from_le_bytes([bytes[i], bytes[i + 1], bytes[i + 2], bytes[i + 3]]);
            let (version, width, vocab) = (u32_at(8), u32_at(12) as usize, u32_at(16) as usize);
            let mut n = [0u8; 8];
            n.copy_from_slice(&bytes[24..32]);
            let count = u64::from_le_bytes(n) as usize;
            if version != 1 {
                bail!(
                    "{}: shard format version {version} is not supported (expected 1)",
                    path.display()
                );
            }
            if width != 2 && width != 4 {
                bail!(
                    "{}: shard header says {width} bytes per token (expected 2 or 4)",
                    path.display()
                );
            }
            // Checked: a damaged count must not wrap around to the file's size.
            let want = (count as u64)
                .checked_mul(width as u64)
                .and_then(|b| b.checked_add(HEADER_LEN as u64));
            if want != Some(bytes.len() as u64) {
                let want = want.map_or("more than 2^64".into(), |w| w.to_string());
                bail!(
                    "{}: shard header promises {count} tokens ({want} bytes) but the file has {} bytes",
                    path.display(),
                    bytes.len()
                );
            }
            if width == 2 && vocab > 65536 {
                bail!(
                    "{}: vocabulary of {vocab} does not fit u16 tokens",
                    path.display()
                );
            }
            return Ok((HEADER_LEN, width, count, Some(vocab)));
        }
        if path.extension().is_some_and(|e| e == "u32") {
            if !bytes.len().is_multiple_of(4) {
                bail!(
                    "{}: raw u32 token file has {} bytes, not a multiple of 4",
                    path.display(),
                    bytes.len()
                );
            }
            let len = bytes.len() / 4;
            return Ok((0, 4, len, None));
        }
        bail!(
            "{}: not a camelid token shard (wrong magic; expected {:?}) and not a raw .u32 file",
            path.display(),
            std::str::from_utf8(MAGIC).unwrap_or("")
        )
    }

    pub fn get(&self, i: usize) -> u32 {
        let o = self.offset + i * self.width;
        let b = &self.map[o..o + self.width];
        if self.width == 2 {
            u16::from_le_bytes([b[0], b[1]]) as u32
        } else {
            u32::from_le_bytes([b[0], b[1], b[2], b[3]])
        }
    }

    /// The largest token id (a full scan).
    pub fn max_token(&self) -> u32 {
        (0..self.len).map(|i| self.get(i)).max().unwrap_or(0)
    }
}

/// Writes a shard with the header above. `vocab` must fit the token width.
pub fn write_shard(path: &Path, tokens: &[u32], width: usize, vocab: usize) -> Result<()> {
    if width == 2 && vocab > 65536 {
        bail!("a vocabulary of {vocab} does not fit u16 tokens; use u32");
    }
    let mut f = std::io::BufWriter::new(
        std::fs::File::create(path).with_context(|| format!("cannot create {}", path.display()))?,
    );
    f.write_all(MAGIC)?;
    for x in [1u32, width as u32, vocab as u32, 0] {
        f.write_all(&x.to_le_bytes())?;
    }
    f.write_all(&(tokens.len() as u64).to_le_bytes())?;
    for &t in tokens {
        if width == 2 {
            f.write_all(&(t as u16).to_le_bytes())?;
        } else {
            f.write_all(&t.to_le_bytes())?;
        }
    }
    f.flush()?;
    Ok(())
}

/// How rows are drawn from the data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Order {
    /// Micro-batch `i`, row `r` starts at `(i·batch + r)·(seq_len + 1)` (wrapping around).
    Sequential,
    /// Uniform random starts, a pure function of (seed, micro-batch index): resuming needs no
    /// generator state.
    Shuffled { seed: u64 },
}

/// Inputs and targets (`[batch, seq_len]` u32) of micro-batch `index`.
pub fn batch(
    data: &TokenData,
    index: u64,
    batch: usize,
    seq_len: usize,
    order: Order,
    device: &Device,
) -> Result<(Tensor, Tensor)> {
    let row = seq_len + 1;
    if data.len < row {
        bail!(
            "{}: {} tokens are fewer than one row of --seq-len + 1 = {row}",
            data.path.display(),
            data.len
        );
    }
    let rows = (data.len / row) as u64;
    let mut rng = rand::rngs::StdRng::seed_from_u64(match order {
        Order::Shuffled { seed } => seed ^ index.wrapping_mul(0x9E37_79B9_7F4A_7C15),
        Order::Sequential => 0,
    });
    let mut inputs = Vec::with_capacity(batch * seq_len);
    let mut targets = Vec::with_capacity(batch * seq_len);
    for r in 0..batch as u64 {
        let start = match order {
            Order::Sequential => ((index * batch as u64 + r) % rows) as usize * row,
            Order::Shuffled { .. } => rng.random_range(0..=data.len - row),
        };
        for j in 0..seq_len {
            inputs.push(data.get(start + j));
            targets.push(data.get(start + j + 1));
        }
    }
    Ok((
        Tensor::from_vec(inputs, (batch, seq_len), device)?,
        Tensor::from_vec(targets, (batch, seq_len), device)?,
    ))
}
