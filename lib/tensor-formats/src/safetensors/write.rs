//! Streaming writer, byte-identical to the reference `serialize` / `safetensors.torch.save_file`.

use std::collections::{BTreeMap, HashSet};
use std::io::{self, Write};

use safetensors::tensor::TensorInfo;
use safetensors::Dtype;
use serde::ser::{Serialize, SerializeMap, Serializer};

use super::{byte_len, MAX_HEADER_LEN};
use crate::dtype::DType;
use crate::error::{FormatError, Result};

/// A tensor to write: its name, dtype and shape. Its bytes are streamed afterwards.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorSpec {
    /// Tensor name (a header key; `__metadata__` is reserved).
    pub name: String,
    /// Element type.
    pub dtype: DType,
    /// Shape (empty for a scalar).
    pub shape: Vec<usize>,
}

/// Writes a safetensors file to `W` as a stream: the header at construction, then each tensor's bytes.
///
/// The layout is exactly the reference's: tensors sorted by dtype descending in the safetensors enum order
/// (`I64, F64, F32, I32, BF16, F16, I16, I8, U8, BOOL` among the dtypes this suite carries) then by name,
/// consecutive offsets from 0, compact JSON with `__metadata__` first, padded with spaces to a multiple of 8.
/// The reference writes the `__metadata__` entries in hash-map order, which changes from run to run; this writer
/// sorts them by key, so its output is deterministic and equal to the reference's whenever the metadata has at
/// most one entry (`{"format": "pt"}`, as transformers writes).
///
/// Feed the tensors in [`order`](Self::order): for each, write exactly its bytes with
/// [`write_tensor_bytes`](Self::write_tensor_bytes) or [`Write`], then call
/// [`finish_tensor`](Self::finish_tensor); end with [`finish`](Self::finish). Nothing is buffered: bytes go
/// straight to `W` (wrap it in a `BufWriter` for small writes). After any error the output is unusable.
#[derive(Debug)]
pub struct SafetensorsWriter<W: Write> {
    inner: W,
    order: Vec<TensorSpec>,
    sizes: Vec<usize>,
    /// Index in `order` of the tensor being written.
    current: usize,
    /// Bytes of the current tensor written so far.
    written: usize,
}

impl<W: Write> SafetensorsWriter<W> {
    /// Orders `tensors`, writes the 8-byte length and the header to `writer`, and returns the writer ready for
    /// the first tensor's bytes.
    ///
    /// Fails on duplicate or reserved names, shapes whose byte size overflows, a header over
    /// [`MAX_HEADER_LEN`](super::MAX_HEADER_LEN), or an I/O error.
    pub fn new(
        mut writer: W,
        mut tensors: Vec<TensorSpec>,
        metadata: Option<BTreeMap<String, String>>,
    ) -> Result<Self> {
        tensors.sort_by(|a, b| {
            reference_dtype(b.dtype)
                .cmp(&reference_dtype(a.dtype))
                .then_with(|| a.name.cmp(&b.name))
        });
        let mut seen = HashSet::new();
        let mut sizes = Vec::with_capacity(tensors.len());
        let mut infos = Vec::with_capacity(tensors.len());
        let mut offset = 0usize;
        for t in &tensors {
            if t.name == "__metadata__" || !seen.insert(t.name.as_str()) {
                return Err(FormatError::Invalid(format!(
                    "cannot write tensor `{}`: the name is {}",
                    t.name,
                    if t.name == "__metadata__" {
                        "reserved for metadata"
                    } else {
                        "used twice"
                    }
                )));
            }
            let Some(size) = byte_len(t.dtype, &t.shape) else {
                return Err(FormatError::Invalid(format!(
                    "cannot write tensor `{}`: shape {:?} of {} is too large: its dimensions times \
                     the element size overflow 64 bits",
                    t.name,
                    t.shape,
                    t.dtype.safetensors_name()
                )));
            };
            let Some(end) = offset.checked_add(size) else {
                return Err(FormatError::Invalid(format!(
                    "cannot write tensor `{}`: the tensors add up to more bytes than 64 bits \
                     can count",
                    t.name
                )));
            };
            sizes.push(size);
            infos.push(TensorInfo {
                dtype: reference_dtype(t.dtype),
                shape: t.shape.clone(),
                data_offsets: (offset, end),
            });
            offset = end;
        }
        let header = Header {
            metadata: metadata.as_ref(),
            tensors: &tensors,
            infos: &infos,
        };
        let mut json = serde_json::to_vec(&header)
            .map_err(|e| FormatError::Invalid(format!("cannot serialize the header: {e}")))?;
        json.resize(json.len().next_multiple_of(8), b' ');
        if json.len() > MAX_HEADER_LEN {
            return Err(FormatError::Invalid(format!(
                "the header would be {} bytes, over the limit of {MAX_HEADER_LEN} that readers \
                 accept",
                json.len()
            )));
        }
        writer.write_all(&(json.len() as u64).to_le_bytes())?;
        writer.write_all(&json)?;
        Ok(SafetensorsWriter {
            inner: writer,
            order: tensors,
            sizes,
            current: 0,
            written: 0,
        })
    }

