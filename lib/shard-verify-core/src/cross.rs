//! Check 4, cross-rank invariants: every region of a source tensor that the layout places on
//! several ranks (norms on every tp rank, kv heads replicated by the kv size multiplier, a tied
//! `lm_head` and `embed_tokens`) is bit-identical in every copy; and the embedding / lm_head row
//! blocks cover the vocabulary exactly once (no two ranks hold the same rows).
//!
//! The plan says where every shard region comes from: each part of a shard tensor is a narrow
//! of one source tensor. Two regions that map to the same source region must be equal. Only
//! those regions are read (plus the vocabulary blocks), through the files' memory maps.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::fmt::Write as _;
use std::io;
use std::ops::Range;

use nxd_layout::{narrowed_box, ShardPlan, EMBED, LM_HEAD};
use rayon::prelude::*;
use suite_support::hash::HashingWriter;
use tensor_formats::copy::{write_view, Part};
use tensor_formats::TensorRef;

use crate::names::Slot;
use crate::report::{Check, Problem};
use crate::structure::Opened;

/// A region of a shard tensor: (slot index, tensor name, range per dimension in the tensor's
/// logical coordinates).
type Region = (usize, String, Vec<Range<usize>>);

/// A region of one tensor of a file, as a digest key: (tensor name, (start, end) per dimension).
type RegionKey = (String, Vec<(usize, usize)>);

/// Where one part of a source tensor sits in the shards.
struct Loc {
    slot: usize,
    tensor: String,
    /// The part's box in the source's coordinates.
    src: Vec<Range<usize>>,
    /// The same box in the shard tensor's coordinates.
    out: Vec<Range<usize>>,
}

/// A set of regions that must be bit-identical.
struct Group {
    source: usize,
    dim: usize,
    seg: Range<usize>,
    members: Vec<Region>,
}

/// What the cross-rank check found.
#[derive(Debug, Clone, Default)]
pub struct CrossOutcome {
    /// Problems, naming the files and tensors.
    pub problems: Vec<Problem>,
    /// Replicated regions compared (groups of copies).
    pub groups: usize,
    /// Copies read in those groups.
    pub copies: usize,
    /// Rows of each vocabulary tensor (`model.embed_tokens.weight`, `lm_head.weight` when not
    /// tied) held by files that passed the structure check, and the vocabulary size.
    pub vocab: Vec<(String, usize, usize)>,
    /// True if some region could not be read (I/O error while reading a mapped file).
    pub unreadable: bool,
}

impl CrossOutcome {
    /// One line: what was compared.
    pub fn detail(&self) -> String {
        let mut s = format!(
            "{} replicated regions compared over {} copies",
            self.groups, self.copies
        );
        for (name, rows, vocab) in &self.vocab {
            let _ = write!(s, "; {name} rows {rows}/{vocab}");
        }
        s
    }
}

