//! The raw corpus's description that `datasets` leaves in `dataset_info.json`.
//!
//! `get_dataset.py` saves a dataset mapped from `load_dataset(<builder>, data_files=...)`, so its
//! `dataset_info.json` still describes the raw table the builder made: the builder's name, the
//! input files and their sizes (`download_checksums`, `download_size`), and the raw split's row
//! count and bytes (`splits.train.num_bytes`, `dataset_size`), as datasets 3.6 (NxD's pin) writes
//! them. The bytes are `pyarrow.Table.nbytes` of the builder's tables: per row, 4 bytes of
//! offsets for a `string` column (8 for `large_string`) plus its UTF-8 bytes, 8 bytes for an
//! `int64` or `double`. Those counts are kept exactly for such columns without nulls; anything
//! else (nulls, booleans, nested values, mixed types) makes the bytes depend on how pyarrow
//! chunks the file, and then the raw description is left out, as `Dataset.from_dict` leaves it.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};

use crate::input::InputFormat;

/// pandas' default missing-value strings: `read_csv` turns such a field into NaN (a null).
const PANDAS_NA: &[&str] = &[
    "", "#N/A", "#N/A N/A", "#NA", "-1.#IND", "-1.#QNAN", "-NaN", "-nan", "1.#IND", "1.#QNAN",
    "<NA>", "N/A", "NA", "NULL", "NaN", "None", "n/a", "nan", "null",
];

/// The Arrow type a raw column gets, as far as its size goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
enum ColumnKind {
    /// 32-bit offsets plus bytes.
    String,
    /// 64-bit offsets plus bytes (pandas 3 `str` columns).
    LargeString,
    /// 8 bytes a row.
    Int64,
    /// 8 bytes a row.
    Float64,
    /// A fixed width in bytes a row (Arrow/Parquet integer and float columns).
    Fixed(u64),
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct ColumnStats {
    name: String,
    kind: ColumnKind,
    /// UTF-8 bytes of a string column.
    value_bytes: u64,
    /// Rows that had a value.
    rows: u64,
}

/// The raw table's rows and bytes as the `datasets` builder of the input format counts them.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct RawTable {
    builder: Option<String>,
    rows: u64,
    columns: Vec<ColumnStats>,
    /// Why the bytes cannot be known exactly (the first reason found).
    inexact: Option<String>,
}

