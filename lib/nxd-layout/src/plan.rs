//! The forward plan: HF source tensors -> NxD shard files (spec §2-§9).

use std::collections::HashMap;
use std::fmt;
use std::ops::Range;

use serde::{Deserialize, Serialize};

use crate::config::{ModelConfig, ParallelConfig};
use crate::error::LayoutError;
use crate::heads::{kv_rows, q_rows};
use crate::names::{
    file_name, LayerTensor, TensorKind, EMBED, LM_HEAD, NORM, NXD_SPECIAL_SUBSTRINGS,
};
use crate::pipeline::layer_pp_ranks;
use crate::validate::validate;

/// One tensor of the source (HF) checkpoint, as the caller lists it.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct SourceTensor {
    /// HF name, e.g. `model.layers.3.self_attn.q_proj.weight`.
    pub name: String,
    /// Shape (row-major).
    pub shape: Vec<usize>,
    /// Opaque dtype id, carried into the plan unchanged (e.g. the safetensors name `BF16`).
    /// NxD never converts dtypes; parts concatenated into one tensor must share it.
    pub dtype: String,
    /// Bytes per element (used for sizes in [`ShardPlan::summary`]).
    pub elem_size: usize,
}

impl SourceTensor {
    /// Builds a source tensor description.
    pub fn new(
        name: impl Into<String>,
        shape: Vec<usize>,
        dtype: impl Into<String>,
        elem_size: usize,
    ) -> SourceTensor {
        SourceTensor {
            name: name.into(),
            shape,
            dtype: dtype.into(),
            elem_size,
        }
    }

    /// Number of elements.
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
}

/// `narrow(dim, start, len)`, as in torch: keep indices `[start, start+len)` of dimension `dim`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Narrow {
    /// The dimension narrowed.
    pub dim: usize,
    /// First index kept.
    pub start: usize,
    /// Number of indices kept.
    pub len: usize,
}

impl Narrow {
    /// `narrow(dim, start, len)`.
    pub fn new(dim: usize, start: usize, len: usize) -> Narrow {
        Narrow { dim, start, len }
    }
}

/// Applies `narrows` in order to a box of extents `shape`, returning the kept index range of
/// every dimension (in the coordinates of the un-narrowed tensor), or `None` if a narrow is out
/// of range.
pub fn narrowed_box(shape: &[usize], narrows: &[Narrow]) -> Option<Vec<Range<usize>>> {
    let mut b: Vec<Range<usize>> = shape.iter().map(|&n| 0..n).collect();
    for n in narrows {
        let r = b.get_mut(n.dim)?;
        let end = n.start.checked_add(n.len)?;
        if end > r.len() {
            return None;
        }
        *r = r.start + n.start..r.start + end;
    }
    Some(b)
}

/// One input of an output tensor: a source tensor, narrowed.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct PartPlan {
    /// Index of the source tensor in the list given to [`plan`].
    pub source: usize,
    /// Narrows applied to the source, in order (logical coordinates). Empty: the whole tensor.
    pub narrow: Vec<Narrow>,
}

impl PartPlan {
    /// The part's shape, given its source's shape (`None` if a narrow is out of range).
    pub fn shape(&self, source_shape: &[usize]) -> Option<Vec<usize>> {
        Some(
            narrowed_box(source_shape, &self.narrow)?
                .iter()
                .map(|r| r.len())
                .collect(),
        )
    }
}

/// One tensor of a shard file: `cat(parts, concat_dim)`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct TensorPlan {
    /// NxD key, e.g. `model.layers.3.self_attn.qkv_proj.weight_qkv`.
    pub name: String,
    /// Logical shape (what torch reports as `.shape`).
    pub shape: Vec<usize>,
    /// dtype id of the sources (see [`SourceTensor::dtype`]).
    pub dtype: String,
    /// Bytes per element.
    pub elem_size: usize,
    /// True for `o_proj.weight` under `qkv_linear`: NxD stores the tensor transposed, shape
    /// `[H, n·hd]` with stride `(1, H)`, i.e. the storage holds the row-major `[n·hd, H]` matrix
    /// (the logical tensor transposed). Everything else is contiguous.
    pub stored_transposed: bool,
    /// Dimension along which `parts` are concatenated (logical coordinates).
    pub concat_dim: usize,
    /// The parts, in order. Every coordinate is logical (untransposed).
    pub parts: Vec<PartPlan>,
}

