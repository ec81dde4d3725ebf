//! What a verification found, and its two renderings: a human summary with a tp x pp grid, and
//! JSON for machines.

use std::fmt::Write as _;

use serde::Serialize;
use serde_json::Value;

/// The checks, fastest first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Check {
    /// File names and counts (missing, stray, misnamed, duplicate files; xser directories).
    Names,
    /// Header-only structure: each archive parses; keys, dtypes, shapes and strides match the
    /// layout.
    Structure,
    /// Sizes and SHA-256 against a manifest.
    Manifest,
    /// Replicated regions bit-identical across ranks; vocabulary rows covered once.
    CrossRank,
}

impl Check {
    /// The label used in the human summary.
    pub fn label(self) -> &'static str {
        match self {
            Check::Names => "names",
            Check::Structure => "structure",
            Check::Manifest => "manifest",
            Check::CrossRank => "cross-rank",
        }
    }
}

/// The grid mark of a file; a file with several problems shows the highest one (declaration
/// order is priority order, lowest first).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Mark {
    /// Every check passed.
    Ok,
    /// A replicated region differs from its copies on other ranks.
    CrossRank,
    /// Size or SHA-256 differs from the manifest, or the file is not in it.
    Manifest,
    /// Keys, dtypes, shapes or strides differ from the layout (or the xser directory is wrong).
    Structure,
    /// The file does not parse (truncated, empty, corrupt) or cannot be read.
    Unreadable,
    /// The file is absent.
    Missing,
}

impl Mark {
    /// The grid symbol.
    pub fn symbol(self) -> char {
        match self {
            Mark::Ok => '.',
            Mark::CrossRank => 'X',
            Mark::Manifest => 'H',
            Mark::Structure => 'S',
            Mark::Unreadable => 'U',
            Mark::Missing => 'M',
        }
    }
}

/// The legend printed under the grid.
pub const LEGEND: &str =
    ". ok  M missing  U unreadable  S structure  H size/sha256  X cross-rank replicas";

/// One problem (or warning), naming the files and the tensor it concerns.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Problem {
    /// The check that found it.
    pub check: Check,
    /// The files concerned, relative to the verified directory (`model/dp_rank_…pt`); empty for
    /// a problem of the set as a whole.
    pub files: Vec<String>,
    /// The tensor concerned, as named in the file.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tensor: Option<String>,
    /// One line saying what is wrong.
    pub message: String,
}

impl Problem {
    /// A problem of `files` (no tensor).
    pub fn new(check: Check, files: Vec<String>, message: impl Into<String>) -> Problem {
        Problem {
            check,
            files,
            tensor: None,
            message: message.into(),
        }
    }

    /// A problem of one file.
    pub fn file(check: Check, file: &str, message: impl Into<String>) -> Problem {
        Problem::new(check, vec![file.to_string()], message)
    }

    /// Names the tensor concerned.
    pub fn with_tensor(mut self, tensor: impl Into<String>) -> Problem {
        self.tensor = Some(tensor.into());
        self
    }

    /// `files: tensor: message`, one line.
    pub fn line(&self) -> String {
        let mut s = String::new();
        if !self.files.is_empty() {
            s.push_str(&self.files.join(", "));
            s.push_str(": ");
        }
        if let Some(t) = &self.tensor {
            s.push_str(t);
            s.push_str(": ");
        }
        s.push_str(&self.message);
        s
    }
}

/// How a check ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    /// Ran and found nothing wrong.
    Passed,
    /// Ran and found problems.
    Failed,
    /// Did not run (`--fast`, no `--manifest`, not applicable).
    Skipped,
}

/// The outcome of one check, with a one-line detail (what was covered, or why it was skipped).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CheckResult {
    /// Which check.
    pub check: Check,
    /// How it ended.
    pub status: Status,
    /// What it covered, or why it was skipped.
    pub detail: String,
}

impl CheckResult {
    /// A check that ran: passed if `problems` holds none of its kind, else failed, with their
    /// count before `detail`.
    pub fn ran(check: Check, problems: &[Problem], detail: String) -> CheckResult {
        let n = problems.iter().filter(|p| p.check == check).count();
        if n == 0 {
            CheckResult {
                check,
                status: Status::Passed,
                detail,
            }
        } else {
            CheckResult {
                check,
                status: Status::Failed,
                detail: format!("{n} problems; {detail}"),
            }
        }
    }

    /// A check that did not run, and why.
    pub fn skipped(check: Check, why: impl Into<String>) -> CheckResult {
        CheckResult {
            check,
            status: Status::Skipped,
            detail: why.into(),
        }
    }
}

