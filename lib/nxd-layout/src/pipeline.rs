//! Pipeline placement (spec §4): NxD's `create_partitions` and `stage_to_pipeline_parallel_rank`.

use std::ops::Range;

use crate::error::{LayoutError, Refusal};

/// The layers of each of `stages` pipeline stages, in stage order.
///
/// Each stage gets `layers / stages` layers and the remainder `layers % stages` goes one each to
/// the **last** stages. Fails (as NxD's assert does) when a stage would get no layer.
pub fn stage_layers(num_layers: usize, stages: usize) -> Result<Vec<Range<usize>>, LayoutError> {
    if stages == 0 || num_layers / stages < 1 {
        return Err(LayoutError::refused(
            Refusal::NxdCrashes,
            format!(
                "{stages} pipeline stages for {num_layers} layers: every stage needs at least one \
                 layer (NxD's create_partitions asserts); use pp x vpp <= {num_layers}"
            ),
        ));
    }
    let base = num_layers / stages;
    let rem = num_layers % stages;
    let mut out = Vec::with_capacity(stages);
    let mut start = 0;
    for s in 0..stages {
        let n = base + usize::from(s >= stages - rem);
        out.push(start..start + n);
        start += n;
    }
    Ok(out)
}

/// The pp rank of every layer: stage s (of pp·vpp) lives on pp rank `s % pp`.
pub fn layer_pp_ranks(num_layers: usize, pp: usize, vpp: usize) -> Result<Vec<usize>, LayoutError> {
    let stages = stage_layers(num_layers, pp * vpp)?;
    let mut out = vec![0; num_layers];
    for (s, range) in stages.into_iter().enumerate() {
        for l in range {
            out[l] = s % pp;
        }
    }
    Ok(out)
}

/// The layers held by each pp rank, ascending: `result[pp_rank]`.
pub fn layers_per_pp_rank(
    num_layers: usize,
    pp: usize,
    vpp: usize,
) -> Result<Vec<Vec<usize>>, LayoutError> {
    let ranks = layer_pp_ranks(num_layers, pp, vpp)?;
    let mut out = vec![Vec::new(); pp];
    for (l, r) in ranks.into_iter().enumerate() {
        out[r].push(l);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spec_examples() {
        // c, 7 layers, pp3: [0,1] [2,3] [4,5,6]
        assert_eq!(stage_layers(7, 3).unwrap(), vec![0..2, 2..4, 4..7]);
        assert_eq!(
            layers_per_pp_rank(7, 3, 1).unwrap(),
            vec![vec![0, 1], vec![2, 3], vec![4, 5, 6]]
        );
        // c, pp3 vpp2: stages [0][1][2][3][4][5,6] -> {0,3}, {1,4}, {2,5,6}
        assert_eq!(
            stage_layers(7, 6).unwrap(),
            vec![0..1, 1..2, 2..3, 3..4, 4..5, 5..7]
        );
        assert_eq!(
            layers_per_pp_rank(7, 3, 2).unwrap(),
            vec![vec![0, 3], vec![1, 4], vec![2, 5, 6]]
        );
        // a, pp2 vpp2: {0,2,3} and {1,4,5}
        assert_eq!(
            layers_per_pp_rank(6, 2, 2).unwrap(),
            vec![vec![0, 2, 3], vec![1, 4, 5]]
        );
        // b, pp2 vpp2: {0,2} and {1,3,4}
        assert_eq!(
            layers_per_pp_rank(5, 2, 2).unwrap(),
            vec![vec![0, 2], vec![1, 3, 4]]
        );
        // b, pp5
        assert_eq!(
            layers_per_pp_rank(5, 5, 1).unwrap(),
            vec![vec![0], vec![1], vec![2], vec![3], vec![4]]
        );
        // 70B: 80 layers, pp 8 -> 10 each
        let r = layers_per_pp_rank(80, 8, 1).unwrap();
        assert!(r
            .iter()
            .enumerate()
            .all(|(i, v)| *v == (i * 10..i * 10 + 10).collect::<Vec<_>>()));
    }

    #[test]
    fn too_many_stages_is_refused() {
        assert!(stage_layers(5, 6).is_err());
        assert!(stage_layers(7, 8).is_err());
        assert!(stage_layers(3, 0).is_err());
        assert_eq!(stage_layers(1, 1).unwrap(), vec![0..1]);
    }
}
