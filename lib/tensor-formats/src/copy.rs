//! The strided-copy engine: writes the row-major bytes of an output tensor that is a concatenation of
//! strided views of mapped source tensors, with optional float conversion on the fly.
//!
//! Every sharding operation reduces to this: narrow (a view with a smaller shape and a shifted offset),
//! transposition (swapped strides), repetition (the same part listed several times), head gathering
//! (several narrowed parts), and concatenation along any dimension. Contiguous inner runs become single
//! large writes; a transposed inner pair goes through a cache-blocked tile transpose.

use std::io::Write;

use crate::dtype::{convert_floats, DType};
use crate::error::{FormatError, Result};
use crate::view::{Layout, TensorRef};

/// Elements per side of a transpose tile: 64x64 elements of up to 8 bytes stay inside L1/L2.
const TILE: usize = 64;
/// Output buffered for gathers and conversions before it is handed to the writer.
const CHUNK_BYTES: usize = 1 << 20;

/// One source of an output tensor: a (possibly narrowed / transposed) view of a mapped tensor.
#[derive(Debug, Clone)]
pub struct Part<'a> {
    /// Element type of the source.
    pub dtype: DType,
    /// The view's layout, in source elements.
    pub layout: Layout,
    /// The whole source storage.
    pub storage: &'a [u8],
}

impl<'a> Part<'a> {
    /// A part covering the whole of a tensor view.
    pub fn whole(t: TensorRef<'a>) -> Part<'a> {
        Part {
            dtype: t.dtype,
            layout: t.layout.clone(),
            storage: t.storage,
        }
    }

    /// The same source narrowed along `dim` to `[start, start+len)`.
    pub fn narrow(&self, dim: usize, start: usize, len: usize) -> Result<Part<'a>> {
        Ok(Part {
            dtype: self.dtype,
            layout: self.layout.narrow(dim, start, len)?,
            storage: self.storage,
        })
    }

    /// The same source with two dimensions swapped (no data moves).
    pub fn transpose(&self, a: usize, b: usize) -> Part<'a> {
        Part {
            dtype: self.dtype,
            layout: self.layout.transpose(a, b),
            storage: self.storage,
        }
    }
}

/// Shape of `cat(parts, dim)`, checking that the parts agree on every other dimension.
pub fn concat_shape(parts: &[Part<'_>], dim: usize) -> Result<Vec<usize>> {
    let first = parts
        .first()
        .ok_or_else(|| FormatError::Invalid("concatenation of no parts".into()))?;
    let mut shape = first.layout.shape.clone();
    if dim >= shape.len() {
        return Err(FormatError::Invalid(format!(
            "concatenation along dim {dim} of a {}-d tensor",
            shape.len()
        )));
    }
    shape[dim] = 0;
    for p in parts {
        let s = &p.layout.shape;
        let agrees = s.len() == shape.len()
            && s.iter()
                .zip(&shape)
                .enumerate()
                .all(|(d, (a, b))| d == dim || a == b);
        if !agrees {
            return Err(FormatError::Invalid(format!(
                "cannot concatenate shapes {:?} and {:?} along dim {dim}",
                first.layout.shape, s
            )));
        }
        shape[dim] += s[dim];
    }
    Ok(shape)
}

/// Writes the row-major bytes of `cat(parts, dim)` converted to `out_dtype`; returns the bytes written.
///
/// Parts must lie inside their storages (checked) and be float types when a conversion is asked for.
pub fn write_concat(
    parts: &[Part<'_>],
    dim: usize,
    out_dtype: DType,
    out: &mut dyn Write,
) -> Result<u64> {
    let shape = concat_shape(parts, dim)?;
    for p in parts {
        TensorRef {
            dtype: p.dtype,
            layout: &p.layout,
            storage: p.storage,
        }
        .validate()?;
        if p.dtype != out_dtype && !(p.dtype.is_float() && out_dtype.is_float()) {
            return Err(FormatError::Invalid(format!(
                "cannot convert {} to {}",
                p.dtype, out_dtype
            )));
        }
    }
    let mut sink = Sink {
        out,
        buf: Vec::with_capacity(CHUNK_BYTES),
        written: 0,
        out_dtype,
    };
    let outer: usize = shape[..dim].iter().product();
    if shape.contains(&0) {
        return Ok(0);
    }
    if let Some(blocks) = transposed_column_blocks(parts, dim) {
        // Every part is a column block of a transposed matrix (unsharding o_proj): one tiled pass.
        sink.transpose_blocks(parts[0].dtype, shape[0], &blocks)?;
        sink.flush()?;
        return Ok(sink.written);
    }
    let mut index = vec![0usize; dim];
    for _ in 0..outer {
        for p in parts {
            let offset = p.layout.offset
                + index
                    .iter()
                    .zip(&p.layout.strides)
                    .map(|(i, s)| i * s)
                    .sum::<usize>();
            let inner = Layout {
                shape: p.layout.shape[dim..].to_vec(),
                strides: p.layout.strides[dim..].to_vec(),
                offset,
            };
            sink.view(p.dtype, &inner, p.storage)?;
        }
        // Advance the row-major index over the outer dimensions.
        for d in (0..dim).rev() {
            index[d] += 1;
            if index[d] < shape[d] {
                break;
            }
            index[d] = 0;
        }
    }
    sink.flush()?;
    Ok(sink.written)
}

/// The parts as column blocks when they are 2-D, of one dtype, stored transposed (row stride 1) and
/// concatenated along dim 1; `None` otherwise.
fn transposed_column_blocks<'a>(parts: &[Part<'a>], dim: usize) -> Option<Vec<ColumnBlock<'a>>> {
    let dtype = parts.first()?.dtype;
    if dim != 1 || parts.len() < 2 {
        return None;
    }
    parts
        .iter()
        .map(|p| {
            let l = &p.layout;
            (l.shape.len() == 2 && l.strides[0] == 1 && l.shape[0] > 1 && p.dtype == dtype).then(
                || ColumnBlock {
                    storage: p.storage,
                    base: l.offset,
                    cols: l.shape[1],
                    col_stride: l.strides[1],
                },
            )
        })
        .collect()
}

