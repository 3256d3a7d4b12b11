//! The tensor types `camelid quantize --to` writes, their llama.cpp `general.file_type`
//! numbers, and the fallbacks for rows a block type cannot hold.

use candle_core::quantized::GgmlDType;

/// The target types, in the order the CLI lists them.
pub const TYPES: &[(&str, GgmlDType)] = &[
    ("Q8_0", GgmlDType::Q8_0),
    ("Q4_0", GgmlDType::Q4_0),
    ("Q4_1", GgmlDType::Q4_1),
    ("Q5_0", GgmlDType::Q5_0),
    ("Q5_1", GgmlDType::Q5_1),
    ("Q4_K", GgmlDType::Q4K),
    ("Q5_K", GgmlDType::Q5K),
    ("Q6_K", GgmlDType::Q6K),
    ("F16", GgmlDType::F16),
    ("BF16", GgmlDType::BF16),
    ("F32", GgmlDType::F32),
];

/// Parses a type name (case-insensitive; `Q4_K_S`/`Q4_K_M` style suffixes are not types here).
pub fn parse(name: &str) -> Result<GgmlDType, String> {
    TYPES
        .iter()
        .find(|(n, _)| n.eq_ignore_ascii_case(name))
        .map(|&(_, t)| t)
        .ok_or_else(|| format!("unknown type \"{name}\" (valid types: {})", type_list()))
}

pub fn type_list() -> String {
    TYPES.iter().map(|(n, _)| *n).collect::<Vec<_>>().join(", ")
}

pub fn name(t: GgmlDType) -> &'static str {
    match t {
        GgmlDType::Q8_0 => "Q8_0",
        GgmlDType::Q8_1 => "Q8_1",
        GgmlDType::Q4_0 => "Q4_0",
        GgmlDType::Q4_1 => "Q4_1",
        GgmlDType::Q5_0 => "Q5_0",
        GgmlDType::Q5_1 => "Q5_1",
        GgmlDType::Q2K => "Q2_K",
        GgmlDType::Q3K => "Q3_K",
        GgmlDType::Q4K => "Q4_K",
        GgmlDType::Q5K => "Q5_K",
        GgmlDType::Q6K => "Q6_K",
        GgmlDType::Q8K => "Q8_K",
        GgmlDType::F16 => "F16",
        GgmlDType::BF16 => "BF16",
        GgmlDType::F32 => "F32",
    }
}

/// True for the types whose values are blocks with scales (everything but F32/F16/BF16).
pub fn is_quantized(t: GgmlDType) -> bool {
    !matches!(t, GgmlDType::F32 | GgmlDType::F16 | GgmlDType::BF16)
}

/// llama.cpp's `llama_ftype` for a file whose weights are mostly `t` (`general.file_type`).
/// A uniform K-quant file is what llama.cpp calls the `_S` variant.
pub fn file_type(t: GgmlDType) -> u32 {
    match t {
        GgmlDType::F32 => 0,
        GgmlDType::F16 => 1,
        GgmlDType::Q4_0 => 2,
        GgmlDType::Q4_1 => 3,
        GgmlDType::Q8_0 => 7,
        GgmlDType::Q5_0 => 8,
        GgmlDType::Q5_1 => 9,
        GgmlDType::Q2K => 10,
        GgmlDType::Q3K => 11,
        GgmlDType::Q4K => 14,
        GgmlDType::Q5K => 16,
        GgmlDType::Q6K => 18,
        GgmlDType::BF16 => 32,
        // Not file types llama.cpp names; the CLI never writes these as targets.
        GgmlDType::Q8_1 | GgmlDType::Q8K => 7,
    }
}

/// llama.cpp's mixed K-quant file types: a base type, with some tensors one or two steps up by
/// `llama-quant.cpp`'s per-tensor rules ([`Mix::tensor_type`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mix {
    Q4KS,
    Q4KM,
    Q5KS,
    Q5KM,
}

pub const MIXES: &[(&str, Mix)] = &[
    ("Q4_K_M", Mix::Q4KM),
    ("Q5_K_M", Mix::Q5KM),
    ("Q4_K_S", Mix::Q4KS),
    ("Q5_K_S", Mix::Q5KS),
];