impl TensorPlan {
    /// Number of elements.
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    /// Bytes of tensor data.
    pub fn bytes(&self) -> u64 {
        self.numel() as u64 * self.elem_size as u64
    }

    /// torch strides of the stored tensor, in elements: row-major, except `(1, shape[0])` when
    /// [`TensorPlan::stored_transposed`].
    pub fn strides(&self) -> Vec<usize> {
        if self.stored_transposed && self.shape.len() == 2 {
            return vec![1, self.shape[0]];
        }
        let mut s = vec![1; self.shape.len()];
        for i in (0..self.shape.len().saturating_sub(1)).rev() {
            s[i] = s[i + 1] * self.shape[i + 1];
        }
        s
    }
}

/// One shard file: `dp_rank_00_tp_rank_XX_pp_rank_YY.pt`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct FilePlan {
    /// tp rank.
    pub tp: usize,
    /// pp rank.
    pub pp: usize,
    /// File name (see [`file_name`]), relative to `<output_dir>/model/`.
    pub file_name: String,
    /// The decoder layers this file holds, ascending.
    pub layers: Vec<usize>,
    /// The tensors, in NxD's exact key order (spec §7).
    pub tensors: Vec<TensorPlan>,
}

impl FilePlan {
    /// Bytes of tensor data in the file.
    pub fn bytes(&self) -> u64 {
        self.tensors.iter().map(TensorPlan::bytes).sum()
    }

    /// The tensor with NxD key `name`.
    pub fn tensor(&self, name: &str) -> Option<&TensorPlan> {
        self.tensors.iter().find(|t| t.name == name)
    }
}

/// The whole forward plan.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShardPlan {
    /// The model config planned for.
    pub model: ModelConfig,
    /// The parallel config planned for.
    pub parallel: ParallelConfig,
    /// The source tensors, as given to [`plan`]; [`PartPlan::source`] indexes this list.
    pub sources: Vec<SourceTensor>,
    /// One file per (tp, pp) rank, **tp-major** (the order NxD writes them):
    /// `files[tp * pp_size + pp]`.
    pub files: Vec<FilePlan>,
}

/// Per-file numbers for `--dry-run`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileSummary {
    /// File name.
    pub file_name: String,
    /// tp rank.
    pub tp: usize,
    /// pp rank.
    pub pp: usize,
    /// Decoder layers held.
    pub layers: Vec<usize>,
    /// Number of tensors.
    pub tensors: usize,
    /// Bytes of tensor data (the `.pt` container adds a little).
    pub bytes: u64,
}

/// What [`ShardPlan::summary`] returns.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlanSummary {
    /// One entry per file, in plan order.
    pub files: Vec<FileSummary>,
    /// Tensors over all files.
    pub total_tensors: usize,
    /// Tensor bytes over all files.
    pub total_bytes: u64,
}

impl fmt::Display for PlanSummary {
    /// One line per file (`name  tp pp  layers  tensors  bytes`), then a total line.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for s in &self.files {
            writeln!(
                f,
                "{}  tp {} pp {}  layers {}  {} tensors  {} bytes",
                s.file_name,
                s.tp,
                s.pp,
                layer_list(&s.layers),
                s.tensors,
                s.bytes
            )?;
        }
        write!(
            f,
            "total: {} files, {} tensors, {} bytes",
            self.files.len(),
            self.total_tensors,
            self.total_bytes
        )
    }
}

/// `0-2,5,7-9` style, or `-` for none.
fn layer_list(layers: &[usize]) -> String {
    if layers.is_empty() {
        return "-".to_string();
    }
    let mut out: Vec<String> = Vec::new();
    let mut i = 0;
    while i < layers.len() {
        let mut j = i;
        while j + 1 < layers.len() && layers[j + 1] == layers[j] + 1 {
            j += 1;
        }
        out.push(if i == j {
            layers[i].to_string()
        } else {
            format!("{}-{}", layers[i], layers[j])
        });
        i = j + 1;
    }
    out.join(",")
}

impl ShardPlan {
    /// Index into [`ShardPlan::files`] of rank (tp, pp).
    pub fn file_index(&self, tp: usize, pp: usize) -> usize {
        tp * self.parallel.pp + pp
    }

