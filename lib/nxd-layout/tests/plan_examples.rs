//! The forward plan checked by value against the spec's examples, plus the error paths.

mod common;

use common::*;
use nxd_layout::*;

fn n(dim: usize, start: usize, len: usize) -> Narrow {
    Narrow::new(dim, start, len)
}

fn idx(sources: &[SourceTensor], name: &str) -> usize {
    sources.iter().position(|s| s.name == name).unwrap()
}

fn part(sources: &[SourceTensor], name: &str, narrow: Vec<Narrow>) -> PartPlan {
    PartPlan {
        source: idx(sources, name),
        narrow,
    }
}

fn keys(f: &FilePlan) -> Vec<&str> {
    f.tensors.iter().map(|t| t.name.as_str()).collect()
}

fn sec9_parallel() -> ParallelConfig {
    let mut p = pc(2, 2);
    p.qkv_linear = true;
    p
}

/// Spec §9: model a, tp2 pp2, qkv_linear, kvm1, trn1.
#[test]
fn spec_section_9_layout() {
    let m = model_a();
    let s = sources(&m, false);
    let plan = plan(&m, &sec9_parallel(), &s).unwrap();
    let names: Vec<&str> = plan.files.iter().map(|f| f.file_name.as_str()).collect();
    assert_eq!(
        names,
        [
            "dp_rank_00_tp_rank_00_pp_rank_00.pt",
            "dp_rank_00_tp_rank_00_pp_rank_01.pt",
            "dp_rank_00_tp_rank_01_pp_rank_00.pt",
            "dp_rank_00_tp_rank_01_pp_rank_01.pt",
        ]
    );
    let f = plan.file(0, 0);
    assert_eq!(f.layers, vec![0, 1, 2]);
    let mut want = vec!["model.embed_tokens.weight".to_string()];
    for l in 0..3 {
        for k in [
            "self_attn.qkv_proj.weight_q",
            "self_attn.qkv_proj.weight_k",
            "self_attn.qkv_proj.weight_v",
            "self_attn.o_proj.weight",
            "mlp.gate_up_proj.weight",
            "mlp.down_proj.weight",
            "input_layernorm.weight",
            "post_attention_layernorm.weight",
        ] {
            want.push(format!("model.layers.{l}.{k}"));
        }
    }
    assert_eq!(keys(f), want);

    let t = |name: &str| f.tensor(name).unwrap().clone();
    let e = t("model.embed_tokens.weight");
    assert_eq!(e.shape, vec![512, 256]);
    assert_eq!(e.parts, vec![part(&s, EMBED, vec![n(0, 0, 512)])]);
    let q = t("model.layers.0.self_attn.qkv_proj.weight_q");
    assert_eq!(q.shape, vec![128, 256]);
    assert_eq!(
        q.parts,
        vec![part(
            &s,
            "model.layers.0.self_attn.q_proj.weight",
            vec![n(0, 0, 128)]
        )]
    );
    let k = t("model.layers.0.self_attn.qkv_proj.weight_k");
    assert_eq!(k.shape, vec![32, 256]);
    assert_eq!(
        k.parts,
        vec![part(
            &s,
            "model.layers.0.self_attn.k_proj.weight",
            vec![n(0, 0, 32)]
        )]
    );
    let v = t("model.layers.0.self_attn.qkv_proj.weight_v");
    assert_eq!(
        v.parts,
        vec![part(
            &s,
            "model.layers.0.self_attn.v_proj.weight",
            vec![n(0, 0, 32)]
        )]
    );
    let o = t("model.layers.0.self_attn.o_proj.weight");
    assert_eq!(o.shape, vec![256, 128]);
    assert!(o.stored_transposed);
    assert_eq!(o.strides(), vec![1, 256]);
    assert_eq!(o.concat_dim, 1);
    assert_eq!(
        o.parts,
        vec![part(
            &s,
            "model.layers.0.self_attn.o_proj.weight",
            vec![n(1, 0, 128)]
        )]
    );
    let gu = t("model.layers.0.mlp.gate_up_proj.weight");
    assert_eq!(gu.shape, vec![512, 256]);
    assert_eq!(
        gu.parts,
        vec![
            part(
                &s,
                "model.layers.0.mlp.gate_proj.weight",
                vec![n(0, 0, 256)]
            ),
            part(&s, "model.layers.0.mlp.up_proj.weight", vec![n(0, 0, 256)]),
        ]
    );
    let d = t("model.layers.0.mlp.down_proj.weight");
    assert_eq!(d.shape, vec![256, 256]);
    assert!(!d.stored_transposed);
    assert_eq!(d.strides(), vec![256, 1]);
    assert_eq!(
        d.parts,
        vec![part(
            &s,
            "model.layers.0.mlp.down_proj.weight",
            vec![n(1, 0, 256)]
        )]
    );
    let ln = t("model.layers.0.input_layernorm.weight");
    assert_eq!(ln.shape, vec![256]);
    assert_eq!(
        ln.parts,
        vec![part(&s, "model.layers.0.input_layernorm.weight", vec![])]
    );

    let f = plan.file(0, 1);
    assert_eq!(f.layers, vec![3, 4, 5]);
    let k = keys(f);
    assert_eq!(k.len(), 3 * 8 + 2);
    assert_eq!(k[0], "model.layers.3.self_attn.qkv_proj.weight_q");
    assert_eq!(&k[24..], ["model.norm.weight", "lm_head.weight"]);
    let lm = f.tensor("lm_head.weight").unwrap();
    assert_eq!(lm.shape, vec![512, 256]);
    assert_eq!(lm.parts, vec![part(&s, LM_HEAD, vec![n(0, 0, 512)])]);

    // tp rank 1: the second halves.
    let f = plan.file(1, 0);
    let t = |name: &str| f.tensor(name).unwrap().parts.clone();
    assert_eq!(t(EMBED), vec![part(&s, EMBED, vec![n(0, 512, 512)])]);
    assert_eq!(
        t("model.layers.2.self_attn.qkv_proj.weight_q"),
        vec![part(
            &s,
            "model.layers.2.self_attn.q_proj.weight",
            vec![n(0, 128, 128)]
        )]
    );
    assert_eq!(
        t("model.layers.2.self_attn.qkv_proj.weight_k"),
        vec![part(
            &s,
            "model.layers.2.self_attn.k_proj.weight",
            vec![n(0, 32, 32)]
        )]
    );
    assert_eq!(
        t("model.layers.2.self_attn.o_proj.weight"),
        vec![part(
            &s,
            "model.layers.2.self_attn.o_proj.weight",
            vec![n(1, 128, 128)]
        )]
    );
    assert_eq!(
        t("model.layers.2.mlp.gate_up_proj.weight"),
        vec![
            part(
                &s,
                "model.layers.2.mlp.gate_proj.weight",
                vec![n(0, 256, 256)]
            ),
            part(
                &s,
                "model.layers.2.mlp.up_proj.weight",
                vec![n(0, 256, 256)]
            ),
        ]
    );
    assert_eq!(
        t("model.layers.2.mlp.down_proj.weight"),
        vec![part(
            &s,
            "model.layers.2.mlp.down_proj.weight",
            vec![n(1, 256, 256)]
        )]
    );
}