/// Writes the row-major bytes of one view.
pub fn write_view(part: &Part<'_>, out_dtype: DType, out: &mut dyn Write) -> Result<u64> {
    if part.layout.shape.is_empty() {
        // A 0-d tensor: one element.
        let one = Part {
            layout: Layout {
                shape: vec![1],
                strides: vec![1],
                offset: part.layout.offset,
            },
            ..part.clone()
        };
        return write_concat(&[one], 0, out_dtype, out);
    }
    write_concat(std::slice::from_ref(part), 0, out_dtype, out)
}

/// Drops size-1 dimensions and merges neighbours that are contiguous with each other.
fn coalesce(shape: &[usize], strides: &[usize]) -> (Vec<usize>, Vec<usize>) {
    let mut s: Vec<usize> = Vec::new();
    let mut st: Vec<usize> = Vec::new();
    for (&n, &stride) in shape.iter().zip(strides) {
        if n == 1 {
            continue;
        }
        if let (Some(last_n), Some(last_st)) = (s.last_mut(), st.last_mut()) {
            if *last_st == n * stride {
                *last_n *= n;
                *last_st = stride;
                continue;
            }
        }
        s.push(n);
        st.push(stride);
    }
    if s.is_empty() {
        s.push(1);
        st.push(1);
    }
    (s, st)
}

struct Sink<'w> {
    out: &'w mut dyn Write,
    buf: Vec<u8>,
    written: u64,
    out_dtype: DType,
}

