//! Check 1, names and counts: which of the expected `dp_rank_00_tp_rank_XX_pp_rank_YY.pt` files
//! are there, and what else is in `model/` (stray, misnamed, duplicate files; xser
//! directories).

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, Context};
use nxd_layout::file_name;
use suite_support::exit::ToolError;

use crate::report::{Check, Mark, Problem};

/// The subdirectory holding the shard files (as NxD writes it).
pub const MODEL_DIR: &str = "model";

/// Marker file of an NxD training checkpoint tag directory.
pub const CHECKPOINT_MARKER: &str = "checkpoint";

/// Written by NxD when every rank finished saving a training checkpoint.
pub const DONE_MARKER: &str = "done";

/// Where the shard files of a directory are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Located {
    /// The directory paths are relative to (the one holding `model/`).
    pub root: PathBuf,
    /// The directory holding the shard files.
    pub model_dir: PathBuf,
    /// True for an NxD training checkpoint tag directory (it has a `checkpoint` file).
    pub training: bool,
}

/// Finds the shard files of `dir`: `dir/model/` (an output or training checkpoint directory),
/// or `dir` itself when it is named `model` or holds `dp_rank_*` entries. `None` if `dir` is a
/// directory without shard files.
pub fn locate(dir: &Path) -> Result<Option<Located>, ToolError> {
    let meta = fs::metadata(dir)
        .with_context(|| format!("reading {}", dir.display()))
        .map_err(ToolError::usage)?;
    if !meta.is_dir() {
        return Err(ToolError::usage(anyhow!(
            "{} is not a directory (pass the output directory holding model/, model/ itself, or \
             a training checkpoint tag directory)",
            dir.display()
        )));
    }
    let training = |root: &Path| root.join(CHECKPOINT_MARKER).is_file();
    let model = dir.join(MODEL_DIR);
    if model.is_dir() {
        return Ok(Some(Located {
            root: dir.to_path_buf(),
            model_dir: model,
            training: training(dir),
        }));
    }
    let named_model = dir.file_name().is_some_and(|n| n == MODEL_DIR);
    let has_shards = fs::read_dir(dir)
        .with_context(|| format!("listing {}", dir.display()))
        .map_err(ToolError::usage)?
        .filter_map(Result::ok)
        .any(|e| e.file_name().to_string_lossy().starts_with("dp_rank_"));
    if named_model || has_shards {
        let root = match dir.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        };
        return Ok(Some(Located {
            training: training(&root),
            root,
            model_dir: dir.to_path_buf(),
        }));
    }
    Ok(None)
}

/// One expected shard file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Slot {
    /// tp rank.
    pub tp: usize,
    /// pp rank.
    pub pp: usize,
    /// Path relative to the root (`model/dp_rank_…pt`).
    pub rel: String,
    /// Full path.
    pub path: PathBuf,
    /// True if a regular file is there.
    pub present: bool,
    /// True if `<file>.tensors/` is there (a directory).
    pub xser_dir: bool,
    /// True if `<file>.info.pt` is there (xser training form).
    pub info_file: bool,
    /// The grid mark so far.
    pub mark: Mark,
}

impl Slot {
    /// Raises the grid mark to at least `mark`.
    pub fn flag(&mut self, mark: Mark) {
        self.mark = self.mark.max(mark);
    }
}

/// The result of the names check.
#[derive(Debug, Clone)]
pub struct NameScan {
    /// Every expected file, tp-major (the plan's order: `slots[tp * pp_size + pp]`).
    pub slots: Vec<Slot>,
    /// What is wrong.
    pub problems: Vec<Problem>,
}

/// `dp_rank_<d>[_ep_rank_<e>]_tp_rank_<t>_pp_rank_<p><tail>`.
#[derive(Debug, Clone, PartialEq, Eq)]
struct RankName<'a> {
    dp: usize,
    ep: Option<usize>,
    tp: usize,
    pp: usize,
    tail: &'a str,
}

