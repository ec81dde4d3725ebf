//! The pure plan: from the inputs' tensor lists and the options, every output tensor with its
//! source, name, dtype, shape, LoRA merge and (for a directory) shard. No I/O.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::Path;

use globset::{Glob, GlobSet, GlobSetBuilder};
use tensor_formats::DType;

use crate::adapter::{AdapterPlan, LoraOp};
use crate::store::TensorInfo;

/// What the output path asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutputKind {
    /// `x.safetensors`: one safetensors file.
    Safetensors,
    /// `x.pt` (or `.bin`, `.pth`): one `torch.save` dict.
    Pt,
    /// Anything else: a Hugging Face checkpoint directory.
    Dir,
}

impl OutputKind {
    /// The kind of output `path` names, by its extension.
    pub fn of(path: &Path) -> OutputKind {
        let s = path.to_string_lossy();
        if s.ends_with('/') {
            return OutputKind::Dir;
        }
        match path.extension().and_then(|e| e.to_str()) {
            Some("safetensors") => OutputKind::Safetensors,
            Some("pt" | "bin" | "pth") => OutputKind::Pt,
            _ => OutputKind::Dir,
        }
    }
}

/// A plan error: `usage` when the options or inputs do not fit together (exit 2), else a data
/// problem (exit 1).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlanError {
    /// The one-line message.
    pub message: String,
    /// Whether it is a usage error.
    pub usage: bool,
}

fn usage(message: String) -> PlanError {
    PlanError {
        message,
        usage: true,
    }
}

/// `--rename FROM=TO`: every occurrence of `FROM` in a name becomes `TO`; `^FROM=TO` only a
/// leading one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rename {
    from: String,
    to: String,
    anchored: bool,
}

impl Rename {
    /// Parses `FROM=TO` (or `^FROM=TO`).
    pub fn parse(s: &str) -> Result<Rename, String> {
        let (from, to) = s
            .split_once('=')
            .ok_or_else(|| format!("--rename {s}: expected FROM=TO"))?;
        let (from, anchored) = match from.strip_prefix('^') {
            Some(f) => (f, true),
            None => (from, false),
        };
        if from.is_empty() {
            return Err(format!("--rename {s}: FROM is empty"));
        }
        Ok(Rename {
            from: from.to_string(),
            to: to.to_string(),
            anchored,
        })
    }

    /// The renamed `name`.
    pub fn apply(&self, name: &str) -> String {
        if self.anchored {
            match name.strip_prefix(&self.from) {
                Some(rest) => format!("{}{rest}", self.to),
                None => name.to_string(),
            }
        } else {
            name.replace(&self.from, &self.to)
        }
    }
}

/// `--include` / `--exclude` globs over the input tensor names (`*` matches dots too).
#[derive(Debug, Clone, Default)]
pub struct Selection {
    include: Option<GlobSet>,
    exclude: Option<GlobSet>,
}

fn globset(patterns: &[String], flag: &str) -> Result<Option<GlobSet>, String> {
    if patterns.is_empty() {
        return Ok(None);
    }
    let mut b = GlobSetBuilder::new();
    for p in patterns {
        b.add(Glob::new(p).map_err(|e| format!("{flag} {p}: {e}"))?);
    }
    b.build().map(Some).map_err(|e| format!("{flag}: {e}"))
}

impl Selection {
    /// From the `--include` and `--exclude` patterns.
    pub fn new(include: &[String], exclude: &[String]) -> Result<Selection, String> {
        Ok(Selection {
            include: globset(include, "--include")?,
            exclude: globset(exclude, "--exclude")?,
        })
    }

    /// Whether the tensor called `name` goes to the output.
    pub fn selects(&self, name: &str) -> bool {
        self.include.as_ref().is_none_or(|g| g.is_match(name))
            && !self.exclude.as_ref().is_some_and(|g| g.is_match(name))
    }
}

/// The options the plan depends on.
#[derive(Debug, Clone, Default)]
pub struct PlanOptions {
    /// Which tensors to keep.
    pub selection: Selection,
    /// Renames, applied in order.
    pub renames: Vec<Rename>,
    /// Convert float tensors to this dtype (`None`: keep).
    pub dtype: Option<DType>,
}

/// Where an output tensor's bytes come from.
#[derive(Debug, Clone, PartialEq)]
pub enum Origin {
    /// Copied (and maybe converted) from an input tensor.
    Copy,
    /// The input tensor with a LoRA (or DoRA) update merged in.
    Lora(LoraOp),
    /// Replaced by this adapter tensor (`modules_to_save`).
    Replace(String),
}

/// One output tensor.
#[derive(Debug, Clone, PartialEq)]
pub struct Planned {
    /// Index of the input it comes from.
    pub input: usize,
    /// Its name in that input.
    pub source: String,
    /// Its name in the output.
    pub name: String,
    /// Its dtype in the input.
    pub source_dtype: DType,
    /// Its output dtype.
    pub dtype: DType,
    /// Its shape.
    pub shape: Vec<usize>,
    /// How it is produced.
    pub origin: Origin,
}

