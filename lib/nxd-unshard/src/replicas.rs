//! `--check-replicas`: every copy of every part of every tensor in the shards must be bit-identical
//! to the copy the output is built from. Copies are the kv heads replicated by the kv size
//! multiplier, the norms (and other replicated keys) on every tp rank, and a tied `lm_head`
//! against the embedding. Training can let them drift; the unsharded checkpoint would then
//! silently depend on which copy is read.

use std::ops::Range;

use anyhow::anyhow;
use nxd_layout::{narrowed_box, Narrow, ReplicaLocation, UnshardPlan, UnshardTensor};
use rayon::prelude::*;
use suite_support::exit::ToolError;
use suite_support::progress::Progress;
use tensor_formats::copy::{write_concat, write_view, Part};
use tensor_formats::FormatError;

use crate::shards::ShardTensors;
use crate::write::pieces;

/// Bytes of each side compared at a time (per worker thread, so memory stays bounded).
const CHUNK_BYTES: usize = 8 << 20;

/// What `--check-replicas` found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReplicaReport {
    /// Replica regions compared against the copy the output is built from.
    pub compared: usize,
    /// Bytes compared (each side).
    pub bytes: u64,
}

/// One replica that differs.
struct Mismatch {
    /// Position of the tensor in the plan (to report in plan order).
    order: usize,
    message: String,
}

/// A piece of a tensor, with the range of the concat dimension it covers.
struct Piece<'a> {
    part: Part<'a>,
    range: Range<usize>,
}

/// The pieces of `t` with their ranges along its concat dimension.
fn located_pieces<'a>(
    t: &UnshardTensor,
    shards: &[ShardTensors<'a>],
) -> Result<Vec<Piece<'a>>, FormatError> {
    let d = t.concat_dim;
    let mut at = 0;
    pieces(t, shards)?
        .into_iter()
        .map(|part| {
            let len = part.layout.shape.get(d).copied().unwrap_or(1);
            let range = at..at + len;
            at += len;
            Ok(Piece { part, range })
        })
        .collect()
}

/// The range of `t`'s concat dimension a replica covers, and its narrows of other dimensions.
fn replica_range(t: &UnshardTensor, r: &ReplicaLocation) -> (Range<usize>, Vec<Narrow>) {
    let d = t.concat_dim;
    let full = 0..t.shape.get(d).copied().unwrap_or(1);
    let mut range = full;
    let mut others = Vec::new();
    for n in &r.source_narrow {
        if n.dim == d {
            range = n.start..n.start + n.len;
        } else {
            others.push(*n);
        }
    }
    (range, others)
}

/// True if the replica is the very region the output reads (nothing to compare).
fn is_primary(
    t: &UnshardTensor,
    r: &ReplicaLocation,
    range: &Range<usize>,
    at: &[Piece<'_>],
) -> bool {
    t.pieces.iter().zip(at).any(|(p, piece)| {
        p.file == r.file
            && p.tensor == r.tensor
            && p.narrow == r.shard_narrow
            && piece.range == *range
    })
}

/// The bytes one replica region has, compared chunk by chunk with the output's copy.
struct Comparison<'s, 'a> {
    t: &'s UnshardTensor,
    r: &'s ReplicaLocation,
    shards: &'s [ShardTensors<'a>],
    pieces: &'s [Piece<'a>],
    range: Range<usize>,
    others: Vec<Narrow>,
}

impl Comparison<'_, '_> {
    /// Bytes per index of the concat dimension in the region.
    fn row_bytes(&self, elem: usize) -> usize {
        let d = self.t.concat_dim;
        let mut n = elem;
        for (dim, &len) in self.t.shape.iter().enumerate() {
            if dim == d {
                continue;
            }
            n *= self
                .others
                .iter()
                .find(|o| o.dim == dim)
                .map_or(len, |o| o.len);
        }
        n
    }