    /// The file of rank (tp, pp).
    pub fn file(&self, tp: usize, pp: usize) -> &FilePlan {
        &self.files[self.file_index(tp, pp)]
    }

    /// Per-file tensor counts and bytes, for `--dry-run`.
    pub fn summary(&self) -> PlanSummary {
        let files: Vec<FileSummary> = self
            .files
            .iter()
            .map(|f| FileSummary {
                file_name: f.file_name.clone(),
                tp: f.tp,
                pp: f.pp,
                layers: f.layers.clone(),
                tensors: f.tensors.len(),
                bytes: f.bytes(),
            })
            .collect();
        PlanSummary {
            total_tensors: files.iter().map(|f| f.tensors).sum(),
            total_bytes: files.iter().map(|f| f.bytes).sum(),
            files,
        }
    }
}

/// The source tensors an HF Llama checkpoint of `model` holds, in canonical state-dict order,
/// all of dtype `dtype` (`elem_size` bytes). `lm_head.weight` is omitted when the embeddings are
/// tied (HF safetensors drops it); no legacy `inv_freq`. Useful for `ckpt-unshard`, which knows
/// the config but has no HF checkpoint.
pub fn expected_source_tensors(
    model: &ModelConfig,
    dtype: &str,
    elem_size: usize,
) -> Vec<SourceTensor> {
    let mut out = vec![SourceTensor::new(
        EMBED,
        vec![model.vocab_size, model.hidden_size],
        dtype,
        elem_size,
    )];
    for l in 0..model.num_hidden_layers {
        for t in LayerTensor::ALL {
            if t == LayerTensor::InvFreq {
                continue;
            }
            let shape = expected_layer_shape(model, t);
            out.push(SourceTensor::new(t.name(l), shape, dtype, elem_size));
        }
    }
    out.push(SourceTensor::new(
        NORM,
        vec![model.hidden_size],
        dtype,
        elem_size,
    ));
    if !model.tie_word_embeddings {
        out.push(SourceTensor::new(
            LM_HEAD,
            vec![model.vocab_size, model.hidden_size],
            dtype,
            elem_size,
        ));
    }
    out
}

fn expected_layer_shape(m: &ModelConfig, t: LayerTensor) -> Vec<usize> {
    let h = m.hidden_size;
    match t {
        LayerTensor::Q => vec![m.q_rows(), h],
        LayerTensor::K | LayerTensor::V => vec![m.kv_rows(), h],
        LayerTensor::O => vec![h, m.q_rows()],
        LayerTensor::InvFreq => vec![m.head_dim / 2],
        LayerTensor::Gate | LayerTensor::Up => vec![m.intermediate_size, h],
        LayerTensor::Down => vec![h, m.intermediate_size],
        LayerTensor::InputNorm | LayerTensor::PostNorm => vec![h],
    }
}

fn expected_shape(m: &ModelConfig, kind: TensorKind) -> Option<Vec<usize>> {
    match kind {
        TensorKind::Embed | TensorKind::LmHead => Some(vec![m.vocab_size, m.hidden_size]),
        TensorKind::Norm => Some(vec![m.hidden_size]),
        TensorKind::Layer(_, t) => Some(expected_layer_shape(m, t)),
        TensorKind::LayerOther(_) | TensorKind::Other => None,
    }
}

/// One key of the state dict NxD iterates over.
struct Entry {
    name: String,
    source: usize,
    kind: TensorKind,
}

