//! safetensors: single files read through mmap, Hugging Face index-sharded checkpoints, a streaming
//! writer byte-identical to the reference library, and the Hugging Face sharding rule and index file.
//!
//! Format (`specs/torch-pt-format.md` §10): `u64` little-endian header length `N`, `N` bytes of UTF-8 JSON
//! (`{"__metadata__": {str: str}, "<name>": {"dtype", "shape", "data_offsets": [begin, end]}, ...}`), then the
//! tensors' bytes back to back. Offsets are relative to the end of the header.
//!
//! * [`SafetensorsFile`] maps a file and validates its header with [`parse_header`], which works on any byte
//!   slice and never panics (see [`fuzz_parse`]).
//! * [`ShardedCheckpoint`] opens a checkpoint directory (`model.safetensors.index.json` plus shards, or a single
//!   file) and finds every tensor in its shard.
//! * [`SafetensorsWriter`] writes the header up front and then streams each tensor's bytes, with bounded memory.
//! * [`plan_shards`], [`shard_file_name`] and [`render_index`] reproduce what `save_pretrained` writes.

mod hf;
mod read;
mod sharded;
mod write;

#[cfg(test)]
mod test_support;

pub use hf::{plan_shards, render_index, shard_file_name, INDEX_FILE_NAME, SINGLE_FILE_NAME};
pub use read::{fuzz_parse, parse_header, ParsedHeader, SafetensorsEntry, SafetensorsFile};
pub use sharded::ShardedCheckpoint;
pub use write::{SafetensorsWriter, TensorSpec};

use crate::dtype::DType;

/// The largest header length, in bytes, that the reference reader accepts (`MAX_HEADER_SIZE`).
pub const MAX_HEADER_LEN: usize = 100_000_000;

/// Byte length of a contiguous tensor, or `None` if its nonzero dimensions times the element size overflow
/// `usize`.
///
/// Stricter than the reference, which accepts such a shape when another dimension is 0 (an empty tensor): that
/// way no stride or element count of an accepted shape can overflow later.
fn byte_len(dtype: DType, shape: &[usize]) -> Option<usize> {
    let nonzero = shape
        .iter()
        .filter(|&&d| d != 0)
        .try_fold(dtype.size(), |n, &d| n.checked_mul(d))?;
    Some(if shape.contains(&0) { 0 } else { nonzero })
}