/// Spec §9, "Same setting with --fuse_qkv".
#[test]
fn spec_section_9_fused() {
    let m = model_a();
    let s = sources(&m, false);
    let mut p = sec9_parallel();
    p.fuse_qkv = true;
    let plan = plan(&m, &p, &s).unwrap();
    let f = plan.file(0, 1);
    let k = keys(f);
    assert_eq!(k.len(), 3 * 5 + 2 + 3);
    assert_eq!(
        &k[15..],
        [
            "model.norm.weight",
            "lm_head.weight",
            "model.layers.3.self_attn.qkv_proj.weight_qkv",
            "model.layers.4.self_attn.qkv_proj.weight_qkv",
            "model.layers.5.self_attn.qkv_proj.weight_qkv",
        ]
    );
    assert_eq!(k[0], "model.layers.3.self_attn.o_proj.weight");
    for tp in 0..2 {
        let f = plan.file(tp, 0);
        let qkv = f
            .tensor("model.layers.0.self_attn.qkv_proj.weight_qkv")
            .unwrap();
        assert_eq!(qkv.shape, vec![192, 256]);
        assert_eq!(qkv.concat_dim, 0);
        assert_eq!(
            qkv.parts,
            vec![
                part(
                    &s,
                    "model.layers.0.self_attn.q_proj.weight",
                    vec![n(0, tp * 128, 128)]
                ),
                part(
                    &s,
                    "model.layers.0.self_attn.k_proj.weight",
                    vec![n(0, tp * 32, 32)]
                ),
                part(
                    &s,
                    "model.layers.0.self_attn.v_proj.weight",
                    vec![n(0, tp * 32, 32)]
                ),
            ]
        );
        // pp 0: embed, 3 x (o, gate_up, down, 2 norms), then 3 fused
        assert_eq!(keys(f).len(), 1 + 15 + 3);
        assert_eq!(
            keys(f).last().copied(),
            Some("model.layers.2.self_attn.qkv_proj.weight_qkv")
        );
    }
}

