//! A Hugging Face `datasets` on-disk directory (`save_to_disk`, as tok-pack writes it): the
//! `state.json` file list against the `.arrow` files present, `dataset_info.json` features
//! against each file's schema, and every row (block length, token ids in the vocabulary,
//! `attention_mask` all ones, `labels` equal to `input_ids`).

use std::collections::BTreeSet;
use std::fs::File;
use std::io::BufReader;
use std::path::Path;

use arrow_array::cast::AsArray;
use arrow_array::types::{Int32Type, Int64Type, Int8Type};
use arrow_array::{Array, ArrayRef, ListArray, RecordBatch};
use arrow_ipc::reader::StreamReader;
use arrow_schema::DataType;
use rayon::prelude::*;
use serde_json::Value;

use crate::report::{Check, Problem};

/// The `state.json` of a `save_to_disk` directory; its presence marks a dataset directory.
pub const STATE_FILE: &str = "state.json";
/// The `dataset_info.json` beside it.
pub const INFO_FILE: &str = "dataset_info.json";

/// True if `dir` is a `datasets` `save_to_disk` directory of one split.
pub fn is_dataset_dir(dir: &Path) -> bool {
    dir.join(STATE_FILE).is_file()
}

/// What the rows must look like.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RowExpectations {
    /// Every row's length (`None`: all rows the length of the first).
    pub block_size: Option<usize>,
    /// Token ids must be below this (`None`: only checked to be non-negative).
    pub vocab_size: Option<u64>,
}

/// What the dataset check found.
#[derive(Debug, Clone, Default)]
pub struct DatasetOutcome {
    /// Problems of the file list (check `names`).
    pub names: Vec<Problem>,
    /// Problems of the metadata, schemas and rows (check `structure`).
    pub structure: Vec<Problem>,
    /// True if some file could not be read at all (an I/O error rather than bad content).
    pub unreadable: bool,
    /// The data files listed in `state.json`, in order.
    pub data_files: Vec<String>,
    /// Data files present.
    pub present: usize,
    /// Rows read, per data file (in `data_files` order; 0 for a file not read).
    pub rows: Vec<u64>,
    /// The block length found (the first row's), if any row was read.
    pub block: Option<usize>,
    /// The largest token id found.
    pub max_id: Option<i64>,
}

/// Checks the dataset in `dir`.
pub fn check(dir: &Path, expect: RowExpectations) -> DatasetOutcome {
    let mut out = DatasetOutcome::default();
    let state = match read_json(dir, STATE_FILE) {
        Ok(v) => v,
        Err(p) => {
            out.unreadable |= p.1;
            out.structure.push(p.0);
            return out;
        }
    };
    let listed: Option<Vec<String>> = state["_data_files"].as_array().and_then(|files| {
        files
            .iter()
            .map(|f| f["filename"].as_str().map(str::to_string))
            .collect()
    });
    let Some(listed) = listed else {
        out.structure.push(Problem::file(
            Check::Structure,
            STATE_FILE,
            "no _data_files list of {\"filename\": ...} entries: not a datasets save_to_disk \
             state.json",
        ));
        return out;
    };
    out.data_files = listed.clone();
    let on_disk: BTreeSet<String> = std::fs::read_dir(dir)
        .map(|d| {
            d.filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.ends_with(".arrow"))
                .collect()
        })
        .unwrap_or_default();
    let mut seen = BTreeSet::new();
    let mut first_listing = Vec::with_capacity(listed.len());
    for name in &listed {
        let first = seen.insert(name);
        first_listing.push(first);
        if !first {
            out.names.push(Problem::file(
                Check::Names,
                name,
                "listed twice in state.json",
            ));
        } else if !on_disk.contains(name) {
            out.names.push(Problem::file(
                Check::Names,
                name,
                "missing (listed in state.json)",
            ));
        }
    }
    for stray in on_disk.iter().filter(|n| !seen.contains(n)) {
        out.names.push(Problem::file(
            Check::Names,
            stray,
            "stray: not listed in state.json (datasets would ignore it)",
        ));
    }
    out.present = listed.iter().filter(|n| on_disk.contains(*n)).count();

    let features = match read_json(dir, INFO_FILE) {
        Ok(info) => Some(info["features"].clone()).filter(|f| f.is_object()),
        Err(p) => {
            out.unreadable |= p.1;
            out.structure.push(p.0);
            None
        }
    };
    if features.is_none() && out.structure.is_empty() {
        out.structure.push(Problem::file(
            Check::Structure,
            INFO_FILE,
            "no features: datasets cannot know the columns' types",
        ));
    }

    // Each file once, even if state.json lists it twice (reported above).
    let results: Vec<FileRows> = listed
        .par_iter()
        .zip(&first_listing)
        .map(|(name, &first)| {
            if first && on_disk.contains(name) {
                check_file(&dir.join(name), name, features.as_ref(), expect)
            } else {
                FileRows::default()
            }
        })
        .collect();
    let mut blocks = BTreeSet::new();
    for r in results {
        out.unreadable |= r.unreadable;
        out.structure.extend(r.problems);
        out.rows.push(r.rows);
        out.block = out.block.or(r.block);
        out.max_id = out.max_id.max(r.max_id);
        blocks.extend(r.block);
    }
    // Without --block-size each file is held to its own first row: the files must agree too.
    if blocks.len() > 1 {
        out.structure.push(Problem::new(
            Check::Structure,
            vec![],
            format!("the data files hold rows of different lengths {blocks:?}"),
        ));
    }
    out
}

