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
