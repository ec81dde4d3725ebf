//! The model config (from HF `config.json`) and the parallel config (NxD converter flags).

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::error::LayoutError;

/// The Llama architecture numbers this crate needs, read from a Hugging Face `config.json`.
///
/// Deserializing (with serde or [`ModelConfig::from_json_str`]) applies HF's defaults
/// (`num_key_value_heads` = `num_attention_heads`, `tie_word_embeddings` = false,
/// `head_dim` = `hidden_size / num_attention_heads`) and checks the values (see
/// [`ModelConfig::check`]); unknown fields are ignored.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "RawConfig")]
pub struct ModelConfig {
    /// `hidden_size` (H).
    pub hidden_size: usize,
    /// `num_attention_heads` (Q).
    pub num_attention_heads: usize,
    /// `num_key_value_heads` (KV); equals Q for multi-head attention.
    pub num_key_value_heads: usize,
    /// `num_hidden_layers` (L).
    pub num_hidden_layers: usize,
    /// `intermediate_size` (I), the MLP width.
    pub intermediate_size: usize,
    /// `vocab_size` (V).
    pub vocab_size: usize,
    /// `tie_word_embeddings`: `lm_head.weight` is `model.embed_tokens.weight`.
    pub tie_word_embeddings: bool,
    /// `head_dim` (hd), resolved: the config's value or `hidden_size / num_attention_heads`.
    pub head_dim: usize,
}

/// The raw fields of `config.json`, before defaults and checks.
#[derive(Deserialize)]
struct RawConfig {
    hidden_size: Option<Value>,
    num_attention_heads: Option<Value>,
    num_key_value_heads: Option<Value>,
    num_hidden_layers: Option<Value>,
    intermediate_size: Option<Value>,
    vocab_size: Option<Value>,
    tie_word_embeddings: Option<Value>,
    head_dim: Option<Value>,
}

fn field_err(field: &'static str, problem: impl Into<String>) -> LayoutError {
    LayoutError::ConfigField {
        field,
        problem: problem.into(),
    }
}

/// A required positive integer field.
fn positive(field: &'static str, v: Option<Value>) -> Result<usize, LayoutError> {
    match v {
        None | Some(Value::Null) => Err(field_err(field, "is missing")),
        Some(v) => positive_value(field, &v),
    }
}

/// An optional positive integer field (`null` counts as absent).
fn optional_positive(field: &'static str, v: Option<Value>) -> Result<Option<usize>, LayoutError> {
    match v {
        None | Some(Value::Null) => Ok(None),
        Some(v) => positive_value(field, &v).map(Some),
    }
}

fn positive_value(field: &'static str, v: &Value) -> Result<usize, LayoutError> {
    match v.as_u64() {
        Some(n) if n > 0 => usize::try_from(n)
            .map_err(|_| field_err(field, format!("is too large for this platform: {n}"))),
        _ => Err(field_err(
            field,
            format!("must be a positive integer, got {v}"),
        )),
    }
}

impl TryFrom<RawConfig> for ModelConfig {
    type Error = LayoutError;

    fn try_from(raw: RawConfig) -> Result<ModelConfig, LayoutError> {
        let hidden_size = positive("hidden_size", raw.hidden_size)?;
        let num_attention_heads = positive("num_attention_heads", raw.num_attention_heads)?;
        let num_key_value_heads =
            optional_positive("num_key_value_heads", raw.num_key_value_heads)?
                .unwrap_or(num_attention_heads);
        let num_hidden_layers = positive("num_hidden_layers", raw.num_hidden_layers)?;
        let intermediate_size = positive("intermediate_size", raw.intermediate_size)?;
        let vocab_size = positive("vocab_size", raw.vocab_size)?;
        let tie_word_embeddings = match raw.tie_word_embeddings {
            None | Some(Value::Null) => false,
            Some(Value::Bool(b)) => b,
            Some(v) => {
                return Err(field_err(
                    "tie_word_embeddings",
                    format!("must be true or false, got {v}"),
                ))
            }
        };
        let head_dim = match optional_positive("head_dim", raw.head_dim)? {
            Some(hd) => hd,
            None => {
                if hidden_size % num_attention_heads != 0 {
                    return Err(field_err(
                        "head_dim",
                        format!(
                            "is absent and hidden_size {hidden_size} is not divisible by \
                             num_attention_heads {num_attention_heads}, so it cannot be derived"
                        ),
                    ));
                }
                hidden_size / num_attention_heads
            }
        };
        let cfg = ModelConfig {
            hidden_size,
            num_attention_heads,
            num_key_value_heads,
            num_hidden_layers,
            intermediate_size,
            vocab_size,
            tie_word_embeddings,
            head_dim,
        };
        cfg.check()?;
        Ok(cfg)
    }
}