/// Reads and parses a JSON file of the dataset: the problem and whether it is an I/O error.
fn read_json(dir: &Path, name: &str) -> Result<Value, (Problem, bool)> {
    let path = dir.join(name);
    let text = std::fs::read_to_string(&path).map_err(|e| {
        let io = e.kind() != std::io::ErrorKind::NotFound;
        (
            Problem::file(Check::Structure, name, format!("cannot read: {e}")),
            io,
        )
    })?;
    serde_json::from_str(&text).map_err(|e| {
        (
            Problem::file(Check::Structure, name, format!("not valid JSON: {e}")),
            false,
        )
    })
}

/// What one data file holds.
#[derive(Debug, Default)]
struct FileRows {
    problems: Vec<Problem>,
    unreadable: bool,
    rows: u64,
    block: Option<usize>,
    max_id: Option<i64>,
}

/// At most this many row problems are reported per file and column (the rest are counted).
const ROW_PROBLEMS_PER_FILE: usize = 5;

/// The datasets feature dtype of an Arrow list column's items.
fn value_dtype(t: &DataType) -> Option<&'static str> {
    let item = match t {
        DataType::List(f) | DataType::LargeList(f) => f.data_type(),
        _ => return None,
    };
    Some(match item {
        DataType::Int8 => "int8",
        DataType::Int16 => "int16",
        DataType::Int32 => "int32",
        DataType::Int64 => "int64",
        DataType::UInt8 => "uint8",
        DataType::UInt16 => "uint16",
        DataType::UInt32 => "uint32",
        DataType::UInt64 => "uint64",
        _ => return None,
    })
}

/// Reads one `.arrow` stream and checks its schema and rows.
fn check_file(
    path: &Path,
    name: &str,
    features: Option<&Value>,
    expect: RowExpectations,
) -> FileRows {
    let mut out = FileRows::default();
    let problem = |msg: String| Problem::file(Check::Structure, name, msg);
    let file = match File::open(path) {
        Ok(f) => f,
        Err(e) => {
            out.unreadable = true;
            out.problems.push(problem(format!("cannot open: {e}")));
            return out;
        }
    };
    let reader = match StreamReader::try_new(BufReader::with_capacity(1 << 20, file), None) {
        Ok(r) => r,
        Err(e) => {
            out.problems.push(problem(format!(
                "not an Arrow IPC stream (truncated or corrupt): {e}"
            )));
            return out;
        }
    };
    let schema = reader.schema();
    // Every feature is a column of the declared type, and every column is a feature.
    if let Some(Value::Object(feats)) = features {
        for (col, feat) in feats {
            let want = feat["feature"]["dtype"].as_str();
            match schema.field_with_name(col) {
                Err(_) => out.problems.push(problem(format!(
                    "column {col} of dataset_info.json's features is missing"
                ))),
                Ok(f) if want.is_some() && value_dtype(f.data_type()) != want => {
                    out.problems.push(problem(format!(
                        "column {col} is {}, dataset_info.json says a sequence of {}",
                        f.data_type(),
                        want.unwrap_or("?")
                    )))
                }
                Ok(_) => {}
            }
        }
        for f in schema.fields() {
            if !feats.contains_key(f.name()) {
                out.problems.push(problem(format!(
                    "column {} is not in dataset_info.json's features",
                    f.name()
                )));
            }
        }
    }
    if schema.field_with_name("input_ids").is_err() {
        out.problems.push(problem(
            "no input_ids column: not a tokenized dataset".into(),
        ));
        return out;
    }
    let mut rows = RowChecker::new(name, expect);
    for batch in reader {
        match batch {
            Ok(b) => rows.batch(&b),
            Err(e) => {
                rows.problems.push(problem(format!(
                    "unreadable after row {}: {e} (truncated or corrupt)",
                    rows.rows
                )));
                break;
            }
        }
    }
    out.rows = rows.rows;
    out.block = rows.block;
    out.max_id = rows.max_id;
    out.problems.extend(rows.finish());
    out
}

