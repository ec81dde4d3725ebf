//! LoRA adapters: what to merge into which base tensor (pure, no I/O), for PEFT adapters
//! (`adapter_config.json` + `adapter_model.safetensors`) and DeepSpeed LoRA checkpoints
//! (`lora_weight_1.weight` = A, `lora_weight_2.weight` = B).
//!
//! PEFT (0.21, `tuners/lora/layer.py`): a target module `M` (a `Linear` of weight `[out, in]`)
//! holds `lora_A` `[r, in]` and `lora_B` `[out, r]`; merging adds `scale * B @ A` with
//! `scale = lora_alpha / r`, or `lora_alpha / sqrt(r)` with `use_rslora`; `r` and `lora_alpha`
//! may be overridden per module by `rank_pattern` / `alpha_pattern` (a key `K` applies to a
//! module whose name is `K` or ends with `.K`). An `Embedding` target holds `lora_embedding_A`
//! `[r, num_embeddings]` and `lora_embedding_B` `[dim, r]` and adds `scale * (B @ A)^T`. DoRA
//! (`use_dora`) adds a magnitude vector `m` (`[out]`) per module: `W' = m / ||W + scale B A||_row
//! * (W + scale B A)`, the norm taken over each output row. `modules_to_save` tensors replace
//! the base tensor of the same name. Saved keys start with `base_model.model.`.

use std::collections::BTreeMap;

use serde_json::Value;

use crate::store::TensorInfo;

/// How a LoRA pair applies to its base tensor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LoraKind {
    /// A linear layer: `W [out, in] += scale * B [out, r] @ A [r, in]`.
    Linear,
    /// An embedding: `W [num, dim] += scale * (B [dim, r] @ A [r, num])^T`.
    Embedding,
}

/// One merge: a base tensor and the adapter tensors that change it.
#[derive(Debug, Clone, PartialEq)]
pub struct LoraOp {
    /// The base tensor's name (`model.layers.0.self_attn.q_proj.weight`).
    pub target: String,
    /// The adapter tensor holding A.
    pub a: String,
    /// The adapter tensor holding B.
    pub b: String,
    /// DoRA's magnitude vector, if any.
    pub magnitude: Option<String>,
    /// The factor of `B @ A`.
    pub scale: f32,
    /// The rank.
    pub r: usize,
    /// Linear or embedding.
    pub kind: LoraKind,
}

/// Everything an adapter does to a base model.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct AdapterPlan {
    /// LoRA merges, by base tensor name.
    pub ops: BTreeMap<String, LoraOp>,
    /// Base tensors replaced by an adapter tensor (`modules_to_save`): base name -> adapter name.
    pub replace: BTreeMap<String, String>,
    /// Adapter tensors not used (DeepSpeed checkpoints carry the frozen base too).
    pub ignored: usize,
    /// Which format the adapter was in, for messages.
    pub format: &'static str,
}

/// `--lora-alpha` / `--lora-r` given on the command line.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Overrides {
    /// LoRA alpha.
    pub alpha: Option<f64>,
    /// LoRA rank.
    pub r: Option<usize>,
}

/// The prefix PEFT puts before every saved key.
const PEFT_PREFIX: &str = "base_model.model.";

fn num(config: &Value, key: &str) -> Option<f64> {
    config.get(key).and_then(Value::as_f64)
}

/// The value of a per-module `*_pattern` entry for `module`: PEFT's
/// `re.match(rf"(.*\.)?({key})$", module)`, for keys without regex syntax beyond `.`.
fn pattern_value(patterns: Option<&Value>, module: &str) -> Result<Option<f64>, String> {
    let Some(Value::Object(map)) = patterns else {
        return Ok(None);
    };
    for (key, value) in map {
        if key.contains(|c: char| "*+?()[]{}|^$\\".contains(c)) {
            return Err(format!(
                "adapter_config.json pattern `{key}` uses regular-expression syntax st-merge does \
                 not evaluate; spell the module names out"
            ));
        }
        if module == key || module.ends_with(&format!(".{key}")) {
            return Ok(value.as_f64());
        }
    }
    Ok(None)
}