/// Spec §6: a, tp8, kvm4, trn1: ranks 0..7 get Q0, Q4, Q1, Q5, Q2, Q6, Q3, Q7 with K0, K1, ...
#[test]
fn trn1_head_permutation_by_value() {
    let m = model_a();
    let s = sources(&m, false);
    let mut p = pc(8, 1);
    p.qkv_linear = true;
    p.kv_size_multiplier = 4;
    let plan = plan(&m, &p, &s).unwrap();
    let qh = [0, 4, 1, 5, 2, 6, 3, 7];
    for (r, &qh_r) in qh.iter().enumerate() {
        let f = plan.file(r, 0);
        let q = f
            .tensor("model.layers.5.self_attn.qkv_proj.weight_q")
            .unwrap();
        assert_eq!(
            q.parts,
            vec![part(
                &s,
                "model.layers.5.self_attn.q_proj.weight",
                vec![n(0, qh_r * 32, 32)]
            )]
        );
        let k = f
            .tensor("model.layers.5.self_attn.qkv_proj.weight_k")
            .unwrap();
        assert_eq!(
            k.parts,
            vec![part(
                &s,
                "model.layers.5.self_attn.k_proj.weight",
                vec![n(0, (r % 2) * 32, 32)]
            )]
        );
        let o = f.tensor("model.layers.5.self_attn.o_proj.weight").unwrap();
        assert_eq!(o.shape, vec![256, 32]);
        assert_eq!(
            o.parts,
            vec![part(
                &s,
                "model.layers.5.self_attn.o_proj.weight",
                vec![n(1, qh_r * 32, 32)]
            )]
        );
        // embed 1024 / 8 = 128 rows
        assert_eq!(f.tensor(EMBED).unwrap().shape, vec![128, 256]);
    }
}

/// trn2 with the tiling override reproduces NxD's tiled kv: a, tp2, kvm4 gives each rank
/// K0 K1 K0 K1 (two parts from the same k rows).
#[test]
fn trn2_tiling_override_by_value() {
    let m = model_a();
    let s = sources(&m, false);
    let mut p = pc(2, 1);
    p.qkv_linear = true;
    p.kv_size_multiplier = 4;
    p.hw = HwBackend::Trn2;
    let err = plan(&m, &p, &s).unwrap_err();
    assert_eq!(err.refusal(), Some(Refusal::NxdSilentlyWrong));
    p.allow_nxd_trn2_kv_tiling = true;
    let plan = plan(&m, &p, &s).unwrap();
    for r in 0..2 {
        let f = plan.file(r, 0);
        let k = f
            .tensor("model.layers.0.self_attn.qkv_proj.weight_k")
            .unwrap();
        assert_eq!(k.shape, vec![128, 256]);
        let kp = part(&s, "model.layers.0.self_attn.k_proj.weight", vec![]);
        assert_eq!(k.parts, vec![kp.clone(), kp]);
        let q = f
            .tensor("model.layers.0.self_attn.qkv_proj.weight_q")
            .unwrap();
        assert_eq!(
            q.parts,
            vec![part(
                &s,
                "model.layers.0.self_attn.q_proj.weight",
                vec![n(0, r * 128, 128)]
            )]
        );
    }
}

/// Tied embeddings (model c): lm_head is planned from embed_tokens, after model.norm.
#[test]
fn tied_lm_head_comes_from_embed() {
    let m = model_c();
    let s = sources(&m, false);
    assert!(s.iter().all(|t| t.name != LM_HEAD));
    let mut p = pc(4, 3);
    p.vpp = 2;
    let plan = plan(&m, &p, &s).unwrap();
    assert_eq!(plan.file(0, 0).layers, vec![0, 3]);
    assert_eq!(plan.file(0, 1).layers, vec![1, 4]);
    assert_eq!(plan.file(0, 2).layers, vec![2, 5, 6]);
    for tp in 0..4 {
        let f = plan.file(tp, 2);
        let k = keys(f);
        assert_eq!(&k[k.len() - 2..], ["model.norm.weight", "lm_head.weight"]);
        let lm = f.tensor(LM_HEAD).unwrap();
        assert_eq!(lm.parts, vec![part(&s, EMBED, vec![n(0, tp * 256, 256)])]);
        assert!(plan.file(tp, 0).tensor(LM_HEAD).is_none());
        assert!(plan.file(tp, 1).tensor(EMBED).is_none());
    }
    // An untied model without lm_head is an error; a tied one with lm_head uses it.
    let mut m2 = m.clone();
    m2.tie_word_embeddings = false;
    assert_eq!(
        nxd_layout::plan(&m2, &p, &s).unwrap_err(),
        LayoutError::MissingTensor {
            name: LM_HEAD.into()
        }
    );
    let s2 = sources(&m2, false);
    let plan2 = nxd_layout::plan(&m, &p, &s2).unwrap();
    assert_eq!(
        plan2.file(0, 2).tensor(LM_HEAD).unwrap().parts,
        vec![part(&s2, LM_HEAD, vec![n(0, 0, 256)])]
    );
}

