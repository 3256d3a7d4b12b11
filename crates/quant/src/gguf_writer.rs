//! A streaming GGUF (version 3) writer, laid out as llama.cpp's `gguf_write_to_file` lays out
//! a file: header, metadata, tensor infos, padding to `general.alignment`, then each tensor's
//! bytes padded to the alignment. The header is written first from the tensor types and shapes
//! alone, so tensors can be quantized and written one at a time.

use candle_core::quantized::gguf_file::Value;
use candle_core::quantized::GgmlDType;
use std::io::{self, Write};

pub const GGUF_MAGIC: u32 = 0x4655_4747; // "GGUF" read as a little-endian u32
pub const GGUF_VERSION: u32 = 3;
pub const DEFAULT_ALIGNMENT: u64 = 32;

/// A tensor as the header describes it.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorInfo {
    pub name: String,
    /// Row-major dimensions, outermost first (candle's order; GGUF stores them reversed).
    pub dims: Vec<usize>,
    pub dtype: GgmlDType,
}

impl TensorInfo {
    /// Bytes of the tensor's data (whole blocks).
    pub fn nbytes(&self) -> u64 {
        let elems: usize = self.dims.iter().product();
        (elems / self.dtype.block_size() * self.dtype.type_size()) as u64
    }
}

pub struct GgufWriter<W: Write> {
    w: W,
    pos: u64,
    alignment: u64,
    pending: std::collections::VecDeque<TensorInfo>,
}

/// GGUF's value type ids (`gguf_type` in ggml's `gguf.h`).
fn value_type(v: &Value) -> u32 {
    match v {
        Value::U8(_) => 0,
        Value::I8(_) => 1,
        Value::U16(_) => 2,
        Value::I16(_) => 3,
        Value::U32(_) => 4,
        Value::I32(_) => 5,
        Value::F32(_) => 6,
        Value::Bool(_) => 7,
        Value::String(_) => 8,
        Value::Array(_) => 9,
        Value::U64(_) => 10,
        Value::I64(_) => 11,
        Value::F64(_) => 12,
    }
}

/// ggml's tensor type ids (`ggml_type` in `ggml.h`).
pub fn ggml_type_id(t: GgmlDType) -> u32 {
    match t {
        GgmlDType::F32 => 0,
        GgmlDType::F16 => 1,
        GgmlDType::Q4_0 => 2,
        GgmlDType::Q4_1 => 3,
        GgmlDType::Q5_0 => 6,
        GgmlDType::Q5_1 => 7,
        GgmlDType::Q8_0 => 8,
        GgmlDType::Q8_1 => 9,
        GgmlDType::Q2K => 10,
        GgmlDType::Q3K => 11,
        GgmlDType::Q4K => 12,
        GgmlDType::Q5K => 13,
        GgmlDType::Q6K => 14,
        GgmlDType::Q8K => 15,
        GgmlDType::BF16 => 30,
    }
}

