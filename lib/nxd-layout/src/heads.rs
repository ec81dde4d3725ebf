//! Which rows of q/k/v_proj (and columns of o_proj) each tp rank holds (spec §5, §6).
//!
//! These functions assume [`crate::validate`] accepted the configuration.

use std::ops::Range;

use crate::config::{HwBackend, ModelConfig, ParallelConfig};

/// The rows of `q_proj.weight` that tp rank `rank` holds, in the order they appear in the
/// rank's q shard (the same ranges, as columns of `o_proj.weight`, make its o_proj shard).
///
/// * Without `qkv_linear` (or with `coalesce_qkv`): chunk `rank` of tp equal row chunks.
/// * `qkv_linear` on trn1: q heads cut into KV·kvm blocks of n = Q/(KV·kvm) consecutive heads;
///   rank r gets block `(r % KV)·(tp/KV) + r / KV`.
/// * `qkv_linear` on trn2: heads `[r·Q/tp, (r+1)·Q/tp)`.
pub fn q_rows(model: &ModelConfig, parallel: &ParallelConfig, rank: usize) -> Vec<Range<usize>> {
    let hd = model.head_dim;
    let q = model.num_attention_heads;
    let kv = model.num_key_value_heads;
    let tp = parallel.tp;
    if !parallel.qkv_linear {
        let c = q * hd / tp;
        let chunk = rank * c..(rank + 1) * c;
        return vec![chunk];
    }
    match parallel.hw {
        HwBackend::Trn1 => {
            let n = q / (kv * parallel.kv_size_multiplier);
            let block = (rank % kv) * (tp / kv) + rank / kv;
            let rows = block * n * hd..(block + 1) * n * hd;
            vec![rows]
        }
        HwBackend::Trn2 => {
            let per = q / tp;
            let rows = rank * per * hd..(rank + 1) * per * hd;
            vec![rows]
        }
    }
}

/// The rows of `k_proj.weight` (identically `v_proj.weight`) that tp rank `rank` holds, in order.
///
/// * Without `qkv_linear`: chunk `rank` of tp equal row chunks.
/// * With `qkv_linear` (both backends): chunk `rank` of tp equal row chunks of the *tiled*
///   `k.repeat(kvm, 1)` (K0..K{KV-1}, K0..K{KV-1}, ...), returned as ranges of the original
///   rows (a chunk that crosses a tile boundary gives several ranges).
pub fn kv_rows(model: &ModelConfig, parallel: &ParallelConfig, rank: usize) -> Vec<Range<usize>> {
    let rows = model.kv_rows();
    let tp = parallel.tp;
    if !parallel.qkv_linear {
        let c = rows / tp;
        let chunk = rank * c..(rank + 1) * c;
        return vec![chunk];
    }
    let total = rows * parallel.kv_size_multiplier;
    let c = total / tp;
    tiled_segments(rows, rank * c, c)
}

/// Rows `[start, start+len)` of `x.repeat(k, 1)` for an `x` of `rows` rows, as ranges of `x`.
fn tiled_segments(rows: usize, start: usize, len: usize) -> Vec<Range<usize>> {
    let mut out = Vec::new();
    let mut pos = start;
    let end = start + len;
    while pos < end {
        let within = pos % rows;
        let take = (rows - within).min(end - pos);
        out.push(within..within + take);
        pos += take;
    }
    out
}

/// The q head indices (of Q) that tp rank `rank` holds, in order. Only meaningful for
/// head-aligned layouts (every accepted one).
pub fn q_heads(model: &ModelConfig, parallel: &ParallelConfig, rank: usize) -> Vec<usize> {
    heads_of(&q_rows(model, parallel, rank), model.head_dim)
}

/// The kv head indices (of KV) that tp rank `rank` holds, in order, replicas included.
/// Only meaningful for head-aligned layouts.
pub fn kv_heads(model: &ModelConfig, parallel: &ParallelConfig, rank: usize) -> Vec<usize> {
    heads_of(&kv_rows(model, parallel, rank), model.head_dim)
}