/// Checks the sources and returns NxD's view of the state dict (with the tied `lm_head` added).
fn entries(model: &ModelConfig, sources: &[SourceTensor]) -> Result<Vec<Entry>, LayoutError> {
    let l = model.num_hidden_layers;
    let mut seen: HashMap<&str, usize> = HashMap::new();
    let mut out = Vec::with_capacity(sources.len() + 1);
    for (i, s) in sources.iter().enumerate() {
        if seen.insert(s.name.as_str(), i).is_some() {
            return Err(LayoutError::DuplicateTensor {
                name: s.name.clone(),
            });
        }
        let kind = TensorKind::of(&s.name);
        if let Some(layer) = kind.layer() {
            if layer >= l {
                return Err(LayoutError::UnsupportedTensor {
                    name: s.name.clone(),
                    reason: format!(
                        "belongs to layer {layer}, but config.json has num_hidden_layers {l}"
                    ),
                });
            }
        }
        match kind {
            TensorKind::LayerOther(_) | TensorKind::Other => {
                if let Some(sub) = NXD_SPECIAL_SUBSTRINGS.iter().find(|x| s.name.contains(*x)) {
                    return Err(LayoutError::UnsupportedTensor {
                        name: s.name.clone(),
                        reason: format!(
                            "not a standard Llama tensor, but NxD would treat it specially because \
                             its name contains `{sub}`; remove it from the checkpoint"
                        ),
                    });
                }
                if kind == TensorKind::Other && s.name.contains("layers") {
                    return Err(LayoutError::UnsupportedTensor {
                        name: s.name.clone(),
                        reason: "contains `layers` but is not `model.layers.<N>.<...>` with a \
                                 plain decimal N, so NxD cannot place it in a pipeline stage"
                            .to_string(),
                    });
                }
            }
            _ => {}
        }
        if let Some(expected) = expected_shape(model, kind) {
            if expected != s.shape {
                return Err(LayoutError::ShapeMismatch {
                    name: s.name.clone(),
                    expected,
                    actual: s.shape.clone(),
                });
            }
        }
        out.push(Entry {
            name: s.name.clone(),
            source: i,
            kind,
        });
    }
    // Required tensors, reported in canonical order.
    let mut required: Vec<String> = vec![EMBED.to_string()];
    for layer in 0..l {
        for t in LayerTensor::ALL {
            if t != LayerTensor::InvFreq {
                required.push(t.name(layer));
            }
        }
    }
    required.push(NORM.to_string());
    if !model.tie_word_embeddings {
        required.push(LM_HEAD.to_string());
    }
    if let Some(name) = required
        .into_iter()
        .find(|n| !seen.contains_key(n.as_str()))
    {
        return Err(LayoutError::MissingTensor { name });
    }
    // Tied embeddings without lm_head: a tied `state_dict()` holds lm_head.weight (the same
    // tensor as embed_tokens) right after model.norm.weight, where NxD sees it.
    if !seen.contains_key(LM_HEAD) {
        let embed = seen[EMBED];
        let norm_pos = out
            .iter()
            .position(|e| e.kind == TensorKind::Norm)
            .expect("model.norm.weight is required");
        out.insert(
            norm_pos + 1,
            Entry {
                name: LM_HEAD.to_string(),
                source: embed,
                kind: TensorKind::LmHead,
            },
        );
    }
    Ok(out)
}

