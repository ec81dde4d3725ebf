//! Which (model, parallel) configurations are planned, and why the others are refused.
//!
//! The rule: refuse every configuration where NxD's converter crashes (spec §11) and every one
//! where it is silently wrong (spec §12); accept the rest and reproduce NxD exactly. The one
//! deliberate exception is [`ParallelConfig::allow_nxd_trn2_kv_tiling`], which accepts NxD's
//! non-GQA-consistent trn2 layouts on request.

use crate::config::{HwBackend, ModelConfig, ParallelConfig};
use crate::error::{LayoutError, Refusal};
use crate::heads::{kv_heads, kv_rows, q_heads, q_rows};

/// Checks that `parallel` can shard `model` the way NxD does, and that the result is correct.
///
/// Accepted configurations are exactly those where NxD's `--convert_from_full_state` succeeds
/// and writes an HF-GQA-consistent checkpoint with every head present once (every rank's q heads
/// sit with their own kv heads under `repeat_kv` pairing), plus, with
/// [`ParallelConfig::allow_nxd_trn2_kv_tiling`], NxD's trn2 layouts that are not consistent.
///
/// In detail (Q, KV heads; hd head_dim; H hidden; I intermediate; V vocab; L layers):
/// * every degree >= 1; pp·vpp <= L (NxD's `create_partitions` asserts);
/// * V % tp == 0 and I % tp == 0 (NxD asserts when splitting embed/lm_head and the MLP);
/// * Q % tp == 0 (otherwise a rank holds part of a q head, or NxD drops heads);
/// * `coalesce_qkv`: not with `qkv_linear` (NxD crashes), only for MHA (KV == Q) with Q·hd == H;
/// * without `qkv_linear`: KV % tp == 0 (otherwise k/v heads are split across ranks: NxD accepts
///   it but the shards are not head-aligned; the fix is `qkv_linear` with a kv size multiplier);
/// * with `qkv_linear`: hd == H/Q (NxD derives head_dim that way), and
///   * trn1: tp == KV·kvm (tp < KV, tp > KV·kvm and KV·kvm > Q crash in NxD; KV <= tp < KV·kvm
///     silently drops q heads);
///   * trn2: KV·kvm·hd % tp == 0 (NxD asserts); without the override also the layout must be
///     HF-GQA-consistent, which means kvm == 1 and KV % tp == 0, or KV == 1 (multi-query: every
///     q head uses the one kv head, so tiling cannot mispair) with whole heads per rank;
///     otherwise q heads are paired with the wrong kv heads.
///
/// Every accepted layout (except trn2 with the override) is additionally checked to be
/// HF-GQA-consistent: each rank holds whole q and kv heads, every q head exactly once over the
/// ranks, and local q head i sits with local kv head i / (local q heads / local kv heads).
///
/// `fuse_qkv`, `hw` and `kv_size_multiplier` have no effect without `qkv_linear` (as in NxD).
pub fn validate(model: &ModelConfig, parallel: &ParallelConfig) -> Result<(), LayoutError> {
    check(model, parallel, true)
}

/// Settings that pass [`validate`] for `model` when only tp (and, for trn1 with `qkv_linear`,
/// the kv size multiplier, which must then be tp/KV) changes: `(tp, kv_size_multiplier)` pairs,
/// ascending by tp. Candidates are tp in 1..=Q (tp must divide Q).
pub fn working_tp_sizes(model: &ModelConfig, parallel: &ParallelConfig) -> Vec<(usize, usize)> {
    let mut out = Vec::new();
    for tp in 1..=model.num_attention_heads {
        let mut p = parallel.clone();
        p.tp = tp;
        if p.qkv_linear && p.hw == HwBackend::Trn1 {
            if tp % model.num_key_value_heads != 0 {
                continue;
            }
            p.kv_size_multiplier = tp / model.num_key_value_heads;
        }
        if check(model, &p, false).is_ok() {
            out.push((tp, p.kv_size_multiplier));
        }
    }
    out
}

