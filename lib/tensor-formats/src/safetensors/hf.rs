//! How Hugging Face splits a checkpoint into shards and indexes them (pure, no I/O).
//!
//! `PreTrainedModel.save_pretrained` (transformers 5.23) splits with `huggingface_hub`'s
//! `split_torch_state_dict_into_shards`, writes every shard with `metadata={"format": "pt"}`, and, when there is
//! more than one shard, writes `json.dumps(index, indent=2, sort_keys=True) + "\n"` to [`INDEX_FILE_NAME`].

use std::collections::BTreeMap;

/// The file name of an unsharded checkpoint.
pub const SINGLE_FILE_NAME: &str = "model.safetensors";

/// The file name of the index of a sharded checkpoint.
pub const INDEX_FILE_NAME: &str = "model.safetensors.index.json";

/// Splits tensors `(name, byte size)` into shards of at most `max_shard_size` bytes, as
/// `huggingface_hub.split_torch_state_dict_into_shards` does; returns the indices into `tensors` of each shard.
///
/// The rule is greedy, in input order: a tensor joins the current shard unless that would take it over the
/// limit, in which case the current shard is closed and a new one starts with it; a shard may reach the limit
/// exactly. A tensor larger than the limit gets a shard of its own, **appended at once, before the shard still
/// being filled**: with a limit of 10, sizes `[3, 20, 4, 5]` give `[[1], [0, 2], [3]]`. No shard is ever empty;
/// no tensors give no shards. Tensors sharing storage are the caller's business (the hub keeps them together;
/// transformers removes tied weights before saving).
pub fn plan_shards(tensors: &[(String, u64)], max_shard_size: u64) -> Vec<Vec<usize>> {
    let mut shards = Vec::new();
    let mut current = Vec::new();
    let mut current_size = 0u64;
    for (i, &(_, size)) in tensors.iter().enumerate() {
        if size > max_shard_size {
            shards.push(vec![i]);
            continue;
        }
        // `current_size <= max_shard_size` always holds, so this is `current_size + size > max_shard_size`.
        if size > max_shard_size - current_size {
            shards.push(std::mem::take(&mut current));
            current_size = 0;
        }
        current.push(i);
        current_size += size;
    }
    if !current.is_empty() {
        shards.push(current);
    }
    shards
}

/// The file name of shard `index` (0-based) of `count`: `model-00001-of-00003.safetensors`, or
/// [`SINGLE_FILE_NAME`] when `count` is 1.
pub fn shard_file_name(index: usize, count: usize) -> String {
    if count == 1 {
        SINGLE_FILE_NAME.to_string()
    } else {
        format!("model-{:05}-of-{count:05}.safetensors", index + 1)
    }
}

/// The text of `model.safetensors.index.json`, byte-identical to transformers' `json.dumps(index, indent=2,
/// sort_keys=True) + "\n"`: `metadata` with `total_parameters` (when given; older transformers omit it) and
/// `total_size`, then the sorted `weight_map`, with non-ASCII characters escaped as `\uXXXX`.
pub fn render_index(
    weight_map: &BTreeMap<String, String>,
    total_size: u64,
    total_parameters: Option<u64>,
) -> String {
    let mut out = String::from("{\n  \"metadata\": {\n");
    if let Some(n) = total_parameters {
        out.push_str(&format!("    \"total_parameters\": {n},\n"));
    }
    out.push_str(&format!(
        "    \"total_size\": {total_size}\n  }},\n  \"weight_map\": {{"
    ));
    for (i, (name, file)) in weight_map.iter().enumerate() {
        out.push_str(if i == 0 { "\n    " } else { ",\n    " });
        push_python_json_string(&mut out, name);
        out.push_str(": ");
        push_python_json_string(&mut out, file);
    }
    out.push_str(if weight_map.is_empty() {
        "}\n}\n"
    } else {
        "\n  }\n}\n"
    });
    out
}

