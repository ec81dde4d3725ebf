//! Writing a Hugging Face `datasets` directory (`save_to_disk` format) of packed token rows.
//!
//! See `shared/specs/hf-datasets-format.md`: Arrow IPC *stream* files `data-%05d-of-%05d.arrow`
//! with columns `input_ids` (`list<int32>`), `attention_mask` (`list<int8>`, ones) and `labels`
//! (`list<int64>`, equal to `input_ids`), the features in the schema metadata and in
//! `dataset_info.json` with `"_type": "Sequence"` (so datasets 3.6 loads it), and `state.json`.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::os::unix::fs::FileExt;
use std::path::Path;

use anyhow::{Context, Result};
use serde_json::{json, Value};
use suite_support::atomic::AtomicFile;
use suite_support::hash::HashingWriter;
use suite_support::manifest::ManifestRecord;

use crate::ipc_stream::{self, padding, BatchLayout, ListColumn};

/// The default `max_shard_size` of `save_to_disk` (500 MB, decimal).
pub const DEFAULT_MAX_SHARD_SIZE: u64 = 500_000_000;

/// Rows per Arrow record batch (datasets 3.6's `DEFAULT_MAX_BATCH_SIZE`).
pub const ROWS_PER_RECORD_BATCH: usize = 1000;

/// The manifest `kind` of the files written.
pub const MANIFEST_KIND: &str = "hf-dataset";

/// The schema metadata value `datasets` writes (`json.dumps({"info": {"features": ...}})`).
pub const HF_SCHEMA_METADATA: &str = r#"{"info": {"features": {"input_ids": {"feature": {"dtype": "int32", "_type": "Value"}, "_type": "Sequence"}, "attention_mask": {"feature": {"dtype": "int8", "_type": "Value"}, "_type": "Sequence"}, "labels": {"feature": {"dtype": "int64", "_type": "Value"}, "_type": "Sequence"}}}}"#;

/// The features JSON (in `dataset_info.json`).
pub fn features_json() -> Value {
    let seq =
        |dtype: &str| json!({"feature": {"dtype": dtype, "_type": "Value"}, "_type": "Sequence"});
    json!({
        "input_ids": seq("int32"),
        "attention_mask": seq("int8"),
        "labels": seq("int64"),
    })
}

/// `save_to_disk`'s number of shards for `rows` rows of `block` tokens: the table's estimated
/// bytes over `max_shard_size`, plus one, capped at `rows`, but at least 1 (datasets 3.6 writes one
/// schema-only file for an empty dataset, which every version loads).
pub fn num_shards(rows: u64, block: u64, max_shard_size: u64) -> u64 {
    // Table.nbytes: per row 4-byte offsets in each of the three columns and 4+1+8 bytes a token.
    let nbytes = rows * (13 * block + 12);
    let n = nbytes / max_shard_size.max(1) + 1;
    n.min(rows).max(1)
}

/// The rows of shard `k` of `n` (contiguous, the first `rows % n` shards one row longer).
pub fn shard_range(rows: u64, n: u64, k: u64) -> (u64, u64) {
    let (div, rem) = (rows / n, rows % n);
    let start = div * k + k.min(rem);
    (start, start + div + u64::from(k < rem))
}

/// The file name of shard `k` of `n`.
pub fn shard_name(k: u64, n: u64) -> String {
    format!("data-{k:05}-of-{n:05}.arrow")
}

/// The three columns, in `get_dataset.py`'s order.
pub const COLUMNS: [ListColumn; 3] = [
    ListColumn {
        name: "input_ids",
        item_bytes: 4,
    },
    ListColumn {
        name: "attention_mask",
        item_bytes: 1,
    },
    ListColumn {
        name: "labels",
        item_bytes: 8,
    },
];

/// Writes the dataset into `dir` from `spool`, which holds `rows * block` token ids as
/// little-endian i32, row after row, with `info` as `dataset_info.json`. Returns the manifest records of the files written.
pub fn write_dataset(
    dir: &Path,
    spool: &File,
    rows: u64,
    block: usize,
    max_shard_size: u64,
    fingerprint: &str,
    info: &Value,
) -> Result<Vec<ManifestRecord>> {
    let schema = ipc_stream::schema_message(&COLUMNS, &[("huggingface", HF_SCHEMA_METADATA)]);
    let n = num_shards(rows, block as u64, max_shard_size);
    let mut records = Vec::new();
    let mut names = Vec::new();
    for k in 0..n {
        let name = shard_name(k, n);
        let (start, end) = shard_range(rows, n, k);
        let path = dir.join(&name);
        let ctx = || format!("writing {}", path.display());
        let file = AtomicFile::create(&path).with_context(ctx)?;
        let mut out = HashingWriter::new(BufWriter::with_capacity(1 << 20, file));
        out.write_all(&schema).with_context(ctx)?;
        let mut row = start;
        while row < end {
            let count = (end - row).min(ROWS_PER_RECORD_BATCH as u64);
            write_record_batch(&mut out, spool, row, count as usize, block).with_context(ctx)?;
            row += count;
        }
        out.write_all(&ipc_stream::END_OF_STREAM)
            .with_context(ctx)?;
        let (buffered, sha, bytes) = out.finish();
        let file = buffered
            .into_inner()
            .map_err(|e| e.into_error())
            .with_context(ctx)?;
        file.commit().with_context(ctx)?;
        records.push(
            ManifestRecord::new(name.clone(), bytes, sha)
                .with_kind(MANIFEST_KIND)
                .with_extra("rows", end - start),
        );
        names.push(name);
    }

    let state = json!({
        "_data_files": names.iter().map(|n| json!({"filename": n})).collect::<Vec<_>>(),
        "_fingerprint": fingerprint,
        "_format_columns": null,
        "_format_kwargs": {},
        "_format_type": null,
        "_output_all_columns": false,
        "_split": "train",
    });
    records.push(write_json(dir, "state.json", &state)?);
    records.push(write_json(dir, "dataset_info.json", info)?);
    Ok(records)
}