/// Where a tensor sits, as the mixed types' rules ask.
pub struct TensorPlace<'a> {
    pub name: &'a str,
    /// Row length (GGUF `ne[0]`).
    pub cols: usize,
    /// The architecture (Falcon has rules of its own).
    pub arch: &'a str,
    /// The file has no `output.weight` (the token embedding is the head).
    pub tied: bool,
    /// Which attention-value tensor (`attn_v`, `attn_qkv`) this is, in file order, of how many.
    pub attn_v: (usize, usize),
    /// Which `ffn_down` this is, in file order, of how many layers.
    pub ffn_down: (usize, usize),
    /// llama.cpp's `LLM_TYPE_70B` (LLaMA with 80 layers and grouped KV heads), whose attention
    /// values are raised from Q4_K to Q5_K.
    pub llama_70b: bool,
}

impl Mix {
    pub fn name(self) -> &'static str {
        MIXES.iter().find(|m| m.1 == self).map_or("", |m| m.0)
    }

    /// The type of everything no rule raises.
    pub fn base(self) -> GgmlDType {
        match self {
            Mix::Q4KS | Mix::Q4KM => GgmlDType::Q4K,
            Mix::Q5KS | Mix::Q5KM => GgmlDType::Q5K,
        }
    }

    /// llama.cpp's `llama_ftype`.
    pub fn file_type(self) -> u32 {
        match self {
            Mix::Q4KS => 14,
            Mix::Q4KM => 15,
            Mix::Q5KS => 16,
            Mix::Q5KM => 17,
        }
    }

    /// `llama_tensor_get_type` for a tensor that may be quantized (before the row-length
    /// fallback [`fit`]): the head (or a tied embedding) at Q6_K (Q8_0 for Falcon or rows not a
    /// multiple of 256); attention values (`attn_v`, `attn_qkv`) and `ffn_down` raised to Q6_K
    /// in the layers `use_more_bits` picks for the `_M` types; Q4_K_S raises the first four
    /// attention values and the first eighth of `ffn_down` to Q5_K; Falcon's Q4_K_M `ffn_down`
    /// follows its own ladder.
    pub fn tensor_type(self, t: &TensorPlace) -> GgmlDType {
        let more_bits = |i: usize, n: usize| {
            i < n / 8 || i >= 7 * n / 8 || (i as i64 - (n / 8) as i64) % 3 == 2
        };
        let falcon = t.arch == "falcon";
        let name = t.name;
        let base = self.base();
        if name == "output.weight" || (t.tied && name == "token_embd.weight") {
            return if falcon || !t.cols.is_multiple_of(256) {
                GgmlDType::Q8_0
            } else {
                GgmlDType::Q6K
            };
        }
        if name == "token_embd.weight" {
            return base;
        }
        if name.contains("attn_qkv.weight") || name.contains("attn_v.weight") {
            let (i, n) = t.attn_v;
            let ty = match self {
                Mix::Q4KM | Mix::Q5KM if more_bits(i, n) => GgmlDType::Q6K,
                Mix::Q4KS if i < 4 => GgmlDType::Q5K,
                _ => base,
            };
            return if t.llama_70b && ty == GgmlDType::Q4K {
                GgmlDType::Q5K
            } else {
                ty
            };
        }
        // llama.cpp tests `ffn_up` and `ffn_gate` first (they keep the base type).
        if name.contains("ffn_up") || name.contains("ffn_gate") || !name.contains("ffn_down") {
            return base;
        }
        let (i, n) = t.ffn_down;
        match self {
            Mix::Q4KM if falcon => {
                if i < n / 16 {
                    GgmlDType::Q6K
                } else if more_bits(i, n) {
                    GgmlDType::Q5K
                } else {
                    GgmlDType::Q4K
                }
            }
            Mix::Q4KM | Mix::Q5KM if more_bits(i, n) => GgmlDType::Q6K,
            Mix::Q4KS if !falcon && i < n / 8 => GgmlDType::Q5K,
            _ => base,
        }
    }
}

/// Parses a `--to` target: a type ([`TYPES`]) or a mixed file type ([`MIXES`]).
pub fn parse_target(name: &str) -> Result<(GgmlDType, Option<Mix>), String> {
    if let Some(&(_, m)) = MIXES.iter().find(|(n, _)| n.eq_ignore_ascii_case(name)) {
        return Ok((m.base(), Some(m)));
    }
    parse(name).map(|t| (t, None)).map_err(|_| {
        format!(
            "unknown type \"{name}\" (valid types: {}, {})",
            type_list(),
            MIXES.iter().map(|m| m.0).collect::<Vec<_>>().join(", ")
        )
    })
}

