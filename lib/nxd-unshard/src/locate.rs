//! Finding the shard files: a shard directory (the `dp_rank_*.pt` files themselves, or the
//! directory holding `model/`), or an NxD training checkpoint `<ckpt>/<tag>/model/` chosen by tag,
//! with NxD's `newest`, `checkpoint` and `done` markers; then checking the rank files against the
//! layout.

use std::collections::BTreeSet;
use std::path::{Component, Path, PathBuf};
use std::time::SystemTime;

use anyhow::anyhow;
use nxd_layout::{file_name, ParallelConfig};
use suite_support::exit::ToolError;

/// The file naming the most recent tag of a training checkpoint (older NxD versions write it).
pub const NEWEST_FILE: &str = "newest";
/// The marker NxD writes into a tag directory once every rank has finished saving it.
pub const DONE_FILE: &str = "done";
/// The marker NxD writes into a tag directory when it starts saving it.
pub const CHECKPOINT_MARKER: &str = "checkpoint";
/// The subdirectory of a tag (or of a converter output) that holds the model shard files.
pub const MODEL_DIR: &str = "model";

/// Which tag of a training checkpoint to read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TagChoice {
    /// The tag `newest` names; without that file, the tag whose `done` marker is the most recent
    /// (NxD's `load_checkpoint(tag=None)`).
    Latest,
    /// This tag (a subdirectory of the checkpoint directory).
    Named(String),
}

impl TagChoice {
    /// `latest` is [`TagChoice::Latest`]; anything else names a tag.
    pub fn parse(s: &str) -> TagChoice {
        if s == "latest" {
            TagChoice::Latest
        } else {
            TagChoice::Named(s.to_string())
        }
    }
}

/// Where the shard files are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Located {
    /// The directory holding the `dp_rank_*_tp_rank_*_pp_rank_*.pt` files.
    pub model_dir: PathBuf,
    /// The training-checkpoint tag read, when the input is (inside) a training checkpoint.
    pub tag: Option<String>,
    /// How the tag was chosen, for the user (`named by newest`, ...), when it was not given.
    pub tag_source: Option<&'static str>,
}

/// The ranks in a shard file name `dp_rank_DD[_ep_rank_EE]_tp_rank_TT_pp_rank_PP.pt`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct RankName {
    /// Data-parallel rank (always 0 for model files).
    pub dp: usize,
    /// Expert-parallel rank, when the name has one.
    pub ep: Option<usize>,
    /// Tensor-parallel rank.
    pub tp: usize,
    /// Pipeline-parallel rank.
    pub pp: usize,
}

/// Parses an NxD shard file name; `None` if `name` is not one.
pub fn parse_rank_file_name(name: &str) -> Option<RankName> {
    let stem = name.strip_suffix(".pt")?;
    let fields: Vec<&str> = stem.split('_').collect();
    let mut ranks: Vec<(&str, usize)> = Vec::new();
    for chunk in fields.chunks(3) {
        let [label, "rank", digits] = chunk else {
            return None;
        };
        if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        ranks.push((label, digits.parse().ok()?));
    }
    match ranks.as_slice() {
        [("dp", dp), ("tp", tp), ("pp", pp)] => Some(RankName {
            dp: *dp,
            ep: None,
            tp: *tp,
            pp: *pp,
        }),
        [("dp", dp), ("ep", ep), ("tp", tp), ("pp", pp)] => Some(RankName {
            dp: *dp,
            ep: Some(*ep),
            tp: *tp,
            pp: *pp,
        }),
        _ => None,
    }
}

fn usage(msg: String) -> ToolError {
    ToolError::usage(anyhow!(msg))
}

/// The shard files in `dir` (regular files with an NxD rank name), sorted by name.
fn rank_files(dir: &Path) -> Result<Vec<(String, RankName)>, ToolError> {
    let entries = std::fs::read_dir(dir).map_err(|e| {
        ToolError::classify(anyhow!(e).context(format!("listing {}", dir.display())))
    })?;
    let mut out = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|e| {
            ToolError::classify(anyhow!(e).context(format!("listing {}", dir.display())))
        })?;
        let Some(name) = entry.file_name().to_str().map(str::to_string) else {
            continue;
        };
        if let Some(rank) = parse_rank_file_name(&name) {
            if entry.path().is_file() {
                out.push((name, rank));
            }
        }
    }
    out.sort();
    Ok(out)
}

