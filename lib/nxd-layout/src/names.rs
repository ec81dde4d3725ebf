//! Llama tensor names: classification, canonical HF order, NxD file names.

use serde::{Deserialize, Serialize};

/// `model.embed_tokens.weight`.
pub const EMBED: &str = "model.embed_tokens.weight";
/// `model.norm.weight`.
pub const NORM: &str = "model.norm.weight";
/// `lm_head.weight`.
pub const LM_HEAD: &str = "lm_head.weight";

/// The NxD shard file name for a (tp, pp) rank: `dp_rank_00_tp_rank_{tp:02}_pp_rank_{pp:02}.pt`
/// (relative to `<output_dir>/model/`).
pub fn file_name(tp: usize, pp: usize) -> String {
    format!("dp_rank_00_tp_rank_{tp:02}_pp_rank_{pp:02}.pt")
}

/// A tensor of one decoder layer, in HF state-dict order (the discriminant order is the order).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum LayerTensor {
    /// `self_attn.q_proj.weight`.
    Q,
    /// `self_attn.k_proj.weight`.
    K,
    /// `self_attn.v_proj.weight`.
    V,
    /// `self_attn.o_proj.weight`.
    O,
    /// `self_attn.rotary_emb.inv_freq` (legacy buffer; old transformers registered `rotary_emb`
    /// after `o_proj`, so it sits there).
    InvFreq,
    /// `mlp.gate_proj.weight`.
    Gate,
    /// `mlp.up_proj.weight`.
    Up,
    /// `mlp.down_proj.weight`.
    Down,
    /// `input_layernorm.weight`.
    InputNorm,
    /// `post_attention_layernorm.weight`.
    PostNorm,
}

impl LayerTensor {
    /// Every variant, in canonical order.
    pub const ALL: [LayerTensor; 10] = [
        LayerTensor::Q,
        LayerTensor::K,
        LayerTensor::V,
        LayerTensor::O,
        LayerTensor::InvFreq,
        LayerTensor::Gate,
        LayerTensor::Up,
        LayerTensor::Down,
        LayerTensor::InputNorm,
        LayerTensor::PostNorm,
    ];

    /// The name suffix after `model.layers.N.`.
    pub fn suffix(self) -> &'static str {
        match self {
            LayerTensor::Q => "self_attn.q_proj.weight",
            LayerTensor::K => "self_attn.k_proj.weight",
            LayerTensor::V => "self_attn.v_proj.weight",
            LayerTensor::O => "self_attn.o_proj.weight",
            LayerTensor::InvFreq => "self_attn.rotary_emb.inv_freq",
            LayerTensor::Gate => "mlp.gate_proj.weight",
            LayerTensor::Up => "mlp.up_proj.weight",
            LayerTensor::Down => "mlp.down_proj.weight",
            LayerTensor::InputNorm => "input_layernorm.weight",
            LayerTensor::PostNorm => "post_attention_layernorm.weight",
        }
    }

    fn from_suffix(s: &str) -> Option<LayerTensor> {
        LayerTensor::ALL.into_iter().find(|t| t.suffix() == s)
    }

    /// The full HF name in layer `layer`.
    pub fn name(self, layer: usize) -> String {
        format!("model.layers.{layer}.{}", self.suffix())
    }
}

/// What an HF Llama tensor name denotes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum TensorKind {
    /// `model.embed_tokens.weight`.
    Embed,
    /// A known tensor of a decoder layer: (layer index, which tensor).
    Layer(usize, LayerTensor),
    /// Another key under `model.layers.N.` (kept with its layer, replicated).
    LayerOther(usize),
    /// `model.norm.weight`.
    Norm,
    /// `lm_head.weight`.
    LmHead,
    /// Anything else.
    Other,
}

impl TensorKind {
    /// Classifies an HF name. `model.layers.N.` needs N in canonical decimal (no sign, no
    /// leading zero); otherwise the name is [`TensorKind::Other`].
    pub fn of(name: &str) -> TensorKind {
        match name {
            EMBED => return TensorKind::Embed,
            NORM => return TensorKind::Norm,
            LM_HEAD => return TensorKind::LmHead,
            _ => {}
        }
        if let Some((layer, rest)) = split_layer(name) {
            return match LayerTensor::from_suffix(rest) {
                Some(t) => TensorKind::Layer(layer, t),
                None => TensorKind::LayerOther(layer),
            };
        }
        TensorKind::Other
    }

    /// The decoder layer, if any.
    pub fn layer(self) -> Option<usize> {
        match self {
            TensorKind::Layer(l, _) | TensorKind::LayerOther(l) => Some(l),
            _ => None,
        }
    }
}

/// `model.layers.N.rest` -> (N, rest).
fn split_layer(name: &str) -> Option<(usize, &str)> {
    let rest = name.strip_prefix("model.layers.")?;
    let (num, tail) = rest.split_once('.')?;
    if num.is_empty()
        || !num.bytes().all(|b| b.is_ascii_digit())
        || (num.len() > 1 && num.starts_with('0'))
        || tail.is_empty()
    {
        return None;
    }
    Some((num.parse().ok()?, tail))
}