/// One expected shard file and its mark.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct FileStatus {
    /// Path relative to the verified directory.
    pub path: String,
    /// tp rank.
    pub tp: usize,
    /// pp rank.
    pub pp: usize,
    /// The grid mark.
    pub mark: Mark,
}

/// What was verified.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Mode {
    /// An NxD shard set (`model/dp_rank_…pt`).
    ShardSet,
    /// An NxD training checkpoint tag directory (`checkpoint`, `done`, `model/`, `optim/`…);
    /// only its `model/` shards are verified.
    TrainingCheckpoint,
    /// Any directory, against a manifest only.
    Manifest,
    /// A Hugging Face `datasets` save_to_disk directory (tok-pack's output).
    Dataset,
}

/// Everything a verification found.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// The directory verified (as given).
    pub dir: String,
    /// What kind of directory it is.
    pub mode: Mode,
    /// The layout verified against (the parallel settings and `xser`), for shard sets.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub layout: Option<Value>,
    /// tp degree (grid columns); 0 without a layout.
    pub tp: usize,
    /// pp degree (grid rows); 0 without a layout.
    pub pp: usize,
    /// The checkpoint's dtype (the most common tensor dtype), for shard sets.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dtype: Option<String>,
    /// Every expected shard file, tp-major.
    pub files: Vec<FileStatus>,
    /// The checks, in order.
    pub checks: Vec<CheckResult>,
    /// Every problem found.
    pub problems: Vec<Problem>,
    /// Things worth knowing that do not make the set wrong.
    pub warnings: Vec<Problem>,
    /// True if some input could not be read at all (an I/O error, not bad content): the
    /// verdict is then incomplete and the exit status is 2.
    pub unreadable: bool,
}

/// At most this many problems per file in the human summary (`--json` lists them all).
const HUMAN_PER_FILE: usize = 8;

impl Report {
    /// True if nothing is wrong.
    pub fn ok(&self) -> bool {
        self.problems.is_empty() && !self.unreadable
    }

    /// The exit status: 0 all good, 1 problems found, 2 some input could not be read.
    pub fn exit_code(&self) -> i32 {
        if self.unreadable {
            suite_support::exit::USAGE_ERROR
        } else if self.problems.is_empty() {
            suite_support::exit::SUCCESS
        } else {
            suite_support::exit::DATA_ERROR
        }
    }

    /// The machine-readable report.
    pub fn to_json(&self) -> Value {
        let mut v = serde_json::to_value(self).expect("the report serialises");
        if let Value::Object(m) = &mut v {
            m.insert("ok".into(), Value::Bool(self.ok()));
            m.insert("exit_code".into(), Value::from(self.exit_code()));
        }
        v
    }

    /// The grid of marks, pp ranks as rows and tp ranks as columns (empty without a layout).
    pub fn grid(&self) -> String {
        if self.tp == 0 || self.pp == 0 || self.files.is_empty() {
            return String::new();
        }
        let mut marks = vec![vec!['?'; self.tp]; self.pp];
        for f in &self.files {
            marks[f.pp][f.tp] = f.mark.symbol();
        }
        let pad = "          ";
        let mut s = String::new();
        if self.tp > 10 {
            let tens: String = (0..self.tp)
                .map(|t| {
                    if t % 10 == 0 {
                        char::from_digit((t / 10 % 10) as u32, 10).unwrap_or(' ')
                    } else {
                        ' '
                    }
                })
                .collect();
            let _ = writeln!(s, "{pad}{tens}");
        }
        let ones: String = (0..self.tp)
            .map(|t| char::from_digit((t % 10) as u32, 10).unwrap_or(' '))
            .collect();
        let _ = writeln!(s, "   tp ->  {ones}");
        for (pp, row) in marks.iter().enumerate() {
            let _ = writeln!(s, "  pp {pp:>3}  {}", row.iter().collect::<String>());
        }
        s
    }

