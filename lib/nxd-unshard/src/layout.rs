//! The inverse plan for the shards at hand, checked against them.
//!
//! The HF tensor list comes from `config.json` ([`expected_source_tensors`]) plus the replicated
//! extra keys the shards carry (legacy `rotary_emb.inv_freq`, other unknown keys), each with the
//! dtype the shards hold. It is planned forward with the layout flags, every shard file is
//! checked against the plan (tensor names, shapes and dtypes: a rank from another layout or
//! another model is refused here), and the plan is inverted.

use std::collections::{HashMap, HashSet};

use anyhow::anyhow;
use nxd_layout::{
    canonical_order, expected_source_tensors, plan, LayerTensor, LayoutError, ModelConfig,
    ParallelConfig, ShardPlan, SourceTensor, TensorKind, UnshardPlan, LM_HEAD,
};
use suite_support::exit::ToolError;
use tensor_formats::DType;

use crate::shards::ShardTensors;

/// The dtype the first plan is made with, before the shards' dtypes are known.
const PLACEHOLDER_DTYPE: DType = DType::BF16;

/// `tp 2 x pp 1, qkv_linear (kv size multiplier 1, trn1)`: the layout flags, for messages.
pub fn layout_text(p: &ParallelConfig) -> String {
    let mut s = format!("tp {} x pp {}", p.tp, p.pp);
    if p.vpp > 1 {
        s.push_str(&format!(" x vpp {}", p.vpp));
    }
    if p.qkv_linear {
        s.push_str(&format!(
            ", qkv_linear (kv size multiplier {}, {}{})",
            p.kv_size_multiplier,
            p.hw,
            if p.fuse_qkv { ", fused" } else { "" }
        ));
    } else {
        s.push_str(", no qkv_linear");
    }
    if p.coalesce_qkv {
        s.push_str(", coalesce_qkv");
    }
    s
}

const HINT: &str = "were the shards written with other layout flags, or for another config.json?";

fn usage(msg: String) -> ToolError {
    ToolError::usage(anyhow!(msg))
}

fn dtype_text(name: &str) -> String {
    DType::from_safetensors_name(name).map_or_else(|| name.to_string(), |d| d.to_string())
}

