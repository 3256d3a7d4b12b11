//! SentencePiece `tokenizer.model` reader: a minimal protobuf wire-format decoder for the few
//! fields of `sentencepiece.ModelProto` a LLaMA-style tokenizer needs.
//!
//! ```text
//! message ModelProto {
//!   repeated SentencePiece pieces = 1;   // {1: piece string, 2: score float, 3: type enum}
//!   optional TrainerSpec trainer_spec = 2;       // {3: model_type, 35: byte_fallback,
//!                                                //  40: unk_id, 41: bos_id, 42: eos_id, 43: pad_id}
//!   optional NormalizerSpec normalizer_spec = 3; // {3: add_dummy_prefix, 4: remove_extra_whitespaces}
//! }
//! ```

use super::vocab::{LlamaVocab, TokType, VocabModel};
use crate::error::{ModelError, Result};
use std::path::Path;

/// Wire types of the protobuf encoding.
const WIRE_VARINT: u8 = 0;
const WIRE_FIXED64: u8 = 1;
const WIRE_LEN: u8 = 2;
const WIRE_FIXED32: u8 = 5;

/// A cursor over one protobuf message.
struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn new(buf: &'a [u8]) -> Self {
        Self { buf, pos: 0 }
    }

    fn at_end(&self) -> bool {
        self.pos >= self.buf.len()
    }

    fn varint(&mut self) -> Result<u64, String> {
        let mut value: u64 = 0;
        for i in 0..10 {
            let byte = *self
                .buf
                .get(self.pos)
                .ok_or_else(|| format!("truncated varint at byte {}", self.pos))?;
            self.pos += 1;
            value |= u64::from(byte & 0x7f) << (7 * i);
            if byte & 0x80 == 0 {
                return Ok(value);
            }
        }
        Err(format!("varint longer than 10 bytes at byte {}", self.pos))
    }

    fn bytes(&mut self, n: usize) -> Result<&'a [u8], String> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|&e| e <= self.buf.len())
            .ok_or_else(|| {
                format!(
                    "field of {n} bytes at byte {} runs past the end of its message ({} bytes)",
                    self.pos,
                    self.buf.len()
                )
            })?;
        let out = &self.buf[self.pos..end];
        self.pos = end;
        Ok(out)
    }

    fn len_delimited(&mut self) -> Result<&'a [u8], String> {
        let n = self.varint()?;
        let n = usize::try_from(n).map_err(|_| format!("length {n} too large"))?;
        self.bytes(n)
    }

    fn fixed32(&mut self) -> Result<u32, String> {
        let b = self.bytes(4)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }

    /// Reads a field key: (field number, wire type).
    fn key(&mut self) -> Result<(u64, u8), String> {
        let k = self.varint()?;
        Ok((k >> 3, (k & 7) as u8))
    }

    fn skip(&mut self, wire: u8) -> Result<(), String> {
        match wire {
            WIRE_VARINT => self.varint().map(|_| ()),
            WIRE_FIXED64 => self.bytes(8).map(|_| ()),
            WIRE_LEN => self.len_delimited().map(|_| ()),
            WIRE_FIXED32 => self.bytes(4).map(|_| ()),
            other => Err(format!("unsupported protobuf wire type {other}")),
        }
    }
}

/// Expects `wire` for `field`, naming both on mismatch.
fn expect_wire(what: &str, wire: u8, expected: u8) -> Result<(), String> {
    if wire == expected {
        Ok(())
    } else {
        Err(format!("{what} has wire type {wire}, expected {expected}"))
    }
}

struct Piece {
    piece: String,
    score: f32,
    kind: i64,
}

fn parse_piece(buf: &[u8], index: usize) -> Result<Piece, String> {
    let mut r = Reader::new(buf);
    let mut p = Piece {
        piece: String::new(),
        score: 0.0,
        kind: 1,
    };
    while !r.at_end() {
        let (field, wire) = r.key()?;
        match field {
            1 => {
                expect_wire("SentencePiece.piece", wire, WIRE_LEN)?;
                let b = r.len_delimited()?;
                p.piece = String::from_utf8(b.to_vec())
                    .map_err(|_| format!("piece {index} is not valid UTF-8"))?;
            }
            2 => {
                expect_wire("SentencePiece.score", wire, WIRE_FIXED32)?;
                p.score = f32::from_bits(r.fixed32()?);
            }
            3 => {
                expect_wire("SentencePiece.type", wire, WIRE_VARINT)?;
                p.kind = r.varint()? as i64;
            }
            _ => r.skip(wire)?,
        }
    }
    Ok(p)
}

