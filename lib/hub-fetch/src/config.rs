//! Settings from the Hugging Face environment variables, resolved once (pure: the environment
//! is passed in as a lookup function).

use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::error::FetchError;

/// The public Hub.
pub const DEFAULT_ENDPOINT: &str = "https://huggingface.co";

/// An access token. Its `Debug` and `Display` never show the value.
#[derive(Clone, PartialEq, Eq)]
pub struct Token(String);

impl Token {
    /// A token from raw text: `\r` and `\n` removed, whitespace stripped; empty means none.
    pub fn new(raw: &str) -> Option<Token> {
        let cleaned: String = raw.chars().filter(|c| *c != '\r' && *c != '\n').collect();
        let cleaned = cleaned.trim();
        (!cleaned.is_empty()).then(|| Token(cleaned.to_string()))
    }

    /// The secret, for the `Authorization` header only.
    pub fn secret(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Token(***)")
    }
}

impl fmt::Display for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

/// What the environment says.
#[derive(Debug, Clone)]
pub struct HubEnv {
    /// `HF_ENDPOINT` without a trailing `/`.
    pub endpoint: String,
    /// The token from `HF_TOKEN`, `HUGGING_FACE_HUB_TOKEN`, or the token file.
    pub token: Option<Token>,
    /// `HF_HUB_CACHE` (or `HUGGINGFACE_HUB_CACHE`), else `$HF_HOME/hub`.
    pub hub_cache: PathBuf,
    /// `HF_HUB_OFFLINE` (or `TRANSFORMERS_OFFLINE`) is true.
    pub offline: bool,
    /// `HF_HUB_DISABLE_PROGRESS_BARS` is true.
    pub disable_progress: bool,
    /// `HF_HUB_DOWNLOAD_TIMEOUT` (seconds; default 10; 0 means the default): longest silence on a
    /// connection before it is dropped and retried.
    pub read_timeout: Duration,
    /// `HF_HUB_ETAG_TIMEOUT` (seconds; default 10): timeout of metadata requests.
    pub etag_timeout: Duration,
}

/// Whether `value` is one of the Hub's true spellings (`1`, `ON`, `YES`, `TRUE`, any case).
pub fn is_true(value: Option<&str>) -> bool {
    value.is_some_and(|v| {
        matches!(
            v.trim().to_ascii_uppercase().as_str(),
            "1" | "ON" | "YES" | "TRUE"
        )
    })
}

fn expand(path: &str, home: &Path) -> PathBuf {
    match path.strip_prefix("~/") {
        Some(rest) => home.join(rest),
        None if path == "~" => home.to_path_buf(),
        None => PathBuf::from(path),
    }
}