impl RawTable {
    /// The builder `datasets.load_dataset` would use for `format` (`None` when there is none).
    fn builder_name(format: InputFormat) -> &'static str {
        match format {
            InputFormat::Jsonl => "json",
            InputFormat::Txt => "text",
            InputFormat::Csv => "csv",
            InputFormat::Parquet => "parquet",
            InputFormat::Arrow => "arrow",
        }
    }

    /// Starts a file of `format`; files of several formats have no single builder.
    pub fn start_file(&mut self, format: InputFormat) {
        let name = Self::builder_name(format);
        match &self.builder {
            None => self.builder = Some(name.to_string()),
            Some(b) if b == name => {}
            Some(_) => self.give_up("the inputs have several formats"),
        }
    }

    fn give_up(&mut self, why: &str) {
        self.inexact.get_or_insert_with(|| why.to_string());
    }

    fn column(&mut self, name: &str, kind: ColumnKind) -> Option<&mut ColumnStats> {
        let index = match self.columns.iter().position(|c| c.name == name) {
            Some(i) => i,
            None => {
                self.columns.push(ColumnStats {
                    name: name.to_string(),
                    kind,
                    value_bytes: 0,
                    rows: 0,
                });
                self.columns.len() - 1
            }
        };
        let column = &mut self.columns[index];
        // pyarrow's JSON reader widens int64 to double when a column holds both.
        let merged = match (column.kind, kind) {
            (a, b) if a == b => Some(a),
            (ColumnKind::Int64, ColumnKind::Float64) | (ColumnKind::Float64, ColumnKind::Int64) => {
                Some(ColumnKind::Float64)
            }
            _ => None,
        };
        match merged {
            Some(kind) => {
                column.kind = kind;
                Some(&mut self.columns[index])
            }
            None => {
                self.give_up(&format!("column {name:?} holds values of several types"));
                None
            }
        }
    }

    fn add(&mut self, name: &str, kind: ColumnKind, value_bytes: u64) {
        if let Some(column) = self.column(name, kind) {
            column.rows += 1;
            column.value_bytes += value_bytes;
        }
    }

    /// One JSON lines object (pyarrow's JSON reader types).
    pub fn record_json(&mut self, object: &Map<String, Value>) {
        self.rows += 1;
        for (name, value) in object {
            match value {
                Value::String(s) => self.add(name, ColumnKind::String, s.len() as u64),
                Value::Number(n) if n.is_i64() => self.add(name, ColumnKind::Int64, 0),
                Value::Number(_) => self.add(name, ColumnKind::Float64, 0),
                Value::Null => self.give_up(&format!("column {name:?} has nulls")),
                Value::Bool(_) => self.give_up(&format!("column {name:?} is boolean")),
                Value::Array(_) | Value::Object(_) => {
                    self.give_up(&format!("column {name:?} is nested"))
                }
            }
        }
    }

    /// One line of text (the `text` builder's single `text` column).
    pub fn record_text(&mut self, text: &str) {
        self.rows += 1;
        self.add("text", ColumnKind::String, text.len() as u64);
    }

    /// One CSV record under `headers` (pandas' `read_csv` inference: int64, float64, or `str`,
    /// which pandas 3 hands to Arrow as `large_string`).
    pub fn record_csv(&mut self, headers: &[String], fields: &[&[u8]]) {
        self.rows += 1;
        for (name, field) in headers.iter().zip(fields) {
            let Ok(text) = std::str::from_utf8(field) else {
                continue;
            };
            if PANDAS_NA.contains(&text) {
                self.give_up(&format!("column {name:?} has missing values"));
            } else if text.parse::<i64>().is_ok() {
                self.add(name, ColumnKind::Int64, 0);
            } else if text.parse::<f64>().is_ok() {
                self.add(name, ColumnKind::Float64, 0);
            } else if ["True", "False", "true", "false", "TRUE", "FALSE"].contains(&text) {
                self.give_up(&format!("column {name:?} is boolean"));
            } else {
                self.add(name, ColumnKind::LargeString, text.len() as u64);
            }
        }
        if fields.len() < headers.len() {
            self.give_up("a CSV record has missing fields");
        }
    }

    /// One record batch of a Parquet or Arrow input: every column by its Arrow type.
    pub fn record_batch(&mut self, batch: &arrow_array::RecordBatch) {
        use arrow_array::cast::AsArray;
        use arrow_array::Array;
        use arrow_schema::DataType;
        let rows = batch.num_rows() as u64;
        self.rows += rows;
        for (field, array) in batch.schema().fields().iter().zip(batch.columns()) {
            let name = field.name();
            if array.null_count() > 0 {
                self.give_up(&format!("column {name:?} has nulls"));
                continue;
            }
            let (kind, bytes) = match array.data_type() {
                DataType::Utf8 => {
                    let a = array.as_string::<i32>();
                    (ColumnKind::String, value_span(a.value_offsets()))
                }
                DataType::LargeUtf8 => {
                    let a = array.as_string::<i64>();
                    (ColumnKind::LargeString, value_span(a.value_offsets()))
                }
                t if t.is_primitive() => match t.primitive_width() {
                    Some(width) => (ColumnKind::Fixed(width as u64), 0),
                    None => {
                        self.give_up(&format!("column {name:?} is {t}"));
                        continue;
                    }
                },
                t => {
                    self.give_up(&format!("column {name:?} is {t}"));
                    continue;
                }
            };
            if let Some(column) = self.column(name, kind) {
                column.rows += rows;
                column.value_bytes += bytes;
            }
        }
    }

    /// Documents (raw rows) counted.
    pub fn rows(&self) -> u64 {
        self.rows
    }

    /// `pyarrow.Table.nbytes` of the raw table, or why it cannot be known.
    pub fn num_bytes(&self) -> Result<u64, String> {
        if let Some(why) = &self.inexact {
            return Err(why.clone());
        }
        let mut total = 0;
        for c in &self.columns {
            if c.rows != self.rows {
                return Err(format!("column {:?} is missing in some rows", c.name));
            }
            total += match c.kind {
                ColumnKind::String => 4 * self.rows + c.value_bytes,
                ColumnKind::LargeString => 8 * self.rows + c.value_bytes,
                ColumnKind::Int64 | ColumnKind::Float64 => 8 * self.rows,
                ColumnKind::Fixed(width) => width * self.rows,
            };
        }
        Ok(total)
    }
}

/// Bytes between the first and last offset of a string array.
fn value_span<O: arrow_array::OffsetSizeTrait>(offsets: &[O]) -> u64 {
    match (offsets.first(), offsets.last()) {
        (Some(a), Some(b)) => (b.as_usize() - a.as_usize()) as u64,
        _ => 0,
    }
}

/// The corpus a dataset was made from: its files (absolute paths and sizes) and raw table.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Source {
    /// The input files as `load_dataset` names them (absolute), with their sizes on disk.
    pub files: Vec<(PathBuf, u64)>,
    /// The raw table.
    pub raw: RawTable,
}

impl Source {
    /// The source of `files`, of `sizes` bytes on disk, with the raw table read from them.
    pub fn new(
        files: &[(PathBuf, InputFormat)],
        sizes: &[u64],
        raw: RawTable,
    ) -> std::io::Result<Source> {
        let files = files
            .iter()
            .zip(sizes)
            .map(|((p, _), &size)| Ok((std::path::absolute(p)?, size)))
            .collect::<std::io::Result<_>>()?;
        Ok(Source { files, raw })
    }