/// PEFT's scaling: `alpha / r`, or `alpha / sqrt(r)` with rsLoRA.
pub fn peft_scale(alpha: f64, r: usize, rslora: bool) -> f32 {
    let r = r as f64;
    (if rslora { alpha / r.sqrt() } else { alpha / r }) as f32
}

/// Plans a PEFT adapter from its `adapter_config.json` and the tensors of its weights file.
pub fn plan_peft(
    config: &Value,
    tensors: &[TensorInfo],
    overrides: Overrides,
) -> Result<AdapterPlan, String> {
    let peft_type = config
        .get("peft_type")
        .and_then(Value::as_str)
        .unwrap_or("LORA");
    if peft_type != "LORA" {
        return Err(format!(
            "adapter_config.json has peft_type {peft_type}; st-merge merges LORA adapters only"
        ));
    }
    if config.get("fan_in_fan_out").and_then(Value::as_bool) == Some(true) {
        return Err(
            "adapter_config.json sets fan_in_fan_out (Conv1D models such as GPT-2); \
                    st-merge merges Linear/Embedding adapters of Llama-style models only"
                .into(),
        );
    }
    let alpha = overrides
        .alpha
        .or_else(|| num(config, "lora_alpha"))
        .ok_or("adapter_config.json has no lora_alpha (pass --lora-alpha)")?;
    let r = overrides
        .r
        .or_else(|| num(config, "r").map(|r| r as usize))
        .ok_or("adapter_config.json has no r (pass --lora-r)")?;
    let rslora = config.get("use_rslora").and_then(Value::as_bool) == Some(true);
    let dora = config.get("use_dora").and_then(Value::as_bool) == Some(true);

    #[derive(Default)]
    struct Module {
        a: Option<String>,
        b: Option<String>,
        m: Option<String>,
        kind: Option<LoraKind>,
    }
    let mut modules: BTreeMap<String, Module> = BTreeMap::new();
    let mut plan = AdapterPlan {
        format: "PEFT",
        ..AdapterPlan::default()
    };
    let shapes: BTreeMap<&str, &[usize]> = tensors
        .iter()
        .map(|t| (t.name.as_str(), t.shape.as_slice()))
        .collect();
    for t in tensors {
        let key = t.name.strip_prefix(PEFT_PREFIX).unwrap_or(&t.name);
        let key = key.replace(".modules_to_save.default.", ".");
        let key = key.replace(".modules_to_save.", ".");
        let suffixes: [(&str, u8, LoraKind); 6] = [
            (".lora_A.weight", b'a', LoraKind::Linear),
            (".lora_B.weight", b'b', LoraKind::Linear),
            (".lora_embedding_A", b'a', LoraKind::Embedding),
            (".lora_embedding_B", b'b', LoraKind::Embedding),
            (".lora_magnitude_vector", b'm', LoraKind::Linear),
            (".lora_magnitude_vector.weight", b'm', LoraKind::Linear),
        ];
        if let Some((module, which, kind)) = suffixes
            .iter()
            .find_map(|&(s, w, k)| key.strip_suffix(s).map(|m| (m, w, k)))
        {
            let entry = modules.entry(module.to_string()).or_default();
            let slot = match which {
                b'a' => &mut entry.a,
                b'b' => &mut entry.b,
                _ => &mut entry.m,
            };
            *slot = Some(t.name.clone());
            if which != b'm' {
                entry.kind = Some(kind);
            }
        } else if key.ends_with(".lora_B.bias") {
            return Err(format!(
                "adapter tensor {} is a LoRA bias (lora_bias=True); st-merge does not merge \
                 those",
                t.name
            ));
        } else if key.ends_with(".base_layer.weight") {
            // PEFT's save_embedding_layers copy of a targeted embedding: the base has it.
            plan.ignored += 1;
        } else if key.contains(".lora_") || key.contains("trainable_tokens") {
            return Err(format!(
                "adapter tensor {} is of a kind st-merge does not merge",
                t.name
            ));
        } else {
            plan.replace.insert(key.to_string(), t.name.clone());
        }
    }
    for (module, m) in modules {
        let (Some(a), Some(b), Some(kind)) = (m.a, m.b, m.kind) else {
            return Err(format!(
                "adapter module {module} lacks its lora_A or lora_B tensor: the adapter file \
                 is incomplete"
            ));
        };
        if dora && kind == LoraKind::Embedding {
            return Err(format!(
                "adapter module {module}: DoRA on an embedding is not supported by st-merge"
            ));
        }
        if m.m.is_some() != dora {
            return Err(format!(
                "adapter module {module}: use_dora is {dora} in adapter_config.json but the \
                 magnitude vector is {}",
                if dora { "missing" } else { "present" }
            ));
        }
        let r_here = match pattern_value(config.get("rank_pattern"), &module)? {
            Some(v) if overrides.r.is_none() => v as usize,
            _ => r,
        };
        let alpha_here = match pattern_value(config.get("alpha_pattern"), &module)? {
            Some(v) if overrides.alpha.is_none() => v,
            _ => alpha,
        };
        let a_rank = shapes[a.as_str()].first().copied().unwrap_or(0);
        if a_rank != r_here {
            return Err(format!(
                "adapter tensor {a} has rank {a_rank} but the adapter's r for {module} is \
                 {r_here}{}",
                if overrides.r.is_some() {
                    " (from --lora-r)"
                } else {
                    " (adapter_config.json)"
                }
            ));
        }
        let target = format!("{module}.weight");
        plan.ops.insert(
            target.clone(),
            LoraOp {
                target,
                a,
                b,
                magnitude: m.m,
                scale: peft_scale(alpha_here, r_here, rslora),
                r: r_here,
                kind,
            },
        );
    }
    Ok(plan)
}