impl ModelConfig {
    /// Parses an HF `config.json` document.
    ///
    /// Errors name the missing or invalid field ([`LayoutError::ConfigField`]) or say that the
    /// text is not a JSON object ([`LayoutError::ConfigJson`]).
    pub fn from_json_str(json: &str) -> Result<ModelConfig, LayoutError> {
        let raw: RawConfig =
            serde_json::from_str(json).map_err(|e| LayoutError::ConfigJson(e.to_string()))?;
        ModelConfig::try_from(raw)
    }

    /// Checks the numbers for consistency: every size positive, and
    /// `num_attention_heads` a multiple of `num_key_value_heads`.
    pub fn check(&self) -> Result<(), LayoutError> {
        let fields: [(&'static str, usize); 7] = [
            ("hidden_size", self.hidden_size),
            ("num_attention_heads", self.num_attention_heads),
            ("num_key_value_heads", self.num_key_value_heads),
            ("num_hidden_layers", self.num_hidden_layers),
            ("intermediate_size", self.intermediate_size),
            ("vocab_size", self.vocab_size),
            ("head_dim", self.head_dim),
        ];
        for (field, v) in fields {
            if v == 0 {
                return Err(field_err(field, "must be a positive integer, got 0"));
            }
        }
        if !self
            .num_attention_heads
            .is_multiple_of(self.num_key_value_heads)
        {
            return Err(field_err(
                "num_key_value_heads",
                format!(
                    "{} does not divide num_attention_heads {} (each kv head must serve a whole \
                     group of q heads)",
                    self.num_key_value_heads, self.num_attention_heads
                ),
            ));
        }
        Ok(())
    }

    /// Rows of `q_proj.weight` (and columns of `o_proj.weight`): Q·hd.
    pub fn q_rows(&self) -> usize {
        self.num_attention_heads * self.head_dim
    }

    /// Rows of `k_proj.weight` and `v_proj.weight`: KV·hd.
    pub fn kv_rows(&self) -> usize {
        self.num_key_value_heads * self.head_dim
    }

    /// The head_dim NxD's converter uses: `hidden_size // num_attention_heads` (it never reads
    /// `head_dim` from the config).
    pub fn nxd_head_dim(&self) -> usize {
        self.hidden_size / self.num_attention_heads
    }

    /// True for grouped-query attention (KV != Q).
    pub fn is_gqa(&self) -> bool {
        self.num_key_value_heads != self.num_attention_heads
    }
}

/// `--hw_backend`. NxD treats every string other than the exact `trn2` as trn1 (e.g. `inf2`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum HwBackend {
    /// Trainium 1 (and anything NxD does not recognise as trn2): trn1 q-head permutation.
    #[default]
    Trn1,
    /// Trainium 2: contiguous q heads per rank.
    Trn2,
}

impl HwBackend {
    /// NxD's own reading of `--hw_backend`: exactly `trn2` is trn2, anything else is trn1.
    pub fn from_nxd_str(s: &str) -> HwBackend {
        if s == "trn2" {
            HwBackend::Trn2
        } else {
            HwBackend::Trn1
        }
    }

    /// The flag value: `trn1` or `trn2`.
    pub fn as_str(self) -> &'static str {
        match self {
            HwBackend::Trn1 => "trn1",
            HwBackend::Trn2 => "trn2",
        }
    }
}

impl fmt::Display for HwBackend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for HwBackend {
    type Err = String;

    /// Strict parse: `trn1` or `trn2` (ASCII case-insensitive). Use [`HwBackend::from_nxd_str`]
    /// for NxD's permissive reading.
    fn from_str(s: &str) -> Result<HwBackend, String> {
        match s.to_ascii_lowercase().as_str() {
            "trn1" => Ok(HwBackend::Trn1),
            "trn2" => Ok(HwBackend::Trn2),
            _ => Err(format!("unknown hw backend {s:?}: expected trn1 or trn2")),
        }
    }
}