/// Writes `value` as Python's `json.dump(value, indent=2)` does (keys in the given order).
fn write_json(dir: &Path, name: &str, value: &Value) -> Result<ManifestRecord> {
    let path = dir.join(name);
    let ctx = || format!("writing {}", path.display());
    let text = serde_json::to_string_pretty(value)?;
    let file = AtomicFile::create(&path).with_context(ctx)?;
    let mut hashing = HashingWriter::new(file);
    hashing.write_all(text.as_bytes()).with_context(ctx)?;
    let (file, sha, bytes) = hashing.finish();
    file.commit().with_context(ctx)?;
    Ok(ManifestRecord::new(name, bytes, sha).with_kind(MANIFEST_KIND))
}

/// Writes the record batch of the `count` rows from `first`: its message, then the body
/// (per column: offsets, items) as [`ipc_stream::BatchLayout`] lays it out.
fn write_record_batch(
    out: &mut impl Write,
    spool: &File,
    first: u64,
    count: usize,
    block: usize,
) -> Result<()> {
    let layout = BatchLayout::new(&COLUMNS, count, block);
    out.write_all(&ipc_stream::record_batch_message(count, &layout))?;
    let offsets: Vec<u8> = (0..=count)
        .flat_map(|row| ((row * block) as i32).to_le_bytes())
        .collect();
    let tokens = count * block;
    let mut ids = vec![0u8; tokens * 4];
    spool
        .read_exact_at(&mut ids, first * block as u64 * 4)
        .context("reading back the token spool")?;
    let pad = |out: &mut dyn Write, len: usize| out.write_all(&[0u8; 8][..padding(len)]);

    out.write_all(&offsets)?;
    pad(out, offsets.len())?;
    out.write_all(&ids)?;
    pad(out, ids.len())?;

    out.write_all(&offsets)?;
    pad(out, offsets.len())?;
    out.write_all(&vec![1u8; tokens])?;
    pad(out, tokens)?;

    out.write_all(&offsets)?;
    pad(out, offsets.len())?;
    // Labels widen the ids to i64, a bounded chunk at a time.
    let mut labels = Vec::with_capacity(LABEL_CHUNK_TOKENS * 8);
    for chunk in ids.chunks(LABEL_CHUNK_TOKENS * 4) {
        labels.clear();
        labels.extend(
            chunk.chunks_exact(4).flat_map(|c| {
                i64::from(i32::from_le_bytes([c[0], c[1], c[2], c[3]])).to_le_bytes()
            }),
        );
        out.write_all(&labels)?;
    }
    Ok(())
}

/// Tokens widened to labels at a time.
const LABEL_CHUNK_TOKENS: usize = 1 << 16;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shard_rule_matches_datasets() {
        assert_eq!(num_shards(0, 8192, DEFAULT_MAX_SHARD_SIZE), 1);
        assert_eq!(num_shards(1841, 8192, DEFAULT_MAX_SHARD_SIZE), 1);
        assert_eq!(num_shards(4694, 8192, DEFAULT_MAX_SHARD_SIZE), 1);
        assert_eq!(num_shards(4695, 8192, DEFAULT_MAX_SHARD_SIZE), 2);
        assert_eq!(num_shards(13237, 128, 5_000_000), 5);
        assert_eq!(num_shards(3, 8192, 1), 3);
        let sizes: Vec<u64> = (0..5)
            .map(|k| {
                let (a, b) = shard_range(13237, 5, k);
                b - a
            })
            .collect();
        assert_eq!(sizes, vec![2648, 2648, 2647, 2647, 2647]);
        assert_eq!(shard_name(3, 12), "data-00003-of-00012.arrow");
    }

    #[test]
    fn metadata_is_the_features_json() {
        let meta: Value = serde_json::from_str(HF_SCHEMA_METADATA).unwrap();
        assert_eq!(meta["info"]["features"], features_json());
    }
}