/// Model d: legacy inv_freq keys are replicated with their layer, in their slot, dtype kept.
#[test]
fn legacy_inv_freq_is_replicated() {
    let m = model_a();
    let s = sources(&m, true);
    let mut p = pc(2, 2);
    p.qkv_linear = true;
    let plan = plan(&m, &p, &s).unwrap();
    let f = plan.file(1, 1);
    let k = keys(f);
    assert_eq!(k[3], "model.layers.3.self_attn.o_proj.weight");
    assert_eq!(k[4], "model.layers.3.self_attn.rotary_emb.inv_freq");
    let t = f
        .tensor("model.layers.3.self_attn.rotary_emb.inv_freq")
        .unwrap();
    assert_eq!(t.shape, vec![16]);
    assert_eq!(t.dtype, "F32");
    assert_eq!(t.elem_size, 4);
    assert_eq!(t.parts[0].narrow, vec![]);
    assert!(plan
        .file(1, 0)
        .tensor("model.layers.3.self_attn.rotary_emb.inv_freq")
        .is_none());
}

/// Coalesced qkv (model b, tp2, no qkv_linear): [q_r; k_r; v_r] with hidden/tp rows each,
/// appended at the end of the file.
#[test]
fn coalesced_qkv() {
    let m = model_b();
    let s = sources(&m, false);
    let mut p = pc(2, 1);
    p.coalesce_qkv = true;
    let plan = plan(&m, &p, &s).unwrap();
    let f = plan.file(1, 0);
    let k = keys(f);
    assert_eq!(k.len(), 1 + 5 * 5 + 2 + 5);
    assert_eq!(k[1], "model.layers.0.self_attn.o_proj.weight");
    assert_eq!(&k[26..28], ["model.norm.weight", "lm_head.weight"]);
    assert_eq!(k[28], "model.layers.0.self_attn.qkv_proj.weight");
    assert_eq!(k[32], "model.layers.4.self_attn.qkv_proj.weight");
    let t = f
        .tensor("model.layers.4.self_attn.qkv_proj.weight")
        .unwrap();
    assert_eq!(t.shape, vec![384, 256]);
    assert_eq!(
        t.parts,
        vec![
            part(
                &s,
                "model.layers.4.self_attn.q_proj.weight",
                vec![n(0, 128, 128)]
            ),
            part(
                &s,
                "model.layers.4.self_attn.k_proj.weight",
                vec![n(0, 128, 128)]
            ),
            part(
                &s,
                "model.layers.4.self_attn.v_proj.weight",
                vec![n(0, 128, 128)]
            ),
        ]
    );
}

/// Without qkv_linear, fuse/hw/kvm have no effect (spec §5).
#[test]
fn flags_without_qkv_linear_have_no_effect() {
    let m = model_c();
    let s = sources(&m, false);
    let base = plan(&m, &pc(2, 2), &s).unwrap();
    let mut p = pc(2, 2);
    p.fuse_qkv = true;
    p.kv_size_multiplier = 2;
    p.hw = HwBackend::Trn2;
    let other = plan(&m, &p, &s).unwrap();
    assert_eq!(base.files, other.files);
    assert_eq!(
        keys(base.file(0, 0))[1..4],
        [
            "model.layers.0.self_attn.q_proj.weight",
            "model.layers.0.self_attn.k_proj.weight",
            "model.layers.0.self_attn.v_proj.weight"
        ]
    );
}