    /// `None` if equal, else the message naming the replica and the first differing element.
    fn run(&self, progress: &Progress) -> Result<Option<String>, FormatError> {
        let t = self.t;
        let r = self.r;
        let d = t.concat_dim;
        let view = self.shards[r.file]
            .get(&r.tensor)
            .ok_or_else(|| FormatError::Invalid(format!("replica `{}` is missing", r.tensor)))?;
        let mut replica = Part::whole(*view);
        for n in &r.shard_narrow {
            replica = replica.narrow(n.dim, n.start, n.len)?;
        }
        let es = view.dtype.size();
        if t.shape.is_empty() {
            // A 0-d tensor: one element.
            let (mut a, mut b) = (Vec::new(), Vec::new());
            write_view(&replica, view.dtype, &mut a)?;
            write_view(&self.pieces[0].part, view.dtype, &mut b)?;
            progress.inc(a.len() as u64);
            return Ok((a != b).then(|| self.message(&[], &self.pieces[0])));
        }
        let rows = (CHUNK_BYTES / self.row_bytes(es).max(1)).max(1);
        let (mut a, mut b) = (Vec::new(), Vec::new());
        let mut c = self.range.start;
        while c < self.range.end {
            let e = (c + rows).min(self.range.end);
            let mine = replica.narrow(d, c - self.range.start, e - c)?;
            let mut theirs = Vec::new();
            for p in self
                .pieces
                .iter()
                .filter(|p| p.range.start < e && c < p.range.end)
            {
                let s = c.max(p.range.start);
                let mut part = p
                    .part
                    .narrow(d, s - p.range.start, e.min(p.range.end) - s)?;
                for o in &self.others {
                    part = part.narrow(o.dim, o.start, o.len)?;
                }
                theirs.push(part);
            }
            a.clear();
            b.clear();
            write_view(&mine, view.dtype, &mut a)?;
            write_concat(&theirs, d, view.dtype, &mut b)?;
            progress.inc(a.len() as u64);
            if let Some(pos) = a.chunks(es).zip(b.chunks(es)).position(|(x, y)| x != y) {
                // The element's index in the chunk, then in the whole tensor.
                let mut shape = t.shape.clone();
                shape[d] = e - c;
                for o in &self.others {
                    shape[o.dim] = o.len;
                }
                let mut idx = vec![0; shape.len()];
                let mut rem = pos;
                for k in (0..shape.len()).rev() {
                    idx[k] = rem % shape[k];
                    rem /= shape[k];
                }
                idx[d] += c;
                for o in &self.others {
                    idx[o.dim] += o.start;
                }
                let primary = self
                    .pieces
                    .iter()
                    .find(|p| p.range.contains(&idx[d]))
                    .unwrap_or(&self.pieces[0]);
                return Ok(Some(self.message(&idx, primary)));
            }
            c = e;
        }
        Ok(None)
    }

    fn message(&self, idx: &[usize], primary: &Piece<'_>) -> String {
        let t = self.t;
        let which = t
            .pieces
            .iter()
            .zip(self.pieces)
            .find(|(_, p)| std::ptr::eq(*p, primary))
            .map(|(s, _)| s)
            .unwrap_or(&t.pieces[0]);
        format!(
            "{} `{}` differs from its copy in {} `{}` at element {idx:?} of `{}`",
            self.shards[self.r.file].name,
            self.r.tensor,
            self.shards[which.file].name,
            which.tensor,
            t.name
        )
    }
}

/// Compares every replica listed in `plan` with the copy the output is built from. Returns what
/// was compared; any difference is a data error (exit 1) naming the first differing replica
/// (file, tensor, element) in plan order and how many differ.
pub fn check_replicas(
    plan: &UnshardPlan,
    shards: &[ShardTensors<'_>],
    show_progress: bool,
) -> Result<ReplicaReport, ToolError> {
    let internal = |e: FormatError| ToolError::data(anyhow!(e).context("checking replicas"));
    // Everything to compare, with its size for the progress bar.
    let mut jobs = Vec::new();
    let mut located = Vec::with_capacity(plan.tensors.len());
    for t in &plan.tensors {
        located.push(located_pieces(t, shards).map_err(internal)?);
    }
    let mut total = 0u64;
    for (order, (t, at)) in plan.tensors.iter().zip(&located).enumerate() {
        for r in &t.replicas {
            let (range, others) = replica_range(t, r);
            if is_primary(t, r, &range, at) {
                continue;
            }
            let elem = shards[r.file].get(&r.tensor).map_or(1, |v| v.dtype.size());
            let region: Option<Vec<Range<usize>>> = narrowed_box(&t.shape, &r.source_narrow);
            total += region.map_or(0, |b| b.iter().map(|x| x.len() as u64).product::<u64>())
                * elem as u64;
            jobs.push((
                order,
                Comparison {
                    t,
                    r,
                    shards,
                    pieces: at,
                    range,
                    others,
                },
            ));
        }
    }
    let progress = Progress::new(total, "checking replicas", show_progress);
    let results: Vec<Result<Option<Mismatch>, FormatError>> = jobs
        .par_iter()
        .map(|(order, c)| {
            Ok(c.run(&progress)?.map(|message| Mismatch {
                order: *order,
                message,
            }))
        })
        .collect();
    progress.finish();
    let mut mismatches = Vec::new();
    for r in results {
        if let Some(m) = r.map_err(internal)? {
            mismatches.push(m);
        }
    }
    if let Some(first) = mismatches.iter().min_by_key(|m| m.order) {
        let more = match mismatches.len() {
            1 => String::new(),
            n => format!(" ({n} of {} replica regions differ)", jobs.len()),
        };
        return Err(ToolError::data(anyhow!(
            "replicas differ: {}{more}; the shards are not one consistent checkpoint (training \
             let the copies drift, or a file was altered), so nothing was written",
            first.message
        )));
    }
    Ok(ReplicaReport {
        compared: jobs.len(),
        bytes: total,
    })
}