fn working_text(model: &ModelConfig, parallel: &ParallelConfig) -> String {
    let w = working_tp_sizes(model, parallel);
    if w.is_empty() {
        return "no tp size works for this model with these other settings".to_string();
    }
    let show_kvm = parallel.qkv_linear && parallel.hw == HwBackend::Trn1;
    let items: Vec<String> = w
        .iter()
        .map(|(tp, kvm)| {
            if show_kvm {
                format!("tp {tp} with --kv-size-multiplier {kvm}")
            } else {
                format!("tp {tp}")
            }
        })
        .collect();
    format!("settings that work: {}", items.join(", "))
}

fn refuse(reason: Refusal, msg: String) -> Result<(), LayoutError> {
    Err(LayoutError::refused(reason, msg))
}

/// The checks. With `suggest`, messages end with the tp sizes that work (computed by re-running
/// the checks without suggestions).
fn check(m: &ModelConfig, p: &ParallelConfig, suggest: bool) -> Result<(), LayoutError> {
    m.check()?;
    let sug = |s: String| -> String {
        if suggest {
            format!("{s}; {}", working_text(m, p))
        } else {
            s
        }
    };
    let (q, kv, hd, h) = (
        m.num_attention_heads,
        m.num_key_value_heads,
        m.head_dim,
        m.hidden_size,
    );
    let (tp, kvm) = (p.tp, p.kv_size_multiplier);

    for (flag, v) in [
        ("tp", p.tp),
        ("pp", p.pp),
        ("vpp", p.vpp),
        ("kv size multiplier", p.kv_size_multiplier),
    ] {
        if v == 0 {
            return refuse(
                Refusal::Invalid,
                format!("{flag} must be at least 1, got 0"),
            );
        }
    }

    let l = m.num_hidden_layers;
    if p.stages() > l {
        return refuse(
            Refusal::NxdCrashes,
            format!(
                "pp {} x vpp {} = {} pipeline stages > num_hidden_layers {l}: every stage needs at \
                 least one layer (NxD's create_partitions asserts); use pp x vpp <= {l}",
                p.pp,
                p.vpp,
                p.stages()
            ),
        );
    }

    if p.coalesce_qkv {
        if p.qkv_linear {
            return refuse(
                Refusal::NxdCrashes,
                "--coalesce-qkv with --qkv-linear crashes NxD (torch.cat of an empty list); use \
                 one or the other"
                    .to_string(),
            );
        }
        if m.is_gqa() {
            return refuse(
                Refusal::NxdCrashes,
                format!(
                    "--coalesce-qkv needs multi-head attention, but this model has {q} q heads and \
                     {kv} kv heads (NxD slices k/v by hidden_size/tp rows and crashes); use \
                     --qkv-linear instead"
                ),
            );
        }
        if q * hd != h {
            return refuse(
                Refusal::NxdSilentlyWrong,
                format!(
                    "--coalesce-qkv slices q/k/v by hidden_size/tp rows, but num_attention_heads \
                     {q} x head_dim {hd} = {} != hidden_size {h}; drop --coalesce-qkv",
                    q * hd
                ),
            );
        }
    }

    if !m.vocab_size.is_multiple_of(tp) {
        return refuse(
            Refusal::NxdCrashes,
            sug(format!(
                "vocab_size {} is not divisible by tp {tp} (NxD asserts when splitting \
                 embed_tokens/lm_head rows)",
                m.vocab_size
            )),
        );
    }
    if !m.intermediate_size.is_multiple_of(tp) {
        return refuse(
            Refusal::NxdCrashes,
            sug(format!(
                "intermediate_size {} is not divisible by tp {tp} (NxD asserts when splitting \
                 gate/up rows and down_proj columns)",
                m.intermediate_size
            )),
        );
    }

    if p.qkv_linear {
        if m.nxd_head_dim() * q != h || m.nxd_head_dim() != hd {
            return refuse(
                Refusal::NxdSilentlyWrong,
                format!(
                    "with --qkv-linear NxD reshapes q/o_proj into heads of hidden_size / \
                     num_attention_heads = {h}/{q} rows, but this model's head_dim is {hd}; \
                     drop --qkv-linear"
                ),
            );
        }
        match p.hw {
            HwBackend::Trn1 => check_trn1(m, p, suggest)?,
            HwBackend::Trn2 => {
                if q % tp != 0 {
                    return refuse(
                        Refusal::NxdSilentlyWrong,
                        sug(format!(
                            "num_attention_heads {q} is not divisible by tp {tp}: on trn2 NxD \
                             gives each rank {q}/{tp} = {} q heads and silently drops the rest",
                            q / tp
                        )),
                    );
                }
                if (kv * kvm * hd) % tp != 0 {
                    return refuse(
                        Refusal::NxdCrashes,
                        sug(format!(
                            "num_key_value_heads {kv} x kv size multiplier {kvm} x head_dim {hd} = \
                             {} rows is not divisible by tp {tp} (NxD asserts)",
                            kv * kvm * hd
                        )),
                    );
                }
                if !p.allow_nxd_trn2_kv_tiling && !gqa_consistent(m, p) {
                    if kvm > 1 {
                        return refuse(
                            Refusal::NxdSilentlyWrong,
                            format!(
                                "--kv-size-multiplier {kvm} on trn2: NxD tiles the kv heads \
                                 (K0..K{} repeated) but gives each rank contiguous q heads, so q \
                                 heads sit with the wrong kv heads; use --hw-backend trn1 with tp \
                                 = {kv} x kvm, or kvm 1 with a tp that divides {kv}, or \
                                 --allow-nxd-trn2-kv-tiling to reproduce NxD's layout anyway",
                                kv - 1
                            ),
                        );
                    }
                    let trn1 = if tp % kv == 0 && tp <= q {
                        format!(
                            "--hw-backend trn1 --kv-size-multiplier {} (tp = kv heads x kvm), or ",
                            tp / kv
                        )
                    } else {
                        String::new()
                    };
                    return refuse(
                        Refusal::NxdSilentlyWrong,
                        format!(
                            "tp {tp} does not divide num_key_value_heads {kv} on trn2 with \
                             --qkv-linear and kvm 1, so k/v heads are split across ranks away \
                             from their q heads; use a tp that divides {kv}, or {trn1}\
                             --allow-nxd-trn2-kv-tiling to reproduce NxD's layout anyway"
                        ),
                    );
                }
            }
        }
    } else {
        if (q * hd) % tp != 0 {
            return refuse(
                Refusal::NxdCrashes,
                sug(format!(
                    "q_proj rows num_attention_heads {q} x head_dim {hd} = {} are not divisible \
                     by tp {tp} (NxD asserts)",
                    q * hd
                )),
            );
        }
        if q % tp != 0 {
            return refuse(
                Refusal::NxdSilentlyWrong,
                sug(format!(
                    "num_attention_heads {q} is not divisible by tp {tp}, so NxD would split a q \
                     head across ranks"
                )),
            );
        }
        if (kv * hd) % tp != 0 {
            return refuse(
                Refusal::NxdCrashes,
                sug(format!(
                    "k/v_proj rows num_key_value_heads {kv} x head_dim {hd} = {} are not \
                     divisible by tp {tp} (NxD asserts)",
                    kv * hd
                )),
            );
        }
        if kv % tp != 0 {
            if tp > kv && tp % kv == 0 {
                let hw = if p.hw == HwBackend::Trn2 {
                    " --hw-backend trn1"
                } else {
                    ""
                };
                return refuse(
                    Refusal::NxdSilentlyWrong,
                    format!(
                        "tp {tp} > num_key_value_heads {kv} without --qkv-linear splits k/v heads \
                         across ranks (NxD accepts it, but the shards are not head-aligned); add \
                         --qkv-linear --kv-size-multiplier {}{hw}",
                        tp / kv
                    ),
                );
            }
            return refuse(
                Refusal::NxdSilentlyWrong,
                sug(format!(
                    "tp {tp} does not divide num_key_value_heads {kv}, so without --qkv-linear \
                     NxD splits k/v heads across ranks"
                )),
            );
        }
    }
    let tiling_allowed = p.qkv_linear && p.hw == HwBackend::Trn2 && p.allow_nxd_trn2_kv_tiling;
    if !tiling_allowed && !gqa_consistent(m, p) {
        // Not reachable with the checks above; kept so that no inconsistent layout slips through.
        return refuse(
            Refusal::NxdSilentlyWrong,
            sug(format!(
                "with these settings some rank's q heads would not sit with their own kv heads \
                 (tp {tp}, kv size multiplier {kvm}, {})",
                p.hw
            )),
        );
    }
    Ok(())
}

