//! The inverse plan: NxD shard files -> the original HF tensors (for `ckpt-unshard`).
//!
//! It is derived from the forward plan, so it inverts exactly what [`crate::plan`] does:
//! the trn1 head permutation, the kv tiling (the first replica is read, every replica is
//! listed), fused qkv split by the real q/k/v row counts, gate_up split into gate and up, and the
//! transposed o_proj (all coordinates are logical).

use std::ops::Range;

use serde::{Deserialize, Serialize};

use crate::config::{ModelConfig, ParallelConfig};
use crate::error::LayoutError;
use crate::plan::{narrowed_box, plan, Narrow, ShardPlan, SourceTensor};

/// Where a range of an original tensor's bytes lives: a region of one shard tensor.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ShardSlice {
    /// Index into [`UnshardPlan::files`] (the same as [`ShardPlan::files`]).
    pub file: usize,
    /// NxD key of the tensor in that file.
    pub tensor: String,
    /// Narrows to apply to that tensor, in its logical coordinates (empty: the whole tensor).
    pub narrow: Vec<Narrow>,
}

/// One copy of part of an original tensor inside the shards (for `--check-replicas`).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ReplicaLocation {
    /// Index into [`UnshardPlan::files`].
    pub file: usize,
    /// NxD key of the tensor in that file.
    pub tensor: String,
    /// The region of that shard tensor (logical coordinates).
    pub shard_narrow: Vec<Narrow>,
    /// The region of the original tensor it must equal.
    pub source_narrow: Vec<Narrow>,
}

/// How to rebuild one original tensor: `cat(pieces, concat_dim)`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct UnshardTensor {
    /// HF name.
    pub name: String,
    /// HF shape.
    pub shape: Vec<usize>,
    /// dtype id (as in the source list).
    pub dtype: String,
    /// Bytes per element.
    pub elem_size: usize,
    /// Index of this tensor in the source list the forward plan was built from.
    pub source: usize,
    /// Dimension along which `pieces` are concatenated.
    pub concat_dim: usize,
    /// The pieces, in order; each is the first replica (in file order, then key order) of its
    /// range.
    pub pieces: Vec<ShardSlice>,
    /// Every location of every part of this tensor, the pieces' own included, in file order.
    /// With tied embeddings and no `lm_head` in the source list, the `lm_head.weight` shards are
    /// listed here as replicas of `model.embed_tokens.weight`.
    pub replicas: Vec<ReplicaLocation>,
}

/// A shard file, as the inverse plan refers to it.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ShardFileRef {
    /// File name (relative to `<checkpoint>/model/`).
    pub file_name: String,
    /// tp rank.
    pub tp: usize,
    /// pp rank.
    pub pp: usize,
}

/// The whole inverse plan.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UnshardPlan {
    /// The shard files, in forward-plan order (tp-major).
    pub files: Vec<ShardFileRef>,
    /// One entry per original tensor, in source-list order.
    pub tensors: Vec<UnshardTensor>,
}

/// Plans, then inverts: for `ckpt-unshard`, pass [`crate::expected_source_tensors`] as `sources`
/// (or the original HF tensor list).
pub fn plan_unshard(
    model: &ModelConfig,
    parallel: &ParallelConfig,
    sources: &[SourceTensor],
) -> Result<UnshardPlan, LayoutError> {
    plan(model, parallel, sources)?.unshard()
}

/// One place where a part of a source sits.
struct Loc {
    file: usize,
    tensor: usize,
    /// The part's box in source coordinates.
    bx: Vec<Range<usize>>,
    /// The same box in the shard tensor's coordinates.
    out: Vec<Range<usize>>,
}

fn to_narrows(region: &[Range<usize>], full: &[usize]) -> Vec<Narrow> {
    region
        .iter()
        .zip(full)
        .enumerate()
        .filter(|(_, (r, &n))| !(r.start == 0 && r.end == n))
        .map(|(d, (r, _))| Narrow::new(d, r.start, r.len()))
        .collect()
}

