//! Element types shared by safetensors, torch and numpy, with exact conversions between float types.

use half::{bf16, f16};

/// An element type that every format in this crate can carry (the dtypes torch 2.1 can save).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum DType {
    /// 1-byte boolean (0 or 1).
    Bool,
    /// Unsigned 8-bit integer.
    U8,
    /// Signed 8-bit integer.
    I8,
    /// Signed 16-bit integer.
    I16,
    /// Signed 32-bit integer.
    I32,
    /// Signed 64-bit integer.
    I64,
    /// IEEE half precision.
    F16,
    /// bfloat16.
    BF16,
    /// IEEE single precision.
    F32,
    /// IEEE double precision.
    F64,
}

/// Every dtype, in a fixed order (useful for tests and help text).
pub const ALL_DTYPES: [DType; 10] = [
    DType::Bool,
    DType::U8,
    DType::I8,
    DType::I16,
    DType::I32,
    DType::I64,
    DType::F16,
    DType::BF16,
    DType::F32,
    DType::F64,
];

impl DType {
    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            DType::Bool | DType::U8 | DType::I8 => 1,
            DType::I16 | DType::F16 | DType::BF16 => 2,
            DType::I32 | DType::F32 => 4,
            DType::I64 | DType::F64 => 8,
        }
    }

    /// The dtype string in a safetensors header (`"BF16"`).
    pub fn safetensors_name(self) -> &'static str {
        match self {
            DType::Bool => "BOOL",
            DType::U8 => "U8",
            DType::I8 => "I8",
            DType::I16 => "I16",
            DType::I32 => "I32",
            DType::I64 => "I64",
            DType::F16 => "F16",
            DType::BF16 => "BF16",
            DType::F32 => "F32",
            DType::F64 => "F64",
        }
    }

    /// Parses a safetensors dtype string; `None` for dtypes this suite does not carry.
    pub fn from_safetensors_name(name: &str) -> Option<DType> {
        ALL_DTYPES
            .into_iter()
            .find(|d| d.safetensors_name() == name)
    }

    /// The legacy torch storage class that tags this dtype in a `.pt` pickle (`"BFloat16Storage"`).
    pub fn torch_storage_class(self) -> &'static str {
        match self {
            DType::Bool => "BoolStorage",
            DType::U8 => "ByteStorage",
            DType::I8 => "CharStorage",
            DType::I16 => "ShortStorage",
            DType::I32 => "IntStorage",
            DType::I64 => "LongStorage",
            DType::F16 => "HalfStorage",
            DType::BF16 => "BFloat16Storage",
            DType::F32 => "FloatStorage",
            DType::F64 => "DoubleStorage",
        }
    }

    /// Parses a torch storage class name (without the `torch.` module).
    pub fn from_torch_storage_class(name: &str) -> Option<DType> {
        ALL_DTYPES
            .into_iter()
            .find(|d| d.torch_storage_class() == name)
    }

    /// The torch dtype attribute name (`torch.bfloat16` -> `"bfloat16"`).
    pub fn torch_name(self) -> &'static str {
        match self {
            DType::Bool => "bool",
            DType::U8 => "uint8",
            DType::I8 => "int8",
            DType::I16 => "int16",
            DType::I32 => "int32",
            DType::I64 => "int64",
            DType::F16 => "float16",
            DType::BF16 => "bfloat16",
            DType::F32 => "float32",
            DType::F64 => "float64",
        }
    }

    /// Parses a torch dtype attribute name, including the aliases torch pickles (`half`, `float`, `long`...).
    pub fn from_torch_name(name: &str) -> Option<DType> {
        let canonical = match name {
            "half" => "float16",
            "float" => "float32",
            "double" => "float64",
            "long" => "int64",
            "int" => "int32",
            "short" => "int16",
            other => other,
        };
        ALL_DTYPES.into_iter().find(|d| d.torch_name() == canonical)
    }

    /// True for the floating-point dtypes that can be converted into each other.
    pub fn is_float(self) -> bool {
        matches!(self, DType::F16 | DType::BF16 | DType::F32 | DType::F64)
    }

    /// Parses a user-facing dtype name: `bf16`, `fp16`, `fp32`, `f32`, `float32`, `BF16`...
    pub fn parse_user(name: &str) -> Option<DType> {
        let lower = name.to_ascii_lowercase();
        match lower.as_str() {
            "bf16" | "bfloat16" => Some(DType::BF16),
            "fp16" | "f16" | "float16" | "half" => Some(DType::F16),
            "fp32" | "f32" | "float32" | "float" => Some(DType::F32),
            "fp64" | "f64" | "float64" | "double" => Some(DType::F64),
            _ => DType::from_safetensors_name(&name.to_ascii_uppercase())
                .or_else(|| DType::from_torch_name(&lower)),
        }
    }
}

impl std::fmt::Display for DType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.torch_name())
    }
}

