//! Reading documents from the input files, in order, in batches.

use std::fs::File;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};

use anyhow::{anyhow, Context, Result};
use serde_json::{Map, Value};

use crate::provenance::RawTable;

/// The input file formats.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InputFormat {
    /// JSON lines: one JSON object per line, the text in a string column.
    Jsonl,
    /// Plain text: one document per line (what `datasets`' `text` loader does).
    Txt,
    /// CSV with a header row (RFC 4180 quoting); the text in a named column.
    Csv,
    /// Parquet (the Hub's dataset format); the text in a string column.
    Parquet,
    /// An Arrow IPC stream (a `datasets` `.arrow` file); the text in a string column.
    Arrow,
}

impl InputFormat {
    /// The format a file's name suggests (`.jsonl`/`.json` → JSON lines, `.txt` → text), if any.
    pub fn from_path(path: &Path) -> Option<InputFormat> {
        let name = path.file_name()?.to_str()?.to_ascii_lowercase();
        let name = name
            .strip_suffix(".gz")
            .or_else(|| name.strip_suffix(".zst"))
            .unwrap_or(&name);
        if name.ends_with(".jsonl") || name.ends_with(".json") || name.ends_with(".ndjson") {
            Some(InputFormat::Jsonl)
        } else if name.ends_with(".txt") || name.ends_with(".text") {
            Some(InputFormat::Txt)
        } else if name.ends_with(".csv") {
            Some(InputFormat::Csv)
        } else if name.ends_with(".parquet") {
            Some(InputFormat::Parquet)
        } else if name.ends_with(".arrow") {
            Some(InputFormat::Arrow)
        } else {
            None
        }
    }
}

/// Reads the documents of a list of files in order (file after file, line after line).
///
/// Errors name the file and the 1-based line.
pub struct DocReader {
    files: Vec<(PathBuf, InputFormat)>,
    text_column: String,
    next_file: usize,
    current: Option<Current>,
    line_buf: Vec<u8>,
    bytes_read: u64,
    raw: RawTable,
    /// The further documents of a text line that held lone carriage returns.
    split_line: std::collections::VecDeque<String>,
}

struct Current {
    path: PathBuf,
    format: InputFormat,
    source: Source,
    line: u64,
}

enum Source {
    Lines(BufReader<Box<dyn Read + Send>>),
    Csv {
        reader: csv::Reader<BufReader<Box<dyn Read + Send>>>,
        column: usize,
        headers: Vec<String>,
        record: csv::ByteRecord,
    },
    Parquet {
        reader: Box<dyn Iterator<Item = Result<arrow_array::RecordBatch>> + Send>,
        pending: std::collections::VecDeque<Option<String>>,
    },
}

impl DocReader {
    /// A reader of `files` taking the text from `text_column` (JSON lines).
    pub fn new(files: Vec<(PathBuf, InputFormat)>, text_column: &str) -> Self {
        DocReader {
            files,
            text_column: text_column.to_string(),
            next_file: 0,
            current: None,
            line_buf: Vec::with_capacity(1 << 16),
            bytes_read: 0,
            raw: RawTable::default(),
            split_line: Default::default(),
        }
    }

    /// The raw table read so far, as the `datasets` builder of the input format would count it.
    pub fn raw_table(&self) -> &RawTable {
        &self.raw
    }

    /// Bytes of input read so far.
    pub fn bytes_read(&self) -> u64 {
        self.bytes_read
    }

    /// Up to `n` more documents; fewer only at the end of the input (an empty batch means the
    /// input is exhausted).
    pub fn next_batch(&mut self, n: usize) -> Result<Vec<String>> {
        let mut batch = Vec::with_capacity(n);
        while batch.len() < n {
            match self.next_doc()? {
                Some(doc) => batch.push(doc),
                None => break,
            }
        }
        Ok(batch)
    }