fn take_num(s: &str) -> Option<(usize, &str)> {
    let end = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    if end == 0 {
        return None;
    }
    Some((s[..end].parse().ok()?, &s[end..]))
}

fn parse_rank_name(name: &str) -> Option<RankName<'_>> {
    let (dp, rest) = take_num(name.strip_prefix("dp_rank_")?)?;
    let (ep, rest) = match rest.strip_prefix("_ep_rank_") {
        Some(r) => {
            let (e, r) = take_num(r)?;
            (Some(e), r)
        }
        None => (None, rest),
    };
    let (tp, rest) = take_num(rest.strip_prefix("_tp_rank_")?)?;
    let (pp, tail) = take_num(rest.strip_prefix("_pp_rank_")?)?;
    Some(RankName {
        dp,
        ep,
        tp,
        pp,
        tail,
    })
}

/// What an entry beside the shard files is, relative to its rank's file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Role {
    Shard,
    XserDir,
    InfoFile,
}

/// Lists `model_dir` and checks it against the `tp` x `pp` layout.
pub fn scan(
    root: &Path,
    model_dir: &Path,
    tp: usize,
    pp: usize,
    xser: bool,
) -> Result<NameScan, ToolError> {
    let model_rel = rel_of(root, model_dir);
    let rel = |name: &str| {
        if model_rel.is_empty() {
            name.to_string()
        } else {
            format!("{model_rel}/{name}")
        }
    };
    let mut slots: Vec<Slot> = Vec::with_capacity(tp * pp);
    for t in 0..tp {
        for p in 0..pp {
            let name = file_name(t, p);
            slots.push(Slot {
                tp: t,
                pp: p,
                rel: rel(&name),
                path: model_dir.join(&name),
                present: false,
                xser_dir: false,
                info_file: false,
                mark: Mark::Ok,
            });
        }
    }
    let mut names: Vec<(String, bool)> = Vec::new();
    for e in fs::read_dir(model_dir)
        .with_context(|| format!("listing {}", model_dir.display()))
        .map_err(ToolError::usage)?
    {
        let e = e
            .with_context(|| format!("listing {}", model_dir.display()))
            .map_err(ToolError::usage)?;
        let is_dir = fs::metadata(e.path()).is_ok_and(|m| m.is_dir());
        names.push((e.file_name().to_string_lossy().into_owned(), is_dir));
    }
    names.sort();

    let mut problems = Vec::new();
    // Non-canonical names of an in-range rank: (tp, pp) -> names.
    let mut aliases: BTreeMap<(usize, usize), Vec<String>> = BTreeMap::new();
    let layout = format!("tp {tp} x pp {pp}");
    for (name, is_dir) in &names {
        let stray = |why: String| Problem::file(Check::Names, &rel(name), why);
        if name.starts_with('.') && name.contains(".partial-") {
            problems.push(stray(
                "stray partial output of an interrupted (or still running) write".into(),
            ));
            continue;
        }
        let Some(r) = parse_rank_name(name) else {
            problems.push(stray(format!(
                "stray {}: not a shard file of this layout",
                if *is_dir { "directory" } else { "file" }
            )));
            continue;
        };
        let role = match r.tail {
            ".pt" => Role::Shard,
            ".pt.tensors" => Role::XserDir,
            ".pt.info.pt" => Role::InfoFile,
            _ => {
                problems.push(stray(format!(
                    "stray {}: the name does not end in .pt",
                    if *is_dir { "directory" } else { "file" }
                )));
                continue;
            }
        };
        let in_range = r.tp < tp && r.pp < pp;
        let canonical_base = file_name(r.tp, r.pp);
        let canonical = r.dp == 0 && r.ep.is_none() && name.starts_with(&canonical_base);
        if !in_range {
            problems.push(stray(format!(
                "stray: tp rank {} pp rank {} is outside the layout ({layout}); a file from a \
                 different layout?",
                r.tp, r.pp
            )));
            continue;
        }
        if r.ep.is_some() {
            problems.push(stray(
                "stray: an expert-parallel (ep_rank) name; a Llama shard set has no ep ranks"
                    .into(),
            ));
            continue;
        }
        if r.dp != 0 {
            problems.push(stray(format!(
                "stray: dp rank {}; NxD's converter writes dp_rank_00 only",
                r.dp
            )));
            continue;
        }
        let slot = &mut slots[r.tp * pp + r.pp];
        if !canonical {
            if role == Role::Shard {
                aliases.entry((r.tp, r.pp)).or_default().push(name.clone());
            } else {
                problems.push(stray(format!(
                    "misnamed: the name for tp rank {} pp rank {} is {canonical_base}{}",
                    r.tp, r.pp, r.tail
                )));
            }
            continue;
        }
        match role {
            Role::Shard if *is_dir => {
                slot.flag(Mark::Unreadable);
                problems.push(stray("is a directory, not a shard file".into()));
            }
            Role::Shard => slot.present = true,
            Role::XserDir if !xser => {
                problems.push(stray(
                    "stray xser directory: the layout has no --xser (pass --xser if the set was \
                     written with --save_xser)"
                        .into(),
                ));
            }
            Role::XserDir if !*is_dir => {
                slot.flag(Mark::Structure);
                problems.push(stray("is a file, but xser needs a directory here".into()));
            }
            Role::XserDir => slot.xser_dir = true,
            Role::InfoFile if !xser => {
                problems.push(stray(
                    "stray xser info file: the layout has no --xser".into(),
                ));
            }
            Role::InfoFile => slot.info_file = true,
        }
    }

    for slot in &mut slots {
        let alias = aliases.get(&(slot.tp, slot.pp));
        if !slot.present && slot.mark == Mark::Ok {
            slot.flag(Mark::Missing);
            let mut why = "missing".to_string();
            if let Some(a) = alias {
                why.push_str(&format!(" (misnamed as {}?)", a.join(", ")));
            }
            problems.push(Problem::file(Check::Names, &slot.rel, why));
        }
        if let Some(a) = alias {
            for n in a {
                let (t, p) = (slot.tp, slot.pp);
                let what = if slot.present {
                    format!(
                        "duplicate: another file for tp rank {t} pp rank {p}, which is there \
                         under its own name"
                    )
                } else {
                    format!("misnamed: this looks like the file for tp rank {t} pp rank {p}")
                };
                problems.push(Problem::file(
                    Check::Names,
                    &rel(n),
                    format!("{what} (expected name {})", file_name(slot.tp, slot.pp)),
                ));
            }
        }
        if xser && slot.present && !slot.xser_dir {
            slot.flag(Mark::Structure);
            problems.push(Problem::file(
                Check::Names,
                &slot.rel,
                format!(
                    "no xser directory {}.tensors/ beside it (the layout has --xser)",
                    file_name(slot.tp, slot.pp)
                ),
            ));
        }
    }
    Ok(NameScan { slots, problems })
}