/// Plans the NxD shard files for `sources` (in state-dict order: the order NxD iterates; use
/// [`crate::canonical_order`] to sort safetensors keys into it).
///
/// Runs [`validate`], checks every source shape against `model` and that every required tensor
/// is present (`lm_head.weight` may be absent only with tied embeddings: it is then added,
/// sourced from `model.embed_tokens.weight`, right after `model.norm.weight`). Unknown keys are
/// replicated like norms (on their layer's pp rank, or on every pp rank if not a layer key),
/// unless NxD would treat them specially by name, which is an error.
///
/// Key order within a file (spec §7): the source order with renames in place (`qkv_proj.weight_q/
/// _k/_v` in the q/k/v slots, `gate_up_proj` in the slot of whichever of gate/up comes first,
/// `up_proj` removed); with `fuse_qkv` (+ `qkv_linear`) one `qkv_proj.weight_qkv` per layer is
/// appended at the end of the file, in the order the layers' q tensors appeared; with
/// `coalesce_qkv` one `qkv_proj.weight` per layer is appended at the end of the file (after
/// `model.norm`/`lm_head`, since NxD's `coalesce_qkv` re-inserts it at the end of the full state
/// dict), layers ascending.
pub fn plan(
    model: &ModelConfig,
    parallel: &ParallelConfig,
    sources: &[SourceTensor],
) -> Result<ShardPlan, LayoutError> {
    validate(model, parallel)?;
    let entries = entries(model, sources)?;
    let layer_pp = layer_pp_ranks(model.num_hidden_layers, parallel.pp, parallel.vpp)?;
    let b = Builder {
        p: parallel,
        sources,
    };

    // Per layer: the sources of q, k, v, gate, up.
    let mut by_layer: HashMap<(usize, LayerTensor), usize> = HashMap::new();
    for e in &entries {
        if let TensorKind::Layer(l, t) = e.kind {
            by_layer.insert((l, t), e.source);
        }
    }
    let src = |l: usize, t: LayerTensor| by_layer[&(l, t)];

    let mut files = Vec::with_capacity(parallel.num_files());
    for tp in 0..parallel.tp {
        for pp in 0..parallel.pp {
            let last_pp = pp == parallel.pp - 1;
            let mut tensors: Vec<TensorPlan> = Vec::new();
            let mut fused_layers: Vec<usize> = Vec::new();
            let mut gate_up_done: Vec<usize> = Vec::new();
            for e in &entries {
                let here = match e.kind {
                    TensorKind::Embed => pp == 0,
                    TensorKind::Norm | TensorKind::LmHead => last_pp,
                    TensorKind::Layer(l, _) | TensorKind::LayerOther(l) => layer_pp[l] == pp,
                    TensorKind::Other => true,
                };
                if !here {
                    continue;
                }
                match e.kind {
                    TensorKind::Embed | TensorKind::LmHead => {
                        tensors.push(b.chunked(&e.name, e.source, 0, tp)?);
                    }
                    TensorKind::Layer(
                        l,
                        t @ (LayerTensor::Q | LayerTensor::K | LayerTensor::V),
                    ) => {
                        if parallel.coalesce_qkv {
                            continue;
                        }
                        if !parallel.qkv_linear {
                            tensors.push(b.chunked(&e.name, e.source, 0, tp)?);
                            continue;
                        }
                        if parallel.fuse_qkv {
                            if t == LayerTensor::Q {
                                fused_layers.push(l);
                            }
                            continue;
                        }
                        let (suffix, rows) = match t {
                            LayerTensor::Q => ("weight_q", q_rows(model, parallel, tp)),
                            LayerTensor::K => ("weight_k", kv_rows(model, parallel, tp)),
                            _ => ("weight_v", kv_rows(model, parallel, tp)),
                        };
                        let name = qkv_linear_name(&e.name, suffix);
                        let parts = b.ranges(e.source, 0, &rows);
                        tensors.push(b.tensor(name, 0, false, parts)?);
                    }
                    TensorKind::Layer(_, LayerTensor::O) => {
                        if parallel.qkv_linear {
                            let parts = b.ranges(e.source, 1, &q_rows(model, parallel, tp));
                            tensors.push(b.tensor(e.name.clone(), 1, true, parts)?);
                        } else {
                            tensors.push(b.chunked(&e.name, e.source, 1, tp)?);
                        }
                    }
                    TensorKind::Layer(l, LayerTensor::Gate | LayerTensor::Up) => {
                        if gate_up_done.contains(&l) {
                            continue;
                        }
                        gate_up_done.push(l);
                        let name = format!("model.layers.{l}.mlp.gate_up_proj.weight");
                        let mut parts = b.chunk_part(src(l, LayerTensor::Gate), 0, tp);
                        parts.extend(b.chunk_part(src(l, LayerTensor::Up), 0, tp));
                        tensors.push(b.tensor(name, 0, false, parts)?);
                    }
                    TensorKind::Layer(_, LayerTensor::Down) => {
                        tensors.push(b.chunked(&e.name, e.source, 1, tp)?);
                    }
                    TensorKind::Layer(
                        _,
                        LayerTensor::InvFreq | LayerTensor::InputNorm | LayerTensor::PostNorm,
                    )
                    | TensorKind::LayerOther(_)
                    | TensorKind::Norm
                    | TensorKind::Other => {
                        let parts = vec![PartPlan {
                            source: e.source,
                            narrow: Vec::new(),
                        }];
                        tensors.push(b.tensor(e.name.clone(), 0, false, parts)?);
                    }
                }
            }
            if parallel.qkv_linear && parallel.fuse_qkv {
                for l in fused_layers {
                    let q = q_rows(model, parallel, tp);
                    let kv = kv_rows(model, parallel, tp);
                    let mut parts = b.ranges(src(l, LayerTensor::Q), 0, &q);
                    parts.extend(b.ranges(src(l, LayerTensor::K), 0, &kv));
                    parts.extend(b.ranges(src(l, LayerTensor::V), 0, &kv));
                    let name = format!("model.layers.{l}.self_attn.qkv_proj.weight_qkv");
                    tensors.push(b.tensor(name, 0, false, parts)?);
                }
            }
            if parallel.coalesce_qkv {
                for l in (0..model.num_hidden_layers).filter(|&l| layer_pp[l] == pp) {
                    let mut parts = Vec::new();
                    for t in [LayerTensor::Q, LayerTensor::K, LayerTensor::V] {
                        parts.extend(b.chunk_part(src(l, t), 0, tp));
                    }
                    let name = format!("model.layers.{l}.self_attn.qkv_proj.weight");
                    tensors.push(b.tensor(name, 0, false, parts)?);
                }
            }
            let layers = (0..model.num_hidden_layers)
                .filter(|&l| layer_pp[l] == pp)
                .collect();
            files.push(FilePlan {
                tp,
                pp,
                file_name: file_name(tp, pp),
                layers,
                tensors,
            });
        }
    }
    Ok(ShardPlan {
        model: model.clone(),
        parallel: parallel.clone(),
        sources: sources.to_vec(),
        files,
    })
}

