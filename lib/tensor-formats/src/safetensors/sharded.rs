//! Hugging Face checkpoints: one safetensors file, or shards listed by `model.safetensors.index.json`.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::ffi::OsStr;
use std::fs;
use std::io;
use std::path::Path;

use serde::Deserialize;
use serde_json::{Map, Value};

use super::{SafetensorsEntry, SafetensorsFile, INDEX_FILE_NAME, SINGLE_FILE_NAME};
use crate::error::{FormatError, Result};

/// A checkpoint whose tensors may be spread over several safetensors files, each opened (mapped) once.
#[derive(Debug)]
pub struct ShardedCheckpoint {
    shards: Vec<SafetensorsFile>,
    names: Vec<String>,
    /// Tensor name -> (index in `shards`, index in that shard's `tensors()`).
    locations: HashMap<String, (usize, usize)>,
    index_metadata: Option<Map<String, Value>>,
}

/// The parts of an index file that matter; transformers 5.23 also requires `metadata` but uses only the map.
#[derive(Deserialize)]
struct RawIndex {
    #[serde(default)]
    metadata: Option<Map<String, Value>>,
    weight_map: BTreeMap<String, String>,
}

impl ShardedCheckpoint {
    /// Opens a checkpoint from `path`, which is one of:
    ///
    /// * a directory with [`SINGLE_FILE_NAME`], which wins over an index next to it, as in transformers;
    /// * a directory with [`INDEX_FILE_NAME`] and the shards it names;
    /// * a directory with exactly one other `*.safetensors` file;
    /// * an index file (`*.index.json`) or a safetensors file.
    ///
    /// A directory with several `*.safetensors` files but neither of those names is refused: nothing says
    /// which files form the checkpoint.
    ///
    /// With an index, the shards are the distinct files its `weight_map` names (plain file names next to the
    /// index), and every tensor it maps must be in the shard it names. Like transformers, which loads every
    /// tensor of those shards, tensors present in a shard but missing from the `weight_map` are tolerated and
    /// included. A tensor stored in two shards is refused.
    pub fn open(path: impl AsRef<Path>) -> Result<ShardedCheckpoint> {
        let path = path.as_ref();
        if !path.is_dir() {
            return if path.to_string_lossy().ends_with(".index.json") {
                Self::open_index(path)
            } else {
                Self::from_shards(vec![SafetensorsFile::open(path)?], None)
            };
        }
        let single = path.join(SINGLE_FILE_NAME);
        if single.is_file() {
            return Self::from_shards(vec![SafetensorsFile::open(single)?], None);
        }
        let index = path.join(INDEX_FILE_NAME);
        if index.is_file() {
            return Self::open_index(&index);
        }
        let mut found = Vec::new();
        for entry in fs::read_dir(path).map_err(|e| FormatError::io(path, e))? {
            let file = entry.map_err(|e| FormatError::io(path, e))?.path();
            if file.extension() == Some(OsStr::new("safetensors")) && file.is_file() {
                found.push(file);
            }
        }
        found.sort();
        match found.as_slice() {
            [one] => Self::from_shards(vec![SafetensorsFile::open(one)?], None),
            [] => Err(FormatError::Invalid(format!(
                "{}: no {SINGLE_FILE_NAME}, {INDEX_FILE_NAME} or other .safetensors file",
                path.display()
            ))),
            many => Err(FormatError::Invalid(format!(
                "{}: {} .safetensors files ({}) but no {INDEX_FILE_NAME} to say how they form a \
                 checkpoint; refusing to guess",
                path.display(),
                many.len(),
                many.iter()
                    .map(|f| f.file_name().unwrap_or_default().to_string_lossy())
                    .collect::<Vec<_>>()
                    .join(", ")
            ))),
        }
    }

    /// Every tensor name: shard by shard (in file-name order), each shard's tensors in file-offset order.
    pub fn names(&self) -> &[String] {
        &self.names
    }

    /// The tensor called `name` and the shard holding it.
    pub fn get(&self, name: &str) -> Option<(&SafetensorsFile, &SafetensorsEntry)> {
        let &(shard, entry) = self.locations.get(name)?;
        let file = &self.shards[shard];
        Some((file, &file.tensors()[entry]))
    }

    /// The open shards, in file-name order (one file when there is no index).
    pub fn shards(&self) -> &[SafetensorsFile] {
        &self.shards
    }

    /// The index's `metadata` object (`total_size`, `total_parameters`), as written; `None` without an index.
    pub fn index_metadata(&self) -> Option<&Map<String, Value>> {
        self.index_metadata.as_ref()
    }