    /// The human summary: what was verified, one line per check, the grid, every problem
    /// (at most a few per file), warnings, and the verdict.
    pub fn human(&self) -> String {
        let mut s = String::new();
        let what = match self.mode {
            Mode::ShardSet => "shard set",
            Mode::TrainingCheckpoint => "training checkpoint",
            Mode::Manifest => "directory",
            Mode::Dataset => "dataset",
        };
        let _ = write!(s, "shard-verify: {what} {}", self.dir);
        if self.tp > 0 {
            let _ = write!(s, ", tp {} x pp {}", self.tp, self.pp);
        }
        if let Some(d) = &self.dtype {
            let _ = write!(s, ", {d}");
        }
        s.push('\n');
        for c in &self.checks {
            let status = match c.status {
                Status::Passed => "ok",
                Status::Failed => "FAILED",
                Status::Skipped => "skipped",
            };
            let _ = writeln!(s, "  {:<11} {status}: {}", c.check.label(), c.detail);
        }
        let grid = self.grid();
        if !grid.is_empty() {
            s.push('\n');
            s.push_str(&grid);
            let _ = writeln!(s, "  ({LEGEND})");
        }
        if !self.problems.is_empty() {
            let _ = writeln!(s, "\nproblems ({}):", self.problems.len());
            s.push_str(&capped_lines(&self.problems));
        }
        if !self.warnings.is_empty() {
            let _ = writeln!(s, "\nwarnings ({}):", self.warnings.len());
            s.push_str(&capped_lines(&self.warnings));
        }
        let verdict = if self.unreadable {
            format!(
                "INCOMPLETE: some input could not be read ({} problems found)",
                self.problems.len()
            )
        } else if self.problems.is_empty() {
            "OK".to_string()
        } else {
            let files: std::collections::BTreeSet<&str> = self
                .problems
                .iter()
                .flat_map(|p| p.files.iter().map(String::as_str))
                .collect();
            format!(
                "FAILED: {} problems in {} files",
                self.problems.len(),
                files.len()
            )
        };
        let _ = writeln!(s, "\nresult: {verdict}");
        s
    }
}

/// Problem lines, at most [`HUMAN_PER_FILE`] per first-named file, with a count of the rest.
fn capped_lines(problems: &[Problem]) -> String {
    let mut per_file: std::collections::HashMap<&str, usize> = std::collections::HashMap::new();
    let mut hidden: std::collections::BTreeMap<&str, usize> = std::collections::BTreeMap::new();
    let mut s = String::new();
    for p in problems {
        let key = p.files.first().map_or("", String::as_str);
        let n = per_file.entry(key).or_default();
        *n += 1;
        if key.is_empty() || *n <= HUMAN_PER_FILE {
            let _ = writeln!(s, "  {}", p.line());
        } else {
            *hidden.entry(key).or_default() += 1;
        }
    }
    for (file, n) in hidden {
        let _ = writeln!(s, "  {file}: ... and {n} more (--json lists them all)");
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(marks: &[(usize, usize, Mark)], tp: usize, pp: usize) -> Report {
        Report {
            dir: "out".into(),
            mode: Mode::ShardSet,
            layout: None,
            tp,
            pp,
            dtype: Some("bfloat16".into()),
            files: marks
                .iter()
                .map(|&(t, p, mark)| FileStatus {
                    path: format!("model/{t}_{p}"),
                    tp: t,
                    pp: p,
                    mark,
                })
                .collect(),
            checks: vec![],
            problems: vec![],
            warnings: vec![],
            unreadable: false,
        }
    }

    #[test]
    fn grid_rows_are_pp_columns_tp() {
        let r = report(
            &[
                (0, 0, Mark::Ok),
                (0, 1, Mark::Missing),
                (1, 0, Mark::CrossRank),
                (1, 1, Mark::Ok),
            ],
            2,
            2,
        );
        assert_eq!(r.grid(), "   tp ->  01\n  pp   0  .X\n  pp   1  M.\n");
        assert!(r.ok());
        assert_eq!(r.exit_code(), 0);
    }

    #[test]
    fn wide_grids_get_a_tens_row() {
        let marks: Vec<_> = (0..12).map(|t| (t, 0, Mark::Ok)).collect();
        let g = report(&marks, 12, 1).grid();
        let lines: Vec<&str> = g.lines().collect();
        assert_eq!(lines[0], "          0         1 ");
        assert_eq!(lines[1], "   tp ->  012345678901");
    }

    #[test]
    fn human_caps_problems_per_file_and_json_keeps_all() {
        let mut r = report(&[(0, 0, Mark::Structure)], 1, 1);
        for i in 0..12 {
            r.problems.push(
                Problem::file(Check::Structure, "model/a.pt", format!("p{i}")).with_tensor("t"),
            );
        }
        let h = r.human();
        assert!(h.contains("model/a.pt: t: p7"), "{h}");
        assert!(!h.contains("p8"), "{h}");
        assert!(h.contains("model/a.pt: ... and 4 more"), "{h}");
        assert!(h.contains("result: FAILED: 12 problems in 1 files"), "{h}");
        let j = r.to_json();
        assert_eq!(j["problems"].as_array().unwrap().len(), 12);
        assert_eq!(j["ok"], false);
        assert_eq!(j["exit_code"], 1);
        assert_eq!(j["problems"][0]["check"], "structure");
        assert_eq!(j["files"][0]["mark"], "structure");
    }
}