impl Sink<'_> {
    fn flush(&mut self) -> Result<()> {
        if !self.buf.is_empty() {
            self.out.write_all(&self.buf)?;
            self.written += self.buf.len() as u64;
            self.buf.clear();
        }
        Ok(())
    }

    /// Emits `n` contiguous source elements starting at byte `start`.
    fn run(&mut self, dtype: DType, storage: &[u8], start: usize, n: usize) -> Result<()> {
        let src = &storage[start..start + n * dtype.size()];
        if dtype == self.out_dtype {
            if src.len() >= CHUNK_BYTES {
                self.flush()?;
                self.out.write_all(src)?;
                self.written += src.len() as u64;
            } else {
                if self.buf.len() + src.len() > CHUNK_BYTES {
                    self.flush()?;
                }
                self.buf.extend_from_slice(src);
            }
            return Ok(());
        }
        // Convert in chunks so the buffer stays bounded whatever the run length.
        let per_chunk = CHUNK_BYTES / self.out_dtype.size();
        for chunk in src.chunks(per_chunk * dtype.size()) {
            let out_len = chunk.len() / dtype.size() * self.out_dtype.size();
            if self.buf.len() + out_len > CHUNK_BYTES {
                self.flush()?;
            }
            let at = self.buf.len();
            self.buf.resize(at + out_len, 0);
            convert_floats(chunk, dtype, &mut self.buf[at..], self.out_dtype);
        }
        Ok(())
    }

    fn view(&mut self, dtype: DType, layout: &Layout, storage: &[u8]) -> Result<()> {
        let (shape, strides) = coalesce(&layout.shape, &layout.strides);
        let es = dtype.size();
        let nd = shape.len();
        if strides[nd - 1] == 1 {
            // Contiguous innermost run: iterate over the outer dims.
            let run = shape[nd - 1];
            self.each_outer(
                &shape[..nd - 1],
                &strides[..nd - 1],
                layout.offset,
                |sink, off| sink.run(dtype, storage, off * es, run),
            )
        } else if nd >= 2 && strides[nd - 2] == 1 {
            // A transposed pair: blocked tile transpose.
            let (rows, cols) = (shape[nd - 2], shape[nd - 1]);
            let col_stride = strides[nd - 1];
            self.each_outer(
                &shape[..nd - 2],
                &strides[..nd - 2],
                layout.offset,
                |sink, off| {
                    let block = ColumnBlock {
                        storage,
                        base: off,
                        cols,
                        col_stride,
                    };
                    sink.transpose_blocks(dtype, rows, std::slice::from_ref(&block))
                },
            )
        } else {
            // Fully strided: element by element.
            self.each_outer(&shape, &strides, layout.offset, |sink, off| {
                sink.run(dtype, storage, off * es, 1)
            })
        }
    }

    /// Calls `f` with the element offset of every row-major index of `shape`.
    fn each_outer(
        &mut self,
        shape: &[usize],
        strides: &[usize],
        base: usize,
        mut f: impl FnMut(&mut Self, usize) -> Result<()>,
    ) -> Result<()> {
        let total: usize = shape.iter().product();
        let mut index = vec![0usize; shape.len()];
        let mut off = base;
        for _ in 0..total {
            f(self, off)?;
            for d in (0..shape.len()).rev() {
                index[d] += 1;
                off += strides[d];
                if index[d] < shape[d] {
                    break;
                }
                off -= strides[d] * shape[d];
                index[d] = 0;
            }
        }
        Ok(())
    }

    /// Writes a `rows x (sum of block widths)` output whose columns come from `blocks` side by side:
    /// in block b, source element (r, c) is at `base + r + c * col_stride` of its storage. One
    /// transposed view is a single block; a concatenation of transposed views along the last dim is
    /// several.
    fn transpose_blocks(
        &mut self,
        dtype: DType,
        rows: usize,
        blocks: &[ColumnBlock<'_>],
    ) -> Result<()> {
        let row_bytes = blocks.iter().map(|b| b.cols).sum::<usize>() * dtype.size();
        let pitch = tile_pitch(row_bytes);
        let mut tile = vec![0u8; TILE.min(rows) * pitch];
        for r0 in (0..rows).step_by(TILE) {
            let r1 = (r0 + TILE).min(rows);
            let mut col_offset = 0;
            for block in blocks {
                let band = Band {
                    block,
                    r0,
                    r1,
                    pitch,
                    col_offset,
                };
                match dtype.size() {
                    1 => band.gather::<1>(&mut tile),
                    2 => band.gather::<2>(&mut tile),
                    4 => band.gather::<4>(&mut tile),
                    _ => band.gather::<8>(&mut tile),
                }
                col_offset += block.cols;
            }
            for r in 0..r1 - r0 {
                self.emit_gathered(dtype, &tile[r * pitch..r * pitch + row_bytes])?;
            }
        }
        Ok(())
    }

    /// Emits already-gathered source-dtype bytes.
    fn emit_gathered(&mut self, dtype: DType, bytes: &[u8]) -> Result<()> {
        self.run(dtype, bytes, 0, bytes.len() / dtype.size())
    }
}

/// Distance between tile rows: the row length padded so that consecutive rows do not fall in the same
/// cache set (rows a multiple of 4 KiB apart all compete for the same few L1 ways).
fn tile_pitch(row_bytes: usize) -> usize {
    let lines = row_bytes.div_ceil(64);
    // An odd number of cache lines never lands rows on the same set.
    64 * (lines | 1)
}