/// `model.layers.N.self_attn.q_proj.weight` -> `model.layers.N.self_attn.qkv_proj.weight_q`
/// (NxD's `get_weight_key`: replace the last two dotted fields).
fn qkv_linear_name(name: &str, suffix: &str) -> String {
    let mut fields: Vec<&str> = name.split('.').collect();
    fields.truncate(fields.len().saturating_sub(2));
    format!("{}.qkv_proj.{suffix}", fields.join("."))
}

struct Builder<'a> {
    p: &'a ParallelConfig,
    sources: &'a [SourceTensor],
}

impl Builder<'_> {
    /// Chunk `rank` of `tp` equal chunks of `source` along `dim`, as a part list.
    fn chunk_part(&self, source: usize, dim: usize, rank: usize) -> Vec<PartPlan> {
        let extent = self.sources[source].shape[dim];
        let c = extent / self.p.tp;
        let chunk = rank * c..(rank + 1) * c;
        self.ranges(source, dim, &[chunk])
    }

    /// A tensor that is chunk `rank` of the source along `dim`, under the source's name.
    fn chunked(
        &self,
        name: &str,
        source: usize,
        dim: usize,
        rank: usize,
    ) -> Result<TensorPlan, LayoutError> {
        let parts = self.chunk_part(source, dim, rank);
        self.tensor(name.to_string(), dim, false, parts)
    }

    /// Parts taking `ranges` of `source` along `dim`, merging adjacent ranges and leaving out
    /// narrows that keep the whole dimension.
    fn ranges(&self, source: usize, dim: usize, ranges: &[Range<usize>]) -> Vec<PartPlan> {
        let extent = self.sources[source].shape[dim];
        let mut merged: Vec<Range<usize>> = Vec::new();
        for r in ranges.iter().filter(|r| !r.is_empty()) {
            match merged.last_mut() {
                Some(last) if last.end == r.start => last.end = r.end,
                _ => merged.push(r.clone()),
            }
        }
        merged
            .into_iter()
            .map(|r| PartPlan {
                source,
                narrow: if r.start == 0 && r.end == extent {
                    Vec::new()
                } else {
                    vec![Narrow::new(dim, r.start, r.len())]
                },
            })
            .collect()
    }

    /// Assembles a tensor plan: shape from the parts, dtype checked.
    fn tensor(
        &self,
        name: String,
        concat_dim: usize,
        stored_transposed: bool,
        parts: Vec<PartPlan>,
    ) -> Result<TensorPlan, LayoutError> {
        let first = &self.sources[parts[0].source];
        let mut dtypes: Vec<String> = Vec::new();
        for p in &parts {
            let d = &self.sources[p.source].dtype;
            if !dtypes.contains(d) {
                dtypes.push(d.clone());
            }
        }
        if dtypes.len() > 1 {
            return Err(LayoutError::MixedDtypes { name, dtypes });
        }
        let mut shape: Option<Vec<usize>> = None;
        for p in &parts {
            let s = p
                .shape(&self.sources[p.source].shape)
                .expect("planned narrows are in range");
            match shape.as_mut() {
                None => shape = Some(s),
                Some(acc) => {
                    debug_assert_eq!(acc.len(), s.len());
                    acc[concat_dim] += s[concat_dim];
                }
            }
        }
        Ok(TensorPlan {
            name,
            shape: shape.expect("at least one part"),
            dtype: first.dtype.clone(),
            elem_size: first.elem_size,
            stored_transposed,
            concat_dim,
            parts,
        })
    }
}
