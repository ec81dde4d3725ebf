//! Which items of a plan this process owns when a run is split over `world` processes
//! (`--rank/--world`, or Slurm's variables).

use std::cmp::Reverse;
use std::collections::BinaryHeap;

/// Step ids from this value up are Slurm's special steps (batch script, extern, interactive),
/// not the tasks of an `srun` step.
const FIRST_SPECIAL_STEP_ID: u64 = 0xFFFF_FFF0;

/// The slice of the work owned by one process: rank `rank` of `world` (`rank < world`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WorkSlice {
    /// This process's index, `0..world`.
    pub rank: usize,
    /// The number of processes sharing the work, at least 1.
    pub world: usize,
}

/// The rank and world size could not be determined, or are inconsistent.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WorkSplitError {
    /// The world size is 0.
    #[error("the world size must be at least 1")]
    EmptyWorld,
    /// The rank is not below the world size.
    #[error("rank {rank} is out of range for world size {world} (ranks count from 0)")]
    RankOutOfRange {
        /// The rank.
        rank: usize,
        /// The world size.
        world: usize,
    },
    /// A Slurm variable is not a non-negative integer.
    #[error("environment variable {var}={value:?} is not a non-negative integer")]
    BadVariable {
        /// The variable.
        var: &'static str,
        /// Its value.
        value: String,
    },
    /// A Slurm variable is missing although a related one is set.
    #[error("environment variable {var} is not set although {set_var} is")]
    MissingVariable {
        /// The missing variable.
        var: &'static str,
        /// The variable that is set.
        set_var: &'static str,
    },
    /// The Slurm array has gaps or a step, so task ids do not map onto ranks.
    #[error(
        "the Slurm array is not contiguous (SLURM_ARRAY_TASK_MIN={min}, SLURM_ARRAY_TASK_MAX={max}, \
         SLURM_ARRAY_TASK_COUNT={count}): submit a range such as --array=0-N, or pass --rank and --world"
    )]
    NonContiguousArray {
        /// `SLURM_ARRAY_TASK_MIN`.
        min: usize,
        /// `SLURM_ARRAY_TASK_MAX`.
        max: usize,
        /// `SLURM_ARRAY_TASK_COUNT`.
        count: usize,
    },
    /// `SLURM_ARRAY_TASK_ID` is below `SLURM_ARRAY_TASK_MIN`.
    #[error("SLURM_ARRAY_TASK_ID={id} is below SLURM_ARRAY_TASK_MIN={min}")]
    TaskBelowMin {
        /// `SLURM_ARRAY_TASK_ID`.
        id: usize,
        /// `SLURM_ARRAY_TASK_MIN`.
        min: usize,
    },
}

impl WorkSlice {
    /// The whole work: rank 0 of 1.
    pub const ALL: WorkSlice = WorkSlice { rank: 0, world: 1 };

    /// Rank `rank` of `world`, checked.
    pub fn new(rank: usize, world: usize) -> Result<Self, WorkSplitError> {
        if world == 0 {
            Err(WorkSplitError::EmptyWorld)
        } else if rank >= world {
            Err(WorkSplitError::RankOutOfRange { rank, world })
        } else {
            Ok(WorkSlice { rank, world })
        }
    }

    /// [`WorkSlice::resolve_with`] on the process environment.
    pub fn resolve(rank: Option<usize>, world: Option<usize>) -> Result<Self, WorkSplitError> {
        Self::resolve_with(rank, world, &|name| std::env::var(name).ok())
    }

