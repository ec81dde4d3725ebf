//! Tensor checkpoint formats for the suite.
//!
//! * [`dtype`]: element types and exact float conversions.
//! * [`view`]: layouts (shape, strides, offset) and borrowed tensor views over mapped bytes.
//! * [`safetensors`]: single-file and index-sharded safetensors, read through mmap, written as a stream.
//! * [`torch`]: torch `.pt` archives (zip + restricted pickle), byte-identical to `torch.save`.
//! * [`xser`]: the torch_xla / NxD xser layouts.
//! * [`copy`]: the strided-copy engine that produces output tensors from runs of source bytes.
#![warn(missing_docs)]

pub mod copy;
pub mod dtype;
pub mod error;
pub mod safetensors;
pub mod torch;
pub mod view;
pub mod xser;

pub use dtype::DType;
pub use error::{FormatError, Result};
pub use view::{Layout, TensorRef};
