//! Plans executed on symbolic tensors, compared with an independent emulator of NxD's converter,
//! and inverted: shard then unshard is the identity, and the accept/refuse decision matches
//! "NxD succeeds and writes a correct (HF-GQA-consistent, complete) checkpoint".

mod common;

use common::*;
use nxd_layout::*;
use proptest::prelude::*;

/// Everything we assert about one (model, parallel) pair.
fn check_case(m: &ModelConfig, p: &ParallelConfig, s: &[SourceTensor]) -> Result<bool, String> {
    let full = nxd_full_state(m, s);
    let nxd = nxd_convert(m, p, &full);
    let tiling_allowed = p.qkv_linear && p.hw == HwBackend::Trn2 && p.allow_nxd_trn2_kv_tiling;
    match plan(m, p, s) {
        Ok(plan) => {
            let nxd = nxd.map_err(|e| format!("accepted but NxD crashes: {e} ({p:?})"))?;
            let ours = execute(&plan);
            assert_same(&ours, &nxd);
            if !tiling_allowed && !nxd_consistent(m, p, s, &nxd) {
                return Err(format!("accepted an inconsistent layout: {m:?} {p:?}"));
            }
            // The stored-transposed flag is exactly o_proj under qkv_linear.
            for f in &plan.files {
                for t in &f.tensors {
                    assert_eq!(
                        t.stored_transposed,
                        p.qkv_linear && t.name.ends_with("self_attn.o_proj.weight"),
                        "{}",
                        t.name
                    );
                }
            }
            // Shard then unshard is the identity (replicas checked inside).
            let u = plan.unshard().map_err(|e| e.to_string())?;
            let back = unshard_execute(&u, &ours);
            assert_eq!(back.len(), s.len());
            for (i, x) in back.iter().enumerate() {
                assert_eq!(*x, Sym::source(i, &s[i].shape), "source {}", s[i].name);
            }
            // Every planned byte is accounted for: sum of replica sizes = sum of tensor sizes.
            let planned: usize = plan
                .files
                .iter()
                .flat_map(|f| &f.tensors)
                .map(|t| t.numel())
                .sum();
            let located: usize = u
                .tensors
                .iter()
                .map(|t| {
                    t.replicas
                        .iter()
                        .map(|r| {
                            narrowed_box(&t.shape, &r.source_narrow)
                                .unwrap()
                                .iter()
                                .map(|x| x.len())
                                .product::<usize>()
                        })
                        .sum::<usize>()
                })
                .sum();
            assert_eq!(planned, located);
            Ok(true)
        }
        Err(e) => {
            assert!(
                e.refusal().is_some(),
                "only refusals for valid sources: {e}"
            );
            if let Ok(nxd) = &nxd {
                if nxd_consistent(m, p, s, nxd) && !tiling_allowed {
                    return Err(format!(
                        "refused a configuration NxD handles correctly: {p:?}: {e}"
                    ));
                }
            }
            Ok(false)
        }
    }
}

/// Spec §1's head structures (a: Q8 KV2 6 layers; b: Q8 KV8 5 layers; c: Q8 KV4 7 layers tied;
/// d: a + inv_freq), scaled down to head_dim 2 so the emulator is fast, over the §14 axes plus
/// coalesce and the trn2 override.
#[test]
fn spec_models_full_matrix_against_nxd_emulator() {
    let mk = |kv: usize, layers: usize, tied: bool| {
        let mut m = model(16, 8, kv, layers, 32, 64);
        m.tie_word_embeddings = tied;
        m
    };
    let models = [
        ("a", mk(2, 6, false), false),
        ("b", mk(8, 5, false), false),
        ("c", mk(4, 7, true), false),
        ("d", mk(2, 6, false), true),
    ];
    let mut accepted = 0;
    let mut total = 0;
    for (name, m, inv) in &models {
        let s = sources(m, *inv);
        for tp in [1, 2, 4, 8] {
            for (pp, vpp) in [(1, 1), (2, 1), (2, 2), (3, 1), (3, 2)] {
                for qkv in [false, true] {
                    for kvm in [1, 2, 4] {
                        for fuse in [false, true] {
                            for hw in [HwBackend::Trn1, HwBackend::Trn2] {
                                for allow in [false, true] {
                                    for coalesce in [false, true] {
                                        let p = ParallelConfig {
                                            tp,
                                            pp,
                                            vpp,
                                            kv_size_multiplier: kvm,
                                            qkv_linear: qkv,
                                            fuse_qkv: fuse,
                                            coalesce_qkv: coalesce,
                                            hw,
                                            allow_nxd_trn2_kv_tiling: allow,
                                        };
                                        total += 1;
                                        match check_case(m, &p, &s) {
                                            Ok(true) => accepted += 1,
                                            Ok(false) => {}
                                            Err(e) => panic!("model {name}: {e}"),
                                        }
                                    }
                                }
                            }
                        }
                    }
                }
            }
        }
    }
    assert!(accepted > 500, "{accepted} of {total}");
}