    fn open_index(index: &Path) -> Result<ShardedCheckpoint> {
        let text = fs::read(index).map_err(|e| FormatError::io(index, e))?;
        let raw: RawIndex = serde_json::from_slice(&text).map_err(|e| {
            FormatError::Corrupt(format!(
                "{}: not a valid safetensors index: {e}",
                index.display()
            ))
        })?;
        let dir = index.parent().unwrap_or(Path::new(""));
        let files: BTreeSet<&str> = raw.weight_map.values().map(String::as_str).collect();
        let mut shards = Vec::with_capacity(files.len());
        for file in files {
            if file.is_empty() || file == "." || file == ".." || file.contains(['/', '\\']) {
                return Err(FormatError::Corrupt(format!(
                    "{}: weight_map names `{file}`, which is not a file name in the index's \
                     directory",
                    index.display()
                )));
            }
            let shard = SafetensorsFile::open(dir.join(file)).map_err(|e| match e {
                FormatError::Io { path, source } if source.kind() == io::ErrorKind::NotFound => {
                    FormatError::io(
                        path,
                        io::Error::new(
                            source.kind(),
                            format!("missing, but {} names it as a shard", index.display()),
                        ),
                    )
                }
                other => other,
            })?;
            shards.push(shard);
        }
        let checkpoint = Self::from_shards(shards, raw.metadata)?;
        for (name, file) in &raw.weight_map {
            match checkpoint.get(name) {
                Some((shard, _)) if shard.path().file_name() == Some(OsStr::new(file)) => {}
                found => {
                    let where_it_is = match found {
                        Some((shard, _)) => format!("it is in {}", shard.path().display()),
                        None => "no shard has it".to_string(),
                    };
                    return Err(FormatError::Corrupt(format!(
                        "{}: maps tensor `{name}` to {file}, but {file} has no such tensor \
                         ({where_it_is})",
                        index.display()
                    )));
                }
            }
        }
        Ok(checkpoint)
    }