fn has_rank_files(dir: &Path) -> Result<bool, ToolError> {
    Ok(!rank_files(dir)?.is_empty())
}

fn is_tag_dir(dir: &Path) -> bool {
    dir.join(CHECKPOINT_MARKER).is_file()
}

fn dir_name(dir: &Path) -> String {
    dir.file_name().map_or_else(
        || dir.display().to_string(),
        |n| n.to_string_lossy().into_owned(),
    )
}

/// The tag directories of a training checkpoint: subdirectories with a `checkpoint` marker or a
/// `model/` directory, sorted by name.
fn list_tags(root: &Path) -> Result<Vec<String>, ToolError> {
    let entries = std::fs::read_dir(root).map_err(|e| {
        ToolError::classify(anyhow!(e).context(format!("listing {}", root.display())))
    })?;
    let mut tags = BTreeSet::new();
    for entry in entries.flatten() {
        let path = entry.path();
        if path.is_dir() && (is_tag_dir(&path) || path.join(MODEL_DIR).is_dir()) {
            tags.insert(entry.file_name().to_string_lossy().into_owned());
        }
    }
    Ok(tags.into_iter().collect())
}

fn completed(root: &Path, tags: &[String]) -> Vec<String> {
    tags.iter()
        .filter(|t| root.join(t).join(DONE_FILE).is_file())
        .cloned()
        .collect()
}

fn list_text(items: &[String]) -> String {
    if items.is_empty() {
        "none".to_string()
    } else {
        items.join(", ")
    }
}

fn reject_tag(tag: Option<&TagChoice>, input: &Path, what: &str) -> Result<(), ToolError> {
    if tag.is_some() {
        return Err(usage(format!(
            "--tag applies to an NxD training checkpoint directory (holding <tag>/model/), but {} \
             is {what}; drop --tag or pass the checkpoint directory",
            input.display()
        )));
    }
    Ok(())
}

/// Refuses a tag directory without NxD's `done` marker.
fn require_done(root: &Path, tag_dir: &Path) -> Result<(), ToolError> {
    if tag_dir.join(DONE_FILE).is_file() {
        return Ok(());
    }
    let tag = dir_name(tag_dir);
    let others = match list_tags(root) {
        Ok(tags) => completed(root, &tags),
        Err(_) => Vec::new(),
    };
    Err(usage(format!(
        "checkpoint tag `{tag}` in {} has no `{DONE_FILE}` marker: NxD writes it only after every \
         rank finished saving, so this tag is incomplete (interrupted, or still being written); \
         completed tags: {}",
        root.display(),
        list_text(&others)
    )))
}

/// The tag `--tag latest` means, and how it was found.
fn latest_tag(root: &Path, tags: &[String]) -> Result<(String, &'static str), ToolError> {
    let newest = root.join(NEWEST_FILE);
    if newest.is_file() {
        let text = std::fs::read_to_string(&newest).map_err(|e| {
            ToolError::classify(anyhow!(e).context(format!("reading {}", newest.display())))
        })?;
        let tag = text.trim().to_string();
        let single = {
            let mut c = Path::new(&tag).components();
            matches!((c.next(), c.next()), (Some(Component::Normal(_)), None))
        };
        if !single {
            return Err(usage(format!(
                "{} does not name a tag directory (it holds {text:?}); pass --tag with one of: {}",
                newest.display(),
                list_text(tags)
            )));
        }
        if !root.join(&tag).is_dir() {
            return Err(usage(format!(
                "{} names tag `{tag}`, which is not in {}; tags: {}",
                newest.display(),
                root.display(),
                list_text(tags)
            )));
        }
        return Ok((tag, "named by `newest`"));
    }
    let mut done: Vec<(SystemTime, String)> = completed(root, tags)
        .into_iter()
        .map(|t| {
            let mtime = std::fs::metadata(root.join(&t).join(DONE_FILE))
                .and_then(|m| m.modified())
                .unwrap_or(SystemTime::UNIX_EPOCH);
            (mtime, t)
        })
        .collect();
    done.sort();
    match done.pop() {
        Some((_, tag)) => Ok((
            tag,
            "the most recently completed; there is no `newest` file",
        )),
        None => Err(usage(format!(
            "no completed checkpoint tag in {}: no tag has a `{DONE_FILE}` marker (tags: {})",
            root.display(),
            list_text(tags)
        ))),
    }
}