    fn next_doc(&mut self) -> Result<Option<String>> {
        if let Some(doc) = self.split_line.pop_front() {
            return Ok(Some(doc));
        }
        loop {
            if self.current.is_none() {
                let Some((path, format)) = self.files.get(self.next_file).cloned() else {
                    return Ok(None);
                };
                self.next_file += 1;
                let file =
                    File::open(&path).with_context(|| format!("opening {}", path.display()))?;
                let source = open_source(&path, format, file, &self.text_column)?;
                self.raw.start_file(format);
                self.current = Some(Current {
                    path,
                    format,
                    source,
                    line: 0,
                });
            }
            let cur = self.current.as_mut().expect("just set");
            let reader = match &mut cur.source {
                Source::Lines(reader) => reader,
                Source::Csv {
                    reader,
                    column,
                    headers,
                    record,
                } => {
                    let got = reader.read_byte_record(record).map_err(|e| {
                        anyhow!("{}: {}", cur.path.display(), csv_error(&e, cur.line + 2))
                    })?;
                    if !got {
                        self.current = None;
                        continue;
                    }
                    cur.line += 1;
                    self.bytes_read += record.as_slice().len() as u64;
                    let line = record.position().map_or(cur.line + 1, |p| p.line());
                    let fields: Vec<&[u8]> = record.iter().collect();
                    self.raw.record_csv(headers, &fields);
                    let field = record.get(*column).ok_or_else(|| {
                        anyhow!(
                            "{}:{line}: the record has no column {}",
                            cur.path.display(),
                            *column + 1
                        )
                    })?;
                    let text = std::str::from_utf8(field).map_err(|e| {
                        anyhow!(
                            "{}:{line}: invalid UTF-8 at byte {} of the field",
                            cur.path.display(),
                            e.valid_up_to() + 1
                        )
                    })?;
                    return Ok(Some(text.to_string()));
                }
                Source::Parquet { reader, pending } => {
                    if let Some(doc) = pending.pop_front() {
                        cur.line += 1;
                        return match doc {
                            Some(doc) => {
                                self.bytes_read += doc.len() as u64;
                                Ok(Some(doc))
                            }
                            None => Err(anyhow!(
                                "{}: row {}: column {:?} is null",
                                cur.path.display(),
                                cur.line,
                                self.text_column
                            )),
                        };
                    }
                    match reader.next() {
                        None => {
                            self.current = None;
                        }
                        Some(batch) => {
                            let batch =
                                batch.with_context(|| format!("reading {}", cur.path.display()))?;
                            self.raw.record_batch(&batch);
                            pending.extend(strings(&batch, &cur.path, &self.text_column)?);
                        }
                    }
                    continue;
                }
            };
            self.line_buf.clear();
            let got = reader
                .read_until(b'\n', &mut self.line_buf)
                .with_context(|| format!("reading {}", cur.path.display()))?;
            if got == 0 {
                self.current = None;
                continue;
            }
            self.bytes_read += got as u64;
            cur.line += 1;
            let mut bytes = &self.line_buf[..];
            if let Some(rest) = bytes.strip_suffix(b"\n") {
                bytes = rest;
            }
            if let Some(rest) = bytes.strip_suffix(b"\r") {
                bytes = rest;
            }
            let text = std::str::from_utf8(bytes).map_err(|e| {
                anyhow!(
                    "{}:{}: invalid UTF-8 at byte {} of the line",
                    cur.path.display(),
                    cur.line,
                    e.valid_up_to() + 1
                )
            })?;
            match cur.format {
                InputFormat::Txt | InputFormat::Csv | InputFormat::Parquet | InputFormat::Arrow => {
                    // datasets reads text files in Python's text mode, where a lone "\r" ends a
                    // line too (universal newlines).
                    let mut docs = text.split('\r');
                    let first = docs.next().unwrap_or_default().to_string();
                    self.split_line.extend(docs.map(str::to_string));
                    self.raw.record_text(&first);
                    for doc in &self.split_line {
                        self.raw.record_text(doc);
                    }
                    return Ok(Some(first));
                }
                InputFormat::Jsonl => {
                    if text.trim().is_empty() {
                        continue;
                    }
                    let mut object: Map<String, Value> =
                        serde_json::from_str(text).map_err(|e| {
                            anyhow!(
                                "{}:{}: not a JSON object: {e}",
                                cur.path.display(),
                                cur.line
                            )
                        })?;
                    self.raw.record_json(&object);
                    return match object.remove(&self.text_column) {
                        Some(Value::String(s)) => Ok(Some(s)),
                        Some(other) => Err(anyhow!(
                            "{}:{}: column {:?} is {}, not a string",
                            cur.path.display(),
                            cur.line,
                            self.text_column,
                            kind(&other)
                        )),
                        None => {
                            let columns: Vec<&str> = object.keys().map(String::as_str).collect();
                            Err(anyhow!(
                                "{}:{}: no {:?} column (columns: {}); choose one with --text-column",
                                cur.path.display(),
                                cur.line,
                                self.text_column,
                                if columns.is_empty() {
                                    "none".to_string()
                                } else {
                                    columns.join(", ")
                                }
                            ))
                        }
                    };
                }
            }
        }
    }
}