/// True if every rank holds whole q and kv heads, each q head exactly once over all ranks, and
/// every local q head sits with its own kv head under `repeat_kv` (repeat_interleave) pairing:
/// local q head i uses local kv head `i / (local q heads / local kv heads)`.
///
/// Needs the divisibility checks done first (Q % tp and the kv row count % tp).
fn gqa_consistent(m: &ModelConfig, p: &ParallelConfig) -> bool {
    let hd = m.head_dim;
    let group = m.num_attention_heads / m.num_key_value_heads;
    let aligned =
        |rs: &[std::ops::Range<usize>]| rs.iter().all(|r| r.start % hd == 0 && r.len() % hd == 0);
    let mut seen = vec![0usize; m.num_attention_heads];
    for r in 0..p.tp {
        let (qr, kr) = (q_rows(m, p, r), kv_rows(m, p, r));
        if !aligned(&qr) || !aligned(&kr) {
            return false;
        }
        let (qh, kh) = (q_heads(m, p, r), kv_heads(m, p, r));
        if kh.is_empty() || qh.len() % kh.len() != 0 {
            return false;
        }
        let g = qh.len() / kh.len();
        for (i, &h) in qh.iter().enumerate() {
            if h >= seen.len() || h / group != kh[i / g] {
                return false;
            }
            seen[h] += 1;
        }
    }
    seen.iter().all(|&n| n == 1)
}