/// Appends `s` as Python's `json.dumps` writes a string with `ensure_ascii=True`: printable ASCII as is, the
/// short escapes, and every other character as `\uXXXX` (lowercase hex, UTF-16 surrogate pairs).
fn push_python_json_string(out: &mut String, s: &str) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            ' '..='~' => out.push(c),
            _ => {
                for unit in c.encode_utf16(&mut [0; 2]) {
                    out.push_str(&format!("\\u{unit:04x}"));
                }
            }
        }
    }
    out.push('"');
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `vectors/safetensors/hf_tiny_sharded/model.safetensors.index.json`, written by transformers 5.23
    /// `GPT2LMHeadModel(n_layer=1, n_embd=8, vocab_size=16, n_positions=4).save_pretrained(max_shard_size="1KB")`.
    const TINY_INDEX: &str = r#"{
  "metadata": {
    "total_parameters": 1048,
    "total_size": 4192
  },
  "weight_map": {
    "transformer.h.0.attn.c_attn.bias": "model-00002-of-00005.safetensors",
    "transformer.h.0.attn.c_attn.weight": "model-00002-of-00005.safetensors",
    "transformer.h.0.attn.c_proj.bias": "model-00005-of-00005.safetensors",
    "transformer.h.0.attn.c_proj.weight": "model-00005-of-00005.safetensors",
    "transformer.h.0.ln_1.bias": "model-00001-of-00005.safetensors",
    "transformer.h.0.ln_1.weight": "model-00001-of-00005.safetensors",
    "transformer.h.0.ln_2.bias": "model-00005-of-00005.safetensors",
    "transformer.h.0.ln_2.weight": "model-00005-of-00005.safetensors",
    "transformer.h.0.mlp.c_fc.bias": "model-00005-of-00005.safetensors",
    "transformer.h.0.mlp.c_fc.weight": "model-00003-of-00005.safetensors",
    "transformer.h.0.mlp.c_proj.bias": "model-00005-of-00005.safetensors",
    "transformer.h.0.mlp.c_proj.weight": "model-00004-of-00005.safetensors",
    "transformer.ln_f.bias": "model-00005-of-00005.safetensors",
    "transformer.ln_f.weight": "model-00005-of-00005.safetensors",
    "transformer.wpe.weight": "model-00001-of-00005.safetensors",
    "transformer.wte.weight": "model-00001-of-00005.safetensors"
  }
}
"#;

    #[track_caller]
    fn plans(sizes: &[u64], max_shard_size: u64, expected: &[&[usize]]) {
        let tensors: Vec<_> = sizes
            .iter()
            .enumerate()
            .map(|(i, &s)| (format!("t{i}"), s))
            .collect();
        assert_eq!(plan_shards(&tensors, max_shard_size), expected);
    }

    #[test]
    fn plans_like_huggingface_hub() {
        // Expected values from huggingface_hub 2.4.0 `split_state_dict_into_shards_factory`.
        plans(&[6, 6, 2, 6, 2, 2], 10, &[&[0], &[1, 2], &[3, 4, 5]]);
        plans(&[3, 20, 4, 5], 10, &[&[1], &[0, 2], &[3]]);
        plans(&[3, 20, 30, 4], 10, &[&[1], &[2], &[0, 3]]);
        plans(&[5, 5], 10, &[&[0, 1]]);
        plans(&[11], 10, &[&[0]]);
        plans(&[0, 0, 10, 0, 1], 10, &[&[0, 1, 2, 3], &[4]]);
        plans(&[4, 4, 4], 4, &[&[0], &[1], &[2]]);
        plans(&[0], 0, &[&[0]]);
        plans(&[], 10, &[]);
        plans(&[u64::MAX, 1, u64::MAX], u64::MAX, &[&[0], &[1], &[2]]);
    }

    #[test]
    fn names_shards_like_transformers() {
        assert_eq!(shard_file_name(0, 1), "model.safetensors");
        assert_eq!(shard_file_name(0, 3), "model-00001-of-00003.safetensors");
        assert_eq!(shard_file_name(2, 3), "model-00003-of-00003.safetensors");
        assert_eq!(
            shard_file_name(99_999, 100_000),
            "model-100000-of-100000.safetensors"
        );
    }

    #[test]
    fn renders_the_transformers_index() {
        let index: serde_json::Value = serde_json::from_str(TINY_INDEX).unwrap();
        let weight_map: BTreeMap<String, String> =
            serde_json::from_value(index["weight_map"].clone()).unwrap();
        assert_eq!(render_index(&weight_map, 4192, Some(1048)), TINY_INDEX);
    }

    #[test]
    fn escapes_like_python_json() {
        // Expected from Python 3.11 `json.dumps(index, indent=2, sort_keys=True) + "\n"`.
        let weight_map = BTreeMap::from([
            (
                "b\u{e9}\u{20ac}\u{1f600}".to_string(),
                "model-00002-of-00002.safetensors".to_string(),
            ),
            (
                "a\"\\\n\t\r\u{8}\u{c}\u{1}\u{7f}/".to_string(),
                "model-00001-of-00002.safetensors".to_string(),
            ),
            ("Z".to_string(), "x".to_string()),
        ]);
        let expected = r#"{
  "metadata": {
    "total_parameters": 3,
    "total_size": 12
  },
  "weight_map": {
    "Z": "x",
    "a\"\\\n\t\r\b\f\u0001\u007f/": "model-00001-of-00002.safetensors",
    "b\u00e9\u20ac\ud83d\ude00": "model-00002-of-00002.safetensors"
  }
}
"#;
        assert_eq!(render_index(&weight_map, 12, Some(3)), expected);
        assert_eq!(
            render_index(&BTreeMap::new(), 0, None),
            "{\n  \"metadata\": {\n    \"total_size\": 0\n  },\n  \"weight_map\": {}\n}\n"
        );
    }
}