/// The file's contents, decompressed if its name ends in `.gz` (gzip) or `.zst` (zstd).
fn decompressed(path: &Path, file: File) -> Result<Box<dyn Read + Send>> {
    let name = path
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or("")
        .to_ascii_lowercase();
    Ok(if name.ends_with(".gz") {
        Box::new(flate2::read::MultiGzDecoder::new(BufReader::with_capacity(
            1 << 20,
            file,
        )))
    } else if name.ends_with(".zst") {
        Box::new(
            zstd::stream::read::Decoder::new(file)
                .with_context(|| format!("{}: not a zstd file", path.display()))?,
        )
    } else {
        Box::new(file)
    })
}

/// Opens the reader of one input file.
fn open_source(path: &Path, format: InputFormat, file: File, column: &str) -> Result<Source> {
    match format {
        InputFormat::Jsonl | InputFormat::Txt => Ok(Source::Lines(BufReader::with_capacity(
            1 << 20,
            decompressed(path, file)?,
        ))),
        InputFormat::Csv => {
            let mut reader = csv::ReaderBuilder::new()
                .has_headers(true)
                .flexible(true)
                .from_reader(BufReader::with_capacity(1 << 20, decompressed(path, file)?));
            let headers = reader
                .byte_headers()
                .map_err(|e| anyhow!("{}: {}", path.display(), csv_error(&e, 1)))?
                .clone();
            let names: Vec<String> = headers
                .iter()
                .map(|h| String::from_utf8_lossy(h).into_owned())
                .collect();
            let index = names.iter().position(|n| n == column).ok_or_else(|| {
                anyhow!(
                    "{}:1: no {column:?} column (columns: {}); choose one with --text-column",
                    path.display(),
                    names.join(", ")
                )
            })?;
            Ok(Source::Csv {
                reader,
                column: index,
                headers: names,
                record: csv::ByteRecord::new(),
            })
        }
        InputFormat::Parquet => {
            use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
            let builder = ParquetRecordBatchReaderBuilder::try_new(file)
                .map_err(|e| anyhow!("{}: not a readable Parquet file: {e}", path.display()))?;
            let schema = builder.schema().clone();
            let names: Vec<&str> = schema.fields().iter().map(|f| f.name().as_str()).collect();
            if !names.contains(&column) {
                return Err(anyhow!(
                    "{}: no {column:?} column (columns: {}); choose one with --text-column",
                    path.display(),
                    names.join(", ")
                ));
            }
            // Every column, not only the text: dataset_info.json describes the whole raw table.
            let reader = builder
                .with_batch_size(1024)
                .build()
                .map_err(|e| anyhow!("{}: reading Parquet: {e}", path.display()))?;
            Ok(Source::Parquet {
                reader: Box::new(reader.map(|b| b.map_err(anyhow::Error::from))),
                pending: Default::default(),
            })
        }
        InputFormat::Arrow => {
            let reader = arrow_ipc::reader::StreamReader::try_new(
                BufReader::with_capacity(1 << 20, file),
                None,
            )
            .map_err(|e| anyhow!("{}: not an Arrow IPC stream: {e}", path.display()))?;
            let schema = reader.schema();
            if schema.column_with_name(column).is_none() {
                let names: Vec<&str> = schema.fields().iter().map(|f| f.name().as_str()).collect();
                return Err(anyhow!(
                    "{}: no {column:?} column (columns: {}); choose one with --text-column",
                    path.display(),
                    names.join(", ")
                ));
            }
            Ok(Source::Parquet {
                reader: Box::new(reader.map(|b| b.map_err(anyhow::Error::from))),
                pending: Default::default(),
            })
        }
    }
}