/// `path` relative to `root`, `/`-separated (empty if they are the same directory).
pub fn rel_of(root: &Path, path: &Path) -> String {
    let r = path.strip_prefix(root).unwrap_or(path);
    r.components()
        .map(|c| c.as_os_str().to_string_lossy().into_owned())
        .collect::<Vec<_>>()
        .join("/")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_rank_names() {
        let r = parse_rank_name("dp_rank_00_tp_rank_03_pp_rank_01.pt").unwrap();
        assert_eq!((r.dp, r.ep, r.tp, r.pp, r.tail), (0, None, 3, 1, ".pt"));
        let r = parse_rank_name("dp_rank_00_ep_rank_01_tp_rank_3_pp_rank_001.pt.tensors").unwrap();
        assert_eq!(
            (r.dp, r.ep, r.tp, r.pp, r.tail),
            (0, Some(1), 3, 1, ".pt.tensors")
        );
        assert!(parse_rank_name("dp_rank_x_tp_rank_0_pp_rank_0.pt").is_none());
        assert!(parse_rank_name("config.json").is_none());
    }

    fn touch(dir: &Path, name: &str) {
        fs::write(dir.join(name), b"x").unwrap();
    }

    #[test]
    fn reports_missing_stray_misnamed_and_duplicate_files() {
        let d = tempfile::tempdir().unwrap();
        let m = d.path().join("model");
        fs::create_dir(&m).unwrap();
        touch(&m, "dp_rank_00_tp_rank_00_pp_rank_00.pt");
        touch(&m, "dp_rank_00_tp_rank_0_pp_rank_00.pt"); // duplicate of (0, 0)
        touch(&m, "dp_rank_00_tp_rank_1_pp_rank_0.pt"); // misnamed (1, 0)
        touch(&m, "dp_rank_00_tp_rank_02_pp_rank_00.pt"); // outside tp 2
        touch(&m, "notes.txt");
        touch(&m, ".dp_rank_00_tp_rank_01_pp_rank_01.pt.partial-12-0");
        fs::create_dir(m.join("dp_rank_00_tp_rank_00_pp_rank_00.pt.tensors")).unwrap();
        let loc = locate(d.path()).unwrap().unwrap();
        assert_eq!(loc.model_dir, m);
        assert!(!loc.training);
        let scan = scan(&loc.root, &loc.model_dir, 2, 2, false).unwrap();
        let lines: Vec<String> = scan.problems.iter().map(Problem::line).collect();
        let has = |needle: &str| {
            assert!(
                lines.iter().any(|l| l.contains(needle)),
                "{needle} not in {lines:#?}"
            )
        };
        has("model/.dp_rank_00_tp_rank_01_pp_rank_01.pt.partial-12-0: stray partial");
        has("model/dp_rank_00_tp_rank_00_pp_rank_00.pt.tensors: stray xser directory");
        has("model/dp_rank_00_tp_rank_02_pp_rank_00.pt: stray: tp rank 2 pp rank 0 is outside");
        has("model/notes.txt: stray file");
        has("model/dp_rank_00_tp_rank_01_pp_rank_00.pt: missing (misnamed as dp_rank_00_tp_rank_1_pp_rank_0.pt?)");
        has("model/dp_rank_00_tp_rank_1_pp_rank_0.pt: misnamed");
        has("model/dp_rank_00_tp_rank_0_pp_rank_00.pt: duplicate");
        has("model/dp_rank_00_tp_rank_01_pp_rank_01.pt: missing");
        has("model/dp_rank_00_tp_rank_00_pp_rank_01.pt: missing");
        assert_eq!(lines.len(), 9, "{lines:#?}");
        let marks: Vec<Mark> = scan.slots.iter().map(|s| s.mark).collect();
        assert_eq!(
            marks,
            vec![Mark::Ok, Mark::Missing, Mark::Missing, Mark::Missing]
        );
    }

    #[test]
    fn locates_model_dirs_and_training_checkpoints() {
        let d = tempfile::tempdir().unwrap();
        assert_eq!(locate(d.path()).unwrap(), None);
        let m = d.path().join("model");
        fs::create_dir(&m).unwrap();
        touch(d.path(), CHECKPOINT_MARKER);
        let a = locate(d.path()).unwrap().unwrap();
        let b = locate(&m).unwrap().unwrap();
        assert_eq!(a, b);
        assert!(a.training);
        assert_eq!(rel_of(&a.root, &a.model_dir.join("x.pt")), "model/x.pt");
        let f = d.path().join("file");
        touch(d.path(), "file");
        assert_eq!(locate(&f).unwrap_err().code, 2);
        assert_eq!(locate(&d.path().join("nope")).unwrap_err().code, 2);
    }
}
