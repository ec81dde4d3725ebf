//! Check 2, structure, header-only: each archive parses (zip directory, `data.pkl`, storage
//! records in range) and holds exactly the tensors the layout puts on its rank, in order, with
//! the checkpoint's dtype, the planned shapes and strides. No tensor data is read.
//!
//! Files in NxD's xser training-checkpoint form (`TensorReference`s) hold the runtime parameters
//! rather than the converter's output: their key order is only a warning and their strides are
//! not checked (every tensor is saved contiguous there, o_proj included).

use std::collections::{BTreeSet, HashMap, HashSet};
use std::fs;
use std::path::Path;

use nxd_layout::FilePlan;
use tensor_formats::torch::Value;
use tensor_formats::xser::{tensors_dir, NxdFile};
use tensor_formats::{DType, FormatError};

use crate::names::Slot;
use crate::report::{Check, Problem};

/// One tensor of an opened file, as its header describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorInfo {
    /// Key in the file.
    pub name: String,
    /// Element type.
    pub dtype: DType,
    /// Shape.
    pub shape: Vec<usize>,
    /// Strides, in elements.
    pub strides: Vec<usize>,
    /// Storage offset, in elements.
    pub offset: usize,
    /// Elements in the tensor's storage.
    pub storage_elems: usize,
}

/// A shard file opened header-only: parsed, every tensor's storage checked to be in the file.
pub struct Opened {
    /// The file (mapped; its tensor bytes are untouched until a cross-rank check reads them).
    pub file: NxdFile,
    /// The zip's top folder (torch names it after the file it saved to).
    pub archive_name: String,
    /// The tensors, in file order.
    pub tensors: Vec<TensorInfo>,
    /// The `TensorReference` ids of the xser training form (empty for inline tensors).
    pub tids: BTreeSet<usize>,
}

/// Why a file could not be opened.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OpenFailure {
    /// What went wrong, one line.
    pub message: String,
    /// True for an I/O error other than a missing file (permissions, device errors): the input
    /// cannot be verified, rather than being wrong.
    pub io: bool,
}

fn is_io(e: &FormatError) -> bool {
    let kind = match e {
        FormatError::Io { source, .. } => source.kind(),
        FormatError::Stream(s) => s.kind(),
        _ => return false,
    };
    kind != std::io::ErrorKind::NotFound && kind != std::io::ErrorKind::UnexpectedEof
}

/// Opens a shard file header-only.
pub fn open(path: &Path) -> Result<Opened, OpenFailure> {
    if fs::metadata(path).is_ok_and(|m| m.len() == 0) {
        return Err(OpenFailure {
            message: "empty file (0 bytes)".into(),
            io: false,
        });
    }
    let fail = |e: FormatError| {
        let prefix = format!("{}: ", path.display());
        let msg = e.to_string();
        OpenFailure {
            message: msg.strip_prefix(&prefix).unwrap_or(&msg).to_string(),
            io: is_io(&e),
        }
    };
    let file = NxdFile::open(path).map_err(fail)?;
    let views = file.tensors().map_err(fail)?;
    let tensors = views
        .iter()
        .map(|(name, v)| TensorInfo {
            name: name.to_string(),
            dtype: v.dtype,
            shape: v.layout.shape.clone(),
            strides: v.layout.strides.clone(),
            offset: v.layout.offset,
            storage_elems: v.storage.len() / v.dtype.size(),
        })
        .collect();
    let mut tids = BTreeSet::new();
    collect_tids(file.main().root(), &mut tids);
    Ok(Opened {
        archive_name: file.main().archive().archive_name.clone(),
        file,
        tensors,
        tids,
    })
}

fn collect_tids(v: &Value, out: &mut BTreeSet<usize>) {
    match v {
        Value::Object { class, state } if class.ends_with("TensorReference") => {
            if let Some(tid) = state
                .iter()
                .find(|(k, _)| k.as_str() == Some("tid"))
                .and_then(|(_, v)| v.as_int())
            {
                out.insert(tid as usize);
            }
        }
        Value::Dict(items) => items.iter().for_each(|(_, v)| collect_tids(v, out)),
        _ => {}
    }
}

/// What comparing one file with its plan found.
#[derive(Debug, Clone, Default)]
pub struct Compared {
    /// Problems.
    pub problems: Vec<Problem>,
    /// Warnings.
    pub warnings: Vec<Problem>,
    /// The tensors whose dtype and shape match the plan (safe to read for cross-rank checks).
    pub verified: HashSet<String>,
}

fn dtype_name(safetensors: &str) -> String {
    DType::from_safetensors_name(safetensors).map_or(safetensors.to_string(), |d| d.to_string())
}