impl HubEnv {
    /// Reads the settings through `var` (e.g. `|k| std::env::var(k).ok()`); `read_file` reads
    /// the token file.
    pub fn from_lookup(
        var: impl Fn(&str) -> Option<String>,
        read_file: impl Fn(&Path) -> Option<String>,
    ) -> Result<HubEnv, FetchError> {
        let get = |k: &str| var(k).filter(|v| !v.is_empty());
        let home = PathBuf::from(get("HOME").unwrap_or_else(|| "/".into()));
        let hf_home = match get("HF_HOME") {
            Some(h) => expand(&h, &home),
            None => match get("XDG_CACHE_HOME") {
                Some(x) => expand(&x, &home).join("huggingface"),
                None => home.join(".cache").join("huggingface"),
            },
        };
        let hub_cache = get("HF_HUB_CACHE")
            .or_else(|| get("HUGGINGFACE_HUB_CACHE"))
            .map(|c| expand(&c, &home))
            .unwrap_or_else(|| hf_home.join("hub"));
        let endpoint = get("HF_ENDPOINT")
            .unwrap_or_else(|| DEFAULT_ENDPOINT.into())
            .trim_end_matches('/')
            .to_string();
        if !(endpoint.starts_with("http://") || endpoint.starts_with("https://")) {
            return Err(FetchError::Usage(format!(
                "HF_ENDPOINT must be an http:// or https:// URL, not {endpoint:?}"
            )));
        }
        let token = get("HF_TOKEN")
            .and_then(|t| Token::new(&t))
            .or_else(|| get("HUGGING_FACE_HUB_TOKEN").and_then(|t| Token::new(&t)))
            .or_else(|| {
                let path = get("HF_TOKEN_PATH")
                    .map(|p| expand(&p, &home))
                    .unwrap_or_else(|| hf_home.join("token"));
                read_file(&path).and_then(|t| Token::new(&t))
            });
        let seconds = |k: &str| {
            get(k)
                .and_then(|v| v.trim().parse::<f64>().ok())
                .filter(|s| *s > 0.0 && s.is_finite())
                .map_or(Duration::from_secs(10), Duration::from_secs_f64)
        };
        Ok(HubEnv {
            endpoint,
            token,
            hub_cache,
            offline: is_true(get("HF_HUB_OFFLINE").as_deref())
                || is_true(get("TRANSFORMERS_OFFLINE").as_deref()),
            disable_progress: is_true(get("HF_HUB_DISABLE_PROGRESS_BARS").as_deref()),
            read_timeout: seconds("HF_HUB_DOWNLOAD_TIMEOUT"),
            etag_timeout: seconds("HF_HUB_ETAG_TIMEOUT"),
        })
    }

    /// Reads the process environment and the token file.
    pub fn from_process() -> Result<HubEnv, FetchError> {
        HubEnv::from_lookup(
            |k| std::env::var(k).ok(),
            |p| std::fs::read_to_string(p).ok(),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn env(pairs: &[(&str, &str)], file: Option<&str>) -> HubEnv {
        let map: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let file = file.map(str::to_string);
        HubEnv::from_lookup(|k| map.get(k).cloned(), |_| file.clone()).unwrap()
    }

    #[test]
    fn defaults_and_overrides() {
        let e = env(&[("HOME", "/h")], None);
        assert_eq!(e.endpoint, DEFAULT_ENDPOINT);
        assert_eq!(e.hub_cache, PathBuf::from("/h/.cache/huggingface/hub"));
        assert!(e.token.is_none() && !e.offline);
        let e = env(
            &[
                ("HOME", "/h"),
                ("HF_HOME", "~/hf"),
                ("HF_ENDPOINT", "http://127.0.0.1:9/"),
                ("HF_HUB_OFFLINE", "yes"),
                ("HF_HUB_DOWNLOAD_TIMEOUT", "0"),
            ],
            None,
        );
        assert_eq!(e.endpoint, "http://127.0.0.1:9");
        assert_eq!(e.hub_cache, PathBuf::from("/h/hf/hub"));
        assert!(e.offline);
        assert_eq!(e.read_timeout, Duration::from_secs(10));
        let e = env(&[("HF_HUB_CACHE", "/c"), ("HF_HOME", "/x")], None);
        assert_eq!(e.hub_cache, PathBuf::from("/c"));
    }

    #[test]
    fn token_order_and_cleaning() {
        let e = env(&[("HF_TOKEN", " hf_a\r\n")], Some("hf_file"));
        assert_eq!(e.token.unwrap().secret(), "hf_a");
        let e = env(&[("HF_TOKEN", "")], Some("hf_file\n"));
        assert_eq!(e.token.unwrap().secret(), "hf_file");
        let e = env(&[], Some("  \n"));
        assert!(e.token.is_none());
        let t = Token::new("hf_secretsecretsecretsecret").unwrap();
        assert!(!format!("{t:?} {t}").contains("secret"));
    }

    #[test]
    fn true_spellings() {
        for v in ["1", "on", "YES", "True"] {
            assert!(is_true(Some(v)));
        }
        for v in ["0", "", "no", "false"] {
            assert!(!is_true(Some(v)));
        }
        assert!(!is_true(None));
    }
}
