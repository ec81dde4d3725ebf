//! Tensor metadata and borrowed tensor views over mapped bytes.

use crate::dtype::DType;
use crate::error::FormatError;

/// Where a tensor's elements sit in its storage: torch's (storage offset, size, stride) triple, in elements.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Layout {
    /// Size of every dimension (empty for a 0-d tensor).
    pub shape: Vec<usize>,
    /// Distance in elements between neighbours along each dimension.
    pub strides: Vec<usize>,
    /// Index of element (0, 0, ...) in the storage, in elements.
    pub offset: usize,
}

impl Layout {
    /// The row-major (C-contiguous) layout of `shape` at offset 0.
    pub fn contiguous(shape: &[usize]) -> Layout {
        Layout {
            shape: shape.to_vec(),
            strides: contiguous_strides(shape),
            offset: 0,
        }
    }

    /// Number of elements.
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    /// True if the elements are row-major and gap-free (torch's `is_contiguous`: size-1 dims are ignored).
    pub fn is_contiguous(&self) -> bool {
        let mut expected = 1;
        for (&size, &stride) in self.shape.iter().zip(&self.strides).rev() {
            if size != 1 && stride != expected {
                return false;
            }
            expected *= size;
        }
        true
    }

    /// Number of storage elements the layout reaches: one past its highest element index (0 if empty).
    pub fn storage_span(&self) -> usize {
        if self.shape.contains(&0) {
            return 0;
        }
        self.offset
            + 1
            + self
                .shape
                .iter()
                .zip(&self.strides)
                .map(|(&n, &s)| (n - 1) * s)
                .sum::<usize>()
    }

    /// The sub-range `[start, start+len)` along `dim` (torch's `narrow`).
    pub fn narrow(&self, dim: usize, start: usize, len: usize) -> Result<Layout, FormatError> {
        if dim >= self.shape.len() || start + len > self.shape[dim] {
            return Err(FormatError::Invalid(format!(
                "narrow({dim}, {start}, {len}) out of range for shape {:?}",
                self.shape
            )));
        }
        let mut out = self.clone();
        out.offset += start * self.strides[dim];
        out.shape[dim] = len;
        Ok(out)
    }

    /// Swaps two dimensions (torch's `transpose`), without moving any data.
    pub fn transpose(&self, a: usize, b: usize) -> Layout {
        let mut out = self.clone();
        out.shape.swap(a, b);
        out.strides.swap(a, b);
        out
    }
}

/// Row-major strides for `shape`.
pub fn contiguous_strides(shape: &[usize]) -> Vec<usize> {
    let mut strides = vec![1; shape.len()];
    for i in (0..shape.len().saturating_sub(1)).rev() {
        strides[i] = strides[i + 1] * shape[i + 1];
    }
    strides
}

/// A tensor borrowed from mapped bytes: dtype, layout and the whole storage it indexes into.
#[derive(Debug, Clone, Copy)]
pub struct TensorRef<'a> {
    /// Element type.
    pub dtype: DType,
    /// Shape, strides and offset into `storage`, in elements.
    pub layout: &'a Layout,
    /// The storage bytes (little-endian elements).
    pub storage: &'a [u8],
}

impl<'a> TensorRef<'a> {
    /// Checks that the layout stays inside the storage.
    pub fn validate(&self) -> Result<(), FormatError> {
        let needed = self.layout.storage_span().checked_mul(self.dtype.size());
        match needed {
            Some(n) if n <= self.storage.len() => Ok(()),
            _ => Err(FormatError::Invalid(format!(
                "tensor of shape {:?} (strides {:?}, offset {}) does not fit in a storage of {} bytes",
                self.layout.shape,
                self.layout.strides,
                self.layout.offset,
                self.storage.len()
            ))),
        }
    }

    /// The tensor's bytes when it is contiguous (`None` otherwise).
    pub fn contiguous_bytes(&self) -> Option<&'a [u8]> {
        if !self.layout.is_contiguous() {
            return None;
        }
        let es = self.dtype.size();
        let start = self.layout.offset * es;
        self.storage.get(start..start + self.layout.numel() * es)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn contiguity_and_span() {
        let l = Layout::contiguous(&[3, 4]);
        assert_eq!(l.strides, vec![4, 1]);
        assert!(l.is_contiguous());
        assert_eq!(l.storage_span(), 12);
        let t = l.transpose(0, 1);
        assert!(!t.is_contiguous());
        assert_eq!(t.storage_span(), 12);
        let n = l.narrow(1, 1, 2).unwrap();
        assert_eq!(n.offset, 1);
        assert_eq!(n.storage_span(), 11);
        assert!(l.narrow(1, 3, 2).is_err());
        assert_eq!(Layout::contiguous(&[0, 5]).storage_span(), 0);
        assert_eq!(Layout::contiguous(&[]).storage_span(), 1);
    }
}