impl<W: Write> GgufWriter<W> {
    /// Writes the header, the metadata (in the order given) and the tensor infos. The caller
    /// then passes every tensor's bytes, in the same order, to [`GgufWriter::write_tensor`].
    pub fn new(
        w: W,
        metadata: &[(String, Value)],
        tensors: &[TensorInfo],
        alignment: u64,
    ) -> io::Result<Self> {
        if alignment == 0 || !alignment.is_power_of_two() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("alignment {alignment} is not a power of two"),
            ));
        }
        let mut me = Self {
            w,
            pos: 0,
            alignment,
            pending: tensors.iter().cloned().collect(),
        };
        me.u32(GGUF_MAGIC)?;
        me.u32(GGUF_VERSION)?;
        me.u64(tensors.len() as u64)?;
        me.u64(metadata.len() as u64)?;
        for (key, value) in metadata {
            me.string(key)?;
            me.u32(value_type(value))?;
            me.value(value)?;
        }
        let mut offset = 0u64;
        for t in tensors {
            me.string(&t.name)?;
            me.u32(t.dims.len() as u32)?;
            for &d in t.dims.iter().rev() {
                me.u64(d as u64)?;
            }
            me.u32(ggml_type_id(t.dtype))?;
            me.u64(offset)?;
            offset += t.nbytes().next_multiple_of(alignment);
        }
        me.pad()?;
        Ok(me)
    }

    /// Writes the next tensor's bytes (checked against the header) and its padding.
    pub fn write_tensor(&mut self, name: &str, bytes: &[u8]) -> io::Result<()> {
        let Some(info) = self.pending.front() else {
            return Err(io::Error::other(format!(
                "tensor {name}: the header lists no more tensors"
            )));
        };
        if info.name != name || info.nbytes() != bytes.len() as u64 {
            return Err(io::Error::other(format!(
                "tensor {name} ({} bytes) does not match the header's next tensor {} ({} bytes)",
                bytes.len(),
                info.name,
                info.nbytes()
            )));
        }
        self.pending.pop_front();
        self.bytes(bytes)?;
        self.pad()
    }

    /// Checks every tensor was written and returns the inner writer.
    pub fn finish(mut self) -> io::Result<W> {
        if let Some(t) = self.pending.front() {
            return Err(io::Error::other(format!(
                "tensor {} was never written",
                t.name
            )));
        }
        self.w.flush()?;
        Ok(self.w)
    }

    fn pad(&mut self) -> io::Result<()> {
        let n = self.pos.next_multiple_of(self.alignment) - self.pos;
        self.bytes(&vec![0u8; n as usize])
    }

    fn bytes(&mut self, b: &[u8]) -> io::Result<()> {
        self.w.write_all(b)?;
        self.pos += b.len() as u64;
        Ok(())
    }

    fn u32(&mut self, v: u32) -> io::Result<()> {
        self.bytes(&v.to_le_bytes())
    }

    fn u64(&mut self, v: u64) -> io::Result<()> {
        self.bytes(&v.to_le_bytes())
    }

    fn string(&mut self, s: &str) -> io::Result<()> {
        self.u64(s.len() as u64)?;
        self.bytes(s.as_bytes())
    }

    fn value(&mut self, v: &Value) -> io::Result<()> {
        match v {
            Value::U8(x) => self.bytes(&x.to_le_bytes()),
            Value::I8(x) => self.bytes(&x.to_le_bytes()),
            Value::U16(x) => self.bytes(&x.to_le_bytes()),
            Value::I16(x) => self.bytes(&x.to_le_bytes()),
            Value::U32(x) => self.bytes(&x.to_le_bytes()),
            Value::I32(x) => self.bytes(&x.to_le_bytes()),
            Value::U64(x) => self.bytes(&x.to_le_bytes()),
            Value::I64(x) => self.bytes(&x.to_le_bytes()),
            Value::F32(x) => self.bytes(&x.to_le_bytes()),
            Value::F64(x) => self.bytes(&x.to_le_bytes()),
            Value::Bool(x) => self.bytes(&[u8::from(*x)]),
            Value::String(s) => self.string(s),
            Value::Array(items) => {
                // GGUF arrays hold one element type; an empty one is written as u32 (readers
                // accept any type for an empty array).
                let elem = items.first().map(value_type).unwrap_or(4);
                if items.iter().any(|x| value_type(x) != elem) {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidInput,
                        "GGUF arrays must hold one element type",
                    ));
                }
                self.u32(elem)?;
                self.u64(items.len() as u64)?;
                for x in items {
                    self.value(x)?;
                }
                Ok(())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::quantized::gguf_file;

    #[test]
    fn candle_reads_what_we_write() {
        let meta = vec![
            (
                "general.architecture".to_string(),
                Value::String("llama".into()),
            ),
            ("general.alignment".to_string(), Value::U32(32)),
            (
                "tokenizer.ggml.tokens".to_string(),
                Value::Array(vec![Value::String("a".into()), Value::String("b".into())]),
            ),
        ];
        let infos = vec![
            TensorInfo {
                name: "x".into(),
                dims: vec![3],
                dtype: GgmlDType::F32,
            },
            TensorInfo {
                name: "y".into(),
                dims: vec![2, 32],
                dtype: GgmlDType::Q8_0,
            },
        ];
        let mut w = GgufWriter::new(Vec::new(), &meta, &infos, 32).unwrap();
        let x: Vec<u8> = [1f32, 2., 3.]
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect();
        w.write_tensor("x", &x).unwrap();
        assert!(w.write_tensor("z", &[0u8; 68]).is_err());
        w.write_tensor("y", &[0u8; 68]).unwrap();
        let buf = w.finish().unwrap();
        assert_eq!(buf.len() % 32, 0);
        let mut cur = std::io::Cursor::new(&buf);
        let c = gguf_file::Content::read(&mut cur).unwrap();
        assert_eq!(c.tensor_infos["y"].shape.dims(), &[2, 32]);
        assert_eq!(c.tensor_infos["y"].offset, 32);
        let t = c.tensor(&mut cur, "x", &candle_core::Device::Cpu).unwrap();
        let v: Vec<f32> = t
            .dequantize(&candle_core::Device::Cpu)
            .unwrap()
            .to_vec1()
            .unwrap();
        assert_eq!(v, vec![1., 2., 3.]);
    }
}