/// Converts little-endian float elements from `src` (dtype `from`) into `dst` (dtype `to`).
///
/// Rounding is IEEE round-to-nearest-even, done once from the wider value, as torch's `.to()` does.
/// Both dtypes must be float types, and `dst.len() / to.size() == src.len() / from.size()`.
pub fn convert_floats(src: &[u8], from: DType, dst: &mut [u8], to: DType) {
    debug_assert!(from.is_float() && to.is_float());
    debug_assert_eq!(src.len() / from.size(), dst.len() / to.size());
    if from == to {
        dst.copy_from_slice(src);
        return;
    }
    // One tight loop per pair: the conversion runs over whole checkpoints.
    macro_rules! each {
        ($n:literal, $m:literal, |$b:ident| $e:expr) => {
            for (s, d) in src.chunks_exact($n).zip(dst.chunks_exact_mut($m)) {
                let $b: [u8; $n] = s.try_into().unwrap();
                d.copy_from_slice(&$e);
            }
        };
    }
    match (from, to) {
        // f64 narrows straight from f64 so there is a single rounding.
        (DType::F64, DType::F32) => each!(8, 4, |b| (f64::from_le_bytes(b) as f32).to_le_bytes()),
        (DType::F64, DType::F16) => {
            each!(8, 2, |b| f16::from_f64(f64::from_le_bytes(b)).to_le_bytes())
        }
        (DType::F64, DType::BF16) => each!(8, 2, |b| bf16::from_f64(f64::from_le_bytes(b))
            .to_le_bytes()),
        (DType::F32, DType::F64) => each!(4, 8, |b| (f32::from_le_bytes(b) as f64).to_le_bytes()),
        (DType::F32, DType::F16) => {
            each!(4, 2, |b| f16::from_f32(f32::from_le_bytes(b)).to_le_bytes())
        }
        (DType::F32, DType::BF16) => each!(4, 2, |b| bf16::from_f32(f32::from_le_bytes(b))
            .to_le_bytes()),
        // bf16 widens by a shift: exact.
        (DType::BF16, DType::F32) => each!(2, 4, |b| ((u16::from_le_bytes(b) as u32) << 16)
            .to_le_bytes()),
        (DType::BF16, DType::F64) => {
            each!(2, 8, |b| (bf16::from_le_bytes(b).to_f64()).to_le_bytes())
        }
        (DType::BF16, DType::F16) => {
            each!(2, 2, |b| f16::from_f32(bf16::from_le_bytes(b).to_f32())
                .to_le_bytes())
        }
        (DType::F16, DType::F32) => each!(2, 4, |b| f16::from_le_bytes(b).to_f32().to_le_bytes()),
        (DType::F16, DType::F64) => each!(2, 8, |b| f16::from_le_bytes(b).to_f64().to_le_bytes()),
        (DType::F16, DType::BF16) => {
            each!(2, 2, |b| bf16::from_f32(f16::from_le_bytes(b).to_f32())
                .to_le_bytes())
        }
        _ => unreachable!("convert_floats called with {from} -> {to}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        for d in ALL_DTYPES {
            assert_eq!(DType::from_safetensors_name(d.safetensors_name()), Some(d));
            assert_eq!(
                DType::from_torch_storage_class(d.torch_storage_class()),
                Some(d)
            );
            assert_eq!(DType::from_torch_name(d.torch_name()), Some(d));
        }
        assert_eq!(DType::parse_user("fp32"), Some(DType::F32));
        assert_eq!(DType::parse_user("BF16"), Some(DType::BF16));
        assert_eq!(DType::parse_user("int8"), Some(DType::I8));
        assert_eq!(DType::parse_user("q4"), None);
    }

    #[test]
    fn bf16_rounds_to_nearest_even() {
        // 1 + 2^-8 is exactly halfway between two bf16 values: ties go to the even mantissa (1.0).
        let halfway = 1.0f32 + 2f32.powi(-8);
        let mut out = [0u8; 2];
        convert_floats(&halfway.to_le_bytes(), DType::F32, &mut out, DType::BF16);
        assert_eq!(u16::from_le_bytes(out), 0x3f80);
        // Just above halfway rounds up.
        let above = f32::from_bits(halfway.to_bits() + 1);
        convert_floats(&above.to_le_bytes(), DType::F32, &mut out, DType::BF16);
        assert_eq!(u16::from_le_bytes(out), 0x3f81);
    }

    #[test]
    fn widening_is_exact() {
        let vals: Vec<u8> = [0x3f80u16, 0xc000, 0x7f80, 0x0001]
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect();
        let mut wide = vec![0u8; 16];
        convert_floats(&vals, DType::BF16, &mut wide, DType::F32);
        let mut back = vec![0u8; 8];
        convert_floats(&wide, DType::F32, &mut back, DType::BF16);
        assert_eq!(back, vals);
    }
}
