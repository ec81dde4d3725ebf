//! The number of worker threads and rayon's global pool.

use std::num::NonZeroUsize;

/// The default number of jobs: the parallelism available to this process (cores, limited by
/// affinity and cgroup quotas), at least 1.
pub fn default_jobs() -> usize {
    std::thread::available_parallelism().map_or(1, NonZeroUsize::get)
}

/// Sets up rayon's global pool with `jobs` threads (`None` or `Some(0)`: [`default_jobs`]) and
/// returns the number of threads of the global pool. Only the first call takes effect; later
/// ones leave the pool as it is.
pub fn init_thread_pool(jobs: Option<usize>) -> usize {
    let threads = jobs.filter(|&jobs| jobs > 0).unwrap_or_else(default_jobs);
    // Fails only if the global pool already exists, which is fine.
    let _ = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build_global();
    rayon::current_num_threads()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pool_is_initialised_once() {
        assert!(default_jobs() >= 1);
        let threads = init_thread_pool(Some(2));
        assert!(threads >= 1);
        assert_eq!(init_thread_pool(Some(5)), threads);
        assert_eq!(init_thread_pool(None), threads);
    }
}
