//! The executor: turns planned tensors into [`TensorSource`]s that stream their bytes from the
//! mapped inputs (converting dtypes on the way) or, for a LoRA target, merge the adapter in
//! blocks of rows, in parallel, holding one base tensor's adapter pair at a time.

use std::io::Write;

use anyhow::{anyhow, Context, Result};
use checkpoint_write::TensorSource;
use rayon::prelude::*;
use tensor_formats::copy::{write_view, Part};
use tensor_formats::{DType, TensorRef};

use crate::adapter::LoraOp;
use crate::merge::{decode_f32, encode, Merge};
use crate::plan::{Origin, Planned};
use crate::store::Store;

/// Bytes of fp32 rows a merge block holds (per worker).
const BLOCK_BYTES: usize = 4 << 20;

/// A planned tensor bound to the opened inputs and adapter.
pub struct Job<'a> {
    /// The plan entry.
    pub planned: &'a Planned,
    /// The inputs.
    pub inputs: &'a [Store],
    /// The adapter's tensors, if there is an adapter.
    pub adapter: Option<&'a Store>,
}

/// A tensor as fp32 values (adapter tensors are small).
fn read_f32(view: TensorRef<'_>) -> Result<Vec<f32>> {
    if !view.dtype.is_float() {
        return Err(anyhow!("is {}, not a float tensor", view.dtype));
    }
    let mut bytes = Vec::with_capacity(view.layout.numel() * 4);
    write_view(&Part::whole(view), DType::F32, &mut bytes)?;
    Ok(decode_f32(&bytes))
}

impl Job<'_> {
    fn base(&self) -> Result<TensorRef<'_>> {
        let p = self.planned;
        self.inputs[p.input]
            .view(&p.source)
            .with_context(|| format!("reading {}", p.source))
    }

    fn adapter_tensor(&self, name: &str) -> Result<TensorRef<'_>> {
        self.adapter
            .ok_or_else(|| anyhow!("no adapter"))?
            .view(name)
            .with_context(|| format!("reading adapter tensor {name}"))
    }

    fn merge_for(&self, op: &LoraOp) -> Result<Merge> {
        let f32_of = |name: &str| -> Result<Vec<f32>> {
            read_f32(self.adapter_tensor(name)?).with_context(|| format!("adapter tensor {name}"))
        };
        let shape = &self.planned.shape;
        let merge = Merge {
            a: f32_of(&op.a)?,
            b: f32_of(&op.b)?,
            magnitude: op.magnitude.as_deref().map(f32_of).transpose()?,
            scale: op.scale,
            r: op.r,
            kind: op.kind,
            rows: shape[0],
            cols: shape[1],
        };
        merge.check().map_err(|e| anyhow!(e))?;
        Ok(merge)
    }

    /// Streams `base` with `op` merged in, block by block; blocks of a batch run in parallel.
    fn write_merged(&self, op: &LoraOp, out: &mut dyn Write) -> Result<u64> {
        let merge = self.merge_for(op)?;
        let base = Part::whole(self.base()?);
        let (rows, cols) = (merge.rows, merge.cols);
        let block_rows = (BLOCK_BYTES / (cols.max(1) * 4)).clamp(1, rows.max(1));
        let blocks: Vec<usize> = (0..rows).step_by(block_rows).collect();
        let batch = 2 * rayon::current_num_threads();
        let dtype = self.planned.dtype;
        let mut written = 0u64;
        for group in blocks.chunks(batch) {
            let encoded: Vec<Result<Vec<u8>>> = group
                .par_iter()
                .map(|&row0| {
                    let n = block_rows.min(rows - row0);
                    let mut bytes = Vec::with_capacity(n * cols * 4);
                    write_view(&base.narrow(0, row0, n)?, DType::F32, &mut bytes)?;
                    let mut values = decode_f32(&bytes);
                    merge.apply(row0, &mut values);
                    Ok(encode(&values, dtype))
                })
                .collect();
            for e in encoded {
                let e = e?;
                out.write_all(&e)?;
                written += e.len() as u64;
            }
        }
        Ok(written)
    }
}

impl TensorSource for Job<'_> {
    fn name(&self) -> &str {
        &self.planned.name
    }

    fn dtype(&self) -> DType {
        self.planned.dtype
    }

    fn shape(&self) -> &[usize] {
        &self.planned.shape
    }

    fn write_to(&self, out: &mut dyn Write) -> Result<u64> {
        let dtype = self.planned.dtype;
        match &self.planned.origin {
            Origin::Copy => Ok(write_view(&Part::whole(self.base()?), dtype, out)?),
            Origin::Replace(name) => {
                let view = self.adapter_tensor(name)?;
                if view.dtype != dtype && !(view.dtype.is_float() && dtype.is_float()) {
                    return Err(anyhow!(
                        "adapter tensor {name} is {} but the model's is {dtype}",
                        view.dtype
                    ));
                }
                Ok(write_view(&Part::whole(view), dtype, out)?)
            }
            Origin::Lora(op) => self
                .write_merged(op, out)
                .with_context(|| format!("merging the adapter into {}", self.planned.source)),
        }
    }
}