/// The NxD converter's parallel settings (`convert_checkpoints.py` flags).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ParallelConfig {
    /// `--tp_size`: tensor-parallel degree.
    pub tp: usize,
    /// `--pp_size`: pipeline-parallel degree.
    pub pp: usize,
    /// `--virtual_pp_size`: virtual pipeline stages per pp rank.
    pub vpp: usize,
    /// `--kv_size_multiplier`: how many times the kv heads are replicated (only with `qkv_linear`).
    pub kv_size_multiplier: usize,
    /// `--qkv_linear`: GQAQKVColumnParallelLinear layout (`qkv_proj.weight_{q,k,v}`).
    pub qkv_linear: bool,
    /// `--fuse_qkv`: one `qkv_proj.weight_qkv` per layer (only with `qkv_linear`).
    pub fuse_qkv: bool,
    /// `--coalesce_qkv`: one `qkv_proj.weight` per layer (multi-head attention, no `qkv_linear`).
    pub coalesce_qkv: bool,
    /// `--hw_backend`.
    pub hw: HwBackend,
    /// Accept trn2 + `qkv_linear` layouts that are not HF-GQA-consistent (kv size multiplier > 1,
    /// or k/v heads split across ranks) and reproduce NxD's tiled output exactly.
    pub allow_nxd_trn2_kv_tiling: bool,
}

impl ParallelConfig {
    /// `tp` x `pp` with every other setting at NxD's default (vpp 1, kvm 1, no qkv_linear,
    /// no fuse, no coalesce, trn1, no trn2 tiling override).
    pub fn new(tp: usize, pp: usize) -> ParallelConfig {
        ParallelConfig {
            tp,
            pp,
            vpp: 1,
            kv_size_multiplier: 1,
            qkv_linear: false,
            fuse_qkv: false,
            coalesce_qkv: false,
            hw: HwBackend::Trn1,
            allow_nxd_trn2_kv_tiling: false,
        }
    }

    /// Number of pipeline stages, pp·vpp.
    pub fn stages(&self) -> usize {
        self.pp * self.vpp
    }

    /// Number of shard files, tp·pp.
    pub fn num_files(&self) -> usize {
        self.tp * self.pp
    }
}