    /// The tensors in the order their bytes must be written (the order of the file).
    pub fn order(&self) -> &[TensorSpec] {
        &self.order
    }

    /// Writes the next `bytes` of the current tensor. Refuses (writing nothing) if they would run past its end.
    pub fn write_tensor_bytes(&mut self, bytes: &[u8]) -> Result<()> {
        let room = self
            .sizes
            .get(self.current)
            .map_or(0, |size| size - self.written);
        if bytes.len() > room {
            return Err(FormatError::Invalid(match self.order.get(self.current) {
                Some(t) => format!(
                    "tensor `{}` is {} bytes: writing {} more after {} would run past its end",
                    t.name,
                    self.sizes[self.current],
                    bytes.len(),
                    self.written
                ),
                None => format!(
                    "all {} tensors are already written: {} extra bytes",
                    self.order.len(),
                    bytes.len()
                ),
            }));
        }
        self.inner.write_all(bytes)?;
        self.written += bytes.len();
        Ok(())
    }

    /// Checks that the current tensor got all its bytes and moves on to the next one.
    pub fn finish_tensor(&mut self) -> Result<()> {
        let Some(t) = self.order.get(self.current) else {
            return Err(FormatError::Invalid(format!(
                "finish_tensor: all {} tensors are already finished",
                self.order.len()
            )));
        };
        let size = self.sizes[self.current];
        if self.written != size {
            return Err(FormatError::Invalid(format!(
                "tensor `{}` got {} of its {size} bytes",
                t.name, self.written
            )));
        }
        self.current += 1;
        self.written = 0;
        Ok(())
    }

    /// Checks that every tensor was finished, flushes, and returns the inner writer.
    pub fn finish(mut self) -> Result<W> {
        if let Some(t) = self.order.get(self.current) {
            return Err(FormatError::Invalid(format!(
                "only {} of {} tensors were finished; tensor `{}` has {} of its {} bytes",
                self.current,
                self.order.len(),
                t.name,
                self.written,
                self.sizes[self.current]
            )));
        }
        self.inner.flush()?;
        Ok(self.inner)
    }
}

/// Writes go to the current tensor, as [`SafetensorsWriter::write_tensor_bytes`]: all of `buf` or an
/// [`io::ErrorKind::InvalidInput`] error.
impl<W: Write> Write for SafetensorsWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.write_tensor_bytes(buf).map_err(|e| match e {
            FormatError::Stream(e) => e,
            other => io::Error::new(io::ErrorKind::InvalidInput, other),
        })?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// The reference crate's dtype, whose `Ord` is the order its writer sorts by and whose serialization is the
/// header's dtype string.
fn reference_dtype(dtype: DType) -> Dtype {
    match dtype {
        DType::Bool => Dtype::BOOL,
        DType::U8 => Dtype::U8,
        DType::I8 => Dtype::I8,
        DType::I16 => Dtype::I16,
        DType::I32 => Dtype::I32,
        DType::I64 => Dtype::I64,
        DType::F16 => Dtype::F16,
        DType::BF16 => Dtype::BF16,
        DType::F32 => Dtype::F32,
        DType::F64 => Dtype::F64,
    }
}

/// The header object: `__metadata__` first, then the tensors in offset order.
struct Header<'a> {
    metadata: Option<&'a BTreeMap<String, String>>,
    tensors: &'a [TensorSpec],
    infos: &'a [TensorInfo],
}