/// gate_up takes the slot of whichever of gate/up comes first; cat is always [gate, up].
#[test]
fn gate_up_slot_follows_input_order() {
    let m = model_a();
    let mut s = sources(&m, false);
    let g = idx(&s, "model.layers.0.mlp.gate_proj.weight");
    let u = idx(&s, "model.layers.0.mlp.up_proj.weight");
    let d = idx(&s, "model.layers.0.mlp.down_proj.weight");
    // order: ..., up, down, gate
    let gate = s[g].clone();
    s[g] = s[u].clone();
    s[u] = s[d].clone();
    s[d] = gate;
    let plan = plan(&m, &pc(1, 1), &s).unwrap();
    let f = plan.file(0, 0);
    let k = keys(f);
    assert_eq!(k[5], "model.layers.0.mlp.gate_up_proj.weight");
    assert_eq!(k[6], "model.layers.0.mlp.down_proj.weight");
    let gu = f.tensor("model.layers.0.mlp.gate_up_proj.weight").unwrap();
    assert_eq!(
        gu.parts,
        vec![
            part(&s, "model.layers.0.mlp.gate_proj.weight", vec![]),
            part(&s, "model.layers.0.mlp.up_proj.weight", vec![]),
        ]
    );
}

#[test]
fn source_errors_name_the_tensor() {
    let m = model_a();
    let p = pc(2, 1);
    let s = sources(&m, false);

    let mut bad = s.clone();
    bad[2].shape = vec![64, 255];
    let e = plan(&m, &p, &bad).unwrap_err();
    assert_eq!(
        e,
        LayoutError::ShapeMismatch {
            name: "model.layers.0.self_attn.k_proj.weight".into(),
            expected: vec![64, 256],
            actual: vec![64, 255],
        }
    );
    assert_eq!(
        e.to_string(),
        "tensor `model.layers.0.self_attn.k_proj.weight`: expected shape [64, 256] from \
         config.json, found [64, 255]"
    );

    let mut missing = s.clone();
    missing.retain(|t| t.name != "model.layers.4.mlp.up_proj.weight");
    assert_eq!(
        plan(&m, &p, &missing).unwrap_err(),
        LayoutError::MissingTensor {
            name: "model.layers.4.mlp.up_proj.weight".into()
        }
    );

    let mut dup = s.clone();
    dup.push(s[3].clone());
    assert!(matches!(
        plan(&m, &p, &dup).unwrap_err(),
        LayoutError::DuplicateTensor { .. }
    ));

    let mut extra_layer = s.clone();
    extra_layer.push(SourceTensor::new(
        "model.layers.6.input_layernorm.weight",
        vec![256],
        "BF16",
        2,
    ));
    let e = plan(&m, &p, &extra_layer).unwrap_err();
    assert!(e.to_string().contains("num_hidden_layers 6"), "{e}");

    for name in [
        "model.layers.0.self_attn.q_proj.bias",
        "lm_head.bias",
        "model.layers.03.foo",
    ] {
        let mut x = s.clone();
        x.push(SourceTensor::new(name, vec![4], "BF16", 2));
        assert!(
            matches!(
                plan(&m, &p, &x).unwrap_err(),
                LayoutError::UnsupportedTensor { .. }
            ),
            "{name}"
        );
    }

    let mut mixed = s.clone();
    let up = idx(&s, "model.layers.1.mlp.up_proj.weight");
    mixed[up].dtype = "F32".into();
    mixed[up].elem_size = 4;
    assert_eq!(
        plan(&m, &p, &mixed).unwrap_err(),
        LayoutError::MixedDtypes {
            name: "model.layers.1.mlp.gate_up_proj.weight".into(),
            dtypes: vec!["BF16".into(), "F32".into()],
        }
    );

    // Refusals come through plan too.
    assert!(plan(&m, &pc(4, 1), &s).unwrap_err().refusal().is_some());
}

/// Unknown keys: replicated, on their layer's pp rank or (non-layer) on every pp rank.
#[test]
fn unknown_keys_are_replicated() {
    let m = model_a();
    let mut s = sources(&m, false);
    s.push(SourceTensor::new(
        "model.rotary_emb.inv_freq",
        vec![16],
        "F32",
        4,
    ));
    s.insert(
        10,
        SourceTensor::new("model.layers.1.extra_scale", vec![3], "BF16", 2),
    );
    let order = canonical_order(&s.iter().map(|t| t.name.as_str()).collect::<Vec<_>>());
    let s: Vec<SourceTensor> = order.iter().map(|&i| s[i].clone()).collect();
    let plan = plan(&m, &pc(1, 2), &s).unwrap();
    for pp in 0..2 {
        let f = plan.file(0, pp);
        assert_eq!(keys(f).last().copied(), Some("model.rotary_emb.inv_freq"));
    }
    assert!(plan
        .file(0, 0)
        .tensor("model.layers.1.extra_scale")
        .is_some());
    assert!(plan
        .file(0, 1)
        .tensor("model.layers.1.extra_scale")
        .is_none());
}