/// Plans a DeepSpeed LoRA checkpoint: `X.lora_weight_1.weight` (A) and `X.lora_weight_2.weight`
/// (B) merge into `X.weight` with `scale = alpha / r`; every other tensor (DeepSpeed saves the
/// frozen base weights too) is ignored.
pub fn plan_deepspeed(tensors: &[TensorInfo], overrides: Overrides) -> Result<AdapterPlan, String> {
    let (Some(alpha), Some(r)) = (overrides.alpha, overrides.r) else {
        return Err(
            "a DeepSpeed LoRA checkpoint does not record its scaling: pass --lora-alpha \
                    and --lora-r as set in its LoRAConfig (lora_alpha, lora_r)"
                .into(),
        );
    };
    let mut plan = AdapterPlan {
        format: "DeepSpeed",
        ..AdapterPlan::default()
    };
    let mut pairs: BTreeMap<String, (Option<&TensorInfo>, Option<&TensorInfo>)> = BTreeMap::new();
    for t in tensors {
        let name = t.name.strip_prefix("module.").unwrap_or(&t.name);
        if let Some(m) = name.strip_suffix(".lora_weight_1.weight") {
            pairs.entry(m.to_string()).or_default().0 = Some(t);
        } else if let Some(m) = name.strip_suffix(".lora_weight_2.weight") {
            pairs.entry(m.to_string()).or_default().1 = Some(t);
        } else {
            plan.ignored += 1;
        }
    }
    if pairs.is_empty() {
        return Err(
            "no lora_weight_1/lora_weight_2 tensors: not a DeepSpeed LoRA checkpoint".into(),
        );
    }
    for (module, pair) in pairs {
        let (Some(a), Some(b)) = pair else {
            return Err(format!(
                "adapter module {module} lacks its lora_weight_1 or lora_weight_2 tensor"
            ));
        };
        let a_rank = a.shape.first().copied().unwrap_or(0);
        if a_rank != r {
            return Err(format!(
                "adapter tensor {} has rank {a_rank} but --lora-r is {r}",
                a.name
            ));
        }
        let target = format!("{module}.weight");
        plan.ops.insert(
            target.clone(),
            LoraOp {
                target,
                a: a.name.clone(),
                b: b.name.clone(),
                magnitude: None,
                scale: (alpha / r as f64) as f32,
                r,
                kind: LoraKind::Linear,
            },
        );
    }
    Ok(plan)
}