/// Compares an opened file with the plan of its rank. `stems` maps every expected file stem
/// (`dp_rank_…_pp_rank_YY`) to its (tp, pp), to recognise a file saved for another rank.
pub fn compare(
    slot: &Slot,
    opened: &Opened,
    plan: &FilePlan,
    stems: &HashMap<String, (usize, usize)>,
) -> Compared {
    let mut out = Compared::default();
    let rel = slot.rel.as_str();
    let problem = |msg: String| Problem::file(Check::Structure, rel, msg);

    let own_stem = plan.file_name.trim_end_matches(".pt");
    let archive = opened.archive_name.as_str();
    if archive != own_stem && archive != "archive" {
        match stems.get(archive) {
            Some((t, p)) => out.problems.push(problem(format!(
                "holds the archive torch saved as {archive}.pt (tp rank {t} pp rank {p}): files \
                 swapped or copied over each other?"
            ))),
            None => out.warnings.push(problem(format!(
                "the archive inside is named {archive}, not {own_stem}: the file was renamed"
            ))),
        }
    }

    let mut seen: HashMap<&str, usize> = HashMap::new();
    for t in &opened.tensors {
        *seen.entry(t.name.as_str()).or_default() += 1;
    }
    for (name, n) in &seen {
        if *n > 1 {
            out.problems
                .push(problem(format!("key appears {n} times")).with_tensor(*name));
        }
    }
    let planned: HashMap<&str, usize> = plan
        .tensors
        .iter()
        .enumerate()
        .map(|(i, t)| (t.name.as_str(), i))
        .collect();
    let where_ = format!("tp rank {} pp rank {}", plan.tp, plan.pp);
    for t in &plan.tensors {
        if !seen.contains_key(t.name.as_str()) {
            out.problems.push(
                problem(format!("missing (the layout puts it on {where_})"))
                    .with_tensor(t.name.as_str()),
            );
        }
    }
    for t in &opened.tensors {
        if !planned.contains_key(t.name.as_str()) {
            out.problems.push(
                problem(format!(
                    "unexpected tensor (not in the layout for {where_})"
                ))
                .with_tensor(t.name.as_str()),
            );
        }
    }
    // NxD's training checkpoints (TensorReferences) hold the runtime parameters: their key
    // order is the module's and every tensor is contiguous, unlike the converter's output.
    let training_form = !opened.tids.is_empty();
    let same_keys = seen.len() == planned.len()
        && opened.tensors.len() == plan.tensors.len()
        && seen.keys().all(|k| planned.contains_key(k));
    if same_keys {
        if let Some(i) =
            (0..plan.tensors.len()).find(|&i| opened.tensors[i].name != plan.tensors[i].name)
        {
            let p = problem(format!(
                "keys out of order: position {i} holds {}, the layout puts {} there",
                opened.tensors[i].name, plan.tensors[i].name
            ));
            if training_form {
                out.warnings.push(p);
            } else {
                out.problems.push(p);
            }
        }
    }

    for t in &opened.tensors {
        let Some(&pi) = planned.get(t.name.as_str()) else {
            continue;
        };
        let p = &plan.tensors[pi];
        let tensor_problem = |msg: String| problem(msg).with_tensor(t.name.as_str());
        let mut ok = true;
        if t.dtype.safetensors_name() != p.dtype {
            ok = false;
            out.problems.push(tensor_problem(format!(
                "dtype {}, expected {} (the checkpoint's dtype)",
                t.dtype,
                dtype_name(&p.dtype)
            )));
        }
        if t.shape != p.shape {
            ok = false;
            out.problems.push(tensor_problem(format!(
                "shape {:?}, expected {:?}",
                t.shape, p.shape
            )));
        } else if t.strides != p.strides() && !training_form {
            let why = if p.stored_transposed {
                " (NxD stores o_proj transposed with --qkv-linear)"
            } else {
                " (contiguous)"
            };
            out.problems.push(tensor_problem(format!(
                "strides {:?}, expected {:?}{why}",
                t.strides,
                p.strides()
            )));
        }
        if ok {
            out.verified.insert(t.name.clone());
            let numel: usize = t.shape.iter().product();
            if t.offset != 0 || t.storage_elems != numel {
                out.warnings.push(tensor_problem(format!(
                    "storage of {} elements at offset {} for {numel} elements: NxD clones every \
                     tensor into its own storage",
                    t.storage_elems, t.offset
                )));
            }
        }
    }
    out
}

/// Checks the xser directory beside an opened file: empty for the converter form, exactly the
/// referenced `tensor_<tid>.pt` files (and a `.info.pt` beside the file) for the training form.
pub fn check_xser_dir(slot: &Slot, opened: &Opened) -> (Vec<Problem>, Vec<Problem>) {
    let (mut problems, mut warnings) = (Vec::new(), Vec::new());
    if !slot.xser_dir {
        return (problems, warnings);
    }
    let dir = tensors_dir(&slot.path);
    let dir_rel = format!("{}.tensors", slot.rel);
    let expected: HashSet<String> = opened
        .tids
        .iter()
        .map(|t| format!("tensor_{t}.pt"))
        .collect();
    let mut names: Vec<String> = fs::read_dir(&dir)
        .map(|rd| {
            rd.filter_map(Result::ok)
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    for n in names.iter().filter(|n| !expected.contains(*n)) {
        let why = if opened.tids.is_empty() {
            "stray: the file holds its tensors inline, so its xser directory should be empty"
        } else {
            "stray: no TensorReference in the file points here"
        };
        problems.push(Problem::file(Check::Names, &format!("{dir_rel}/{n}"), why));
    }
    if opened.tids.is_empty() && slot.info_file {
        problems.push(Problem::file(
            Check::Names,
            &format!("{}.info.pt", slot.rel),
            "stray: an xser info file beside a file without TensorReferences",
        ));
    }
    if !opened.tids.is_empty() && !slot.info_file {
        warnings.push(Problem::file(
            Check::Names,
            &slot.rel,
            "xser training form without its .info.pt",
        ));
    }
    (problems, warnings)
}