impl Planned {
    /// Output bytes.
    pub fn bytes(&self) -> u64 {
        self.shape.iter().product::<usize>() as u64 * self.dtype.size() as u64
    }
}

/// Plans the output: every selected tensor of every input (inputs in order, each in its own
/// order), renamed, re-typed, with the adapter's merges. `names` are the inputs' paths for
/// messages.
pub fn plan(
    inputs: &[Vec<TensorInfo>],
    names: &[String],
    opts: &PlanOptions,
    adapter: Option<&AdapterPlan>,
) -> Result<Vec<Planned>, PlanError> {
    let mut out = Vec::new();
    let mut seen: HashMap<String, usize> = HashMap::new();
    let mut float_dtypes: Vec<BTreeSet<DType>> = vec![BTreeSet::new(); inputs.len()];
    for (i, tensors) in inputs.iter().enumerate() {
        for t in tensors {
            if !opts.selection.selects(&t.name) {
                continue;
            }
            let name = opts.renames.iter().fold(t.name.clone(), |n, r| r.apply(&n));
            if name.is_empty() {
                return Err(usage(format!(
                    "--rename turns {} (in {}) into an empty name",
                    t.name, names[i]
                )));
            }
            if let Some(&other) = seen.get(&name) {
                return Err(usage(format!(
                    "two tensors would be called {name}: one from {}, one from {}; drop one with \
                     --exclude or tell them apart with --rename",
                    names[other], names[i]
                )));
            }
            seen.insert(name.clone(), i);
            if t.dtype.is_float() {
                float_dtypes[i].insert(t.dtype);
            }
            let origin = match adapter {
                Some(a) => match (a.ops.get(&t.name), a.replace.get(&t.name)) {
                    (Some(op), _) => Origin::Lora(op.clone()),
                    (None, Some(src)) => Origin::Replace(src.clone()),
                    (None, None) => Origin::Copy,
                },
                None => Origin::Copy,
            };
            let dtype = match opts.dtype {
                Some(d) if t.dtype.is_float() => d,
                _ => t.dtype,
            };
            out.push(Planned {
                input: i,
                source: t.name.clone(),
                name,
                source_dtype: t.dtype,
                dtype,
                shape: t.shape.clone(),
                origin,
            });
        }
    }
    if out.is_empty() {
        return Err(usage(
            "no tensor selected: check --include/--exclude against the inputs' tensor names".into(),
        ));
    }
    if opts.dtype.is_none() && inputs.len() > 1 {
        let all: BTreeSet<DType> = float_dtypes.iter().flatten().copied().collect();
        if all.len() > 1 {
            let per_input: Vec<String> = float_dtypes
                .iter()
                .zip(names)
                .filter(|(d, _)| !d.is_empty())
                .map(|(d, n)| {
                    let d: Vec<String> = d.iter().map(DType::to_string).collect();
                    format!("{n}: {}", d.join("+"))
                })
                .collect();
            return Err(usage(format!(
                "the inputs mix float dtypes ({}); pass --dtype bf16, fp16 or fp32 to choose the \
                 output's",
                per_input.join(", ")
            )));
        }
    }
    Ok(out)
}

/// The shards of a directory output: file name and members (indices into `tensors`), split as
/// `save_pretrained` splits them.
pub fn shards(tensors: &[Planned], max_shard_size: u64) -> Vec<(String, Vec<usize>)> {
    let sizes: Vec<(String, u64)> = tensors
        .iter()
        .map(|t| (t.name.clone(), t.bytes()))
        .collect();
    checkpoint_write::named_shards(&sizes, max_shard_size)
}

