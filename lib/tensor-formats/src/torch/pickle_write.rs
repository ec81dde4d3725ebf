//! A protocol-2 pickler that emits exactly what CPython's C pickler emits for what torch saves, including
//! its memoization (every str, GLOBAL, non-empty tuple, dict and REDUCE result gets a `BINPUT`; an object
//! that Python would pass by identity, such as the `'storage'` literal or a storage key, is `BINGET` on reuse).

use std::collections::HashMap;

use crate::dtype::DType;
use crate::view::Layout;

/// What Python would see as "the same object", for memo lookups.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum Identity {
    Global(&'static str, &'static str),
    Constant(&'static str),
    StorageKey(usize),
}

/// Builds a `data.pkl` byte string.
pub struct Pickler {
    out: Vec<u8>,
    memo: HashMap<Identity, u32>,
    next_memo: u32,
}

impl Default for Pickler {
    fn default() -> Self {
        Pickler::new()
    }
}

impl Pickler {
    /// Starts a protocol-2 pickle.
    pub fn new() -> Pickler {
        Pickler {
            out: vec![0x80, 2],
            memo: HashMap::new(),
            next_memo: 0,
        }
    }

    /// Ends the pickle with STOP and returns its bytes.
    pub fn finish(mut self) -> Vec<u8> {
        self.out.push(b'.');
        self.out
    }

    fn put(&mut self) -> u32 {
        let idx = self.next_memo;
        if idx < 256 {
            self.out.extend_from_slice(&[b'q', idx as u8]);
        } else {
            self.out.push(b'r');
            self.out.extend_from_slice(&idx.to_le_bytes());
        }
        self.next_memo += 1;
        idx
    }

    fn get(&mut self, idx: u32) {
        if idx < 256 {
            self.out.extend_from_slice(&[b'h', idx as u8]);
        } else {
            self.out.push(b'j');
            self.out.extend_from_slice(&idx.to_le_bytes());
        }
    }

    /// Emits the object once and memoizes it; later uses of the same identity are `BINGET`s.
    fn shared(&mut self, id: Identity, emit: impl FnOnce(&mut Pickler)) {
        if let Some(&idx) = self.memo.get(&id) {
            self.get(idx);
        } else {
            emit(self);
            let idx = self.put();
            self.memo.insert(id, idx);
        }
    }

    /// A fresh str object (memoized, never reused).
    pub fn str(&mut self, s: &str) {
        self.raw_str(s);
        self.put();
    }

    fn raw_str(&mut self, s: &str) {
        self.out.push(b'X');
        self.out.extend_from_slice(&(s.len() as u32).to_le_bytes());
        self.out.extend_from_slice(s.as_bytes());
    }

    fn constant_str(&mut self, s: &'static str) {
        self.shared(Identity::Constant(s), |p| p.raw_str(s));
    }

    fn global(&mut self, module: &'static str, name: &'static str) {
        self.shared(Identity::Global(module, name), |p| {
            p.out.push(b'c');
            p.out.extend_from_slice(module.as_bytes());
            p.out.push(b'\n');
            p.out.extend_from_slice(name.as_bytes());
            p.out.push(b'\n');
        });
    }

    /// An int, with the shortest opcode CPython picks.
    pub fn int(&mut self, v: i64) {
        if (0..=0xff).contains(&v) {
            self.out.extend_from_slice(&[b'K', v as u8]);
        } else if (0..=0xffff).contains(&v) {
            self.out.push(b'M');
            self.out.extend_from_slice(&(v as u16).to_le_bytes());
        } else if (i32::MIN as i64..=i32::MAX as i64).contains(&v) {
            self.out.push(b'J');
            self.out.extend_from_slice(&(v as i32).to_le_bytes());
        } else {
            // LONG1: minimal two's-complement little-endian bytes.
            let bytes = v.to_le_bytes();
            let mut n = 8;
            while n > 1 {
                let (last, prev) = (bytes[n - 1], bytes[n - 2]);
                if (last == 0 && prev & 0x80 == 0) || (last == 0xff && prev & 0x80 != 0) {
                    n -= 1;
                } else {
                    break;
                }
            }
            self.out.extend_from_slice(&[0x8a, n as u8]);
            self.out.extend_from_slice(&bytes[..n]);
        }
    }

    /// A bool.
    pub fn bool(&mut self, v: bool) {
        self.out.push(if v { 0x88 } else { 0x89 });
    }

    /// A fresh tuple of ints (`EMPTY_TUPLE` when empty, which is never memoized).
    pub fn int_tuple(&mut self, items: &[usize]) {
        match items.len() {
            0 => self.out.push(b')'),
            n @ 1..=3 => {
                for &i in items {
                    self.int(i as i64);
                }
                self.out.push(0x84 + n as u8);
                self.put();
            }
            _ => {
                self.out.push(b'(');
                for &i in items {
                    self.int(i as i64);
                }
                self.out.push(b't');
                self.put();
            }
        }
    }

    /// A dict of `len` entries; `entry(p, i)` writes the i-th key and value. Batches as CPython does:
    /// one item uses SETITEM; otherwise MARK..SETITEMS per 1000, with a trailing empty batch after a full one.
    pub fn dict(&mut self, len: usize, mut entry: impl FnMut(&mut Pickler, usize)) {
        self.out.push(b'}');
        self.put();
        if len == 1 {
            entry(self, 0);
            self.out.push(b's');
            return;
        }
        if len == 0 {
            return;
        }
        let mut i = 0;
        loop {
            self.out.push(b'(');
            let batch_end = (i + 1000).min(len);
            let batch = batch_end - i;
            while i < batch_end {
                entry(self, i);
                i += 1;
            }
            self.out.push(b'u');
            if batch != 1000 {
                break;
            }
        }
    }