/// The type a row of `cols` values is written in when `want` cannot hold it: llama.cpp's rule
/// (`llama-quant.cpp`): K-quants (blocks of 256) fall back to the 32-block type of the same
/// quality (Q4_K → Q5_0, Q5_K → Q5_1, Q6_K → Q8_0), anything else to F16.
pub fn fit(want: GgmlDType, cols: usize) -> GgmlDType {
    if cols.is_multiple_of(want.block_size()) {
        return want;
    }
    let next = match want {
        GgmlDType::Q2K | GgmlDType::Q3K | GgmlDType::Q4K => GgmlDType::Q5_0,
        GgmlDType::Q5K => GgmlDType::Q5_1,
        GgmlDType::Q6K => GgmlDType::Q8_0,
        _ => GgmlDType::F16,
    };
    if cols.is_multiple_of(next.block_size()) {
        next
    } else {
        GgmlDType::F16
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_and_list() {
        assert_eq!(parse("q4_k").unwrap(), GgmlDType::Q4K);
        assert_eq!(parse("BF16").unwrap(), GgmlDType::BF16);
        let e = parse("Q3_X").unwrap_err();
        assert!(e.contains("Q3_X") && e.contains("Q8_0, Q4_0"), "{e}");
    }

    #[test]
    fn mixes_follow_llama_quant() {
        assert_eq!(
            parse_target("q4_k_m").unwrap(),
            (GgmlDType::Q4K, Some(Mix::Q4KM))
        );
        assert!(parse_target("Q4_K_X").unwrap_err().contains("Q5_K_M"));
        let place = |name, i, n| TensorPlace {
            name,
            cols: 4096,
            arch: "llama",
            tied: false,
            attn_v: (i, n),
            ffn_down: (i, n),
            llama_70b: false,
        };
        // 32 layers: use_more_bits picks 0..4, 28..32 and every third from 6.
        let more: Vec<usize> = (0..32)
            .filter(|&i| {
                Mix::Q4KM.tensor_type(&place("blk.x.attn_v.weight", i, 32)) == GgmlDType::Q6K
            })
            .collect();
        assert_eq!(
            more,
            vec![0, 1, 2, 3, 6, 9, 12, 15, 18, 21, 24, 27, 28, 29, 30, 31]
        );
        assert_eq!(
            Mix::Q4KM.tensor_type(&place("blk.5.ffn_down.weight", 5, 32)),
            GgmlDType::Q4K
        );
        assert_eq!(
            Mix::Q5KM.tensor_type(&place("blk.6.ffn_down.weight", 6, 32)),
            GgmlDType::Q6K
        );
        assert_eq!(
            Mix::Q4KS.tensor_type(&place("blk.3.attn_v.weight", 3, 32)),
            GgmlDType::Q5K
        );
        assert_eq!(
            Mix::Q4KS.tensor_type(&place("blk.4.attn_v.weight", 4, 32)),
            GgmlDType::Q4K
        );
        assert_eq!(
            Mix::Q4KM.tensor_type(&place("output.weight", 0, 32)),
            GgmlDType::Q6K
        );
        assert_eq!(
            Mix::Q4KM.tensor_type(&place("token_embd.weight", 0, 32)),
            GgmlDType::Q4K
        );
        assert_eq!(
            Mix::Q4KM.tensor_type(&place("blk.0.ffn_up.weight", 0, 32)),
            GgmlDType::Q4K
        );
    }

    #[test]
    fn fallbacks_follow_llama_cpp() {
        assert_eq!(fit(GgmlDType::Q4K, 4096), GgmlDType::Q4K);
        assert_eq!(fit(GgmlDType::Q4K, 96), GgmlDType::Q5_0);
        assert_eq!(fit(GgmlDType::Q5K, 96), GgmlDType::Q5_1);
        assert_eq!(fit(GgmlDType::Q6K, 96), GgmlDType::Q8_0);
        assert_eq!(fit(GgmlDType::Q6K, 100), GgmlDType::F16);
        assert_eq!(fit(GgmlDType::Q8_0, 100), GgmlDType::F16);
        assert_eq!(fit(GgmlDType::F16, 7), GgmlDType::F16);
    }
}