struct TrainerSpec {
    model_type: i64,
    byte_fallback: bool,
    unk_id: i32,
    bos_id: i32,
    eos_id: i32,
    pad_id: i32,
}

fn parse_trainer_spec(buf: &[u8]) -> Result<TrainerSpec, String> {
    let mut t = TrainerSpec {
        model_type: 1,
        byte_fallback: false,
        unk_id: 0,
        bos_id: 1,
        eos_id: 2,
        pad_id: -1,
    };
    let mut r = Reader::new(buf);
    while !r.at_end() {
        let (field, wire) = r.key()?;
        // int32 fields are varints holding the two's complement 64-bit value.
        let int32 = |r: &mut Reader, name: &str| -> Result<i32, String> {
            expect_wire(name, wire, WIRE_VARINT)?;
            Ok(r.varint()? as i64 as i32)
        };
        match field {
            3 => t.model_type = int32(&mut r, "TrainerSpec.model_type")? as i64,
            35 => t.byte_fallback = int32(&mut r, "TrainerSpec.byte_fallback")? != 0,
            40 => t.unk_id = int32(&mut r, "TrainerSpec.unk_id")?,
            41 => t.bos_id = int32(&mut r, "TrainerSpec.bos_id")?,
            42 => t.eos_id = int32(&mut r, "TrainerSpec.eos_id")?,
            43 => t.pad_id = int32(&mut r, "TrainerSpec.pad_id")?,
            _ => r.skip(wire)?,
        }
    }
    Ok(t)
}

struct NormalizerSpec {
    add_dummy_prefix: bool,
    remove_extra_whitespaces: bool,
}

fn parse_normalizer_spec(buf: &[u8]) -> Result<NormalizerSpec, String> {
    let mut n = NormalizerSpec {
        add_dummy_prefix: true,
        remove_extra_whitespaces: true,
    };
    let mut r = Reader::new(buf);
    while !r.at_end() {
        let (field, wire) = r.key()?;
        match field {
            3 => {
                expect_wire("NormalizerSpec.add_dummy_prefix", wire, WIRE_VARINT)?;
                n.add_dummy_prefix = r.varint()? != 0;
            }
            4 => {
                expect_wire("NormalizerSpec.remove_extra_whitespaces", wire, WIRE_VARINT)?;
                n.remove_extra_whitespaces = r.varint()? != 0;
            }
            _ => r.skip(wire)?,
        }
    }
    Ok(n)
}

/// What the reader found in a `tokenizer.model`.
pub(crate) struct SentencePieceModel {
    pub vocab: LlamaVocab,
    /// SentencePiece's own normalizer would collapse runs of whitespace; llama.cpp does not,
    /// and neither does camelid. Kept for diagnostics.
    #[allow(dead_code)]
    pub remove_extra_whitespaces: bool,
}

fn parse_model(bytes: &[u8]) -> Result<SentencePieceModel, String> {
    let mut r = Reader::new(bytes);
    let mut pieces = Vec::new();
    let mut trainer = None;
    let mut normalizer = None;
    while !r.at_end() {
        let (field, wire) = r.key()?;
        match field {
            1 => {
                expect_wire("ModelProto.pieces", wire, WIRE_LEN)?;
                let b = r.len_delimited()?;
                pieces.push(parse_piece(b, pieces.len())?);
            }
            2 => {
                expect_wire("ModelProto.trainer_spec", wire, WIRE_LEN)?;
                trainer = Some(parse_trainer_spec(r.len_delimited()?)?);
            }
            3 => {
                expect_wire("ModelProto.normalizer_spec", wire, WIRE_LEN)?;
                normalizer = Some(parse_normalizer_spec(r.len_delimited()?)?);
            }
            _ => r.skip(wire)?,
        }
    }
    if pieces.is_empty() {
        return Err("no pieces (is this a SentencePiece model file?)".into());
    }
    let trainer = trainer.unwrap_or(TrainerSpec {
        model_type: 1,
        byte_fallback: false,
        unk_id: 0,
        bos_id: 1,
        eos_id: 2,
        pad_id: -1,
    });
    match trainer.model_type {
        2 => {}
        1 => {
            return Err(
                "unsupported SentencePiece model type UNIGRAM (camelid reads BPE models, \
                        as used by LLaMA-1/2, Mistral and Gemma)"
                    .into(),
            )
        }
        3 => return Err("unsupported SentencePiece model type WORD".into()),
        4 => return Err("unsupported SentencePiece model type CHAR".into()),
        other => return Err(format!("unknown SentencePiece model type {other}")),
    }
    let normalizer = normalizer.unwrap_or(NormalizerSpec {
        add_dummy_prefix: true,
        remove_extra_whitespaces: true,
    });

    let n = pieces.len();
    let mut tokens = Vec::with_capacity(n);
    let mut scores = Vec::with_capacity(n);
    let mut types = Vec::with_capacity(n);
    for (i, p) in pieces.into_iter().enumerate() {
        let kind = match p.kind {
            1 => TokType::Normal,
            2 => TokType::Unknown,
            3 => TokType::Control,
            4 => TokType::UserDefined,
            5 => TokType::Unused,
            6 => TokType::Byte,
            _ => TokType::Undefined,
        };
        let text = if p.piece.is_empty() {
            format!("[EMPTY_{i}]")
        } else {
            p.piece
        };
        tokens.push(text);
        scores.push(p.score);
        types.push(kind);
    }
    let id = |v: i32| -> Option<u32> { u32::try_from(v).ok().filter(|&v| (v as usize) < n) };
    // The ids the trainer names, falling back to the usual piece names.
    let find = |name: &str| tokens.iter().position(|t| t == name).map(|i| i as u32);
    let bos = id(trainer.bos_id).or_else(|| find("<s>"));
    let eos = id(trainer.eos_id).or_else(|| find("</s>"));
    let unk = id(trainer.unk_id);
    let pad = id(trainer.pad_id);
    // `byte_fallback` only decides whether unknown characters become <0xXX> pieces; the
    // pieces are looked up either way, as llama.cpp does.
    let _ = trainer.byte_fallback;
    let vocab = LlamaVocab {
        tokens,
        scores,
        types,
        model: VocabModel::Spm {
            add_space_prefix: normalizer.add_dummy_prefix,
        },
        bos,
        eos,
        extra_eos: Vec::new(),
        unk,
        pad,
        add_bos: true,
    };
    Ok(SentencePieceModel {
        vocab,
        remove_extra_whitespaces: normalizer.remove_extra_whitespaces,
    })
}

