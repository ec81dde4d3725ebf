//! safetensors (in progress).