/// Checks an adapter against the base tensors it changes: every target exists, is a float
/// matrix, and has the shapes the adapter's tensors imply. Errors say which tensor and why.
pub fn check_against_base(
    plan: &AdapterPlan,
    adapter: &[TensorInfo],
    base: &BTreeMap<&str, &TensorInfo>,
) -> Result<(), String> {
    let info: BTreeMap<&str, &TensorInfo> = adapter.iter().map(|t| (t.name.as_str(), t)).collect();
    let hint = "was the adapter trained for another model?";
    for op in plan.ops.values() {
        let Some(w) = base.get(op.target.as_str()) else {
            return Err(format!(
                "the adapter changes {} but the model has no such tensor; {hint}",
                op.target
            ));
        };
        if !w.dtype.is_float() || w.shape.len() != 2 {
            return Err(format!(
                "the adapter changes {} but it is a {} tensor of shape {:?}, not a float matrix; \
                 {hint}",
                op.target, w.dtype, w.shape
            ));
        }
        let (a, b) = (info[op.a.as_str()], info[op.b.as_str()]);
        let (rows, cols) = (w.shape[0], w.shape[1]);
        let (want_a, want_b) = match op.kind {
            LoraKind::Linear => ([op.r, cols], [rows, op.r]),
            LoraKind::Embedding => ([op.r, rows], [cols, op.r]),
        };
        for (t, want) in [(a, want_a), (b, want_b)] {
            if !t.dtype.is_float() || t.shape != want {
                return Err(format!(
                    "adapter tensor {} is {} {:?} but {} of shape {:?} needs {:?}; {hint}",
                    t.name, t.dtype, t.shape, op.target, w.shape, want
                ));
            }
        }
        if let Some(m) = &op.magnitude {
            let t = info[m.as_str()];
            if t.shape != [rows] && t.shape != [1, rows] {
                return Err(format!(
                    "adapter tensor {m} is {:?} but {} has {rows} rows; {hint}",
                    t.shape, op.target
                ));
            }
        }
    }
    for (target, source) in &plan.replace {
        let t = info[source.as_str()];
        match base.get(target.as_str()) {
            None => {
                return Err(format!(
                    "the adapter replaces {target} (from {source}) but the model has no such \
                     tensor; {hint}"
                ))
            }
            Some(w) if w.shape != t.shape => {
                return Err(format!(
                    "adapter tensor {source} is {:?} but the model's {target} is {:?}; {hint}",
                    t.shape, w.shape
                ))
            }
            Some(_) => {}
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::info as t;
    use serde_json::json;
    use tensor_formats::DType;

    fn peft_tensors() -> Vec<TensorInfo> {
        vec![
            t(
                "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight",
                DType::F32,
                &[4, 8],
            ),
            t(
                "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight",
                DType::F32,
                &[16, 4],
            ),
            t(
                "base_model.model.model.embed_tokens.lora_embedding_A",
                DType::F32,
                &[4, 32],
            ),
            t(
                "base_model.model.model.embed_tokens.lora_embedding_B",
                DType::F32,
                &[8, 4],
            ),
            t(
                "base_model.model.model.embed_tokens.base_layer.weight",
                DType::BF16,
                &[32, 8],
            ),
            t("base_model.model.lm_head.weight", DType::BF16, &[32, 8]),
        ]
    }

    #[test]
    fn plans_a_peft_adapter() {
        let config = json!({"peft_type": "LORA", "r": 4, "lora_alpha": 8, "use_rslora": false});
        let plan = plan_peft(&config, &peft_tensors(), Overrides::default()).unwrap();
        let q = &plan.ops["model.layers.0.self_attn.q_proj.weight"];
        assert_eq!(q.scale, 2.0);
        assert_eq!(q.kind, LoraKind::Linear);
        assert_eq!(
            plan.ops["model.embed_tokens.weight"].kind,
            LoraKind::Embedding
        );
        assert_eq!(
            plan.replace["lm_head.weight"],
            "base_model.model.lm_head.weight"
        );
        assert_eq!(plan.ignored, 1);

        let base_list = [
            t(
                "model.layers.0.self_attn.q_proj.weight",
                DType::BF16,
                &[16, 8],
            ),
            t("model.embed_tokens.weight", DType::BF16, &[32, 8]),
            t("lm_head.weight", DType::BF16, &[32, 8]),
        ];
        let base: BTreeMap<&str, &TensorInfo> =
            base_list.iter().map(|t| (t.name.as_str(), t)).collect();
        check_against_base(&plan, &peft_tensors(), &base).unwrap();

        // Another model: q_proj is [32, 8].
        let other = [t(
            "model.layers.0.self_attn.q_proj.weight",
            DType::BF16,
            &[32, 8],
        )];
        let mut base2 = base.clone();
        base2.insert(other[0].name.as_str(), &other[0]);
        let err = check_against_base(&plan, &peft_tensors(), &base2).unwrap_err();
        assert!(err.contains("lora_B") && err.contains("[32, 4]"), "{err}");
        // Unknown target.
        base2.remove("model.layers.0.self_attn.q_proj.weight");
        let err = check_against_base(&plan, &peft_tensors(), &base2).unwrap_err();
        assert!(err.contains("has no such tensor"), "{err}");
    }

    #[test]
    fn rslora_and_patterns_scale_per_module() {
        let config = json!({"r": 4, "lora_alpha": 8, "use_rslora": true,
                            "alpha_pattern": {"self_attn.q_proj": 16}});
        let plan = plan_peft(&config, &peft_tensors(), Overrides::default()).unwrap();
        assert_eq!(
            plan.ops["model.layers.0.self_attn.q_proj.weight"].scale,
            8.0
        );
        assert_eq!(plan.ops["model.embed_tokens.weight"].scale, 4.0);
        assert_eq!(peft_scale(16.0, 16, true), 4.0);
        let bad = json!({"r": 4, "lora_alpha": 8, "rank_pattern": {"layers\\.0.*": 2}});
        assert!(plan_peft(&bad, &peft_tensors(), Overrides::default()).is_err());
        let wrong_r = json!({"r": 8, "lora_alpha": 8});
        let err = plan_peft(&wrong_r, &peft_tensors(), Overrides::default()).unwrap_err();
        assert!(err.contains("rank 4"), "{err}");
    }

    #[test]
    fn dora_needs_its_magnitudes() {
        let config = json!({"r": 4, "lora_alpha": 8, "use_dora": true});
        let mut ts = peft_tensors();
        ts.retain(|t| !t.name.contains("embed"));
        assert!(plan_peft(&config, &ts, Overrides::default())
            .unwrap_err()
            .contains("magnitude"));
        ts.push(t(
            "base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector",
            DType::F32,
            &[16],
        ));
        let plan = plan_peft(&config, &ts, Overrides::default()).unwrap();
        assert!(plan.ops["model.layers.0.self_attn.q_proj.weight"]
            .magnitude
            .is_some());
    }

    #[test]
    fn plans_a_deepspeed_checkpoint() {
        let ts = vec![
            t("model.layers.0.mlp.up_proj.weight", DType::BF16, &[16, 8]),
            t(
                "model.layers.0.mlp.up_proj.lora_weight_1.weight",
                DType::BF16,
                &[2, 8],
            ),
            t(
                "model.layers.0.mlp.up_proj.lora_weight_2.weight",
                DType::BF16,
                &[16, 2],
            ),
        ];
        let err = plan_deepspeed(&ts, Overrides::default()).unwrap_err();
        assert!(err.contains("--lora-alpha"), "{err}");
        let plan = plan_deepspeed(
            &ts,
            Overrides {
                alpha: Some(16.0),
                r: Some(2),
            },
        )
        .unwrap();
        let op = &plan.ops["model.layers.0.mlp.up_proj.weight"];
        assert_eq!((op.scale, op.r, plan.ignored), (8.0, 2, 1));
        assert!(plan_deepspeed(
            &ts,
            Overrides {
                alpha: Some(16.0),
                r: Some(4)
            }
        )
        .is_err());
    }
}