/// Finds the shard directory of `input`:
///
/// * a directory holding `dp_rank_*_tp_rank_*_pp_rank_*.pt` files is used as is;
/// * a directory holding `model/` (converter output, or one tag of a training checkpoint) uses
///   `model/`;
/// * otherwise `input` is a training checkpoint directory: `tag` (default
///   [`TagChoice::Latest`]) picks `<input>/<tag>/model/`.
///
/// Inside a training checkpoint (a tag directory has a `checkpoint` marker) the tag must have
/// its `done` marker. Errors are usage errors (exit 2) with one line saying what was found.
pub fn locate(input: &Path, tag: Option<&TagChoice>) -> Result<Located, ToolError> {
    if !input.exists() {
        return Err(usage(format!("input {} does not exist", input.display())));
    }
    if !input.is_dir() {
        return Err(usage(format!(
            "input {} is not a directory: pass the shard directory (holding model/ or the \
             dp_rank_*.pt files) or an NxD training checkpoint directory",
            input.display()
        )));
    }
    // Parents are looked at through the absolute path (`--input model` run inside a tag dir).
    let abs = std::path::absolute(input).unwrap_or_else(|_| input.to_path_buf());
    if has_rank_files(input)? {
        reject_tag(tag, input, "a shard directory")?;
        // `<ckpt>/<tag>/model` given directly.
        if let Some(tag_dir) = abs.parent().filter(|p| is_tag_dir(p)) {
            let root = tag_dir.parent().unwrap_or(Path::new("/"));
            require_done(root, tag_dir)?;
            return Ok(Located {
                model_dir: input.to_path_buf(),
                tag: Some(dir_name(tag_dir)),
                tag_source: None,
            });
        }
        return Ok(Located {
            model_dir: input.to_path_buf(),
            tag: None,
            tag_source: None,
        });
    }
    let model = input.join(MODEL_DIR);
    if model.is_dir() {
        reject_tag(tag, input, "a shard directory (it holds model/)")?;
        let tag_name = if is_tag_dir(input) {
            let root = abs.parent().unwrap_or(Path::new("/"));
            require_done(root, &abs)?;
            Some(dir_name(&abs))
        } else {
            None
        };
        return Ok(Located {
            model_dir: model,
            tag: tag_name,
            tag_source: None,
        });
    }
    let tags = list_tags(input)?;
    if tags.is_empty() {
        return Err(usage(format!(
            "{} holds no NxD shard files (dp_rank_00_tp_rank_XX_pp_rank_YY.pt), no model/ \
             directory and no checkpoint tag directories (<tag>/model/)",
            input.display()
        )));
    }
    let (name, source) = match tag.unwrap_or(&TagChoice::Latest) {
        TagChoice::Latest => {
            let (t, s) = latest_tag(input, &tags)?;
            (t, Some(s))
        }
        TagChoice::Named(t) => (t.clone(), None),
    };
    let tag_dir = input.join(&name);
    if !tags.contains(&name) || !tag_dir.is_dir() {
        return Err(usage(format!(
            "tag `{name}` is not a checkpoint tag of {}; tags: {}",
            input.display(),
            list_text(&tags)
        )));
    }
    require_done(input, &tag_dir)?;
    let model_dir = tag_dir.join(MODEL_DIR);
    if !model_dir.is_dir() {
        return Err(usage(format!(
            "checkpoint tag `{name}` in {} has no model/ directory (a checkpoint saved without \
             the model?)",
            input.display()
        )));
    }
    Ok(Located {
        model_dir,
        tag: Some(name),
        tag_source: source,
    })
}

/// `tp 2 x pp 1`.
fn grid(tp: usize, pp: usize) -> String {
    format!("tp {tp} x pp {pp}")
}

fn first_few(names: &[String]) -> String {
    const SHOWN: usize = 3;
    let mut s = names
        .iter()
        .take(SHOWN)
        .cloned()
        .collect::<Vec<_>>()
        .join(", ");
    if names.len() > SHOWN {
        s.push_str(&format!(" and {} more", names.len() - SHOWN));
    }
    s
}