impl ShardPlan {
    /// The inverse of this plan: for every source tensor, the shard regions that rebuild it.
    ///
    /// Works for any plan whose parts are narrows of their sources and whose every source is
    /// covered; fails with [`LayoutError::InconsistentPlan`] otherwise (only possible for a
    /// hand-edited plan).
    pub fn unshard(&self) -> Result<UnshardPlan, LayoutError> {
        let mut locs: Vec<Vec<Loc>> = (0..self.sources.len()).map(|_| Vec::new()).collect();
        for (fi, f) in self.files.iter().enumerate() {
            for (ti, t) in f.tensors.iter().enumerate() {
                let mut off = 0;
                for p in &t.parts {
                    let src = self.sources.get(p.source).ok_or_else(|| {
                        LayoutError::InconsistentPlan(format!(
                            "`{}` in {} refers to source {} of {}",
                            t.name,
                            f.file_name,
                            p.source,
                            self.sources.len()
                        ))
                    })?;
                    let bx = narrowed_box(&src.shape, &p.narrow).ok_or_else(|| {
                        LayoutError::InconsistentPlan(format!(
                            "a part of `{}` in {} narrows `{}` {:?} out of range",
                            t.name, f.file_name, src.name, src.shape
                        ))
                    })?;
                    let mut out = Vec::with_capacity(bx.len());
                    for (d, r) in bx.iter().enumerate() {
                        let want = if d == t.concat_dim {
                            t.shape.get(d).map(|&n| off + r.len() <= n)
                        } else {
                            t.shape.get(d).map(|&n| r.len() == n)
                        };
                        if want != Some(true) || bx.len() != t.shape.len() {
                            return Err(LayoutError::InconsistentPlan(format!(
                                "the parts of `{}` in {} do not tile its shape {:?}",
                                t.name, f.file_name, t.shape
                            )));
                        }
                        let start = if d == t.concat_dim { off } else { 0 };
                        out.push(start..start + r.len());
                    }
                    if let Some(r) = bx.get(t.concat_dim) {
                        off += r.len();
                    }
                    locs[p.source].push(Loc {
                        file: fi,
                        tensor: ti,
                        bx,
                        out,
                    });
                }
            }
        }

        let mut tensors = Vec::with_capacity(self.sources.len());
        for (si, (src, locs)) in self.sources.iter().zip(locs).enumerate() {
            tensors.push(self.invert_one(si, src, &locs)?);
        }
        Ok(UnshardPlan {
            files: self
                .files
                .iter()
                .map(|f| ShardFileRef {
                    file_name: f.file_name.clone(),
                    tp: f.tp,
                    pp: f.pp,
                })
                .collect(),
            tensors,
        })
    }

    fn invert_one(
        &self,
        si: usize,
        src: &SourceTensor,
        locs: &[Loc],
    ) -> Result<UnshardTensor, LayoutError> {
        let shape = &src.shape;
        if locs.is_empty() {
            return Err(LayoutError::InconsistentPlan(format!(
                "source `{}` is in no shard file",
                src.name
            )));
        }
        let tensor_of = |l: &Loc| &self.files[l.file].tensors[l.tensor];
        let split_dims: Vec<usize> = (0..shape.len())
            .filter(|&d| locs.iter().any(|l| l.bx[d] != (0..shape[d])))
            .collect();
        if split_dims.len() > 1 {
            return Err(LayoutError::InconsistentPlan(format!(
                "source `{}` is split along several dimensions {split_dims:?}",
                src.name
            )));
        }
        let d = split_dims.first().copied().unwrap_or(0);

        let slice = |l: &Loc, out: &[Range<usize>]| ShardSlice {
            file: l.file,
            tensor: tensor_of(l).name.clone(),
            narrow: to_narrows(out, &tensor_of(l).shape),
        };
        let mut pieces = Vec::new();
        if shape.is_empty() || shape.contains(&0) {
            pieces.push(slice(&locs[0], &locs[0].out));
        } else {
            let mut pos = 0;
            while pos < shape[d] {
                let l = locs
                    .iter()
                    .find(|l| l.bx[d].contains(&pos))
                    .ok_or_else(|| {
                        LayoutError::InconsistentPlan(format!(
                            "index {pos} of dimension {d} of `{}` is in no shard",
                            src.name
                        ))
                    })?;
                let end = l.bx[d].end;
                let mut out = l.out.clone();
                let start = out[d].start + (pos - l.bx[d].start);
                out[d] = start..start + (end - pos);
                pieces.push(slice(l, &out));
                pos = end;
            }
        }
        let replicas = locs
            .iter()
            .map(|l| ReplicaLocation {
                file: l.file,
                tensor: tensor_of(l).name.clone(),
                shard_narrow: to_narrows(&l.out, &tensor_of(l).shape),
                source_narrow: to_narrows(&l.bx, shape),
            })
            .collect();
        Ok(UnshardTensor {
            name: src.name.clone(),
            shape: shape.clone(),
            dtype: src.dtype.clone(),
            elem_size: src.elem_size,
            source: si,
            concat_dim: d,
            pieces,
            replicas,
        })
    }
}