fn heads_of(ranges: &[Range<usize>], hd: usize) -> Vec<usize> {
    ranges
        .iter()
        .flat_map(|r| (r.start / hd)..r.end.div_ceil(hd))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn a() -> ModelConfig {
        ModelConfig {
            hidden_size: 256,
            num_attention_heads: 8,
            num_key_value_heads: 2,
            num_hidden_layers: 6,
            intermediate_size: 512,
            vocab_size: 1024,
            tie_word_embeddings: false,
            head_dim: 32,
        }
    }

    fn p(tp: usize, kvm: usize, hw: HwBackend) -> ParallelConfig {
        let mut p = ParallelConfig::new(tp, 1);
        p.qkv_linear = true;
        p.kv_size_multiplier = kvm;
        p.hw = hw;
        p
    }

    fn table(tp: usize, kvm: usize, hw: HwBackend) -> Vec<(Vec<usize>, Vec<usize>)> {
        let (m, p) = (a(), p(tp, kvm, hw));
        (0..tp)
            .map(|r| (q_heads(&m, &p, r), kv_heads(&m, &p, r)))
            .collect()
    }

    /// Spec §6, "Heads per tp rank, model a (Q8, KV2), layer 0" (including the cells that
    /// `validate` refuses: the planner's arithmetic reproduces NxD there too).
    #[test]
    fn spec_head_table() {
        use HwBackend::*;
        let v = |x: &[usize]| x.to_vec();
        // tp2 kvm1: r0[Q0-3|K0] r1[Q4-7|K1], both backends
        for hw in [Trn1, Trn2] {
            assert_eq!(
                table(2, 1, hw),
                vec![(v(&[0, 1, 2, 3]), v(&[0])), (v(&[4, 5, 6, 7]), v(&[1]))]
            );
        }
        // tp2 kvm4 trn1: r0[Q0|K0K1K0K1] r1[Q1|...]: Q2-7 dropped
        assert_eq!(
            table(2, 4, Trn1),
            vec![(v(&[0]), v(&[0, 1, 0, 1])), (v(&[1]), v(&[0, 1, 0, 1]))]
        );
        // tp2 kvm4 trn2: r0[Q0-3|K0K1K0K1] r1[Q4-7|...]
        assert_eq!(
            table(2, 4, Trn2),
            vec![
                (v(&[0, 1, 2, 3]), v(&[0, 1, 0, 1])),
                (v(&[4, 5, 6, 7]), v(&[0, 1, 0, 1]))
            ]
        );
        // tp4 kvm2 trn1: r0[Q0Q1|K0] r1[Q4Q5|K1] r2[Q2Q3|K0] r3[Q6Q7|K1]
        assert_eq!(
            table(4, 2, Trn1),
            vec![
                (v(&[0, 1]), v(&[0])),
                (v(&[4, 5]), v(&[1])),
                (v(&[2, 3]), v(&[0])),
                (v(&[6, 7]), v(&[1]))
            ]
        );
        // tp4 kvm2 trn2: r0[Q0Q1|K0] r1[Q2Q3|K1] r2[Q4Q5|K0] r3[Q6Q7|K1]
        assert_eq!(
            table(4, 2, Trn2),
            vec![
                (v(&[0, 1]), v(&[0])),
                (v(&[2, 3]), v(&[1])),
                (v(&[4, 5]), v(&[0])),
                (v(&[6, 7]), v(&[1]))
            ]
        );
        // tp8 kvm4 trn1: Q0/K0, Q4/K1, Q1/K0, Q5/K1, Q2/K0, Q6/K1, Q3/K0, Q7/K1
        let q1 = [0, 4, 1, 5, 2, 6, 3, 7];
        assert_eq!(
            table(8, 4, Trn1),
            (0..8)
                .map(|r| (vec![q1[r]], vec![r % 2]))
                .collect::<Vec<_>>()
        );
        // tp8 kvm4 trn2: rank r: Q r / K(r%2)
        assert_eq!(
            table(8, 4, Trn2),
            (0..8).map(|r| (vec![r], vec![r % 2])).collect::<Vec<_>>()
        );
    }

    #[test]
    fn tiled_segments_cross_tiles() {
        assert_eq!(tiled_segments(64, 0, 64), vec![0..64]);
        assert_eq!(tiled_segments(64, 48, 48), vec![48..64, 0..32]);
        assert_eq!(tiled_segments(64, 0, 192), vec![0..64, 0..64, 0..64]);
        assert_eq!(tiled_segments(64, 96, 32), vec![32..64]);
    }

    #[test]
    fn seventy_b_trn1_heads() {
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
        let p = p(32, 4, HwBackend::Trn1);
        assert_eq!(q_heads(&m, &p, 0), vec![0, 1]);
        assert_eq!(q_heads(&m, &p, 1), vec![8, 9]);
        assert_eq!(kv_heads(&m, &p, 1), vec![1]);
        // Every rank's q heads belong to its kv head (group size 8).
        for r in 0..32 {
            let kv = kv_heads(&m, &p, r);
            assert_eq!(kv, vec![r % 8]);
            assert!(q_heads(&m, &p, r).iter().all(|&h| h / 8 == r % 8));
        }
    }
}