/// Runs the check over the files that opened and the tensors that passed the structure check
/// (`verified[slot]`). `head_dim` names kv heads in messages.
pub fn check(
    plan: &ShardPlan,
    slots: &[Slot],
    opened: &[Option<Opened>],
    verified: &[HashSet<String>],
    head_dim: usize,
) -> CrossOutcome {
    let mut locs: Vec<Vec<Loc>> = (0..plan.sources.len()).map(|_| Vec::new()).collect();
    for (si, f) in plan.files.iter().enumerate() {
        if opened[si].is_none() {
            continue;
        }
        for t in f.tensors.iter().filter(|t| verified[si].contains(&t.name)) {
            let mut off = 0;
            for p in &t.parts {
                let Some(src) = narrowed_box(&plan.sources[p.source].shape, &p.narrow) else {
                    continue;
                };
                let mut out: Vec<Range<usize>> = t.shape.iter().map(|&n| 0..n).collect();
                let len = src.get(t.concat_dim).map_or(1, |r| r.len());
                if let Some(r) = out.get_mut(t.concat_dim) {
                    *r = off..off + len;
                }
                off += len;
                locs[p.source].push(Loc {
                    slot: si,
                    tensor: t.name.clone(),
                    src,
                    out,
                });
            }
        }
    }

    let mut out = CrossOutcome::default();
    let mut groups: Vec<Group> = Vec::new();
    // Vocabulary blocks: (source, src rows, region).
    let mut vocab_blocks: Vec<(usize, Range<usize>, Region)> = Vec::new();
    for (source, ls) in locs.iter().enumerate() {
        let src = &plan.sources[source];
        if ls.is_empty() || src.shape.is_empty() {
            continue;
        }
        let split: Vec<usize> = (0..src.shape.len())
            .filter(|&d| ls.iter().any(|l| l.src[d] != (0..src.shape[d])))
            .collect();
        if split.len() > 1 {
            continue;
        }
        let d = split.first().copied().unwrap_or(0);
        if src.name == EMBED || src.name == LM_HEAD {
            let mut covered: BTreeSet<usize> = BTreeSet::new();
            for l in ls {
                covered.extend(l.src[d].clone());
                vocab_blocks.push((
                    source,
                    l.src[d].clone(),
                    (l.slot, l.tensor.clone(), l.out.clone()),
                ));
            }
            out.vocab
                .push((src.name.clone(), covered.len(), src.shape[d]));
        }
        let bounds: BTreeSet<usize> = ls
            .iter()
            .flat_map(|l| [l.src[d].start, l.src[d].end])
            .collect();
        let bounds: Vec<usize> = bounds.into_iter().collect();
        for w in bounds.windows(2) {
            let seg = w[0]..w[1];
            let members: Vec<Region> = ls
                .iter()
                .filter(|l| l.src[d].start <= seg.start && seg.end <= l.src[d].end)
                .map(|l| {
                    let mut r = l.out.clone();
                    let start = r[d].start + (seg.start - l.src[d].start);
                    r[d] = start..start + seg.len();
                    (l.slot, l.tensor.clone(), r)
                })
                .collect();
            if members.len() >= 2 {
                groups.push(Group {
                    source,
                    dim: d,
                    seg,
                    members,
                });
            }
        }
    }

    // Every region to digest, per slot.
    let mut wanted: Vec<BTreeSet<RegionKey>> = (0..slots.len()).map(|_| BTreeSet::new()).collect();
    let key = |r: &[Range<usize>]| -> Vec<(usize, usize)> {
        r.iter().map(|x| (x.start, x.end)).collect()
    };
    for g in &groups {
        for (s, t, r) in &g.members {
            wanted[*s].insert((t.clone(), key(r)));
        }
    }
    for (_, _, (s, t, r)) in &vocab_blocks {
        wanted[*s].insert((t.clone(), key(r)));
    }
    let digests: Vec<HashMap<RegionKey, Option<String>>> = wanted
        .into_par_iter()
        .enumerate()
        .map(|(s, regions)| {
            let mut m = HashMap::new();
            if regions.is_empty() {
                return m;
            }
            let Some(o) = &opened[s] else { return m };
            let views: HashMap<&str, TensorRef<'_>> = o
                .file
                .tensors()
                .map(|v| v.into_iter().collect())
                .unwrap_or_default();
            for (t, r) in regions {
                let d = views.get(t.as_str()).and_then(|v| digest(v, &r).ok());
                m.insert((t, r), d);
            }
            m
        })
        .collect();
    let digest_of = |(s, t, r): &Region| -> Option<&String> {
        digests[*s]
            .get(&(t.clone(), key(r)))
            .and_then(Option::as_ref)
    };

    for g in &groups {
        out.groups += 1;
        out.copies += g.members.len();
        let mut classes: Vec<(&String, Vec<&Region>)> = Vec::new();
        for m in &g.members {
            let Some(d) = digest_of(m) else {
                out.unreadable = true;
                out.problems.push(
                    Problem::file(
                        Check::CrossRank,
                        &slots[m.0].rel,
                        "cannot read the tensor data",
                    )
                    .with_tensor(m.1.as_str()),
                );
                continue;
            };
            match classes.iter_mut().find(|(c, _)| *c == d) {
                Some((_, v)) => v.push(m),
                None => classes.push((d, vec![m])),
            }
        }
        if classes.len() <= 1 {
            continue;
        }
        classes.sort_by_key(|(_, v)| std::cmp::Reverse(v.len()));
        let (what, note) = describe_source(plan, g, head_dim);
        if classes[0].1.len() > classes[1].1.len() {
            let reference = classes[0].1[0];
            let n = classes[0].1.len();
            for (_, deviants) in &classes[1..] {
                for m in deviants {
                    out.problems.push(
                        Problem::file(
                            Check::CrossRank,
                            &slots[m.0].rel,
                            format!(
                                "{} (copy of {what}{}) differ from the {n} identical copies on \
                                 other ranks, e.g. {} in {}",
                                describe_region(plan, m),
                                note.as_ref().map_or(String::new(), |n| format!(", {n}")),
                                reference.1,
                                slots[reference.0].rel
                            ),
                        )
                        .with_tensor(m.1.as_str()),
                    );
                }
            }
        } else {
            let mut files: Vec<String> = Vec::new();
            let mut copies: Vec<String> = Vec::new();
            for (_, v) in &classes {
                for m in v {
                    if !files.contains(&slots[m.0].rel) {
                        files.push(slots[m.0].rel.clone());
                    }
                    copies.push(format!(
                        "{} {} in {}",
                        m.1,
                        describe_region(plan, m),
                        slots[m.0].rel
                    ));
                }
            }
            let first = classes[0].1[0];
            out.problems.push(
                Problem::new(
                    Check::CrossRank,
                    files,
                    format!(
                        "the {} copies of {what}{} disagree and no version has a majority: {}",
                        g.members.len(),
                        note.as_ref().map_or(String::new(), |n| format!(" ({n})")),
                        copies.join("; ")
                    ),
                )
                .with_tensor(first.1.as_str()),
            );
        }
    }

    // Vocabulary blocks: different rows of one source must not be identical.
    let mut seen: HashMap<(usize, &String), (&Range<usize>, &Region)> = HashMap::new();
    for (source, rows, region) in &vocab_blocks {
        let Some(d) = digest_of(region) else { continue };
        match seen.get(&(*source, d)) {
            Some((other_rows, other)) if *other_rows != rows => {
                let name = &plan.sources[*source].name;
                out.problems.push(
                    Problem::new(
                        Check::CrossRank,
                        vec![slots[other.0].rel.clone(), slots[region.0].rel.clone()],
                        format!(
                            "{name} rows {}..{} and rows {}..{} are bit-identical: the \
                             vocabulary is not covered exactly once (a file copied over another?)",
                            other_rows.start, other_rows.end, rows.start, rows.end
                        ),
                    )
                    .with_tensor(region.1.as_str()),
                );
            }
            Some(_) => {}
            None => {
                seen.insert((*source, d), (rows, region));
            }
        }
    }
    out
}