#[test]
fn summary_counts_tensors_and_bytes() {
    let m = model_a();
    let s = sources(&m, false);
    let plan = plan(&m, &sec9_parallel(), &s).unwrap();
    let sum = plan.summary();
    assert_eq!(sum.files.len(), 4);
    assert_eq!(sum.files[0].tensors, 1 + 3 * 8);
    assert_eq!(sum.files[1].tensors, 3 * 8 + 2);
    // Every source byte once (no kv replication at kvm 1, tp 2 = KV), except that the 13 norms
    // are replicated on both tp ranks.
    let total: u64 = s.iter().map(|t| t.numel() as u64 * 2).sum::<u64>() + 13 * 256 * 2;
    assert_eq!(sum.total_bytes, total);
    assert_eq!(sum.total_tensors, 2 * (25 + 26));
    // file 0: embed 512x256 + 3 layers x (q 128 + k 32 + v 32 + o 128 + gate_up 512 + down 256)
    // rows of 256, plus 2 norms of 256.
    let layer = (128 + 32 + 32 + 128 + 512 + 256) * 256 + 2 * 256;
    assert_eq!(sum.files[0].bytes, 2 * (512 * 256 + 3 * layer) as u64);
    let text = sum.to_string();
    assert!(
        text.starts_with("dp_rank_00_tp_rank_00_pp_rank_00.pt  tp 0 pp 0  layers 0-2  25 tensors")
    );
    assert!(text.ends_with(&format!("total: 4 files, 102 tensors, {total} bytes")));
}