/// The row checks of one file, batch by batch.
struct RowChecker<'a> {
    name: &'a str,
    expect: RowExpectations,
    rows: u64,
    block: Option<usize>,
    max_id: Option<i64>,
    problems: Vec<Problem>,
    /// Row problems by kind: (count, first few reported).
    counts: std::collections::BTreeMap<&'static str, u64>,
}

impl<'a> RowChecker<'a> {
    fn new(name: &'a str, expect: RowExpectations) -> Self {
        RowChecker {
            name,
            expect,
            rows: 0,
            block: None,
            max_id: None,
            problems: Vec::new(),
            counts: Default::default(),
        }
    }

    /// Records a row problem of `kind`, reporting the first few.
    fn row_problem(&mut self, kind: &'static str, row: u64, msg: impl FnOnce() -> String) {
        let n = self.counts.entry(kind).or_default();
        *n += 1;
        if *n <= ROW_PROBLEMS_PER_FILE as u64 {
            self.problems.push(Problem::file(
                Check::Structure,
                self.name,
                format!("row {row}: {}", msg()),
            ));
        }
    }

    fn batch(&mut self, batch: &RecordBatch) {
        let column = |n: &str| batch.column_by_name(n).cloned();
        let ids = column("input_ids");
        let mask = column("attention_mask");
        let labels = column("labels");
        for i in 0..batch.num_rows() {
            let row = self.rows + i as u64;
            let Some(ids) = ids.as_ref().and_then(|c| row_values(c, i)) else {
                self.row_problem("ids", row, || "input_ids is null or not integers".into());
                continue;
            };
            // The first row's length is reported; without --block-size it is also the rule.
            let first = *self.block.get_or_insert(ids.len());
            let want = self.expect.block_size.unwrap_or(first);
            if ids.len() != want {
                self.row_problem("length", row, || {
                    format!("{} tokens, expected blocks of {want}", ids.len())
                });
            }
            if let Some(&bad) = ids
                .iter()
                .find(|&&t| t < 0 || self.expect.vocab_size.is_some_and(|v| t as u64 >= v))
            {
                let vocab = self.expect.vocab_size;
                self.row_problem("vocab", row, || match vocab {
                    Some(v) => format!("token id {bad} outside the vocabulary (size {v})"),
                    None => format!("negative token id {bad}"),
                });
            }
            self.max_id = self.max_id.max(ids.iter().copied().max());
            if let Some(m) = mask.as_ref() {
                match row_values(m, i) {
                    Some(m) if m.len() == ids.len() && m.iter().all(|&x| x == 1) => {}
                    _ => self.row_problem("mask", row, || {
                        "attention_mask is not all ones over the row".into()
                    }),
                }
            }
            if let Some(l) = labels.as_ref() {
                if row_values(l, i).as_deref() != Some(&ids[..]) {
                    self.row_problem("labels", row, || "labels differ from input_ids".into());
                }
            }
        }
        self.rows += batch.num_rows() as u64;
    }

    fn finish(mut self) -> Vec<Problem> {
        for (kind, &n) in &self.counts {
            if n > ROW_PROBLEMS_PER_FILE as u64 {
                self.problems.push(Problem::file(
                    Check::Structure,
                    self.name,
                    format!(
                        "... {} more rows with the same {kind} problem",
                        n - ROW_PROBLEMS_PER_FILE as u64
                    ),
                ));
            }
        }
        self.problems
    }
}

/// Row `i` of an integer list column, widened to i64; `None` if null or not an integer list.
fn row_values(column: &ArrayRef, i: usize) -> Option<Vec<i64>> {
    let list: &ListArray = column.as_list_opt::<i32>()?;
    if list.is_null(i) {
        return None;
    }
    let values = list.value(i);
    Some(match values.data_type() {
        DataType::Int8 => values
            .as_primitive::<Int8Type>()
            .values()
            .iter()
            .map(|&v| v.into())
            .collect(),
        DataType::Int32 => values
            .as_primitive::<Int32Type>()
            .values()
            .iter()
            .map(|&v| v.into())
            .collect(),
        DataType::Int64 => values.as_primitive::<Int64Type>().values().to_vec(),
        _ => return None,
    })
}