    /// `dataset_info.json` as datasets 3.6 writes it after `load_dataset` + `map` +
    /// `save_to_disk` (top-level keys sorted), with `features`; or, when the raw bytes cannot be
    /// known, the minimal description `Dataset.from_dict(...).save_to_disk` writes. The second
    /// value says why the raw description was left out.
    pub fn dataset_info(&self, features: Value) -> (Value, Option<String>) {
        let minimal = || {
            json!({
                "citation": "",
                "description": "",
                "features": features.clone(),
                "homepage": "",
                "license": "",
            })
        };
        let (builder, num_bytes) = match (&self.raw.builder, self.raw.num_bytes()) {
            (Some(b), Ok(n)) => (b.clone(), n),
            (None, _) => return (minimal(), Some("no input files".to_string())),
            (_, Err(why)) => return (minimal(), Some(why)),
        };
        let download_size: u64 = self.files.iter().map(|(_, n)| n).sum();
        let checksums: Map<String, Value> = self
            .files
            .iter()
            .map(|(p, n)| (path_key(p), json!({"num_bytes": n, "checksum": null})))
            .collect();
        let info = json!({
            "builder_name": builder,
            "citation": "",
            "config_name": "default",
            "dataset_name": builder,
            "dataset_size": num_bytes,
            "description": "",
            "download_checksums": checksums,
            "download_size": download_size,
            "features": features,
            "homepage": "",
            "license": "",
            "size_in_bytes": num_bytes + download_size,
            "splits": {"train": {
                "name": "train",
                "num_bytes": num_bytes,
                "num_examples": self.raw.rows,
                "dataset_name": builder,
            }},
            "version": {"version_str": "0.0.0", "major": 0, "minor": 0, "patch": 0},
        });
        (info, None)
    }
}

fn path_key(path: &Path) -> String {
    path.to_string_lossy().into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn object(text: &str) -> Map<String, Value> {
        serde_json::from_str(text).unwrap()
    }

    #[test]
    fn json_strings_and_numbers_count_like_pyarrow() {
        let mut raw = RawTable::default();
        raw.start_file(InputFormat::Jsonl);
        raw.record_json(&object(r#"{"id": "a1", "n": 1, "text": "héllo"}"#));
        raw.record_json(&object(r#"{"id": "b", "n": 2.5, "text": ""}"#));
        // id: 2*4 + 3; n: 2*8 (double); text: 2*4 + 6.
        assert_eq!(raw.num_bytes(), Ok(11 + 16 + 14));
        assert_eq!(raw.rows(), 2);
    }

    #[test]
    fn nulls_missing_keys_and_mixed_types_are_inexact() {
        for (a, b) in [
            (r#"{"text": "x", "m": 1}"#, r#"{"text": "y"}"#),
            (r#"{"text": "x", "m": null}"#, r#"{"text": "y", "m": 1}"#),
            (r#"{"text": "x", "m": "s"}"#, r#"{"text": "y", "m": 1}"#),
            (r#"{"text": "x", "m": [1]}"#, r#"{"text": "y", "m": [2]}"#),
        ] {
            let mut raw = RawTable::default();
            raw.start_file(InputFormat::Jsonl);
            raw.record_json(&object(a));
            raw.record_json(&object(b));
            assert!(raw.num_bytes().is_err(), "{a} {b}");
        }
    }

    #[test]
    fn csv_follows_pandas_inference() {
        let headers = vec!["id".to_string(), "text".to_string()];
        let mut raw = RawTable::default();
        raw.start_file(InputFormat::Csv);
        raw.record_csv(&headers, &[b"1", b"abc"]);
        raw.record_csv(&headers, &[b"2", b"de"]);
        assert_eq!(raw.num_bytes(), Ok(2 * 8 + 2 * 8 + 5));
        raw.record_csv(&headers, &[b"3", b"NA"]);
        assert!(raw.num_bytes().is_err());
    }

    #[test]
    fn dataset_info_has_the_builders_description_or_is_minimal() {
        let mut raw = RawTable::default();
        raw.start_file(InputFormat::Txt);
        raw.record_text("one");
        raw.record_text("two!");
        let source = Source {
            files: vec![(PathBuf::from("/data/c.txt"), 9)],
            raw,
        };
        let (info, why) = source.dataset_info(json!({}));
        assert!(why.is_none());
        assert_eq!(info["builder_name"], "text");
        assert_eq!(info["dataset_size"], 15);
        assert_eq!(info["size_in_bytes"], 24);
        assert_eq!(info["splits"]["train"]["num_examples"], 2);
        assert_eq!(info["download_checksums"]["/data/c.txt"]["num_bytes"], 9);

        let mut mixed = source.clone();
        mixed.raw.start_file(InputFormat::Csv);
        let (info, why) = mixed.dataset_info(json!({}));
        assert!(why.unwrap().contains("several formats"));
        assert_eq!(
            info.as_object().unwrap().keys().collect::<Vec<_>>(),
            ["citation", "description", "features", "homepage", "license"]
        );
    }
}
