//! Writing a Hugging Face `datasets` directory (`save_to_disk` format) of packed token rows.
//!
//! See `shared/specs/hf-datasets-format.md`: Arrow IPC *stream* files `data-%05d-of-%05d.arrow`
//! with columns `input_ids` (`list<int32>`), `attention_mask` (`list<int8>`, ones) and `labels`
//! (`list<int64>`, equal to `input_ids`), the features in the schema metadata and in
//! `dataset_info.json` with `"_type": "Sequence"` (so datasets 3.6 loads it), and `state.json`.

use std::collections::HashMap;
use std::fs::File;
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Arc;

use anyhow::{Context, Result};
use arrow_array::{ArrayRef, Int32Array, Int64Array, Int8Array, ListArray, RecordBatch};
use arrow_buffer::OffsetBuffer;
use arrow_ipc::writer::{IpcWriteOptions, StreamWriter};
use arrow_ipc::MetadataVersion;
use arrow_schema::{DataType, Field, Schema};
use serde_json::{json, Value};
use suite_support::atomic::AtomicFile;
use suite_support::hash::HashingWriter;
use suite_support::manifest::ManifestRecord;

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

/// The Arrow schema of the files, with the `huggingface` metadata.
pub fn schema() -> Arc<Schema> {
    let list = |t: DataType| DataType::List(Arc::new(Field::new("item", t, true)));
    let fields = vec![
        Field::new("input_ids", list(DataType::Int32), true),
        Field::new("attention_mask", list(DataType::Int8), true),
        Field::new("labels", list(DataType::Int64), true),
    ];
    let metadata = HashMap::from([("huggingface".to_string(), HF_SCHEMA_METADATA.to_string())]);
    Arc::new(Schema::new_with_metadata(fields, metadata))
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

/// Writes the dataset into `dir` from `spool`, which holds `rows * block` token ids as
/// little-endian i32, row after row. Returns the manifest records of the files written.
pub fn write_dataset(
    dir: &Path,
    spool: &File,
    rows: u64,
    block: usize,
    max_shard_size: u64,
    fingerprint: &str,
) -> Result<Vec<ManifestRecord>> {
    let schema = schema();
    let n = num_shards(rows, block as u64, max_shard_size);
    let mut records = Vec::new();
    let mut names = Vec::new();
    for k in 0..n {
        let name = shard_name(k, n);
        let (start, end) = shard_range(rows, n, k);
        let path = dir.join(&name);
        let ctx = || format!("writing {}", path.display());
        let file = AtomicFile::create(&path).with_context(ctx)?;
        let hashing = HashingWriter::new(file);
        let options = IpcWriteOptions::try_new(8, false, MetadataVersion::V5)?;
        let mut writer =
            StreamWriter::try_new_with_options(hashing, &schema, options).with_context(ctx)?;
        let mut row = start;
        while row < end {
            let count = (end - row).min(ROWS_PER_RECORD_BATCH as u64);
            let batch = record_batch(&schema, spool, row, count as usize, block)?;
            writer.write(&batch).with_context(ctx)?;
            row += count;
        }
        writer.finish().with_context(ctx)?;
        let hashing = writer.into_inner().with_context(ctx)?;
        let (file, sha, bytes) = hashing.finish();
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
    let info = json!({
        "citation": "",
        "description": "",
        "features": features_json(),
        "homepage": "",
        "license": "",
    });
    records.push(write_json(dir, "dataset_info.json", &info)?);
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

/// Reads `count` rows from `first` and builds their record batch.
fn record_batch(
    schema: &Arc<Schema>,
    spool: &File,
    first: u64,
    count: usize,
    block: usize,
) -> Result<RecordBatch> {
    let tokens = count * block;
    let mut raw = vec![0u8; tokens * 4];
    spool
        .read_exact_at(&mut raw, first * block as u64 * 4)
        .context("reading back the token spool")?;
    let ids: Vec<i32> = raw
        .chunks_exact(4)
        .map(|c| i32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect();
    drop(raw);
    let labels: Vec<i64> = ids.iter().map(|&i| i64::from(i)).collect();
    let offsets = || OffsetBuffer::<i32>::from_lengths(std::iter::repeat_n(block, count));
    let item = |t: DataType| Arc::new(Field::new("item", t, true));
    let columns: Vec<ArrayRef> = vec![
        Arc::new(ListArray::new(
            item(DataType::Int32),
            offsets(),
            Arc::new(Int32Array::from(ids)),
            None,
        )),
        Arc::new(ListArray::new(
            item(DataType::Int8),
            offsets(),
            Arc::new(Int8Array::from(vec![1i8; tokens])),
            None,
        )),
        Arc::new(ListArray::new(
            item(DataType::Int64),
            offsets(),
            Arc::new(Int64Array::from(labels)),
            None,
        )),
    ];
    Ok(RecordBatch::try_new(schema.clone(), columns)?)
}

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
