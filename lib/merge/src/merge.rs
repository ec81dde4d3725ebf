//! The merge arithmetic: `W' = W + scale * B @ A` (or its embedding transpose), and DoRA's
//! `W' = m / ||W + scale B A||_row * (W + scale B A)`, all in fp32, one block of output rows at
//! a time, with a cache-blocked SGEMM (`matrixmultiply`).

use half::{bf16, f16};
use tensor_formats::DType;

use crate::adapter::LoraKind;

/// The adapter side of one merge, in fp32.
#[derive(Debug, Clone)]
pub struct Merge {
    /// A: `[r, in]` (linear) or `[r, rows]` (embedding), row-major.
    pub a: Vec<f32>,
    /// B: `[rows, r]` (linear) or `[cols, r]` (embedding), row-major.
    pub b: Vec<f32>,
    /// DoRA magnitudes, one per output row.
    pub magnitude: Option<Vec<f32>>,
    /// The factor of `B @ A`.
    pub scale: f32,
    /// Rank.
    pub r: usize,
    /// Linear or embedding.
    pub kind: LoraKind,
    /// Rows of the base tensor.
    pub rows: usize,
    /// Columns of the base tensor.
    pub cols: usize,
}

impl Merge {
    /// Turns `block`, rows `row0..row0 + block.len() / cols` of the base tensor in fp32, into the
    /// same rows of the merged tensor.
    pub fn apply(&self, row0: usize, block: &mut [f32]) {
        let (r, cols) = (self.r, self.cols);
        let n_rows = block.len() / cols;
        assert!(row0 + n_rows <= self.rows && block.len() == n_rows * cols);
        if n_rows == 0 || cols == 0 {
            return;
        }
        // SAFETY: every matrix lies inside its slice: lhs rows row0..row0+n_rows of an
        // [rows, r] (linear: B) or the transpose of an [r, rows] (embedding: A), rhs an [r, cols]
        // view (linear: A; embedding: B^T of B [cols, r]), output the [n_rows, cols] block.
        unsafe {
            match self.kind {
                LoraKind::Linear => matrixmultiply::sgemm(
                    n_rows,
                    r,
                    cols,
                    self.scale,
                    self.b.as_ptr().add(row0 * r),
                    r as isize,
                    1,
                    self.a.as_ptr(),
                    cols as isize,
                    1,
                    1.0,
                    block.as_mut_ptr(),
                    cols as isize,
                    1,
                ),
                LoraKind::Embedding => matrixmultiply::sgemm(
                    n_rows,
                    r,
                    cols,
                    self.scale,
                    self.a.as_ptr().add(row0),
                    1,
                    self.rows as isize,
                    self.b.as_ptr(),
                    1,
                    r as isize,
                    1.0,
                    block.as_mut_ptr(),
                    cols as isize,
                    1,
                ),
            }
        }
        if let Some(m) = &self.magnitude {
            for (i, row) in block.chunks_exact_mut(cols).enumerate() {
                let norm = row
                    .iter()
                    .map(|&v| (v as f64) * (v as f64))
                    .sum::<f64>()
                    .sqrt() as f32;
                let factor = m[row0 + i] / norm;
                for v in row {
                    *v *= factor;
                }
            }
        }
    }

    /// Checks the sizes against `rows x cols` (a programming error otherwise).
    pub fn check(&self) -> Result<(), String> {
        let (a_len, b_len) = match self.kind {
            LoraKind::Linear => (self.r * self.cols, self.rows * self.r),
            LoraKind::Embedding => (self.r * self.rows, self.cols * self.r),
        };
        if self.a.len() != a_len || self.b.len() != b_len {
            return Err(format!(
                "LoRA sizes do not fit: A has {} values (want {a_len}), B {} (want {b_len})",
                self.a.len(),
                self.b.len()
            ));
        }
        if let Some(m) = &self.magnitude {
            if m.len() != self.rows {
                return Err(format!(
                    "DoRA magnitude has {} values for {} rows",
                    m.len(),
                    self.rows
                ));
            }
        }
        Ok(())
    }
}

/// Little-endian bytes of fp32 values in `dtype`, rounded once to nearest-even.
pub fn encode(values: &[f32], dtype: DType) -> Vec<u8> {
    let mut out = Vec::with_capacity(values.len() * dtype.size());
    match dtype {
        DType::BF16 => values
            .iter()
            .for_each(|&v| out.extend_from_slice(&bf16::from_f32(v).to_le_bytes())),
        DType::F16 => values
            .iter()
            .for_each(|&v| out.extend_from_slice(&f16::from_f32(v).to_le_bytes())),
        DType::F64 => values
            .iter()
            .for_each(|&v| out.extend_from_slice(&(v as f64).to_le_bytes())),
        _ => values
            .iter()
            .for_each(|&v| out.extend_from_slice(&v.to_le_bytes())),
    }
    out
}

