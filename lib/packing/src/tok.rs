//! Loading a Hugging Face `tokenizer.json` the way `transformers`' `AutoTokenizer` uses it.

use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use serde_json::Value;
use tokenizers::Tokenizer;

/// Which encoder turns text into ids.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EncoderKind {
    /// `tokenizers` 0.22 (`Tokenizer::encode_batch_fast`), the code behind Python's
    /// `tokenizers`/`transformers`.
    Reference,
    /// `tokenizers` 1.0.0-rc.3's pipeline encoder (a rewrite, much faster).
    Fast,
}

/// A loaded tokenizer with what `transformers` takes from `tokenizer_config.json`.
pub struct LoadedTokenizer {
    /// The tokenizer, with truncation and padding turned off.
    pub tokenizer: Tokenizer,
    /// The `tokenizers` 1.0 pipeline encoder of the same file, if [`EncoderKind::Fast`].
    pub fast: Option<tokenizers_rc::pipeline::PipelineTokenizer>,
    /// `model_max_length` from `tokenizer_config.json` (`None` if absent or not a number).
    pub model_max_length: Option<f64>,
    /// The end-of-sequence token id, if the tokenizer has one.
    pub eos_id: Option<u32>,
    /// The `tokenizer.json` that was loaded.
    pub path: PathBuf,
}

/// End-of-sequence tokens tried, in order, when `tokenizer_config.json` names none.
const EOS_CANDIDATES: [&str; 5] = [
    "<|end_of_text|>",
    "<|endoftext|>",
    "</s>",
    "<eos>",
    "<|im_end|>",
];

/// Loads `path`: a `tokenizer.json`, or a directory holding one (and maybe
/// `tokenizer_config.json`).
pub fn load_tokenizer(path: &Path, kind: EncoderKind) -> Result<LoadedTokenizer> {
    let (json, config) = if path.is_dir() {
        (
            path.join("tokenizer.json"),
            Some(path.join("tokenizer_config.json")),
        )
    } else {
        let config = path.parent().map(|d| d.join("tokenizer_config.json"));
        (path.to_path_buf(), config)
    };
    if !json.is_file() {
        bail!("no tokenizer.json at {}", json.display());
    }
    let mut tokenizer = Tokenizer::from_file(&json)
        .map_err(|e| anyhow!("loading the tokenizer {}: {e}", json.display()))?;
    // transformers turns off whatever truncation or padding tokenizer.json defines.
    tokenizer
        .with_truncation(None)
        .map_err(|e| anyhow!("turning off truncation: {e}"))?;
    tokenizer.with_padding(None);

    let config: Option<Value> = match config.filter(|c| c.is_file()) {
        Some(c) => {
            let text =
                std::fs::read_to_string(&c).with_context(|| format!("reading {}", c.display()))?;
            Some(serde_json::from_str(&text).with_context(|| format!("parsing {}", c.display()))?)
        }
        None => None,
    };
    let model_max_length = config
        .as_ref()
        .and_then(|c| c.get("model_max_length"))
        .and_then(Value::as_f64);
    let eos_name = config.as_ref().and_then(|c| match c.get("eos_token") {
        Some(Value::String(s)) => Some(s.clone()),
        Some(Value::Object(o)) => o.get("content").and_then(Value::as_str).map(str::to_string),
        _ => None,
    });
    let eos_id = match eos_name {
        Some(name) => tokenizer.token_to_id(&name),
        None => EOS_CANDIDATES
            .iter()
            .find_map(|name| tokenizer.token_to_id(name)),
    };
    let fast = match kind {
        EncoderKind::Reference => None,
        EncoderKind::Fast => {
            // Anything the 1.0 release candidate cannot read (tokenizer.json already loaded
            // above) falls back to the reference encoder rather than failing.
            let fast = tokenizers_rc::canonicalize_file(&json)
                .map_err(|e| e.to_string())
                .and_then(|canonical| {
                    tokenizers_rc::from_json(&canonical).map_err(|e| e.to_string())
                });
            match fast {
                Ok(fast) => Some(fast),
                Err(e) => {
                    eprintln!(
                        "tok-pack: warning: the fast encoder cannot read {} ({e}); using the reference encoder",
                        json.display()
                    );
                    None
                }
            }
        }
    };
    Ok(LoadedTokenizer {
        tokenizer,
        fast,
        model_max_length,
        eos_id,
        path: json,
    })
}

impl LoadedTokenizer {
    /// Encodes `docs` with special tokens (as `tokenizer(texts)` does, no truncation or padding)
    /// and returns each document's ids.
    pub fn encode_batch(&self, docs: Vec<String>) -> Result<Vec<Vec<u32>>> {
        if let Some(fast) = &self.fast {
            use tokenizers_rc::pipeline::{EncodeOptions, Override, PipelineToken};
            let options = EncodeOptions {
                add_special_tokens: true,
                encode_special_tokens: false,
                padding: Override::Off,
                truncation: Override::Off,
            };
            let encodings = fast
                .encode(docs, &options)
                .wait()
                .map_err(|e| anyhow!("tokenizing: {e}"))?;
            return Ok(encodings
                .iter()
                .map(|e| PipelineToken::cast_slice(e.ids()).to_vec())
                .collect());
        }
        let encodings = self
            .tokenizer
            .encode_batch_fast(docs, true)
            .map_err(|e| anyhow!("tokenizing: {e}"))?;
        Ok(encodings
            .into_iter()
            .map(|e| e.get_ids().to_vec())
            .collect())
    }
}