/// Checks that `model_dir` holds exactly the rank files of `parallel` (`tp x pp` files named
/// `dp_rank_00_tp_rank_TT_pp_rank_PP.pt`) and returns their paths in plan order (tp-major).
///
/// Missing or extra rank files, expert-parallel files and data-parallel ranks other than 0 are
/// usage errors naming the files; when the files present form a complete grid of another size,
/// the message says which.
pub fn rank_file_paths(
    model_dir: &Path,
    parallel: &ParallelConfig,
) -> Result<Vec<PathBuf>, ToolError> {
    let found = rank_files(model_dir)?;
    if let Some((name, _)) = found.iter().find(|(_, r)| r.ep.is_some()) {
        return Err(usage(format!(
            "{}: expert-parallel shard files ({name}) are not supported (Llama has no experts; \
             NxD's own reverse conversion crashes on them too)",
            model_dir.display()
        )));
    }
    let expected: Vec<String> = (0..parallel.tp)
        .flat_map(|tp| (0..parallel.pp).map(move |pp| file_name(tp, pp)))
        .collect();
    let found_names: BTreeSet<&str> = found.iter().map(|(n, _)| n.as_str()).collect();
    let expected_names: BTreeSet<&str> = expected.iter().map(String::as_str).collect();
    let missing: Vec<String> = expected
        .iter()
        .filter(|n| !found_names.contains(n.as_str()))
        .cloned()
        .collect();
    let extra: Vec<String> = found
        .iter()
        .filter(|(n, _)| !expected_names.contains(n.as_str()))
        .map(|(n, _)| n.clone())
        .collect();
    if missing.is_empty() && extra.is_empty() {
        return Ok(expected.iter().map(|n| model_dir.join(n)).collect());
    }
    let want = grid(parallel.tp, parallel.pp);
    // Do the files present form a complete dp 0 grid of another shape?
    let hint = {
        let tp = found.iter().map(|(_, r)| r.tp + 1).max().unwrap_or(0);
        let pp = found.iter().map(|(_, r)| r.pp + 1).max().unwrap_or(0);
        let complete = found.iter().all(|(_, r)| r.dp == 0) && found.len() == tp * pp;
        if complete && (tp, pp) != (parallel.tp, parallel.pp) {
            format!(
                "; the files present are a complete {} set: were they written with --tp {tp} \
                 --pp {pp}?",
                grid(tp, pp)
            )
        } else {
            String::new()
        }
    };
    let mut parts = Vec::new();
    if !missing.is_empty() {
        parts.push(format!(
            "missing rank file{} {}",
            if missing.len() == 1 { "" } else { "s" },
            first_few(&missing)
        ));
    }
    if !extra.is_empty() {
        parts.push(format!(
            "unexpected rank file{} {}",
            if extra.len() == 1 { "" } else { "s" },
            first_few(&extra)
        ));
    }
    Err(usage(format!(
        "{}: {} (the layout {want} needs {} files, found {}){hint}",
        model_dir.display(),
        parts.join("; "),
        expected.len(),
        found.len()
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn touch(p: &Path) {
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, "1").unwrap();
    }

    #[test]
    fn parses_rank_names() {
        assert_eq!(
            parse_rank_file_name("dp_rank_00_tp_rank_03_pp_rank_01.pt"),
            Some(RankName {
                dp: 0,
                ep: None,
                tp: 3,
                pp: 1
            })
        );
        assert_eq!(
            parse_rank_file_name("dp_rank_00_ep_rank_01_tp_rank_123_pp_rank_04.pt"),
            Some(RankName {
                dp: 0,
                ep: Some(1),
                tp: 123,
                pp: 4
            })
        );
        for bad in [
            "dp_rank_00_tp_rank_03_pp_rank_01.pt.info.pt",
            "dp_rank_00_tp_rank_03_pp_rank_01",
            "dp_rank_00_tp_rank__pp_rank_01.pt",
            "dp_rank_00_tp_rank_x_pp_rank_01.pt",
            "tp_rank_00_pp_rank_00.pt",
            "dp_rank_00_pp_rank_00_tp_rank_00.pt",
            "checkpoint.pt",
        ] {
            assert_eq!(parse_rank_file_name(bad), None, "{bad}");
        }
    }

    fn msg(r: Result<Located, ToolError>) -> String {
        let e = r.unwrap_err();
        assert_eq!(e.code, suite_support::exit::USAGE_ERROR);
        e.report("t")
    }

    #[test]
    fn shard_dirs_and_tags() {
        let d = tempfile::tempdir().unwrap();
        let root = d.path();
        // A converter output: <out>/model/*.pt
        let out = root.join("out");
        touch(&out.join("model/dp_rank_00_tp_rank_00_pp_rank_00.pt"));
        let l = locate(&out, None).unwrap();
        assert_eq!((l.model_dir, l.tag), (out.join("model"), None));
        let l = locate(&out.join("model"), None).unwrap();
        assert_eq!(l.model_dir, out.join("model"));
        assert!(msg(locate(&out, Some(&TagChoice::Latest))).contains("--tag applies"));

        // A training checkpoint with two tags; the newer is incomplete.
        let ck = root.join("ckpt");
        for (tag, done) in [("step_10", true), ("step_20", false)] {
            touch(
                &ck.join(tag)
                    .join("model/dp_rank_00_tp_rank_00_pp_rank_00.pt"),
            );
            touch(&ck.join(tag).join(CHECKPOINT_MARKER));
            if done {
                touch(&ck.join(tag).join(DONE_FILE));
            }
        }
        // Without `newest`: the most recently completed tag.
        let l = locate(&ck, None).unwrap();
        assert_eq!(l.tag.as_deref(), Some("step_10"));
        assert_eq!(l.model_dir, ck.join("step_10/model"));
        // `newest` names the incomplete one: refused, saying why.
        std::fs::write(ck.join(NEWEST_FILE), "step_20\n").unwrap();
        let m = msg(locate(&ck, Some(&TagChoice::Latest)));
        assert!(
            m.contains("`step_20`") && m.contains("no `done` marker") && m.contains("step_10"),
            "{m}"
        );
        let m = msg(locate(&ck, Some(&TagChoice::Named("step_20".into()))));
        assert!(m.contains("incomplete"), "{m}");
        // The tag dir or its model dir given directly is checked too.
        assert!(msg(locate(&ck.join("step_20"), None)).contains("no `done` marker"));
        assert!(msg(locate(&ck.join("step_20/model"), None)).contains("no `done` marker"));
        let l = locate(&ck.join("step_10"), None).unwrap();
        assert_eq!(l.tag.as_deref(), Some("step_10"));
        // Named tags.
        let l = locate(&ck, Some(&TagChoice::Named("step_10".into()))).unwrap();
        assert_eq!(l.model_dir, ck.join("step_10/model"));
        let m = msg(locate(&ck, Some(&TagChoice::Named("step_99".into()))));
        assert!(
            m.contains("step_99") && m.contains("step_10, step_20"),
            "{m}"
        );
        touch(&ck.join("step_20").join(DONE_FILE));
        let l = locate(&ck, None).unwrap();
        assert_eq!(
            (l.tag.as_deref(), l.tag_source),
            (Some("step_20"), Some("named by `newest`"))
        );
        std::fs::write(ck.join(NEWEST_FILE), "../x").unwrap();
        assert!(msg(locate(&ck, None)).contains("does not name a tag"));

        assert!(msg(locate(&root.join("nope"), None)).contains("does not exist"));
        std::fs::create_dir_all(root.join("empty")).unwrap();
        assert!(msg(locate(&root.join("empty"), None)).contains("no NxD shard files"));
    }

    #[test]
    fn rank_files_must_match_the_layout() {
        let d = tempfile::tempdir().unwrap();
        let dir = d.path();
        for (tp, pp) in [(0, 0), (0, 1)] {
            touch(&dir.join(file_name(tp, pp)));
        }
        touch(&dir.join("dp_rank_00_tp_rank_00_pp_rank_00.pt.info.pt"));
        let p = ParallelConfig::new(1, 2);
        assert_eq!(
            rank_file_paths(dir, &p).unwrap(),
            vec![dir.join(file_name(0, 0)), dir.join(file_name(0, 1))]
        );
        let e = rank_file_paths(dir, &ParallelConfig::new(2, 1))
            .unwrap_err()
            .report("t");
        assert!(
            e.contains("missing rank file dp_rank_00_tp_rank_01_pp_rank_00.pt")
                && e.contains("unexpected rank file dp_rank_00_tp_rank_00_pp_rank_01.pt")
                && e.contains("--tp 1 --pp 2"),
            "{e}"
        );
        std::fs::remove_file(dir.join(file_name(0, 1))).unwrap();
        let e = rank_file_paths(dir, &p).unwrap_err().report("t");
        assert!(e.contains("needs 2 files, found 1"), "{e}");
        touch(&dir.join("dp_rank_00_ep_rank_01_tp_rank_00_pp_rank_00.pt"));
        let e = rank_file_paths(dir, &p).unwrap_err().report("t");
        assert!(e.contains("expert-parallel"), "{e}");
    }
}