/// Llama 3 70B seed layout, planned from shapes alone.
#[test]
fn seventy_b_seed_layout() {
    let m = ModelConfig::from_json_str(
        r#"{"architectures": ["LlamaForCausalLM"], "hidden_size": 8192, "num_attention_heads": 64,
            "num_key_value_heads": 8, "num_hidden_layers": 80, "intermediate_size": 28672,
            "vocab_size": 128256, "tie_word_embeddings": false, "rope_theta": 500000.0}"#,
    )
    .unwrap();
    assert_eq!(m.head_dim, 128);
    let p = ParallelConfig {
        tp: 32,
        pp: 8,
        vpp: 1,
        kv_size_multiplier: 4,
        qkv_linear: true,
        fuse_qkv: true,
        coalesce_qkv: false,
        hw: HwBackend::Trn1,
        allow_nxd_trn2_kv_tiling: false,
    };
    let s = expected_source_tensors(&m, "BF16", 2);
    assert_eq!(s.len(), 1 + 80 * 9 + 2);
    let plan = plan(&m, &p, &s).unwrap();
    assert_eq!(plan.files.len(), 256);
    for (i, f) in plan.files.iter().enumerate() {
        assert_eq!((f.tp, f.pp), (i / 8, i % 8));
        assert_eq!(f.layers, (f.pp * 10..f.pp * 10 + 10).collect::<Vec<_>>());
        let expected = 10 * 6 + usize::from(f.pp == 0) + 2 * usize::from(f.pp == 7);
        assert_eq!(f.tensors.len(), expected, "{}", f.file_name);
    }
    let f0 = plan.file(0, 0);
    assert_eq!(f0.tensor(EMBED).unwrap().shape, vec![4008, 8192]);
    let qkv = f0
        .tensor("model.layers.0.self_attn.qkv_proj.weight_qkv")
        .unwrap();
    // q: 64 / (8 x 4) = 2 heads x 128 rows; k, v: 8 x 4 x 128 / 32 = 128 rows each.
    assert_eq!(qkv.shape, vec![512, 8192]);
    let o = f0.tensor("model.layers.0.self_attn.o_proj.weight").unwrap();
    assert_eq!(o.shape, vec![8192, 256]);
    assert!(o.stored_transposed);
    assert_eq!(o.strides(), vec![1, 8192]);
    assert_eq!(
        f0.tensor("model.layers.0.mlp.gate_up_proj.weight")
            .unwrap()
            .shape,
        vec![1792, 8192]
    );
    assert_eq!(
        f0.tensor("model.layers.0.mlp.down_proj.weight")
            .unwrap()
            .shape,
        vec![8192, 896]
    );
    assert_eq!(
        f0.tensor("model.layers.0.input_layernorm.weight")
            .unwrap()
            .shape,
        vec![8192]
    );
    let f7 = plan.file(31, 7);
    let k = keys(f7);
    assert_eq!(k[50], "model.norm.weight");
    assert_eq!(k[51], "lm_head.weight");
    assert_eq!(k[52], "model.layers.70.self_attn.qkv_proj.weight_qkv");
    assert_eq!(k[61], "model.layers.79.self_attn.qkv_proj.weight_qkv");
    let lm = f7.tensor(LM_HEAD).unwrap();
    assert_eq!(lm.shape, vec![4008, 8192]);
    assert_eq!(lm.parts[0].narrow, vec![n(0, 31 * 4008, 4008)]);
    // Rank 1 holds Q8, Q9 and K1 (spec §6).
    let q1 = plan
        .file(1, 0)
        .tensor("model.layers.0.self_attn.qkv_proj.weight_qkv")
        .unwrap();
    assert_eq!(q1.parts[0].narrow, vec![n(0, 8 * 128, 256)]);
    assert_eq!(q1.parts[1].narrow, vec![n(0, 128, 128)]);
    assert_eq!(q1.parts[2].narrow, vec![n(0, 128, 128)]);

    // Bytes: per tp rank, the whole model except that k/v are stored kvm times... / tp.
    let sum = plan.summary();
    let per_layer_rank = (512 + 256 + 1792 + 896) * 8192 * 2 + 2 * 8192 * 2;
    assert_eq!(sum.files[1].bytes, 10 * per_layer_rank as u64);
    let full: u64 = s.iter().map(|t| t.numel() as u64 * 2).sum();
    let kv_extra: u64 = 80 * 2 * (1024 * 8192 * 2) * 3; // k and v stored 4 times, not once
    let norm_extra: u64 = (80 * 2 + 1) * 8192 * 2 * 31; // norms on all 32 tp ranks
    assert_eq!(sum.total_bytes, full + kv_extra + norm_extra);

    // And it inverts.
    let u = plan.unshard().unwrap();
    assert_eq!(u.tensors.len(), s.len());
    let k0 = &u.tensors[2];
    assert_eq!(k0.name, "model.layers.0.self_attn.k_proj.weight");
    assert_eq!(k0.pieces.len(), 8);
    assert_eq!(k0.replicas.len(), 32);
    let q0 = &u.tensors[1];
    // Q head blocks of 2 heads come from ranks 0, 8, 16, 24, 1, 9, ... (block b on rank
    // (b % 4) * 8 + b / 4).
    let files: Vec<usize> = q0.pieces.iter().map(|p| p.file / 8).collect();
    let want: Vec<usize> = (0..32).map(|b| (b % 4) * 8 + b / 4).collect();
    assert_eq!(files, want);
    assert!(q0.pieces.iter().all(|p| p.narrow == vec![n(0, 0, 256)]));
}

fn slice(file: usize, tensor: &str, narrow: Vec<Narrow>) -> ShardSlice {
    ShardSlice {
        file,
        tensor: tensor.into(),
        narrow,
    }
}