    /// A tensor as `torch._utils._rebuild_tensor_v2(storage, offset, size, stride, requires_grad, OrderedDict())`.
    ///
    /// `storage_key` is the storage's number (`data/<key>`), `storage_numel` its length in elements.
    pub fn tensor(
        &mut self,
        dtype: DType,
        layout: &Layout,
        storage_key: usize,
        storage_numel: usize,
        requires_grad: bool,
    ) {
        self.global("torch._utils", "_rebuild_tensor_v2");
        self.out.push(b'(');
        self.out.push(b'(');
        self.constant_str("storage");
        self.global("torch", dtype.torch_storage_class());
        self.shared(Identity::StorageKey(storage_key), |p| {
            p.raw_str(&storage_key.to_string())
        });
        self.constant_str("cpu");
        self.int(storage_numel as i64);
        self.out.push(b't');
        self.put();
        self.out.push(b'Q');
        self.int(layout.offset as i64);
        self.int_tuple(&layout.shape);
        self.int_tuple(&layout.strides);
        self.bool(requires_grad);
        self.global("collections", "OrderedDict");
        self.out.extend_from_slice(b")R");
        self.put();
        self.out.push(b't');
        self.put();
        self.out.push(b'R');
        self.put();
    }

    /// An xser `torch_xla.utils.serialization.TensorReference(tid)` (NEWOBJ + BUILD of `{'tid': tid}`).
    pub fn tensor_reference(&mut self, tid: usize) {
        self.global("torch_xla.utils.serialization", "TensorReference");
        self.out.extend_from_slice(&[b')', 0x81]);
        self.put();
        self.out.push(b'}');
        self.put();
        self.constant_str("tid");
        self.int(tid as i64);
        self.out.push(b's');
        self.out.push(b'b');
    }

    /// An NxD `.info.pt` entry: `{'dtype': torch.<dtype>, 'shape': torch.Size(shape), 'expert_model_parallel': False}`.
    pub fn tensor_info(&mut self, dtype: DType, shape: &[usize]) {
        self.dict(3, |p, i| match i {
            0 => {
                p.constant_str("dtype");
                p.global("torch", dtype.torch_name());
            }
            1 => {
                p.constant_str("shape");
                p.global("torch", "Size");
                p.int_tuple(shape);
                p.out.push(0x85);
                p.put();
                p.out.push(b'R');
                p.put();
            }
            _ => {
                p.constant_str("expert_model_parallel");
                p.bool(false);
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::torch::pickle::{unpickle, Value};

    /// The exact `data.pkl` torch 2.15 writes for `{"w": bf16 [[0,1,2],[3,4,5]]}` (torch-format spec §5.2).
    const TORCH_215: &str = "80027d7100580100000077710163746f7263682e5f7574696c730a5f72656275696c645f74656e736f725f76320a71022828580700000073746f72616765710363746f7263680a42466c6f6174313653746f726167650a71045801000000307105580300000063707571064b06747107514b004b024b038671084b034b018671098963636f6c6c656374696f6e730a4f726465726564446963740a710a2952710b74710c52710d732e";

    fn hex(s: &str) -> Vec<u8> {
        let s: String = s.chars().filter(|c| !c.is_whitespace()).collect();
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect()
    }

    #[test]
    fn matches_torch_byte_for_byte() {
        let mut p = Pickler::new();
        p.dict(1, |p, _| {
            p.str("w");
            p.tensor(DType::BF16, &Layout::contiguous(&[2, 3]), 0, 6, false);
        });
        assert_eq!(p.finish(), hex(TORCH_215));
    }

    #[test]
    fn ints_round_trip() {
        for v in [
            0i64,
            255,
            256,
            65535,
            65536,
            -1,
            -2,
            i32::MIN as i64,
            1 << 40,
            -(1 << 40),
            i64::MAX,
            i64::MIN,
        ] {
            let mut p = Pickler::new();
            p.int(v);
            assert_eq!(unpickle(&p.finish()).unwrap(), Value::Int(v), "{v}");
        }
    }

    #[test]
    fn large_dicts_batch_and_reuse_memo() {
        let mut p = Pickler::new();
        p.dict(2000, |p, i| {
            p.str(&format!("t{i}"));
            p.tensor(DType::F32, &Layout::contiguous(&[2]), i % 3, 2, false);
        });
        let v = unpickle(&p.finish()).unwrap();
        let Value::Dict(items) = v else { panic!() };
        assert_eq!(items.len(), 2000);
        let Value::Tensor(t) = &items[1999].1 else {
            panic!()
        };
        assert_eq!(t.storage.key, (1999 % 3).to_string());
    }

    #[test]
    fn tensor_reference_and_info() {
        let mut p = Pickler::new();
        p.dict(2, |p, i| {
            p.str(&format!("k{i}"));
            p.tensor_reference(i);
        });
        let v = unpickle(&p.finish()).unwrap();
        let Some(Value::Object { class, state }) = v.get("k1") else {
            panic!("{v:?}")
        };
        assert_eq!(class, "torch_xla.utils.serialization.TensorReference");
        assert_eq!(state, &vec![(Value::Str("tid".into()), Value::Int(1))]);

        let mut p = Pickler::new();
        p.dict(1, |p, _| {
            p.int(0);
            p.tensor_info(DType::BF16, &[2, 3]);
        });
        let v = unpickle(&p.finish()).unwrap();
        let Value::Dict(items) = v else { panic!() };
        assert_eq!(items[0].1.get("dtype"), Some(&Value::DType(DType::BF16)));
        assert_eq!(
            items[0].1.get("shape"),
            Some(&Value::Tuple(vec![Value::Int(2), Value::Int(3)]))
        );
    }
}