/// Reads and decodes a SentencePiece model file.
pub(crate) fn read(path: &Path) -> Result<SentencePieceModel> {
    let bytes = std::fs::read(path).map_err(|e| ModelError::io(path, e))?;
    parse_model(&bytes).map_err(|m| {
        ModelError::tokenizer(path, format!("not a readable SentencePiece model: {m}"))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn varint(mut v: u64, out: &mut Vec<u8>) {
        loop {
            let b = (v & 0x7f) as u8;
            v >>= 7;
            if v == 0 {
                out.push(b);
                break;
            }
            out.push(b | 0x80);
        }
    }

    fn field_len(field: u64, payload: &[u8], out: &mut Vec<u8>) {
        varint(field << 3 | 2, out);
        varint(payload.len() as u64, out);
        out.extend_from_slice(payload);
    }

    fn piece(text: &str, score: f32, kind: u64) -> Vec<u8> {
        let mut p = Vec::new();
        field_len(1, text.as_bytes(), &mut p);
        varint(2 << 3 | 5, &mut p);
        p.extend_from_slice(&score.to_le_bytes());
        varint(3 << 3, &mut p);
        varint(kind, &mut p);
        p
    }

    #[test]
    fn parses_pieces_and_specs() {
        let mut m = Vec::new();
        field_len(1, &piece("<unk>", 0.0, 2), &mut m);
        field_len(1, &piece("<s>", 0.0, 3), &mut m);
        field_len(1, &piece("</s>", 0.0, 3), &mut m);
        field_len(1, &piece("▁a", -1.5, 1), &mut m);
        let mut t = Vec::new();
        varint(3 << 3, &mut t);
        varint(2, &mut t); // BPE
        varint(43 << 3, &mut t);
        varint(u64::MAX, &mut t); // pad_id = -1
        field_len(2, &t, &mut m);
        let mut n = Vec::new();
        varint(3 << 3, &mut n);
        varint(0, &mut n);
        field_len(3, &n, &mut m);
        let sp = parse_model(&m).expect("parses");
        assert_eq!(sp.vocab.tokens, vec!["<unk>", "<s>", "</s>", "▁a"]);
        assert_eq!(sp.vocab.scores[3], -1.5);
        assert_eq!(sp.vocab.bos, Some(1));
        assert_eq!(sp.vocab.eos, Some(2));
        assert_eq!(sp.vocab.pad, None);
        assert!(matches!(
            sp.vocab.model,
            VocabModel::Spm {
                add_space_prefix: false
            }
        ));
    }

    #[test]
    fn truncated_input_is_an_error() {
        let mut m = Vec::new();
        field_len(1, &piece("abc", 0.0, 1), &mut m);
        m.truncate(m.len() - 3);
        assert!(parse_model(&m).is_err());
        assert!(parse_model(&[0xff; 12]).is_err());
    }
}