/// How many LoRA merges and replacements the plan does, and which adapter targets it leaves
/// out (excluded by `--include`/`--exclude`).
pub fn adapter_coverage(tensors: &[Planned], adapter: &AdapterPlan) -> (usize, usize, Vec<String>) {
    let used: BTreeMap<&str, ()> = tensors.iter().map(|t| (t.source.as_str(), ())).collect();
    let merged = tensors
        .iter()
        .filter(|t| matches!(t.origin, Origin::Lora(_)))
        .count();
    let replaced = tensors
        .iter()
        .filter(|t| matches!(t.origin, Origin::Replace(_)))
        .count();
    let left_out = adapter
        .ops
        .keys()
        .chain(adapter.replace.keys())
        .filter(|k| !used.contains_key(k.as_str()))
        .cloned()
        .collect();
    (merged, replaced, left_out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::info as t;
    use proptest::prelude::*;

    fn names() -> Vec<String> {
        vec!["a".into(), "b".into()]
    }

    #[test]
    fn output_kind_by_extension() {
        assert_eq!(
            OutputKind::of(Path::new("x.safetensors")),
            OutputKind::Safetensors
        );
        assert_eq!(OutputKind::of(Path::new("dir/x.pt")), OutputKind::Pt);
        assert_eq!(OutputKind::of(Path::new("out")), OutputKind::Dir);
        assert_eq!(OutputKind::of(Path::new("out.v2/")), OutputKind::Dir);
    }

    #[test]
    fn selects_renames_and_retypes() {
        let inputs = vec![
            vec![
                t("model.embed_tokens.weight", DType::BF16, &[8, 4]),
                t("model.layers.0.mlp.up_proj.weight", DType::BF16, &[4, 4]),
                t("step", DType::I64, &[]),
            ],
            vec![t("lm_head.weight", DType::BF16, &[8, 4])],
        ];
        let opts = PlanOptions {
            selection: Selection::new(&[], &["step".into(), "*.mlp.*".into()]).unwrap(),
            renames: vec![Rename::parse("^model.=base.").unwrap()],
            dtype: Some(DType::F32),
        };
        let p = plan(&inputs, &names(), &opts, None).unwrap();
        let got: Vec<(&str, DType, usize)> = p
            .iter()
            .map(|t| (t.name.as_str(), t.dtype, t.input))
            .collect();
        assert_eq!(
            got,
            [
                ("base.embed_tokens.weight", DType::F32, 0),
                ("lm_head.weight", DType::F32, 1)
            ]
        );
        let only = PlanOptions {
            selection: Selection::new(&["step".into()], &[]).unwrap(),
            ..PlanOptions::default()
        };
        let p = plan(&inputs, &names(), &only, None).unwrap();
        assert_eq!((p.len(), p[0].dtype), (1, DType::I64));
    }

    #[test]
    fn refuses_duplicates_mixed_dtypes_and_nothing() {
        let inputs = vec![
            vec![t("x", DType::BF16, &[2])],
            vec![t("x", DType::F32, &[2])],
        ];
        let err = plan(&inputs, &names(), &PlanOptions::default(), None).unwrap_err();
        assert!(err.usage && err.message.contains("two tensors would be called x"));
        let renamed = PlanOptions {
            renames: vec![Rename::parse("^x=y").unwrap()],
            selection: Selection::new(&[], &[]).unwrap(),
            dtype: None,
        };
        // Renaming applies to both inputs, so still a duplicate.
        assert!(plan(&inputs, &names(), &renamed, None).is_err());
        let inputs = vec![
            vec![t("x", DType::BF16, &[2])],
            vec![t("y", DType::F32, &[2])],
        ];
        let err = plan(&inputs, &names(), &PlanOptions::default(), None).unwrap_err();
        assert!(
            err.message.contains("a: bfloat16, b: float32"),
            "{}",
            err.message
        );
        let fp32 = PlanOptions {
            dtype: Some(DType::F32),
            ..PlanOptions::default()
        };
        assert_eq!(plan(&inputs, &names(), &fp32, None).unwrap().len(), 2);
        let none = PlanOptions {
            selection: Selection::new(&["nothing*".into()], &[]).unwrap(),
            ..PlanOptions::default()
        };
        assert!(plan(&inputs, &names(), &none, None).is_err());
        assert!(Rename::parse("novalue").is_err());
        assert!(Selection::new(&["[".into()], &[]).is_err());
    }

    proptest! {
        /// Every selected tensor appears exactly once, in input order, with its shape; the shards
        /// of a directory cover every tensor once, in order.
        #[test]
        fn plan_covers_the_selection(
            sizes in proptest::collection::vec(1usize..50, 1..30),
            drop_every in 2usize..5,
            max_shard in 1u64..400,
        ) {
            let tensors: Vec<TensorInfo> = sizes
                .iter()
                .enumerate()
                .map(|(i, &n)| t(&format!("t{i:03}{}", if i % drop_every == 0 { "x" } else { "" }), DType::BF16, &[n]))
                .collect();
            let opts = PlanOptions {
                selection: Selection::new(&[], &["*x".into()]).unwrap(),
                ..PlanOptions::default()
            };
            let kept: Vec<&TensorInfo> = tensors.iter().filter(|t| !t.name.ends_with('x')).collect();
            match plan(std::slice::from_ref(&tensors), &["in".into()], &opts, None) {
                Err(e) => prop_assert!(kept.is_empty() && e.usage),
                Ok(p) => {
                    prop_assert_eq!(p.len(), kept.len());
                    for (o, k) in p.iter().zip(&kept) {
                        prop_assert_eq!(&o.name, &k.name);
                        prop_assert_eq!(&o.shape, &k.shape);
                        prop_assert_eq!(o.bytes(), 2 * k.shape[0] as u64);
                    }
                    let members: Vec<usize> = shards(&p, max_shard).into_iter().flat_map(|(_, m)| m).collect();
                    let mut sorted = members.clone();
                    sorted.sort();
                    prop_assert_eq!(sorted, (0..p.len()).collect::<Vec<_>>());
                }
            }
        }
    }
}
