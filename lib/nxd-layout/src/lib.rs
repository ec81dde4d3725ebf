//! Pure planning of NxD (AWS neuronx-distributed) Llama checkpoint layouts.
//!
//! This crate reproduces what NxD's `convert_checkpoints.py --convert_from_full_state` writes
//! (see `specs/nxd-sharding-rules.md`), as a plan: for every output file (one per tp x pp rank),
//! every tensor in NxD's key order and the source regions it is concatenated from. It also
//! derives the inverse plan for unsharding. It does no I/O and touches no tensor bytes: the
//! executor (the strided-copy engine) does that.
//!
//! * [`ModelConfig`]: the architecture numbers, from HF `config.json`.
//! * [`ParallelConfig`] and [`validate`]: the converter flags, refused (with a one-line reason and
//!   the settings that work) wherever NxD crashes or is silently wrong.
//! * [`canonical_order`]: sorts HF safetensors keys into state-dict order.
//! * [`plan`] -> [`ShardPlan`]: the forward plan; [`ShardPlan::summary`] for `--dry-run`.
//! * [`ShardPlan::unshard`] / [`plan_unshard`] -> [`UnshardPlan`]: the inverse.
//!
//! All tensor coordinates are **logical** (torch `.shape` order). The one tensor NxD stores
//! non-contiguously, `o_proj.weight` under `qkv_linear`, is flagged by
//! [`TensorPlan::stored_transposed`].
#![warn(missing_docs)]

mod config;
mod error;
mod heads;
mod names;
mod pipeline;
mod plan;
mod unshard;
mod validate;

pub use config::{HwBackend, ModelConfig, ParallelConfig};
pub use error::{LayoutError, Refusal};
pub use heads::{kv_heads, kv_rows, q_heads, q_rows};
pub use names::{canonical_order, file_name, LayerTensor, TensorKind, EMBED, LM_HEAD, NORM};
pub use pipeline::{layer_pp_ranks, layers_per_pp_rank, stage_layers};
pub use plan::{
    expected_source_tensors, narrowed_box, plan, FilePlan, FileSummary, Narrow, PartPlan,
    PlanSummary, ShardPlan, SourceTensor, TensorPlan,
};
pub use unshard::{
    plan_unshard, ReplicaLocation, ShardFileRef, ShardSlice, UnshardPlan, UnshardTensor,
};
pub use validate::{validate, working_tp_sizes};