/// Plans the unsharding of `shards` (in plan order: `files[tp * pp_size + pp]`) and checks
/// every file against the plan. Every mismatch is a usage error (exit 2) naming the file and
/// the tensor.
///
/// The result has one entry per HF tensor, in state-dict order, dtypes as in the shards. With
/// tied embeddings `lm_head.weight` is not among them (HF omits it); its shards are listed as
/// replicas of `model.embed_tokens.weight`, and may be absent altogether (it is only a copy).
pub fn plan_for_shards(
    model: &ModelConfig,
    parallel: &ParallelConfig,
    shards: &[ShardTensors<'_>],
) -> Result<UnshardPlan, ToolError> {
    let layout = layout_text(parallel);
    let base = expected_source_tensors(
        model,
        PLACEHOLDER_DTYPE.safetensors_name(),
        PLACEHOLDER_DTYPE.size(),
    );
    let plan0 = plan(model, parallel, &base).map_err(|e| ToolError::usage(anyhow!(e)))?;
    let planned: HashSet<&str> = plan0
        .files
        .iter()
        .flat_map(|f| f.tensors.iter().map(|t| t.name.as_str()))
        .collect();

    // Keys the plan does not produce: replicated extras (legacy inv_freq, unknown keys), or a
    // sign of another layout.
    let mut extras: Vec<SourceTensor> = Vec::new();
    let mut seen_in: HashMap<String, &str> = HashMap::new();
    for s in shards {
        for (name, view) in s.iter() {
            if planned.contains(name) || seen_in.contains_key(name) {
                continue;
            }
            seen_in.insert(name.to_string(), s.name);
            match TensorKind::of(name) {
                TensorKind::Layer(_, LayerTensor::InvFreq)
                | TensorKind::LayerOther(_)
                | TensorKind::Other => extras.push(SourceTensor::new(
                    name,
                    view.layout.shape.clone(),
                    view.dtype.safetensors_name(),
                    view.dtype.size(),
                )),
                _ => return Err(unexpected(s.name, name, &layout, None)),
            }
        }
    }
    let mut sources = base;
    sources.extend(extras);
    let names: Vec<&str> = sources.iter().map(|s| s.name.as_str()).collect();
    let order = canonical_order(&names);
    let mut sources: Vec<SourceTensor> = order.into_iter().map(|i| sources[i].clone()).collect();

    let replan = |sources: &[SourceTensor]| -> Result<ShardPlan, ToolError> {
        plan(model, parallel, sources).map_err(|e| match &e {
            LayoutError::UnsupportedTensor { name, .. }
            | LayoutError::DuplicateTensor { name }
            | LayoutError::ShapeMismatch { name, .. }
                if seen_in.contains_key(name) =>
            {
                unexpected(seen_in[name], name, &layout, Some(&e))
            }
            _ => ToolError::usage(anyhow!(e)),
        })
    };
    let plan1 = replan(&sources)?;

    // Each source's dtype: that of the first shard tensor built from it.
    let mut assigned = vec![false; sources.len()];
    for (f, s) in plan1.files.iter().zip(shards) {
        for t in &f.tensors {
            let Some(view) = s.get(&t.name) else { continue };
            for p in &t.parts {
                if !assigned[p.source] {
                    assigned[p.source] = true;
                    sources[p.source].dtype = view.dtype.safetensors_name().to_string();
                    sources[p.source].elem_size = view.dtype.size();
                }
            }
        }
    }
    let plan2 = replan(&sources)?;

    let tied_head_absent =
        model.tie_word_embeddings && shards.iter().all(|s| s.get(LM_HEAD).is_none());
    verify(&plan2, shards, &layout, tied_head_absent)?;
    let mut inverse = plan2
        .unshard()
        .map_err(|e| ToolError::data(anyhow!(e).context("inverting the layout plan")))?;
    if tied_head_absent {
        for t in &mut inverse.tensors {
            t.replicas.retain(|r| r.tensor != LM_HEAD);
        }
    }
    Ok(inverse)
}

fn unexpected(file: &str, name: &str, layout: &str, why: Option<&LayoutError>) -> ToolError {
    let why = why.map_or_else(String::new, |e| format!(" ({e})"));
    usage(format!(
        "{file} holds `{name}`, which the layout {layout} does not produce{why}; {HINT}"
    ))
}

/// Checks every shard file against the plan: the same tensor names, shapes and dtypes.
fn verify(
    plan: &ShardPlan,
    shards: &[ShardTensors<'_>],
    layout: &str,
    tied_head_absent: bool,
) -> Result<(), ToolError> {
    for (f, s) in plan.files.iter().zip(shards) {
        let mut names: HashSet<&str> = HashSet::with_capacity(f.tensors.len());
        for t in &f.tensors {
            names.insert(&t.name);
            let Some(view) = s.get(&t.name) else {
                if tied_head_absent && t.name == LM_HEAD {
                    continue;
                }
                return Err(usage(format!(
                    "{}: tensor `{}` is missing (the layout {layout} puts it in this file); {HINT}",
                    s.name, t.name
                )));
            };
            if view.layout.shape != t.shape {
                return Err(usage(format!(
                    "{}: tensor `{}` has shape {:?}, the layout {layout} gives {:?}; {HINT}",
                    s.name, t.name, view.layout.shape, t.shape
                )));
            }
            if view.dtype.safetensors_name() != t.dtype {
                return Err(usage(format!(
                    "{}: tensor `{}` is {}, but the other rank files hold it as {}",
                    s.name,
                    t.name,
                    view.dtype,
                    dtype_text(&t.dtype)
                )));
            }
        }
        if let Some((name, _)) = s.iter().find(|(n, _)| !names.contains(n)) {
            return Err(usage(format!(
                "{} holds `{name}`, which the layout {layout} puts in other files; {HINT}",
                s.name
            )));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use nxd_layout::HwBackend;

    #[test]
    fn layout_texts() {
        assert_eq!(
            layout_text(&ParallelConfig::new(2, 1)),
            "tp 2 x pp 1, no qkv_linear"
        );
        let mut p = ParallelConfig::new(8, 4);
        p.vpp = 2;
        p.qkv_linear = true;
        p.fuse_qkv = true;
        p.kv_size_multiplier = 4;
        p.hw = HwBackend::Trn2;
        assert_eq!(
            layout_text(&p),
            "tp 8 x pp 4 x vpp 2, qkv_linear (kv size multiplier 4, trn2, fused)"
        );
    }
}