/// The inverse of spec §9 with --fuse_qkv, by value: fused qkv split by the real q/k/v row
/// counts (128/32/32, not thirds), gate_up split in halves, o_proj rebuilt from columns.
#[test]
fn unshard_by_value() {
    let m = model_a();
    let s = sources(&m, false);
    let mut p = sec9_parallel();
    p.fuse_qkv = true;
    let plan = plan(&m, &p, &s).unwrap();
    let u = plan.unshard().unwrap();
    assert_eq!(u.files.len(), 4);
    assert_eq!(u.files[2].file_name, "dp_rank_00_tp_rank_01_pp_rank_00.pt");
    assert_eq!(u.tensors.len(), s.len());
    let t = |name: &str| u.tensors.iter().find(|t| t.name == name).unwrap().clone();
    let qkv = "model.layers.0.self_attn.qkv_proj.weight_qkv";

    let q = t("model.layers.0.self_attn.q_proj.weight");
    assert_eq!(q.concat_dim, 0);
    assert_eq!(
        q.pieces,
        vec![
            slice(0, qkv, vec![n(0, 0, 128)]),
            slice(2, qkv, vec![n(0, 0, 128)])
        ]
    );
    let k = t("model.layers.0.self_attn.k_proj.weight");
    assert_eq!(
        k.pieces,
        vec![
            slice(0, qkv, vec![n(0, 128, 32)]),
            slice(2, qkv, vec![n(0, 128, 32)])
        ]
    );
    let v = t("model.layers.0.self_attn.v_proj.weight");
    assert_eq!(
        v.pieces,
        vec![
            slice(0, qkv, vec![n(0, 160, 32)]),
            slice(2, qkv, vec![n(0, 160, 32)])
        ]
    );
    let gu = "model.layers.4.mlp.gate_up_proj.weight";
    let up = t("model.layers.4.mlp.up_proj.weight");
    assert_eq!(
        up.pieces,
        vec![
            slice(1, gu, vec![n(0, 256, 256)]),
            slice(3, gu, vec![n(0, 256, 256)])
        ]
    );
    let gate = t("model.layers.4.mlp.gate_proj.weight");
    assert_eq!(
        gate.pieces,
        vec![
            slice(1, gu, vec![n(0, 0, 256)]),
            slice(3, gu, vec![n(0, 0, 256)])
        ]
    );
    let o = t("model.layers.4.self_attn.o_proj.weight");
    assert_eq!(o.concat_dim, 1);
    let on = "model.layers.4.self_attn.o_proj.weight";
    assert_eq!(o.pieces, vec![slice(1, on, vec![]), slice(3, on, vec![])]);
    let down = t("model.layers.4.mlp.down_proj.weight");
    assert_eq!(down.concat_dim, 1);
    let norm = t("model.layers.4.input_layernorm.weight");
    assert_eq!(
        norm.pieces,
        vec![slice(1, "model.layers.4.input_layernorm.weight", vec![])]
    );
    assert_eq!(norm.replicas.len(), 2);
    assert_eq!(norm.replicas[1].file, 3);
}

/// kv de-replication takes the first replica; every replica is listed (a, tp4, kvm2, trn1:
/// ranks hold K0, K1, K0, K1).
#[test]
fn unshard_kv_replicas() {
    let m = model_a();
    let s = sources(&m, false);
    let mut p = pc(4, 1);
    p.qkv_linear = true;
    p.kv_size_multiplier = 2;
    let u = plan_unshard(&m, &p, &s).unwrap();
    let k = u
        .tensors
        .iter()
        .find(|t| t.name == "model.layers.1.self_attn.k_proj.weight")
        .unwrap();
    let wk = "model.layers.1.self_attn.qkv_proj.weight_k";
    assert_eq!(k.pieces, vec![slice(0, wk, vec![]), slice(1, wk, vec![])]);
    let locs: Vec<(usize, Vec<Narrow>)> = k
        .replicas
        .iter()
        .map(|r| (r.file, r.source_narrow.clone()))
        .collect();
    assert_eq!(
        locs,
        vec![
            (0, vec![n(0, 0, 32)]),
            (1, vec![n(0, 32, 32)]),
            (2, vec![n(0, 0, 32)]),
            (3, vec![n(0, 32, 32)]),
        ]
    );
    // q: trn1 permutation inverted: ranks hold Q0Q1, Q4Q5, Q2Q3, Q6Q7.
    let q = u
        .tensors
        .iter()
        .find(|t| t.name == "model.layers.1.self_attn.q_proj.weight")
        .unwrap();
    let files: Vec<usize> = q.pieces.iter().map(|p| p.file).collect();
    assert_eq!(files, vec![0, 2, 1, 3]);
}

/// Tied embeddings: the unshard plan rebuilds embed_tokens from pp 0 and lists the lm_head
/// shards (last pp rank) as replicas; there is no lm_head output.
#[test]
fn unshard_tied() {
    let m = model_c();
    let s = sources(&m, false);
    let u = plan_unshard(&m, &pc(2, 2), &s).unwrap();
    assert!(u.tensors.iter().all(|t| t.name != LM_HEAD));
    let e = &u.tensors[0];
    assert_eq!(e.name, EMBED);
    assert_eq!(
        e.pieces,
        vec![slice(0, EMBED, vec![]), slice(2, EMBED, vec![]),]
    );
    let reps: Vec<(usize, &str)> = e
        .replicas
        .iter()
        .map(|r| (r.file, r.tensor.as_str()))
        .collect();
    assert_eq!(
        reps,
        vec![(0, EMBED), (1, LM_HEAD), (2, EMBED), (3, LM_HEAD)]
    );
    assert_eq!(e.replicas[3].source_narrow, vec![n(0, 512, 512)]);
}