/// fp32 values from little-endian fp32 bytes.
pub fn decode_f32(bytes: &[u8]) -> Vec<f32> {
    bytes
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// The textbook merge, in f64.
    fn naive(m: &Merge, w: &[f32]) -> Vec<f64> {
        let (rows, cols, r) = (m.rows, m.cols, m.r);
        let mut out: Vec<f64> = w.iter().map(|&v| v as f64).collect();
        for i in 0..rows {
            for j in 0..cols {
                let mut s = 0f64;
                for k in 0..r {
                    let (b, a) = match m.kind {
                        LoraKind::Linear => (m.b[i * r + k], m.a[k * cols + j]),
                        // delta = (B A)^T: delta[i][j] = sum_k B[j][k] A[k][i]
                        LoraKind::Embedding => (m.b[j * r + k], m.a[k * rows + i]),
                    };
                    s += b as f64 * a as f64;
                }
                out[i * cols + j] += m.scale as f64 * s;
            }
        }
        if let Some(mag) = &m.magnitude {
            for i in 0..rows {
                let row = &mut out[i * cols..(i + 1) * cols];
                let norm = row.iter().map(|v| v * v).sum::<f64>().sqrt();
                row.iter_mut().for_each(|v| *v *= mag[i] as f64 / norm);
            }
        }
        out
    }

    fn lcg(seed: &mut u64) -> f32 {
        *seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((*seed >> 40) as f32 / (1u64 << 24) as f32) - 0.5
    }

    fn make(
        kind: LoraKind,
        rows: usize,
        cols: usize,
        r: usize,
        dora: bool,
        seed: u64,
    ) -> (Merge, Vec<f32>) {
        let mut s = seed;
        let (a_len, b_len) = match kind {
            LoraKind::Linear => (r * cols, rows * r),
            LoraKind::Embedding => (r * rows, cols * r),
        };
        let m = Merge {
            a: (0..a_len).map(|_| lcg(&mut s)).collect(),
            b: (0..b_len).map(|_| lcg(&mut s)).collect(),
            magnitude: dora.then(|| (0..rows).map(|_| lcg(&mut s) + 1.0).collect()),
            scale: 0.75,
            r,
            kind,
            rows,
            cols,
        };
        m.check().unwrap();
        let w = (0..rows * cols).map(|_| lcg(&mut s)).collect();
        (m, w)
    }

    proptest! {
        /// Any split into row blocks gives the textbook result to fp32 accuracy.
        #[test]
        fn blocked_merge_matches_the_textbook(
            rows in 1usize..40, cols in 1usize..40, r in 1usize..9,
            embedding: bool, dora: bool, block in 1usize..17, seed: u64,
        ) {
            let kind = if embedding { LoraKind::Embedding } else { LoraKind::Linear };
            let dora = dora && !embedding;
            let (m, w) = make(kind, rows, cols, r, dora, seed);
            let want = naive(&m, &w);
            let mut got = w.clone();
            for (bi, chunk) in got.chunks_mut(block * cols).enumerate() {
                m.apply(bi * block, chunk);
            }
            for (g, w) in got.iter().zip(&want) {
                prop_assert!((*g as f64 - w).abs() <= 1e-5 * (1.0 + w.abs()), "{} vs {}", g, w);
            }
        }
    }

    #[test]
    fn rounds_once_to_nearest_even() {
        // 1 + 2^-8 is halfway between two bf16 values: it goes to the even one (1.0); a merge that
        // rounded W + delta in two steps could land elsewhere.
        let halfway = 1.0f32 + 2f32.powi(-8);
        assert_eq!(encode(&[halfway], DType::BF16), 0x3f80u16.to_le_bytes());
        let above = f32::from_bits(halfway.to_bits() + 1);
        assert_eq!(encode(&[above], DType::BF16), 0x3f81u16.to_le_bytes());
        assert_eq!(decode_f32(&encode(&[1.5, -2.0], DType::F32)), [1.5, -2.0]);
        // W = 1, delta = 2^-8 + 2^-12: summed in fp32, then rounded once, up to 1 + 2^-7.
        let m = Merge {
            a: vec![1.0],
            b: vec![2f32.powi(-8) + 2f32.powi(-12)],
            magnitude: None,
            scale: 1.0,
            r: 1,
            kind: LoraKind::Linear,
            rows: 1,
            cols: 1,
        };
        let mut w = vec![1.0f32];
        m.apply(0, &mut w);
        assert_eq!(encode(&w, DType::BF16), 0x3f81u16.to_le_bytes());
    }

    #[test]
    fn dora_rows_take_their_magnitude() {
        let (m, w) = make(LoraKind::Linear, 5, 7, 2, true, 7);
        let mut got = w.clone();
        m.apply(0, &mut got);
        for (i, row) in got.chunks(7).enumerate() {
            let norm = row.iter().map(|v| v * v).sum::<f32>().sqrt();
            assert!((norm - m.magnitude.as_ref().unwrap()[i]).abs() < 1e-5);
        }
    }
}
