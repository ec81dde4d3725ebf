//! The one error type of this crate.

use serde::{Deserialize, Serialize};

/// Why a parallel configuration was refused by [`crate::validate`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Refusal {
    /// NxD's `convert_checkpoints.py --convert_from_full_state` raises on this configuration
    /// (spec §11), so there is nothing to reproduce.
    NxdCrashes,
    /// NxD accepts this configuration but writes a checkpoint that is wrong for the model
    /// (heads dropped, q heads paired with the wrong kv heads, heads split across ranks; spec §12).
    NxdSilentlyWrong,
    /// The configuration is meaningless on its own (a degree of zero, an inconsistent model config).
    Invalid,
}

/// Everything that can go wrong while reading a config or planning a layout.
///
/// Every message is one line and names the field, tensor or setting at fault.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum LayoutError {
    /// `config.json` is not a JSON object.
    #[error("config.json is not a valid JSON object: {0}")]
    ConfigJson(String),
    /// A field of `config.json` is missing or has an invalid value.
    #[error("config.json: field `{field}` {problem}")]
    ConfigField {
        /// The HF config field name, e.g. `num_key_value_heads`.
        field: &'static str,
        /// What is wrong with it, e.g. "is missing" or "must be a positive integer, got -1".
        problem: String,
    },
    /// The parallel configuration is refused; the message says why and which settings work.
    #[error("{message}")]
    Refused {
        /// The category of the refusal.
        reason: Refusal,
        /// One line: why, and which settings work instead.
        message: String,
    },
    /// A source tensor's shape does not match the model config.
    #[error("tensor `{name}`: expected shape {expected:?} from config.json, found {actual:?}")]
    ShapeMismatch {
        /// HF tensor name.
        name: String,
        /// Shape implied by the model config.
        expected: Vec<usize>,
        /// Shape found in the source.
        actual: Vec<usize>,
    },
    /// A tensor the model needs is absent from the source list.
    #[error("required tensor `{name}` is missing from the source checkpoint")]
    MissingTensor {
        /// HF tensor name.
        name: String,
    },
    /// The same tensor name appears twice in the source list.
    #[error("tensor `{name}` appears more than once in the source list")]
    DuplicateTensor {
        /// HF tensor name.
        name: String,
    },
    /// A source tensor that this planner cannot place the way NxD would.
    #[error("tensor `{name}`: {reason}")]
    UnsupportedTensor {
        /// HF tensor name.
        name: String,
        /// Why it cannot be planned.
        reason: String,
    },
    /// The parts of one output tensor come from sources of different dtypes.
    #[error("output tensor `{name}` would concatenate different dtypes {dtypes:?}; convert the checkpoint to one dtype first")]
    MixedDtypes {
        /// NxD output tensor name.
        name: String,
        /// The distinct dtypes found, in part order.
        dtypes: Vec<String>,
    },
    /// A plan is internally inconsistent (e.g. an inverse was asked of a hand-edited plan whose
    /// parts do not cover a source).
    #[error("inconsistent plan: {0}")]
    InconsistentPlan(String),
}

impl LayoutError {
    pub(crate) fn refused(reason: Refusal, message: impl Into<String>) -> LayoutError {
        LayoutError::Refused {
            reason,
            message: message.into(),
        }
    }

    /// The refusal category, if this error is a [`LayoutError::Refused`].
    pub fn refusal(&self) -> Option<Refusal> {
        match self {
            LayoutError::Refused { reason, .. } => Some(*reason),
            _ => None,
        }
    }
}