/// The permutation that sorts HF Llama tensor names into state-dict order.
///
/// `result[i]` is the index in `names` of the i-th name in canonical order:
/// 1. `model.embed_tokens.weight`;
/// 2. the `model.layers.N.*` keys, layers numerically; within a layer
///    q, k, v, o, `rotary_emb.inv_freq`, gate, up, down, input_layernorm,
///    post_attention_layernorm, then any other key of that layer;
/// 3. `model.norm.weight`;
/// 4. `lm_head.weight`;
/// 5. every other key.
///
/// Ties (unknown keys of the same group, and duplicates) keep their input order (stable sort).
pub fn canonical_order<S: AsRef<str>>(names: &[S]) -> Vec<usize> {
    let key = |name: &str| -> (u8, usize, usize) {
        match TensorKind::of(name) {
            TensorKind::Embed => (0, 0, 0),
            TensorKind::Layer(l, t) => (1, l, t as usize),
            TensorKind::LayerOther(l) => (1, l, LayerTensor::ALL.len()),
            TensorKind::Norm => (2, 0, 0),
            TensorKind::LmHead => (3, 0, 0),
            TensorKind::Other => (4, 0, 0),
        }
    };
    let mut idx: Vec<usize> = (0..names.len()).collect();
    idx.sort_by_key(|&i| key(names[i].as_ref()));
    idx
}

/// Substrings by which NxD's converter decides to tensor-parallel-split or specially place a key
/// (`get_partition_dim`, `is_qkv_weight`, the pipeline rules). A key outside the known Llama set
/// that contains one of these cannot be reproduced faithfully and is refused.
pub(crate) const NXD_SPECIAL_SUBSTRINGS: [&str; 15] = [
    "embed_tokens",
    "wte",
    "lm_head",
    "q_proj",
    "k_proj",
    "v_proj",
    "qkv_proj",
    "query_key_value",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
    "expert_mlps",
    "model.norm.weight",
    "norm_f.weight",
];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_names() {
        assert_eq!(file_name(0, 0), "dp_rank_00_tp_rank_00_pp_rank_00.pt");
        assert_eq!(file_name(31, 7), "dp_rank_00_tp_rank_31_pp_rank_07.pt");
        assert_eq!(file_name(123, 4), "dp_rank_00_tp_rank_123_pp_rank_04.pt");
    }

    #[test]
    fn classify() {
        assert_eq!(TensorKind::of(EMBED), TensorKind::Embed);
        assert_eq!(
            TensorKind::of("model.layers.12.mlp.up_proj.weight"),
            TensorKind::Layer(12, LayerTensor::Up)
        );
        assert_eq!(
            TensorKind::of("model.layers.3.self_attn.rotary_emb.inv_freq"),
            TensorKind::Layer(3, LayerTensor::InvFreq)
        );
        assert_eq!(
            TensorKind::of("model.layers.3.self_attn.q_proj.bias"),
            TensorKind::LayerOther(3)
        );
        assert_eq!(
            TensorKind::of("model.layers.03.mlp.up_proj.weight"),
            TensorKind::Other
        );
        assert_eq!(
            TensorKind::of("model.layers.x.mlp.up_proj.weight"),
            TensorKind::Other
        );
        assert_eq!(TensorKind::of("model.layers.3"), TensorKind::Other);
        assert_eq!(TensorKind::of("model.layers.3."), TensorKind::Other);
        assert_eq!(
            TensorKind::of("model.rotary_emb.inv_freq"),
            TensorKind::Other
        );
        for t in LayerTensor::ALL {
            assert_eq!(TensorKind::of(&t.name(7)), TensorKind::Layer(7, t));
        }
    }

    #[test]
    fn canonical_order_sorts_safetensors_keys() {
        // safetensors sorts keys lexicographically: layers.10 before layers.2, lm_head first.
        let mut names: Vec<String> = vec![EMBED.into(), NORM.into(), LM_HEAD.into()];
        for l in 0..11 {
            for t in LayerTensor::ALL {
                if t != LayerTensor::InvFreq {
                    names.push(t.name(l));
                }
            }
        }
        names.push("model.layers.2.self_attn.rotary_emb.inv_freq".into());
        names.push("zzz.extra".into());
        names.push("aaa.extra".into());
        names.push("model.layers.2.zzz".into());
        names.push("model.layers.2.aaa".into());
        let mut sorted = names.clone();
        sorted.sort();
        let order = canonical_order(&sorted);
        let got: Vec<&str> = order.iter().map(|&i| sorted[i].as_str()).collect();

        let mut want: Vec<String> = vec![EMBED.into()];
        for l in 0..11 {
            for t in LayerTensor::ALL {
                if t != LayerTensor::InvFreq || l == 2 {
                    want.push(t.name(l));
                }
            }
            if l == 2 {
                // unknown layer keys after the known ones, in input (here: sorted) order
                want.push("model.layers.2.aaa".into());
                want.push("model.layers.2.zzz".into());
            }
        }
        want.push(NORM.into());
        want.push(LM_HEAD.into());
        want.push("aaa.extra".into());
        want.push("zzz.extra".into());
        assert_eq!(got, want);
    }

    #[test]
    fn canonical_order_is_a_permutation_and_stable() {
        let names = ["b", "a", "model.norm.weight", "b"];
        assert_eq!(canonical_order(&names), vec![2, 0, 1, 3]);
        let empty: [&str; 0] = [];
        assert!(canonical_order(&empty).is_empty());
    }
}