impl Serialize for Header<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut map = serializer.serialize_map(Some(
            self.tensors.len() + usize::from(self.metadata.is_some()),
        ))?;
        if let Some(metadata) = self.metadata {
            map.serialize_entry("__metadata__", metadata)?;
        }
        for (t, info) in self.tensors.iter().zip(self.infos) {
            map.serialize_entry(&t.name, info)?;
        }
        map.end()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dtype::ALL_DTYPES;
    use crate::safetensors::test_support::{bf16_2x3, mixed, multi, spec, write_to_vec};
    use crate::safetensors::{parse_header, SafetensorsEntry};

    fn invalid_message(result: Result<impl std::fmt::Debug>) -> String {
        match result.unwrap_err() {
            FormatError::Invalid(m) => m,
            other => panic!("expected Invalid, got {other:?}"),
        }
    }

    /// The tensors of a file read back: spec and bytes, in file order.
    fn read_back(bytes: &[u8]) -> Vec<(TensorSpec, Vec<u8>)> {
        let h = parse_header(bytes).unwrap();
        h.tensors()
            .iter()
            .map(
                |SafetensorsEntry {
                     name,
                     dtype,
                     layout,
                     data,
                 }| {
                    (
                        spec(name, *dtype, &layout.shape),
                        bytes[data.clone()].to_vec(),
                    )
                },
            )
            .collect()
    }

    #[test]
    fn reproduces_the_reference_files_byte_for_byte() {
        for (bytes, metadata) in [
            (bf16_2x3(), None),
            (
                mixed(),
                Some(BTreeMap::from([("format".into(), "pt".into())])),
            ),
            (
                multi(),
                Some(BTreeMap::from([("note".into(), "über \"q\"\n".into())])),
            ),
        ] {
            let mut tensors = read_back(&bytes);
            tensors.reverse();
            assert_eq!(write_to_vec(&tensors, metadata), bytes);
        }
        // No tensors: `{}` padded to 8 bytes (the reference's 16-byte empty file).
        assert_eq!(write_to_vec(&[], None), b"\x08\0\0\0\0\0\0\0{}      ");
        // Empty metadata is still written, as the reference does.
        let bytes = write_to_vec(
            &[(spec("x", DType::F32, &[1]), vec![0; 4])],
            Some(BTreeMap::new()),
        );
        assert!(bytes[8..].starts_with(br#"{"__metadata__":{},"x":"#));
    }

    #[test]
    fn orders_by_dtype_descending_then_name() {
        let mut tensors: Vec<_> = ALL_DTYPES
            .iter()
            .map(|&d| spec(d.safetensors_name(), d, &[1]))
            .collect();
        tensors.push(spec("A", DType::BF16, &[]));
        let w = SafetensorsWriter::new(Vec::new(), tensors, None).unwrap();
        let names: Vec<_> = w.order().iter().map(|t| t.name.as_str()).collect();
        assert_eq!(
            names,
            ["I64", "F64", "F32", "I32", "A", "BF16", "F16", "I16", "I8", "U8", "BOOL"]
        );
    }

    #[test]
    fn round_trips_through_the_reader_with_sorted_metadata() {
        let tensors = vec![
            (
                spec("scalar", DType::F64, &[]),
                2.5f64.to_le_bytes().to_vec(),
            ),
            (spec("empty", DType::I32, &[3, 0]), vec![]),
            (spec("m", DType::I16, &[2, 2]), vec![1, 2, 3, 4, 5, 6, 7, 8]),
        ];
        let metadata = BTreeMap::from([("z".into(), "1".into()), ("a".into(), "2".into())]);
        let bytes = write_to_vec(&tensors, Some(metadata.clone()));
        assert_eq!(bytes.len() % 8, 0);
        assert!(bytes[8..].starts_with(br#"{"__metadata__":{"a":"2","z":"1"},"scalar":"#));
        let h = parse_header(&bytes).unwrap();
        assert_eq!(h.metadata(), Some(&metadata));
        let mut expected = tensors.clone();
        expected.sort_by_key(|(s, _)| std::cmp::Reverse(s.dtype.size()));
        assert_eq!(read_back(&bytes), expected);
        assert!(safetensors::SafeTensors::deserialize(&bytes).is_ok());
    }

    #[test]
    fn streams_through_io_write() {
        let tensors = vec![
            spec("a", DType::U8, &[3]),
            spec("b", DType::U8, &[0]),
            spec("c", DType::U8, &[2]),
        ];
        let mut w = SafetensorsWriter::new(Vec::new(), tensors, None).unwrap();
        io::copy(&mut &b"xyz"[..], &mut w).unwrap();
        w.finish_tensor().unwrap();
        w.finish_tensor().unwrap();
        w.write_all(b"p").unwrap();
        w.write_all(b"q").unwrap();
        let err = w.write_all(b"r").unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
        assert_eq!(
            err.to_string(),
            "tensor `c` is 2 bytes: writing 1 more after 2 would run past its end"
        );
        w.finish_tensor().unwrap();
        let bytes = w.finish().unwrap();
        assert_eq!(&bytes[bytes.len() - 5..], b"xyzpq");
    }

    #[test]
    fn refuses_wrong_byte_counts() {
        let new = || {
            SafetensorsWriter::new(
                Vec::new(),
                vec![spec("a", DType::F32, &[2]), spec("b", DType::U8, &[1])],
                None,
            )
            .unwrap()
        };
        let mut w = new();
        w.write_tensor_bytes(&[0; 5]).unwrap();
        assert_eq!(
            invalid_message(w.write_tensor_bytes(&[0; 4])),
            "tensor `a` is 8 bytes: writing 4 more after 5 would run past its end"
        );
        assert_eq!(
            invalid_message(w.finish_tensor()),
            "tensor `a` got 5 of its 8 bytes"
        );
        assert_eq!(
            invalid_message(w.finish()),
            "only 0 of 2 tensors were finished; tensor `a` has 5 of its 8 bytes"
        );

        let mut w = new();
        w.write_tensor_bytes(&[0; 8]).unwrap();
        w.finish_tensor().unwrap();
        w.write_tensor_bytes(&[1]).unwrap();
        w.finish_tensor().unwrap();
        w.write_tensor_bytes(&[]).unwrap();
        assert_eq!(
            invalid_message(w.write_tensor_bytes(&[2])),
            "all 2 tensors are already written: 1 extra bytes"
        );
        assert_eq!(
            invalid_message(w.finish_tensor()),
            "finish_tensor: all 2 tensors are already finished"
        );
        w.finish().unwrap();
    }

    #[test]
    fn refuses_bad_specs() {
        let new = |tensors| SafetensorsWriter::new(Vec::new(), tensors, None);
        assert_eq!(
            invalid_message(new(vec![
                spec("a", DType::U8, &[1]),
                spec("a", DType::F32, &[1])
            ])),
            "cannot write tensor `a`: the name is used twice"
        );
        assert_eq!(
            invalid_message(new(vec![spec("__metadata__", DType::U8, &[1])])),
            "cannot write tensor `__metadata__`: the name is reserved for metadata"
        );
        assert_eq!(
            invalid_message(new(vec![spec("big", DType::F32, &[1 << 62, 0])])),
            "cannot write tensor `big`: shape [4611686018427387904, 0] of F32 is too large: its dimensions times \
             the element size overflow 64 bits"
        );
        let half = usize::MAX / 2 + 1;
        assert!(invalid_message(new(vec![
            spec("a", DType::U8, &[half]),
            spec("b", DType::U8, &[half])
        ]))
        .starts_with("cannot write tensor `b`"));
        let long = "n".repeat(MAX_HEADER_LEN);
        assert_eq!(
            invalid_message(new(vec![spec(&long, DType::U8, &[])])),
            "the header would be 100000056 bytes, over the limit of 100000000 that readers accept"
        );
    }

    #[test]
    fn reports_io_errors() {
        #[derive(Debug)]
        struct Failing;
        impl Write for Failing {
            fn write(&mut self, _: &[u8]) -> io::Result<usize> {
                Err(io::Error::other("disk full"))
            }
            fn flush(&mut self) -> io::Result<()> {
                Ok(())
            }
        }
        let err = SafetensorsWriter::new(Failing, vec![], None).unwrap_err();
        assert!(
            matches!(&err, FormatError::Stream(e) if e.to_string() == "disk full"),
            "{err:?}"
        );
    }
}