/// The text column of a Parquet record batch (string, large string or string view).
fn strings(
    batch: &arrow_array::RecordBatch,
    path: &Path,
    column: &str,
) -> Result<Vec<Option<String>>> {
    use arrow_array::cast::AsArray;
    use arrow_array::Array;
    use arrow_schema::DataType;
    let array = batch
        .column_by_name(column)
        .ok_or_else(|| anyhow!("{}: no {column:?} column", path.display()))?;
    let collect = |get: &dyn Fn(usize) -> String| -> Vec<Option<String>> {
        (0..array.len())
            .map(|i| (!array.is_null(i)).then(|| get(i)))
            .collect()
    };
    Ok(match array.data_type() {
        DataType::Utf8 => {
            let a = array.as_string::<i32>();
            collect(&|i| a.value(i).to_string())
        }
        DataType::LargeUtf8 => {
            let a = array.as_string::<i64>();
            collect(&|i| a.value(i).to_string())
        }
        DataType::Utf8View => {
            let a = array.as_string_view();
            collect(&|i| a.value(i).to_string())
        }
        other => {
            return Err(anyhow!(
                "{}: column {column:?} is {other}, not a string",
                path.display()
            ))
        }
    })
}

/// A CSV error, with its line if the csv crate knows it.
fn csv_error(e: &csv::Error, fallback_line: u64) -> String {
    let line = e.position().map_or(fallback_line, |p| p.line());
    match e.kind() {
        csv::ErrorKind::Utf8 { .. } => format!("line {line}: invalid UTF-8"),
        _ => format!("line {line}: {e}"),
    }
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn file(dir: &Path, name: &str, bytes: &[u8]) -> PathBuf {
        let p = dir.join(name);
        std::fs::File::create(&p).unwrap().write_all(bytes).unwrap();
        p
    }

    #[test]
    fn reads_jsonl_in_order_across_files() {
        let dir = tempfile::tempdir().unwrap();
        let a = file(
            dir.path(),
            "a.jsonl",
            b"{\"id\":1,\"text\":\"one\"}\n\n{\"text\":\"two\"}\r\n",
        );
        let b = file(dir.path(), "b.jsonl", b"{\"text\":\"three\"}");
        let mut r = DocReader::new(
            vec![(a, InputFormat::Jsonl), (b, InputFormat::Jsonl)],
            "text",
        );
        assert_eq!(r.next_batch(2).unwrap(), vec!["one", "two"]);
        assert_eq!(r.next_batch(2).unwrap(), vec!["three"]);
        assert!(r.next_batch(2).unwrap().is_empty());
    }

    #[test]
    fn text_lines_break_at_lone_carriage_returns_like_python() {
        let dir = tempfile::tempdir().unwrap();
        let a = file(
            dir.path(),
            "a.txt",
            b"one\r\ntwo\rthree\n\nfour\r\r\nfive\r",
        );
        let mut r = DocReader::new(vec![(a, InputFormat::Txt)], "text");
        assert_eq!(
            r.next_batch(10).unwrap(),
            vec!["one", "two", "three", "", "four", "", "five"]
        );
        assert_eq!(r.raw_table().rows(), 7);
    }

    #[test]
    fn errors_name_file_and_line() {
        let dir = tempfile::tempdir().unwrap();
        let a = file(
            dir.path(),
            "a.jsonl",
            b"{\"text\":\"ok\"}\n{\"text\":\"\xff\"}\n",
        );
        let mut r = DocReader::new(vec![(a, InputFormat::Jsonl)], "text");
        let e = r.next_batch(10).unwrap_err().to_string();
        assert!(e.contains("a.jsonl:2: invalid UTF-8"), "{e}");

        let b = file(dir.path(), "b.jsonl", b"{\"body\":\"x\"}\n");
        let mut r = DocReader::new(vec![(b, InputFormat::Jsonl)], "text");
        let e = r.next_batch(10).unwrap_err().to_string();
        assert!(
            e.contains("b.jsonl:1: no \"text\" column (columns: body)"),
            "{e}"
        );
    }
}