    /// Resolves the slice from explicit values (`--rank`, `--world`) and the environment, read
    /// through `env`. Each explicit value wins; a missing one comes from the first of:
    ///
    /// 1. a Slurm job array: `SLURM_ARRAY_TASK_ID - SLURM_ARRAY_TASK_MIN` of
    ///    `SLURM_ARRAY_TASK_COUNT` (an array with gaps or a step is an error);
    /// 2. the tasks of an `srun` step: `SLURM_PROCID` of `SLURM_NTASKS`. These are used only
    ///    inside a step (`SLURM_STEP_ID` names a task step): a batch script run without `srun`
    ///    also sees `SLURM_PROCID=0` and the allocation's `SLURM_NTASKS`, and must not do a
    ///    fraction of the work;
    /// 3. rank 0 of 1.
    pub fn resolve_with(
        rank: Option<usize>,
        world: Option<usize>,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Self, WorkSplitError> {
        let from_env = match (rank, world) {
            (Some(_), Some(_)) => None,
            _ => slurm_slice(env)?,
        };
        let (env_rank, env_world) = from_env.unzip();
        Self::new(
            rank.or(env_rank).unwrap_or(0),
            world.or(env_world).unwrap_or(1),
        )
    }

    /// Whether item `index` is this rank's under the round-robin split (`index % world == rank`).
    pub fn owns(&self, index: usize) -> bool {
        index % self.world == self.rank
    }

    /// The indices in `0..n_items` this rank owns under the round-robin split, ascending.
    pub fn select(&self, n_items: usize) -> Vec<usize> {
        (self.rank..n_items).step_by(self.world).collect()
    }

    /// The indices of the items this rank owns when items are balanced by weight (e.g. bytes),
    /// ascending.
    ///
    /// The assignment is a deterministic greedy: items in order of decreasing weight (ties by
    /// index) each go to the least loaded rank (ties by lowest rank). It depends only on
    /// `weights` and `world`, so every rank computes the same assignment and together the ranks
    /// own every item exactly once. Equal weights give the round-robin split.
    pub fn balanced(&self, weights: &[u64]) -> Vec<usize> {
        let mut order: Vec<usize> = (0..weights.len()).collect();
        order.sort_by_key(|&i| (Reverse(weights[i]), i));
        // While some rank below `weights.len()` is still empty it beats every higher rank, so
        // higher ranks never receive an item and need no heap entry.
        let ranks = self.world.min(weights.len());
        let mut loads: BinaryHeap<Reverse<(u128, usize)>> =
            (0..ranks).map(|rank| Reverse((0, rank))).collect();
        let mut mine = Vec::new();
        for i in order {
            let Reverse((load, rank)) = loads.pop().expect("at least one rank per item");
            if rank == self.rank {
                mine.push(i);
            }
            loads.push(Reverse((load + u128::from(weights[i]), rank)));
        }
        mine.sort_unstable();
        mine
    }
}

/// The (rank, world) Slurm gives this process, if any.
fn slurm_slice(
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<Option<(usize, usize)>, WorkSplitError> {
    let var = |var: &'static str| -> Result<Option<usize>, WorkSplitError> {
        env(var)
            .map(|value| {
                value
                    .trim()
                    .parse()
                    .map_err(|_| WorkSplitError::BadVariable { var, value })
            })
            .transpose()
    };
    let required = |name: &'static str, set_var: &'static str| -> Result<usize, WorkSplitError> {
        var(name)?.ok_or(WorkSplitError::MissingVariable { var: name, set_var })
    };
    if let Some(id) = var("SLURM_ARRAY_TASK_ID")? {
        let count = required("SLURM_ARRAY_TASK_COUNT", "SLURM_ARRAY_TASK_ID")?;
        let min = var("SLURM_ARRAY_TASK_MIN")?;
        if let (Some(min), Some(max)) = (min, var("SLURM_ARRAY_TASK_MAX")?) {
            if max < min || count != max - min + 1 {
                return Err(WorkSplitError::NonContiguousArray { min, max, count });
            }
        }
        let min = min.unwrap_or(0);
        let rank = id
            .checked_sub(min)
            .ok_or(WorkSplitError::TaskBelowMin { id, min })?;
        return Ok(Some((rank, count)));
    }
    let in_task_step = ["SLURM_STEP_ID", "SLURM_STEPID"].iter().any(|name| {
        env(name)
            .and_then(|id| id.trim().parse::<u64>().ok())
            .is_some_and(|id| id < FIRST_SPECIAL_STEP_ID)
    });
    match var("SLURM_PROCID")? {
        Some(procid) if in_task_step => {
            Ok(Some((procid, required("SLURM_NTASKS", "SLURM_PROCID")?)))
        }
        _ => Ok(None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::HashMap;

    fn resolve(
        rank: Option<usize>,
        world: Option<usize>,
        vars: &[(&str, &str)],
    ) -> Result<WorkSlice, WorkSplitError> {
        let vars: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        WorkSlice::resolve_with(rank, world, &|name| vars.get(name).cloned())
    }

    fn slice(rank: usize, world: usize) -> WorkSlice {
        WorkSlice::new(rank, world).unwrap()
    }

    const ARRAY: [(&str, &str); 4] = [
        ("SLURM_ARRAY_TASK_ID", "12"),
        ("SLURM_ARRAY_TASK_MIN", "10"),
        ("SLURM_ARRAY_TASK_MAX", "13"),
        ("SLURM_ARRAY_TASK_COUNT", "4"),
    ];
    const SRUN: [(&str, &str); 3] = [
        ("SLURM_PROCID", "3"),
        ("SLURM_NTASKS", "8"),
        ("SLURM_STEP_ID", "0"),
    ];

    #[test]
    fn resolution_order() {
        assert_eq!(resolve(None, None, &[]), Ok(WorkSlice::ALL));
        assert_eq!(resolve(Some(1), Some(2), &ARRAY), Ok(slice(1, 2)));
        assert_eq!(resolve(None, None, &ARRAY), Ok(slice(2, 4)));
        assert_eq!(resolve(None, Some(5), &ARRAY), Ok(slice(2, 5)));
        assert_eq!(resolve(Some(0), None, &ARRAY), Ok(slice(0, 4)));
        assert_eq!(resolve(None, None, &SRUN), Ok(slice(3, 8)));
        let both: Vec<_> = ARRAY.iter().chain(&SRUN).copied().collect();
        assert_eq!(resolve(None, None, &both), Ok(slice(2, 4)));
        // Explicit values need no environment, even a broken one.
        assert_eq!(
            resolve(Some(0), Some(1), &[("SLURM_ARRAY_TASK_ID", "x")]),
            Ok(WorkSlice::ALL)
        );
    }

    #[test]
    fn array_without_min_counts_from_zero() {
        let vars = [
            ("SLURM_ARRAY_TASK_ID", "1"),
            ("SLURM_ARRAY_TASK_COUNT", "3"),
        ];
        assert_eq!(resolve(None, None, &vars), Ok(slice(1, 3)));
    }

    #[test]
    fn batch_script_outside_srun_is_not_split() {
        let batch = [("SLURM_PROCID", "0"), ("SLURM_NTASKS", "8")];
        assert_eq!(resolve(None, None, &batch), Ok(WorkSlice::ALL));
        let batch_step = [
            ("SLURM_PROCID", "0"),
            ("SLURM_NTASKS", "8"),
            ("SLURM_STEP_ID", "4294967294"),
        ];
        assert_eq!(resolve(None, None, &batch_step), Ok(WorkSlice::ALL));
        let old_name = [
            ("SLURM_PROCID", "1"),
            ("SLURM_NTASKS", "2"),
            ("SLURM_STEPID", "3"),
        ];
        assert_eq!(resolve(None, None, &old_name), Ok(slice(1, 2)));
    }

    #[test]
    fn errors() {
        assert_eq!(WorkSlice::new(0, 0), Err(WorkSplitError::EmptyWorld));
        assert_eq!(
            resolve(Some(4), Some(4), &[]),
            Err(WorkSplitError::RankOutOfRange { rank: 4, world: 4 })
        );
        assert_eq!(
            resolve(Some(1), None, &[]),
            Err(WorkSplitError::RankOutOfRange { rank: 1, world: 1 })
        );
        assert_eq!(
            resolve(None, None, &[("SLURM_ARRAY_TASK_ID", "-1")]),
            Err(WorkSplitError::BadVariable {
                var: "SLURM_ARRAY_TASK_ID",
                value: "-1".into()
            })
        );
        assert_eq!(
            resolve(None, None, &[("SLURM_ARRAY_TASK_ID", "1")]),
            Err(WorkSplitError::MissingVariable {
                var: "SLURM_ARRAY_TASK_COUNT",
                set_var: "SLURM_ARRAY_TASK_ID"
            })
        );
        assert_eq!(
            resolve(None, None, &[("SLURM_PROCID", "1"), ("SLURM_STEP_ID", "0")]),
            Err(WorkSplitError::MissingVariable {
                var: "SLURM_NTASKS",
                set_var: "SLURM_PROCID"
            })
        );
        // --array=0-8:2 runs tasks 0,2,4,6,8.
        let stepped = [
            ("SLURM_ARRAY_TASK_ID", "4"),
            ("SLURM_ARRAY_TASK_MIN", "0"),
            ("SLURM_ARRAY_TASK_MAX", "8"),
            ("SLURM_ARRAY_TASK_COUNT", "5"),
        ];
        let err = resolve(None, None, &stepped).unwrap_err();
        assert_eq!(
            err,
            WorkSplitError::NonContiguousArray {
                min: 0,
                max: 8,
                count: 5
            }
        );
        assert!(err.to_string().contains("not contiguous"), "{err}");
        let below = [
            ("SLURM_ARRAY_TASK_ID", "1"),
            ("SLURM_ARRAY_TASK_MIN", "2"),
            ("SLURM_ARRAY_TASK_COUNT", "2"),
        ];
        assert_eq!(
            resolve(None, None, &below),
            Err(WorkSplitError::TaskBelowMin { id: 1, min: 2 })
        );
    }

    #[test]
    fn round_robin() {
        let s = slice(1, 3);
        assert_eq!(s.select(8), [1, 4, 7]);
        assert_eq!(slice(5, 6).select(3), Vec::<usize>::new());
        assert!(s.owns(4) && !s.owns(5));
    }

    #[test]
    fn balanced_is_largest_first_to_least_loaded() {
        let weights = [5, 9, 3, 9, 1, 4];
        // 9(#1)->r0, 9(#3)->r1, 5(#0)->r2, 4(#5)->r2 (load 5), 3(#2)->r0 (9 ties, lowest rank), 1(#4)->r1.
        assert_eq!(slice(0, 3).balanced(&weights), [1, 2]);
        assert_eq!(slice(1, 3).balanced(&weights), [3, 4]);
        assert_eq!(slice(2, 3).balanced(&weights), [0, 5]);
        assert_eq!(slice(1, 3).balanced(&[7; 8]), slice(1, 3).select(8));
        assert_eq!(slice(3, 1000).balanced(&[1, 1, 1, 1, 1]), [3]);
        assert_eq!(
            slice(0, 2).balanced(&[u64::MAX, u64::MAX, u64::MAX]),
            [0, 2]
        );
    }

    proptest! {
        #[test]
        fn balanced_partitions_the_items(weights in prop::collection::vec(0u64..1000, 0..40), world in 1usize..9) {
            let mut all: Vec<usize> = (0..world).flat_map(|r| slice(r, world).balanced(&weights)).collect();
            all.sort_unstable();
            prop_assert_eq!(all, (0..weights.len()).collect::<Vec<_>>());
            // Greedy's bound: no rank exceeds the average by more than the largest item.
            let max = weights.iter().copied().max().unwrap_or(0);
            let total: u64 = weights.iter().sum();
            for r in 0..world {
                let load: u64 = slice(r, world).balanced(&weights).iter().map(|&i| weights[i]).sum();
                prop_assert!(load <= total / world as u64 + max);
            }
        }
    }
}