/// SHA-256 of a region's logical row-major bytes.
fn digest(view: &TensorRef<'_>, region: &[(usize, usize)]) -> tensor_formats::Result<String> {
    let mut part = Part::whole(*view);
    for (dim, &(start, end)) in region.iter().enumerate() {
        if start != 0 || end != view.layout.shape[dim] {
            part = part.narrow(dim, start, end - start)?;
        }
    }
    let mut w = HashingWriter::new(io::sink());
    write_view(&part, view.dtype, &mut w)?;
    Ok(w.finish().1)
}

fn dim_word(d: usize) -> String {
    match d {
        0 => "rows".into(),
        1 => "columns".into(),
        _ => format!("dim {d} indices"),
    }
}

/// The source region of a group, `<source> rows a..b` (the range only if it is not the whole
/// tensor), and what it is: `kv head h`, `kv heads a..b` or `replicated on every tp rank`.
fn describe_source(plan: &ShardPlan, g: &Group, head_dim: usize) -> (String, Option<String>) {
    let src = &plan.sources[g.source];
    let whole = g.seg == (0..src.shape[g.dim]);
    let mut s = src.name.clone();
    if !whole {
        let _ = write!(s, " {} {}..{}", dim_word(g.dim), g.seg.start, g.seg.end);
    }
    let kv = src.name.ends_with("k_proj.weight") || src.name.ends_with("v_proj.weight");
    let note = if kv
        && g.dim == 0
        && head_dim > 0
        && g.seg.start.is_multiple_of(head_dim)
        && g.seg.len().is_multiple_of(head_dim)
    {
        let (a, b) = (g.seg.start / head_dim, g.seg.end / head_dim);
        Some(if b == a + 1 {
            format!("kv head {a}")
        } else {
            format!("kv heads {a}..{b}")
        })
    } else if whole && src.shape.len() == 1 {
        Some("replicated on every tp rank".to_string())
    } else {
        None
    };
    (s, note)
}

/// `rows a..b` of a shard tensor, or `the whole tensor`.
fn describe_region(plan: &ShardPlan, (slot, tensor, r): &Region) -> String {
    let shape = plan.files[*slot]
        .tensor(tensor)
        .map(|t| t.shape.clone())
        .unwrap_or_default();
    let parts: Vec<String> = r
        .iter()
        .enumerate()
        .filter(|(d, x)| shape.get(*d).is_none_or(|&n| **x != (0..n)))
        .map(|(d, x)| format!("{} {}..{}", dim_word(d), x.start, x.end))
        .collect();
    if parts.is_empty() {
        "the whole tensor".into()
    } else {
        parts.join(", ")
    }
}
