//! Test support: a tiny Llama checkpoint with known values, written without Python, for the
//! end-to-end tests of the NxD tools (nx-shard, shard-verify).
//!
//! The model: hidden 64, 8 query heads, 2 kv heads, 3 layers, intermediate 128, vocabulary 96,
//! untied, bf16. Element `k` of the `t`-th tensor (canonical order) holds [`bits`]`(t, k)`, so
//! any misplaced slice shows.
#![warn(missing_docs)]

use std::collections::BTreeMap;
use std::fs;
use std::io::BufWriter;
use std::path::Path;

use tensor_formats::safetensors::{SafetensorsWriter, TensorSpec};
use tensor_formats::DType;

/// `hidden_size`.
pub const H: usize = 64;
/// `num_attention_heads`.
pub const HEADS: usize = 8;
/// `num_key_value_heads`.
pub const KV: usize = 2;
/// `head_dim`.
pub const HD: usize = H / HEADS;
/// `num_hidden_layers`.
pub const LAYERS: usize = 3;
/// `intermediate_size`.
pub const I: usize = 128;
/// `vocab_size`.
pub const V: usize = 96;

/// The model's `config.json`.
pub const CONFIG: &str = r#"{
  "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
  "hidden_size": 64, "num_attention_heads": 8, "num_key_value_heads": 2,
  "num_hidden_layers": 3, "intermediate_size": 128, "vocab_size": 96,
  "tie_word_embeddings": false, "rms_norm_eps": 1e-05, "torch_dtype": "bfloat16"
}"#;

/// The HF tensors of the tiny model, in canonical order: (name, shape).
pub fn hf_tensors() -> Vec<(String, Vec<usize>)> {
    let mut out = vec![("model.embed_tokens.weight".to_string(), vec![V, H])];
    for l in 0..LAYERS {
        let p = format!("model.layers.{l}.");
        out.push((format!("{p}self_attn.q_proj.weight"), vec![HEADS * HD, H]));
        out.push((format!("{p}self_attn.k_proj.weight"), vec![KV * HD, H]));
        out.push((format!("{p}self_attn.v_proj.weight"), vec![KV * HD, H]));
        out.push((format!("{p}self_attn.o_proj.weight"), vec![H, HEADS * HD]));
        out.push((format!("{p}mlp.gate_proj.weight"), vec![I, H]));
        out.push((format!("{p}mlp.up_proj.weight"), vec![I, H]));
        out.push((format!("{p}mlp.down_proj.weight"), vec![H, I]));
        out.push((format!("{p}input_layernorm.weight"), vec![H]));
        out.push((format!("{p}post_attention_layernorm.weight"), vec![H]));
    }
    out.push(("model.norm.weight".to_string(), vec![H]));
    out.push(("lm_head.weight".to_string(), vec![V, H]));
    out
}

/// The position of tensor `name` in [`hf_tensors`].
pub fn index_of(name: &str) -> usize {
    hf_tensors()
        .iter()
        .position(|(n, _)| n == name)
        .unwrap_or_else(|| panic!("no tensor {name}"))
}

/// The bf16 bit pattern of element `k` (row-major) of the `t`-th tensor: finite, positive, and
/// distinct within every tensor (the largest has 6144 < 8192 elements).
pub fn bits(t: usize, k: usize) -> u16 {
    0x3000 + ((k + 131 * t) % 0x2000) as u16
}

/// Writes `config.json` and `model.safetensors` into `dir` (created if needed). Panics on any
/// error: it is for tests.
pub fn write_checkpoint(dir: &Path) {
    fs::create_dir_all(dir).unwrap();
    fs::write(dir.join("config.json"), CONFIG).unwrap();
    let tensors = hf_tensors();
    let specs: Vec<TensorSpec> = tensors
        .iter()
        .map(|(n, s)| TensorSpec {
            name: n.clone(),
            dtype: DType::BF16,
            shape: s.clone(),
        })
        .collect();
    let mut meta = BTreeMap::new();
    meta.insert("format".to_string(), "pt".to_string());
    let file = BufWriter::new(fs::File::create(dir.join("model.safetensors")).unwrap());
    let mut w = SafetensorsWriter::new(file, specs, Some(meta)).unwrap();
    let order: Vec<String> = w.order().iter().map(|s| s.name.clone()).collect();
    for name in order {
        let t = index_of(&name);
        let numel: usize = tensors[t].1.iter().product();
        let bytes: Vec<u8> = (0..numel).flat_map(|k| bits(t, k).to_le_bytes()).collect();
        w.write_tensor_bytes(&bytes).unwrap();
        w.finish_tensor().unwrap();
    }
    w.finish().unwrap();
}
