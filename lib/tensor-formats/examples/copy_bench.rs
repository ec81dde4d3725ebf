//! Benchmark of the strided-copy engine next to plain `memcpy` (run by `make bench`; not a test).
//!
//! Prints a Markdown table: GB/s for a plain copy of the same bytes, then for the engine on the
//! operations nx-shard performs on a 70B-shaped layer (8192 x 8192 bf16 = 128 MiB).

use std::io::Write;
use std::time::Instant;

use tensor_formats::copy::{write_concat, write_view, Part};
use tensor_formats::{DType, Layout};

/// A sink that copies into preallocated memory, like the page cache would.
struct Buffer(Vec<u8>);

impl Write for Buffer {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn best_of<F: FnMut() -> usize>(runs: usize, mut f: F) -> (f64, usize) {
    let mut best = f64::MAX;
    let mut bytes = 0;
    for _ in 0..runs {
        let t = Instant::now();
        bytes = f();
        best = best.min(t.elapsed().as_secs_f64());
    }
    (best, bytes)
}

fn main() {
    let n = 8192usize;
    let src: Vec<u8> = (0..n * n * 2).map(|i| (i * 7 + 3) as u8).collect();
    let full = Layout::contiguous(&[n, n]);
    let whole = Part {
        dtype: DType::BF16,
        layout: full.clone(),
        storage: &src,
    };
    let mut out = Buffer(Vec::with_capacity(n * n * 4));
    let runs = 5;
    let mut rows: Vec<(&str, f64, usize)> = Vec::new();

    let (t, b) = best_of(runs, || {
        out.0.clear();
        out.0.extend_from_slice(&src);
        out.0.len()
    });
    rows.push(("memcpy (reference)", t, b));
    let memcpy_gbs = b as f64 / t / 1e9;

    let mut run = |name: &'static str, f: &mut dyn FnMut(&mut Buffer) -> u64| {
        let (t, b) = best_of(runs, || {
            out.0.clear();
            f(&mut out) as usize
        });
        rows.push((name, t, b));
    };
    run("contiguous view (row split, 32 x dim-0 chunks)", &mut |o| {
        (0..32)
            .map(|r| {
                write_view(
                    &whole.narrow(0, r * n / 32, n / 32).unwrap(),
                    DType::BF16,
                    o,
                )
                .unwrap()
            })
            .sum()
    });
    run(
        "column split (32 x dim-1 chunks, o_proj/down_proj)",
        &mut |o| {
            (0..32)
                .map(|r| {
                    write_view(
                        &whole.narrow(1, r * n / 32, n / 32).unwrap(),
                        DType::BF16,
                        o,
                    )
                    .unwrap()
                })
                .sum()
        },
    );
    run(
        "column split stored transposed (o_proj + qkv_linear)",
        &mut |o| {
            (0..32)
                .map(|r| {
                    write_view(
                        &whole.narrow(1, r * n / 32, n / 32).unwrap().transpose(0, 1),
                        DType::BF16,
                        o,
                    )
                    .unwrap()
                })
                .sum()
        },
    );
    run(
        "concat along dim 1 (unshard o_proj from 32 ranks)",
        &mut |o| {
            let parts: Vec<Part> = (0..32)
                .map(|r| whole.narrow(1, r * n / 32, n / 32).unwrap())
                .collect();
            write_concat(&parts, 1, DType::BF16, o).unwrap()
        },
    );
    run(
        "concat of 32 transposed column blocks (unshard o_proj stored transposed)",
        &mut |o| {
            let stored = whole.transpose(0, 1);
            let parts: Vec<Part> = (0..32)
                .map(|r| stored.narrow(1, r * n / 32, n / 32).unwrap())
                .collect();
            write_concat(&parts, 1, DType::BF16, o).unwrap()
        },
    );
    run(
        "kv repeat x4 (dim-0 parts listed 4 times, 1/8 of rows)",
        &mut |o| {
            let kv = whole.narrow(0, 0, n / 8).unwrap();
            let parts = vec![kv.clone(), kv.clone(), kv.clone(), kv];
            write_concat(&parts, 0, DType::BF16, o).unwrap()
        },
    );
    run("bf16 -> fp32 conversion (contiguous)", &mut |o| {
        write_view(&whole, DType::F32, o).unwrap()
    });

    println!(
        "| operation (8192 x 8192 bf16, best of {runs}) | output MB | seconds | GB/s | vs memcpy |"
    );
    println!("|---|---:|---:|---:|---:|");
    for (name, t, b) in rows {
        let gbs = b as f64 / t / 1e9;
        println!(
            "| {name} | {:.0} | {t:.4} | {gbs:.2} | {:.2}x |",
            b as f64 / 1e6,
            gbs / memcpy_gbs
        );
    }
}