/// Columns of an output whose source is stored transposed: element (r, c) at `base + r + c * col_stride`.
struct ColumnBlock<'a> {
    storage: &'a [u8],
    base: usize,
    cols: usize,
    col_stride: usize,
}

/// Rows `r0..r1` of a [`ColumnBlock`], gathered into a tile at column `col_offset`.
struct Band<'a, 'b> {
    block: &'b ColumnBlock<'a>,
    r0: usize,
    r1: usize,
    pitch: usize,
    col_offset: usize,
}

impl Band<'_, '_> {
    /// `ES` (the element size) is a constant so every element move is a single load and store.
    fn gather<const ES: usize>(&self, tile: &mut [u8]) {
        // Rows: one source cache line of elements; columns: few enough source rows (a multiple of 4 KiB
        // apart, so in one cache set) to fit the L1 ways.
        let row_block = 64 / ES;
        const COL_BLOCK: usize = 8;
        let b = self.block;
        let rows = self.r1 - self.r0;
        assert!(tile.len() >= rows * self.pitch && (self.col_offset + b.cols) * ES <= self.pitch);
        for rb in (0..rows).step_by(row_block) {
            let re = (rb + row_block).min(rows);
            for cb in (0..b.cols).step_by(COL_BLOCK) {
                for c in cb..(cb + COL_BLOCK).min(b.cols) {
                    let start = (b.base + c * b.col_stride + self.r0 + rb) * ES;
                    let col = &b.storage[start..start + (re - rb) * ES];
                    let src = col.as_ptr() as *const [u8; ES];
                    let dst = tile[rb * self.pitch + (self.col_offset + c) * ES..].as_mut_ptr();
                    for i in 0..re - rb {
                        // SAFETY: i < re - rb, the length of `col` in elements; and rb + i < rows and
                        // col_offset + c < pitch / ES, so the ES bytes written lie inside the tile (asserted).
                        unsafe {
                            let v = std::ptr::read_unaligned(src.add(i));
                            std::ptr::write_unaligned(dst.add(i * self.pitch) as *mut [u8; ES], v);
                        }
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Reference: element-by-element row-major gather of `cat(parts, dim)` (u32 elements).
    fn reference(parts: &[(Layout, Vec<u32>)], dim: usize) -> Vec<u32> {
        let shape = {
            let mut s = parts[0].0.shape.clone();
            s[dim] = parts.iter().map(|p| p.0.shape[dim]).sum();
            s
        };
        let numel: usize = shape.iter().product();
        let mut out = Vec::with_capacity(numel);
        for flat in 0..numel {
            let mut idx = vec![0; shape.len()];
            let mut rem = flat;
            for d in (0..shape.len()).rev() {
                idx[d] = rem % shape[d];
                rem /= shape[d];
            }
            let mut along = idx[dim];
            let (layout, data) = parts
                .iter()
                .find(|p| {
                    if along < p.0.shape[dim] {
                        true
                    } else {
                        along -= p.0.shape[dim];
                        false
                    }
                })
                .unwrap();
            idx[dim] = along;
            let off = layout.offset
                + idx
                    .iter()
                    .zip(&layout.strides)
                    .map(|(i, s)| i * s)
                    .sum::<usize>();
            out.push(data[off]);
        }
        out
    }

    fn bytes_of(v: &[u32]) -> Vec<u8> {
        v.iter().flat_map(|x| x.to_le_bytes()).collect()
    }

    /// A random 2-to-4-d source, narrowed, maybe transposed.
    fn arb_view() -> impl Strategy<Value = (Layout, Vec<u32>)> {
        (prop::collection::vec(1usize..7, 2..=4), any::<u64>()).prop_map(|(shape, seed)| {
            let base = Layout::contiguous(&shape);
            let data: Vec<u32> = (0..base.numel() as u32).collect();
            let mut layout = base;
            let nd = shape.len();
            let d = (seed as usize) % nd;
            let start = (seed as usize / 7) % shape[d];
            let len = 1 + (seed as usize / 13) % (shape[d] - start);
            layout = layout.narrow(d, start, len).unwrap();
            if seed % 2 == 0 {
                layout = layout.transpose(nd - 2, nd - 1);
            }
            (layout, data)
        })
    }

    proptest! {
        #[test]
        fn views_match_reference((layout, data) in arb_view()) {
            let storage = bytes_of(&data);
            let part = Part { dtype: DType::I32, layout: layout.clone(), storage: &storage };
            let mut out = Vec::new();
            write_view(&part, DType::I32, &mut out).unwrap();
            prop_assert_eq!(out, bytes_of(&reference(&[(layout, data)], 0)));
        }

        #[test]
        fn concat_matches_reference(rows in prop::collection::vec(1usize..5, 1..4), cols in 1usize..70, dim in 0usize..2, transpose in any::<bool>()) {
            // Parts of shape [rows_i, cols] (dim 0) or [cols, rows_i] (dim 1), maybe stored transposed.
            let mut parts = Vec::new();
            for &r in &rows {
                let stored = if dim == 0 { [r, cols] } else { [cols, r] };
                let data: Vec<u32> = (0..(r * cols) as u32).map(|x| x * 31 + r as u32).collect();
                let layout = if transpose {
                    Layout::contiguous(&[stored[1], stored[0]]).transpose(0, 1)
                } else {
                    Layout::contiguous(&stored)
                };
                parts.push((layout, data));
            }
            let storages: Vec<Vec<u8>> = parts.iter().map(|p| bytes_of(&p.1)).collect();
            let views: Vec<Part> = parts.iter().zip(&storages).map(|(p, s)| Part { dtype: DType::I32, layout: p.0.clone(), storage: s }).collect();
            let mut out = Vec::new();
            let n = write_concat(&views, dim, DType::I32, &mut out).unwrap();
            prop_assert_eq!(n as usize, out.len());
            prop_assert_eq!(out, bytes_of(&reference(&parts, dim)));
        }
    }

    #[test]
    fn converts_while_copying() {
        let src: Vec<u8> = [1.5f32, -2.0, 3.25]
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect();
        let layout = Layout::contiguous(&[3]);
        let part = Part {
            dtype: DType::F32,
            layout,
            storage: &src,
        };
        let mut out = Vec::new();
        write_view(&part, DType::BF16, &mut out).unwrap();
        assert_eq!(
            out,
            [0x3fc0u16, 0xc000, 0x4050]
                .iter()
                .flat_map(|v| v.to_le_bytes())
                .collect::<Vec<_>>()
        );
        assert!(write_view(&part, DType::I32, &mut Vec::new()).is_err());
    }

    #[test]
    fn out_of_bounds_views_are_refused() {
        let src = vec![0u8; 8];
        let part = Part {
            dtype: DType::F32,
            layout: Layout::contiguous(&[3]),
            storage: &src,
        };
        assert!(write_view(&part, DType::F32, &mut Vec::new()).is_err());
    }

    #[test]
    fn concat_of_narrowed_transposed_blocks_is_exact() {
        // o_proj shards: column blocks of one [rows, cols] matrix stored transposed, in a shuffled order.
        let (r, c) = (130usize, 96usize);
        let data: Vec<u32> = (0..(r * c) as u32)
            .map(|x| x.wrapping_mul(2654435761))
            .collect();
        let storage = bytes_of(&data);
        let base = Layout::contiguous(&[c, r]).transpose(0, 1); // logical [r, c], strides (1, r)
        let cuts = [(40usize, 16usize), (0, 40), (56, 40)];
        let layouts: Vec<Layout> = cuts
            .iter()
            .map(|&(s, n)| base.narrow(1, s, n).unwrap())
            .collect();
        let parts: Vec<Part> = layouts
            .iter()
            .map(|l| Part {
                dtype: DType::I32,
                layout: l.clone(),
                storage: &storage,
            })
            .collect();
        assert!(transposed_column_blocks(&parts, 1).is_some());
        let mut out = Vec::new();
        write_concat(&parts, 1, DType::I32, &mut out).unwrap();
        let reference_parts: Vec<(Layout, Vec<u32>)> =
            layouts.iter().map(|l| (l.clone(), data.clone())).collect();
        assert_eq!(out, bytes_of(&reference(&reference_parts, 1)));
    }

    #[test]
    fn large_transpose_is_exact() {
        let (r, c) = (300usize, 257usize);
        let data: Vec<u32> = (0..(r * c) as u32).collect();
        let storage = bytes_of(&data);
        let layout = Layout::contiguous(&[r, c]).transpose(0, 1);
        let part = Part {
            dtype: DType::I32,
            layout: layout.clone(),
            storage: &storage,
        };
        let mut out = Vec::new();
        write_view(&part, DType::I32, &mut out).unwrap();
        assert_eq!(out, bytes_of(&reference(&[(layout, data)], 0)));
    }
}