impl Default for ParallelConfig {
    /// `ParallelConfig::new(1, 1)`.
    fn default() -> ParallelConfig {
        ParallelConfig::new(1, 1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LLAMA3_8B: &str = r#"{
        "architectures": ["LlamaForCausalLM"], "attention_bias": false, "bos_token_id": 128000,
        "hidden_act": "silu", "hidden_size": 4096, "intermediate_size": 14336,
        "max_position_embeddings": 8192, "model_type": "llama", "num_attention_heads": 32,
        "num_hidden_layers": 32, "num_key_value_heads": 8, "rms_norm_eps": 1e-05,
        "rope_theta": 500000.0, "tie_word_embeddings": false, "torch_dtype": "bfloat16",
        "vocab_size": 128256
    }"#;

    #[test]
    fn parses_a_real_config() {
        let m = ModelConfig::from_json_str(LLAMA3_8B).unwrap();
        assert_eq!(
            m,
            ModelConfig {
                hidden_size: 4096,
                num_attention_heads: 32,
                num_key_value_heads: 8,
                num_hidden_layers: 32,
                intermediate_size: 14336,
                vocab_size: 128256,
                tie_word_embeddings: false,
                head_dim: 128,
            }
        );
        assert!(m.is_gqa());
        assert_eq!(m.q_rows(), 4096);
        assert_eq!(m.kv_rows(), 1024);
        // serde path gives the same
        let via_serde: ModelConfig = serde_json::from_str(LLAMA3_8B).unwrap();
        assert_eq!(via_serde, m);
    }

    #[test]
    fn defaults() {
        let m = ModelConfig::from_json_str(
            r#"{"hidden_size": 256, "num_attention_heads": 8, "num_hidden_layers": 5,
                "intermediate_size": 512, "vocab_size": 1024, "num_key_value_heads": null}"#,
        )
        .unwrap();
        assert_eq!(m.num_key_value_heads, 8);
        assert!(!m.tie_word_embeddings);
        assert_eq!(m.head_dim, 32);
        assert!(!m.is_gqa());
        let m = ModelConfig::from_json_str(
            r#"{"hidden_size": 256, "num_attention_heads": 8, "num_hidden_layers": 5,
                "intermediate_size": 512, "vocab_size": 1024, "tie_word_embeddings": true,
                "head_dim": 64}"#,
        )
        .unwrap();
        assert!(m.tie_word_embeddings);
        assert_eq!(m.head_dim, 64);
        assert_eq!(m.nxd_head_dim(), 32);
    }

    fn err(json: &str) -> String {
        ModelConfig::from_json_str(json).unwrap_err().to_string()
    }

    #[test]
    fn errors_name_the_field() {
        let base = r#""hidden_size": 256, "num_attention_heads": 8, "num_hidden_layers": 5,
                      "intermediate_size": 512"#;
        assert_eq!(
            err(&format!("{{{base}}}")),
            "config.json: field `vocab_size` is missing"
        );
        assert_eq!(
            err(&format!("{{{base}, \"vocab_size\": -3}}")),
            "config.json: field `vocab_size` must be a positive integer, got -3"
        );
        assert_eq!(
            err(&format!("{{{base}, \"vocab_size\": 0}}")),
            "config.json: field `vocab_size` must be a positive integer, got 0"
        );
        assert_eq!(
            err(&format!("{{{base}, \"vocab_size\": 1.5}}")),
            "config.json: field `vocab_size` must be a positive integer, got 1.5"
        );
        assert_eq!(
            err(&format!("{{{base}, \"vocab_size\": \"1024\"}}")),
            "config.json: field `vocab_size` must be a positive integer, got \"1024\""
        );
        assert_eq!(
            err(&format!(
                "{{{base}, \"vocab_size\": 1024, \"tie_word_embeddings\": \"yes\"}}"
            )),
            "config.json: field `tie_word_embeddings` must be true or false, got \"yes\""
        );
        assert_eq!(
            err(&format!(
                "{{{base}, \"vocab_size\": 1024, \"num_key_value_heads\": 3}}"
            )),
            "config.json: field `num_key_value_heads` 3 does not divide num_attention_heads 8 \
             (each kv head must serve a whole group of q heads)"
        );
        assert!(err(
            r#"{"hidden_size": 250, "num_attention_heads": 8, "num_hidden_layers": 5,
                "intermediate_size": 512, "vocab_size": 1024}"#
        )
        .starts_with("config.json: field `head_dim` is absent and hidden_size 250"));
        assert!(err("[1, 2]").starts_with("config.json is not a valid JSON object"));
        assert!(err("{").starts_with("config.json is not a valid JSON object"));
        assert_eq!(
            ModelConfig::from_json_str("{}").unwrap_err(),
            LayoutError::ConfigField {
                field: "hidden_size",
                problem: "is missing".into()
            }
        );
        // The serde path reports the same message.
        let e = serde_json::from_str::<ModelConfig>(&format!("{{{base}}}")).unwrap_err();
        assert!(
            e.to_string().contains("field `vocab_size` is missing"),
            "{e}"
        );
    }

    #[test]
    fn check_rejects_zero_sizes() {
        let mut m = ModelConfig::from_json_str(LLAMA3_8B).unwrap();
        m.intermediate_size = 0;
        assert!(m
            .check()
            .unwrap_err()
            .to_string()
            .contains("intermediate_size"));
    }

    #[test]
    fn hw_backend() {
        assert_eq!("trn1".parse::<HwBackend>(), Ok(HwBackend::Trn1));
        assert_eq!("TRN2".parse::<HwBackend>(), Ok(HwBackend::Trn2));
        assert!("inf2".parse::<HwBackend>().is_err());
        assert_eq!(HwBackend::from_nxd_str("inf2"), HwBackend::Trn1);
        assert_eq!(HwBackend::from_nxd_str("trn2"), HwBackend::Trn2);
        assert_eq!(HwBackend::from_nxd_str("TRN2"), HwBackend::Trn1);
        assert_eq!(HwBackend::Trn2.to_string(), "trn2");
        assert_eq!(HwBackend::default(), HwBackend::Trn1);
    }

    #[test]
    fn parallel_defaults() {
        let p = ParallelConfig::default();
        assert_eq!((p.tp, p.pp, p.vpp, p.kv_size_multiplier), (1, 1, 1, 1));
        assert!(!p.qkv_linear && !p.fuse_qkv && !p.coalesce_qkv && !p.allow_nxd_trn2_kv_tiling);
        let p = ParallelConfig::new(32, 8);
        assert_eq!((p.stages(), p.num_files()), (8, 256));
    }
}