fn check_trn1(m: &ModelConfig, p: &ParallelConfig, suggest: bool) -> Result<(), LayoutError> {
    let (q, kv) = (m.num_attention_heads, m.num_key_value_heads);
    let (tp, kvm) = (p.tp, p.kv_size_multiplier);
    let sug = |s: String| -> String {
        if suggest {
            format!("{s}; {}", working_text(m, p))
        } else {
            s
        }
    };
    let kvt = kv * kvm;
    if kvt > q {
        return refuse(
            Refusal::NxdCrashes,
            sug(format!(
                "num_key_value_heads {kv} x kv size multiplier {kvm} = {kvt} > num_attention_heads \
                 {q} on trn1 with --qkv-linear (NxD crashes reshaping q into blocks of 0 heads); \
                 the multiplier can be at most {}",
                q / kv
            )),
        );
    }
    if tp < kv {
        return refuse(
            Refusal::NxdCrashes,
            sug(format!(
                "tp {tp} < num_key_value_heads {kv} with --qkv-linear on trn1 (NxD crashes: \
                 torch.cat of an empty list); tp must equal num_key_value_heads x kv size \
                 multiplier"
            )),
        );
    }
    let fix = if tp % kv == 0 && tp <= q && q % tp == 0 {
        format!("use --kv-size-multiplier {} (tp = kv heads x kvm)", tp / kv)
    } else if suggest {
        working_text(m, p)
    } else {
        "tp must equal kv heads x kvm".to_string()
    };
    if tp > kvt {
        return refuse(
            Refusal::NxdCrashes,
            format!(
                "tp {tp} > num_key_value_heads {kv} x kv size multiplier {kvm} = {kvt} with \
                 --qkv-linear on trn1 (NxD crashes: q head-block index out of bounds); {fix}"
            ),
        );
    }
    if tp < kvt {
        return refuse(
            Refusal::NxdSilentlyWrong,
            format!(
                "tp {tp} < num_key_value_heads {kv} x kv size multiplier {kvm} = {kvt} with \
                 --qkv-linear on trn1: NxD silently drops q heads (each rank keeps {q}/{kvt} \
                 instead of {q}/{tp}); tp must equal kv heads x kvm: {fix}"
            ),
        );
    }
    if q % tp != 0 {
        return refuse(
            Refusal::NxdSilentlyWrong,
            sug(format!(
                "num_attention_heads {q} is not divisible by tp {tp} = kv heads x kvm on trn1 with \
                 --qkv-linear: NxD silently drops {} q heads",
                q - tp * (q / tp)
            )),
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn model(q: usize, kv: usize, layers: usize) -> ModelConfig {
        ModelConfig {
            hidden_size: 256,
            num_attention_heads: q,
            num_key_value_heads: kv,
            num_hidden_layers: layers,
            intermediate_size: 512,
            vocab_size: 1024,
            tie_word_embeddings: false,
            head_dim: 256 / q,
        }
    }

    fn a() -> ModelConfig {
        model(8, 2, 6)
    }
    fn b() -> ModelConfig {
        model(8, 8, 5)
    }
    fn c() -> ModelConfig {
        let mut m = model(8, 4, 7);
        m.tie_word_embeddings = true;
        m
    }

    fn pc(
        tp: usize,
        pp: usize,
        vpp: usize,
        qkv: bool,
        kvm: usize,
        hw: HwBackend,
    ) -> ParallelConfig {
        ParallelConfig {
            tp,
            pp,
            vpp,
            kv_size_multiplier: kvm,
            qkv_linear: qkv,
            fuse_qkv: false,
            coalesce_qkv: false,
            hw,
            allow_nxd_trn2_kv_tiling: false,
        }
    }

    /// Spec §14: accepted by us iff NxD's forward conversion is accepted AND the result is
    /// HF-GQA-consistent ("OK" without `*` in the forward sense).
    fn expected_ok(name: &str, m: &ModelConfig, p: &ParallelConfig) -> bool {
        if p.stages() > m.num_hidden_layers {
            return false;
        }
        let (tp, kvm) = (p.tp, p.kv_size_multiplier);
        if !p.qkv_linear {
            return match name {
                "a" => tp <= 2,
                "b" => true,
                "c" => tp <= 4,
                _ => unreachable!(),
            };
        }
        match (p.hw, name) {
            (HwBackend::Trn1, "a") => [(2, 1), (4, 2), (8, 4)].contains(&(tp, kvm)),
            (HwBackend::Trn1, "b") => (tp, kvm) == (8, 1),
            (HwBackend::Trn1, "c") => [(4, 1), (8, 2)].contains(&(tp, kvm)),
            (HwBackend::Trn2, _) => {
                if p.allow_nxd_trn2_kv_tiling {
                    true
                } else {
                    kvm == 1 && tp <= m.num_key_value_heads
                }
            }
            _ => unreachable!(),
        }
    }

    #[test]
    fn spec_matrix_section_14() {
        let mut accepted = 0;
        for (name, m) in [("a", a()), ("b", b()), ("c", c())] {
            for tp in [1, 2, 4, 8] {
                for pp in [1, 2, 3] {
                    for vpp in [1, 2] {
                        for qkv in [false, true] {
                            for kvm in [1, 2, 4] {
                                for hw in [HwBackend::Trn1, HwBackend::Trn2] {
                                    for allow in [false, true] {
                                        for fuse in [false, true] {
                                            let mut p = pc(tp, pp, vpp, qkv, kvm, hw);
                                            p.allow_nxd_trn2_kv_tiling = allow;
                                            p.fuse_qkv = fuse;
                                            let got = validate(&m, &p);
                                            let want = expected_ok(name, &m, &p);
                                            assert_eq!(
                                                got.is_ok(),
                                                want,
                                                "model {name} {p:?}: {got:?}"
                                            );
                                            if got.is_ok() {
                                                accepted += 1;
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
        assert!(accepted > 0);
    }

    fn msg(m: &ModelConfig, p: &ParallelConfig) -> (Refusal, String) {
        match validate(m, p) {
            Err(LayoutError::Refused { reason, message }) => {
                assert!(!message.contains('\n'), "one line: {message}");
                (reason, message)
            }
            other => panic!("expected a refusal, got {other:?}"),
        }
    }

    #[test]
    fn refusal_messages_say_why_and_what_works() {
        let (r, s) = msg(&a(), &pc(4, 1, 1, false, 1, HwBackend::Trn1));
        assert_eq!(r, Refusal::NxdSilentlyWrong);
        assert!(s.starts_with("tp 4 > num_key_value_heads 2 without --qkv-linear splits k/v heads"));
        assert!(s.contains("add --qkv-linear --kv-size-multiplier 2"), "{s}");

        let (r, s) = msg(&a(), &pc(2, 1, 1, true, 4, HwBackend::Trn1));
        assert_eq!(r, Refusal::NxdSilentlyWrong);
        assert!(
            s.contains("drops q heads") && s.contains("--kv-size-multiplier 1"),
            "{s}"
        );

        let (r, s) = msg(&a(), &pc(1, 1, 1, true, 1, HwBackend::Trn1));
        assert_eq!(r, Refusal::NxdCrashes);
        assert!(s.contains("empty list"), "{s}");
        assert!(
            s.contains("tp 2 with --kv-size-multiplier 1")
                && s.contains("tp 4 with --kv-size-multiplier 2")
                && s.contains("tp 8 with --kv-size-multiplier 4"),
            "{s}"
        );

        let (r, s) = msg(&a(), &pc(8, 1, 1, true, 2, HwBackend::Trn1));
        assert_eq!(r, Refusal::NxdCrashes);
        assert!(
            s.contains("out of bounds") && s.contains("--kv-size-multiplier 4"),
            "{s}"
        );

        let (r, s) = msg(&b(), &pc(8, 1, 1, true, 2, HwBackend::Trn1));
        assert_eq!(r, Refusal::NxdCrashes);
        assert!(s.contains("at most 1"), "{s}");

        let (r, s) = msg(&a(), &pc(8, 1, 1, true, 4, HwBackend::Trn2));
        assert_eq!(r, Refusal::NxdSilentlyWrong);
        assert!(
            s.contains("--allow-nxd-trn2-kv-tiling") && s.contains("wrong kv heads"),
            "{s}"
        );

        let (r, s) = msg(&a(), &pc(4, 1, 1, true, 1, HwBackend::Trn2));
        assert_eq!(r, Refusal::NxdSilentlyWrong);
        assert!(
            s.contains("--hw-backend trn1 --kv-size-multiplier 2"),
            "{s}"
        );

        let (r, s) = msg(&b(), &pc(2, 3, 2, false, 1, HwBackend::Trn1));
        assert_eq!(r, Refusal::NxdCrashes);
        assert!(s.contains("6 pipeline stages > num_hidden_layers 5"), "{s}");

        let mut p = pc(2, 1, 1, true, 1, HwBackend::Trn1);
        p.coalesce_qkv = true;
        assert_eq!(msg(&b(), &p).0, Refusal::NxdCrashes);
        let mut p = pc(2, 1, 1, false, 1, HwBackend::Trn1);
        p.coalesce_qkv = true;
        let (r, s) = msg(&a(), &p);
        assert_eq!(r, Refusal::NxdCrashes);
        assert!(s.contains("multi-head"), "{s}");
        assert!(validate(&b(), &p).is_ok());

        let mut m = a();
        m.vocab_size = 1000;
        let (r, s) = msg(&m, &pc(16, 1, 1, false, 1, HwBackend::Trn1));
        assert_eq!(r, Refusal::NxdCrashes);
        assert!(
            s.contains("vocab_size 1000 is not divisible by tp 16"),
            "{s}"
        );
        assert!(s.contains("settings that work: tp 1, tp 2"), "{s}");

        let mut m = a();
        m.intermediate_size = 510;
        let (_, s) = msg(&m, &pc(4, 1, 1, true, 2, HwBackend::Trn1));
        assert!(s.contains("intermediate_size 510"), "{s}");
        assert!(s.contains("tp 2 with --kv-size-multiplier 1"), "{s}");

        let (r, _) = msg(&a(), &pc(0, 1, 1, false, 1, HwBackend::Trn1));
        assert_eq!(r, Refusal::Invalid);
    }

    #[test]
    fn head_dim_must_match_nxd_under_qkv_linear() {
        let mut m = a();
        m.head_dim = 64; // q rows 512 != hidden 256
        let p = pc(2, 1, 1, true, 1, HwBackend::Trn1);
        assert_eq!(msg(&m, &p).0, Refusal::NxdSilentlyWrong);
        // Without qkv_linear the rows are split plainly and stay head-aligned.
        assert!(validate(&m, &pc(2, 1, 1, false, 1, HwBackend::Trn1)).is_ok());
    }

    #[test]
    fn trn1_q_not_divisible_by_tp() {
        // Q 6, KV 2, kvm 2, tp 4: NxD keeps 6 // 4 = 1 head per rank and drops Q4, Q5.
        let mut m = model(6, 2, 2);
        m.hidden_size = 192;
        m.head_dim = 32;
        m.vocab_size = 1536;
        m.intermediate_size = 768;
        let (r, s) = msg(&m, &pc(4, 1, 1, true, 2, HwBackend::Trn1));
        assert_eq!(r, Refusal::NxdSilentlyWrong);
        assert!(s.contains("drops 2 q heads"), "{s}");
        assert_eq!(
            working_tp_sizes(&m, &pc(4, 1, 1, true, 2, HwBackend::Trn1)),
            vec![(2, 1), (6, 3)]
        );
    }

    #[test]
    fn trn2_multi_query_tiling_is_consistent() {
        // KV 1: every q head uses K0, so NxD's tiling cannot mispair them.
        let mut m = model(4, 1, 2);
        m.head_dim = 64;
        let p = pc(2, 1, 1, true, 2, HwBackend::Trn2);
        validate(&m, &p).unwrap();
        // ... but a k shard must still hold whole heads.
        let p = pc(4, 1, 1, true, 2, HwBackend::Trn2);
        assert_eq!(msg(&m, &p).0, Refusal::NxdSilentlyWrong);
        let mut p = p;
        p.allow_nxd_trn2_kv_tiling = true;
        validate(&m, &p).unwrap();
    }

    #[test]
    fn seventy_b_seed_layout_is_valid() {
        let m = ModelConfig {
            hidden_size: 8192,
            num_attention_heads: 64,
            num_key_value_heads: 8,
            num_hidden_layers: 80,
            intermediate_size: 28672,
            vocab_size: 128256,
            tie_word_embeddings: false,
            head_dim: 128,
        };
        let mut p = pc(32, 8, 1, true, 4, HwBackend::Trn1);
        p.fuse_qkv = true;
        validate(&m, &p).unwrap();
        p.kv_size_multiplier = 2;
        assert!(validate(&m, &p).is_err());
    }
}
