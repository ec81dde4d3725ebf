//! Test vectors written by the reference library, embedded so that tests need no fixture files, and helpers.

use std::collections::BTreeMap;

use super::{SafetensorsWriter, TensorSpec};
use crate::dtype::DType;

/// `header_len` as the 8-byte prefix, then `header`, then `data`.
pub fn safetensors_bytes(header_len: u64, header: &str, data: &[u8]) -> Vec<u8> {
    [&header_len.to_le_bytes()[..], header.as_bytes(), data].concat()
}

/// `vectors/safetensors/bf16_2x3.safetensors` (84 bytes):
/// `save_file({"w": torch.arange(6, dtype=torch.bfloat16).reshape(2, 3)})`.
pub fn bf16_2x3() -> Vec<u8> {
    safetensors_bytes(
        0x40,
        r#"{"w":{"dtype":"BF16","shape":[2,3],"data_offsets":[0,12]}}      "#,
        b"\x00\x00\x80\x3f\x00\x40\x40\x40\x80\x40\xa0\x40",
    )
}

/// `vectors/safetensors/mixed.safetensors` (428 bytes): `save({"i": tensor([1, 2]), "b": ones(3),
/// "e": zeros(0, 4), "w": arange(6, dtype=bfloat16).reshape(2, 3), "s": tensor(3.0, dtype=float16),
/// "flag": tensor([True, False])}, metadata={"format": "pt"})`.
pub fn mixed() -> Vec<u8> {
    safetensors_bytes(
        0x178,
        r#"{"__metadata__":{"format":"pt"},"i":{"dtype":"I64","shape":[2],"data_offsets":[0,16]},"b":{"dtype":"F32","shape":[3],"data_offsets":[16,28]},"e":{"dtype":"F32","shape":[0,4],"data_offsets":[28,28]},"w":{"dtype":"BF16","shape":[2,3],"data_offsets":[28,40]},"s":{"dtype":"F16","shape":[],"data_offsets":[40,42]},"flag":{"dtype":"BOOL","shape":[2],"data_offsets":[42,44]}}       "#,
        b"\x01\x00\x00\x00\x00\x00\x00\x00\x02\x00\x00\x00\x00\x00\x00\x00\x00\x00\x80\x3f\x00\x00\x80\x3f\
          \x00\x00\x80\x3f\x00\x00\x80\x3f\x00\x40\x40\x40\x80\x40\xa0\x40\x00\x42\x01\x00",
    )
}

/// 538 bytes from safetensors 0.8.0 / torch 2.15: `save({"z": tensor([-1, 2], dtype=int8),
/// "u": tensor([200], dtype=uint8), "i16": tensor([[-300], [301]], dtype=int16),
/// "i32": tensor([70000], dtype=int32), "f64": tensor([0.5], dtype=float64),
/// "b": tensor([1.5, -2.0], dtype=bfloat16), "a": tensor([[0.25]], dtype=bfloat16),
/// "café\"\\\x01": tensor([True])}, metadata={"note": "über \"q\"\n"})`.
/// Covers the dtypes `mixed` lacks, name order within a dtype, and JSON escapes.
pub fn multi() -> Vec<u8> {
    safetensors_bytes(
        0x1f8,
        r#"{"__metadata__":{"note":"über \"q\"\n"},"f64":{"dtype":"F64","shape":[1],"data_offsets":[0,8]},"i32":{"dtype":"I32","shape":[1],"data_offsets":[8,12]},"a":{"dtype":"BF16","shape":[1,1],"data_offsets":[12,14]},"b":{"dtype":"BF16","shape":[2],"data_offsets":[14,18]},"i16":{"dtype":"I16","shape":[2,1],"data_offsets":[18,22]},"z":{"dtype":"I8","shape":[2],"data_offsets":[22,24]},"u":{"dtype":"U8","shape":[1],"data_offsets":[24,25]},"café\"\\\u0001":{"dtype":"BOOL","shape":[1],"data_offsets":[25,26]}} "#,
        b"\x00\x00\x00\x00\x00\x00\xe0\x3f\x70\x11\x01\x00\x80\x3e\xc0\x3f\x00\xc0\xd4\xfe\x2d\x01\xff\x02\xc8\x01",
    )
}

/// Shorthand for a [`TensorSpec`].
pub fn spec(name: &str, dtype: DType, shape: &[usize]) -> TensorSpec {
    TensorSpec {
        name: name.into(),
        dtype,
        shape: shape.to_vec(),
    }
}

/// Writes `tensors` (spec and bytes) with [`SafetensorsWriter`], feeding the bytes in the writer's order.
pub fn write_to_vec(
    tensors: &[(TensorSpec, Vec<u8>)],
    metadata: Option<BTreeMap<String, String>>,
) -> Vec<u8> {
    let specs = tensors.iter().map(|(s, _)| s.clone()).collect();
    let mut w = SafetensorsWriter::new(Vec::new(), specs, metadata).unwrap();
    for spec in w.order().to_vec() {
        let (_, bytes) = tensors.iter().find(|(s, _)| *s == spec).unwrap();
        w.write_tensor_bytes(bytes).unwrap();
        w.finish_tensor().unwrap();
    }
    w.finish().unwrap()
}