/// A tiny random model: hidden 16-64, heads 2-8, kv heads dividing heads, 1-7 layers.
fn arb_model() -> impl Strategy<Value = (ModelConfig, bool)> {
    (
        2usize..=8,
        0usize..8,
        1usize..=7,
        0usize..4,
        0usize..4,
        any::<bool>(),
        any::<bool>(),
    )
        .prop_flat_map(|(q, kvi, layers, ii, vi, tied, inv)| {
            let kvs: Vec<usize> = (1..=q).filter(|k| q % k == 0).collect();
            let kv = kvs[kvi % kvs.len()];
            let hds: Vec<usize> = [2, 4, 8]
                .into_iter()
                .filter(|hd| (16..=64).contains(&(q * hd)))
                .collect();
            (
                Just((q, kv, layers, ii, vi, tied, inv)),
                proptest::sample::select(hds),
            )
        })
        .prop_map(|((q, kv, layers, ii, vi, tied, inv), hd)| {
            let h = q * hd;
            let inter = [h, 2 * h, 24, 40][ii];
            let vocab = [32, 48, 64, 40][vi];
            let mut m = model(h, q, kv, layers, inter, vocab);
            m.tie_word_embeddings = tied;
            (m, inv)
        })
}

fn arb_parallel() -> impl Strategy<Value = ParallelConfig> {
    (
        1usize..=8,
        1usize..=3,
        1usize..=2,
        1usize..=4,
        any::<bool>(),
        any::<bool>(),
        prop::bool::weighted(0.15),
        any::<bool>(),
        any::<bool>(),
    )
        .prop_map(
            |(tp, pp, vpp, kvm, qkv, fuse, coalesce, trn2, allow)| ParallelConfig {
                tp,
                pp,
                vpp,
                kv_size_multiplier: kvm,
                qkv_linear: qkv,
                fuse_qkv: fuse,
                coalesce_qkv: coalesce,
                hw: if trn2 {
                    HwBackend::Trn2
                } else {
                    HwBackend::Trn1
                },
                allow_nxd_trn2_kv_tiling: allow,
            },
        )
}

/// Every parallel config (over the axes above) that validates for `m`.
fn valid_configs(m: &ModelConfig) -> Vec<ParallelConfig> {
    let mut out = Vec::new();
    for tp in 1..=8 {
        for pp in 1..=3 {
            for vpp in 1..=2 {
                for kvm in 1..=4 {
                    for bits in 0..32u32 {
                        let p = ParallelConfig {
                            tp,
                            pp,
                            vpp,
                            kv_size_multiplier: kvm,
                            qkv_linear: bits & 1 != 0,
                            fuse_qkv: bits & 2 != 0,
                            coalesce_qkv: bits & 4 != 0,
                            hw: if bits & 8 != 0 {
                                HwBackend::Trn2
                            } else {
                                HwBackend::Trn1
                            },
                            allow_nxd_trn2_kv_tiling: bits & 16 != 0,
                        };
                        if validate(m, &p).is_ok() {
                            out.push(p);
                        }
                    }
                }
            }
        }
    }
    out
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    /// Random (model, parallel), accepted or not: accepted => NxD succeeds, our plan equals its
    /// output element by element, the layout is consistent, and unshard inverts it; refused =>
    /// NxD crashes or is wrong.
    #[test]
    fn random_configs_match_nxd((m, inv) in arb_model(), p in arb_parallel()) {
        let s = sources(&m, inv);
        if let Err(e) = check_case(&m, &p, &s) {
            prop_assert!(false, "{}", e);
        }
    }

    /// Random model, random *valid* parallel config: shard then unshard is the identity.
    #[test]
    fn valid_configs_round_trip((m, inv) in arb_model(), pick in any::<prop::sample::Index>()) {
        let configs = valid_configs(&m);
        // tp 1, pp 1 always works.
        prop_assert!(!configs.is_empty());
        let p = pick.get(&configs);
        let s = sources(&m, inv);
        prop_assert_eq!(check_case(&m, p, &s), Ok(true));
    }

    /// canonical_order is a permutation that puts any shuffle of a Llama key set back in
    /// state-dict order.
    #[test]
    fn canonical_order_undoes_shuffles(
        (m, inv) in arb_model(),
        perm in Just(()).prop_flat_map(|_| prop::collection::vec(any::<u32>(), 80)),
    ) {
        let s = sources(&m, inv);
        let mut shuffled: Vec<&str> = s.iter().map(|t| t.name.as_str()).collect();
        // deterministic shuffle driven by perm
        for (i, r) in perm.iter().enumerate() {
            let n = shuffled.len();
            shuffled.swap(i % n, *r as usize % n);
        }
        let order = canonical_order(&shuffled);
        let mut seen = order.clone();
        seen.sort();
        prop_assert_eq!(seen, (0..shuffled.len()).collect::<Vec<_>>());
        let sorted: Vec<&str> = order.iter().map(|&i| shuffled[i]).collect();
        let want: Vec<&str> = s.iter().map(|t| t.name.as_str()).collect();
        prop_assert_eq!(sorted, want);
    }
}