    fn from_shards(
        shards: Vec<SafetensorsFile>,
        index_metadata: Option<Map<String, Value>>,
    ) -> Result<ShardedCheckpoint> {
        let mut names = Vec::new();
        let mut locations = HashMap::new();
        for (s, shard) in shards.iter().enumerate() {
            for (e, entry) in shard.tensors().iter().enumerate() {
                if let Some((other, _)) = locations.insert(entry.name.clone(), (s, e)) {
                    return Err(FormatError::Corrupt(format!(
                        "tensor `{}` is stored in both {} and {}",
                        entry.name,
                        shards[other].path().display(),
                        shard.path().display()
                    )));
                }
                names.push(entry.name.clone());
            }
        }
        Ok(ShardedCheckpoint {
            shards,
            names,
            locations,
            index_metadata,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dtype::DType;
    use crate::safetensors::test_support::{spec, write_to_vec};
    use crate::safetensors::{render_index, shard_file_name};

    /// Writes shards of U8 tensors (`name -> [value; 2]`) and, unless `weight_map` is `None`, an index.
    fn checkpoint(shards: &[&[&str]], weight_map: Option<&[(&str, usize)]>) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        for (i, names) in shards.iter().enumerate() {
            let tensors: Vec<_> = names
                .iter()
                .map(|&n| (spec(n, DType::U8, &[2]), vec![n.len() as u8; 2]))
                .collect();
            let bytes = write_to_vec(&tensors, None);
            fs::write(dir.path().join(shard_file_name(i, shards.len())), bytes).unwrap();
        }
        if let Some(map) = weight_map {
            let map = map
                .iter()
                .map(|&(n, s)| (n.to_string(), shard_file_name(s, shards.len())))
                .collect();
            fs::write(
                dir.path().join(INDEX_FILE_NAME),
                render_index(&map, 42, Some(21)),
            )
            .unwrap();
        }
        dir
    }

    fn error(path: impl AsRef<Path>) -> String {
        ShardedCheckpoint::open(path).unwrap_err().to_string()
    }

    #[test]
    fn opens_an_index_directory() {
        let dir = checkpoint(
            &[&["b", "a"], &["ccc"]],
            Some(&[("a", 0), ("b", 0), ("ccc", 1)]),
        );
        for path in [dir.path().to_path_buf(), dir.path().join(INDEX_FILE_NAME)] {
            let ckpt = ShardedCheckpoint::open(&path).unwrap();
            assert_eq!(ckpt.names(), ["a", "b", "ccc"]);
            assert_eq!(ckpt.shards().len(), 2);
            let (file, entry) = ckpt.get("ccc").unwrap();
            assert_eq!(
                file.path(),
                dir.path().join("model-00002-of-00002.safetensors")
            );
            assert_eq!(file.tensor(entry).storage, [3, 3]);
            assert!(ckpt.get("d").is_none());
            assert_eq!(ckpt.index_metadata().unwrap()["total_size"], 42);
        }
    }

    #[test]
    fn opens_single_files() {
        let dir = checkpoint(&[&["x"]], None);
        let single = dir.path().join(SINGLE_FILE_NAME);
        for path in [dir.path(), single.as_path()] {
            let ckpt = ShardedCheckpoint::open(path).unwrap();
            assert_eq!(ckpt.names(), ["x"]);
            assert_eq!(ckpt.get("x").unwrap().0.path(), single);
            assert!(ckpt.index_metadata().is_none());
        }
        // model.safetensors wins over an index, as in transformers.
        fs::write(dir.path().join(INDEX_FILE_NAME), "not even JSON").unwrap();
        assert_eq!(ShardedCheckpoint::open(dir.path()).unwrap().names(), ["x"]);
        fs::remove_file(dir.path().join(INDEX_FILE_NAME)).unwrap();
        // Any one .safetensors file, when it is the only one.
        let other = dir.path().join("consolidated.safetensors");
        fs::rename(&single, &other).unwrap();
        assert_eq!(
            ShardedCheckpoint::open(dir.path()).unwrap().shards()[0].path(),
            other
        );
    }

    #[test]
    fn refuses_ambiguous_directories() {
        let dir = checkpoint(&[&["a"], &["b"]], None);
        assert_eq!(
            error(dir.path()),
            format!(
                "{}: 2 .safetensors files (model-00001-of-00002.safetensors, model-00002-of-00002.safetensors) \
                 but no model.safetensors.index.json to say how they form a checkpoint; refusing to guess",
                dir.path().display()
            )
        );
        let empty = tempfile::tempdir().unwrap();
        assert_eq!(
            error(empty.path()),
            format!(
                "{}: no model.safetensors, model.safetensors.index.json or other .safetensors file",
                empty.path().display()
            )
        );
    }

    #[test]
    fn reports_index_inconsistencies() {
        let shard = |dir: &tempfile::TempDir, i| {
            dir.path().join(shard_file_name(i, 2)).display().to_string()
        };
        let index =
            |dir: &tempfile::TempDir| dir.path().join(INDEX_FILE_NAME).display().to_string();

        let dir = checkpoint(&[&["a"], &["b"]], Some(&[("a", 0), ("b", 1)]));
        fs::remove_file(shard(&dir, 1)).unwrap();
        assert_eq!(
            error(dir.path()),
            format!(
                "{}: missing, but {} names it as a shard",
                shard(&dir, 1),
                index(&dir)
            )
        );

        let dir = checkpoint(&[&["a"], &["b"]], Some(&[("a", 0), ("b", 1), ("c", 1)]));
        assert_eq!(
            error(dir.path()),
            format!(
                "{}: maps tensor `c` to model-00002-of-00002.safetensors, but model-00002-of-00002.safetensors has \
                 no such tensor (no shard has it)",
                index(&dir)
            )
        );

        let dir = checkpoint(&[&["a"], &["b"]], Some(&[("a", 1), ("b", 0)]));
        assert!(error(dir.path())
            .ends_with(&format!("has no such tensor (it is in {})", shard(&dir, 0))));

        let dir = checkpoint(&[&["a"], &["a"]], Some(&[("a", 0)]));
        fs::write(
            dir.path().join(INDEX_FILE_NAME),
            render_index(
                &BTreeMap::from([
                    ("a".into(), shard_file_name(0, 2)),
                    ("x".into(), shard_file_name(1, 2)),
                ]),
                0,
                None,
            ),
        )
        .unwrap();
        assert_eq!(
            error(dir.path()),
            format!(
                "tensor `a` is stored in both {} and {}",
                shard(&dir, 0),
                shard(&dir, 1)
            )
        );

        fs::write(
            dir.path().join(INDEX_FILE_NAME),
            r#"{"weight_map":{"a":"../model-00001-of-00002.safetensors"}}"#,
        )
        .unwrap();
        assert_eq!(
            error(dir.path()),
            format!("{}: weight_map names `../model-00001-of-00002.safetensors`, which is not a file name in the index's directory", index(&dir))
        );
        fs::write(dir.path().join(INDEX_FILE_NAME), r#"{"metadata":{}}"#).unwrap();
        assert!(error(dir.path()).starts_with(&format!(
            "{}: not a valid safetensors index: missing field `weight_map`",
            index(&dir)
        )));

        fs::write(shard(&dir, 0), b"\x08\0\0\0\0\0\0\0{}").unwrap();
        fs::write(
            dir.path().join(INDEX_FILE_NAME),
            r#"{"weight_map":{"a":"model-00001-of-00002.safetensors"}}"#,
        )
        .unwrap();
        assert_eq!(
            error(dir.path()),
            format!(
                "{}: truncated: the header length says 8 bytes but only 2 follow it",
                shard(&dir, 0)
            )
        );
    }

    #[test]
    fn tolerates_tensors_missing_from_the_weight_map() {
        // transformers loads every tensor of every shard the index names, listed or not.
        let dir = checkpoint(&[&["a", "extra"], &["b"]], Some(&[("a", 0), ("b", 1)]));
        let ckpt = ShardedCheckpoint::open(dir.path()).unwrap();
        assert_eq!(ckpt.names(), ["a", "extra", "b"]);
        let (file, _) = ckpt.get("extra").unwrap();
        assert_eq!(
            file.path(),
            dir.path().join("model-00001-of-00002.safetensors")
        );
    }
}
