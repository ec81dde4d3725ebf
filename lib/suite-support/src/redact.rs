//! Hiding access tokens before text is printed or logged.

/// What replaces a secret.
pub const REDACTED: &str = "hf_***";

/// The fewest alphanumerics after `hf_` that make a Hugging Face token.
const MIN_HF_TOKEN_CHARS: usize = 20;
/// The fewest characters of a `Bearer` credential that are taken for a token (so that prose
/// such as "bearer of" is left alone).
const MIN_BEARER_TOKEN_CHARS: usize = 8;

/// Replaces secrets in `text` with [`REDACTED`]: Hugging Face tokens (`hf_` followed by 20 or
/// more ASCII letters and digits) and the credential after `Bearer` (any case, as in an
/// `Authorization: Bearer …` header).
pub fn redact_secrets(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = String::with_capacity(text.len());
    // `text[copied..]` is not in `out` yet; secrets start and end at ASCII bytes, so every
    // slice below falls on character boundaries.
    let mut copied = 0;
    let mut i = 0;
    while i < bytes.len() {
        match secret_at(bytes, i) {
            Some((start, end)) => {
                out.push_str(&text[copied..start]);
                out.push_str(REDACTED);
                copied = end;
                i = end;
            }
            None => i += 1,
        }
    }
    out.push_str(&text[copied..]);
    out
}

/// The byte range to replace if a secret starts at `i`.
fn secret_at(bytes: &[u8], i: usize) -> Option<(usize, usize)> {
    let rest = &bytes[i..];
    if rest.starts_with(b"hf_") {
        // The letters and digits after `hf_`, continued through tokens written back to back
        // (`…hf_…`) so that none of them is cut in two.
        let mut end = 3;
        loop {
            end += run_len(&rest[end..], |b| b.is_ascii_alphanumeric());
            if !(rest[..end].ends_with(b"hf") && rest[end..].starts_with(b"_")) {
                break;
            }
            end += 1;
        }
        let chars = rest[3..end]
            .iter()
            .filter(|b| b.is_ascii_alphanumeric())
            .count();
        return (chars >= MIN_HF_TOKEN_CHARS).then_some((i, i + end));
    }
    let at_word_start = i == 0 || !bytes[i - 1].is_ascii_alphanumeric();
    if at_word_start && rest.len() > 6 && rest[..6].eq_ignore_ascii_case(b"bearer") {
        let start = i + 6 + run_len(&rest[6..], |b| b == b' ' || b == b'\t');
        let token_len = run_len(&bytes[start..], |b| {
            b.is_ascii_alphanumeric() || b"-._~+/=".contains(&b)
        });
        return (start > i + 6 && token_len >= MIN_BEARER_TOKEN_CHARS)
            .then_some((start, start + token_len));
    }
    None
}

fn run_len(bytes: &[u8], pred: impl Fn(u8) -> bool) -> usize {
    bytes.iter().take_while(|&&b| pred(b)).count()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const TOKEN: &str = "hf_AbCdEfGhIjKlMnOpQrStUvWxYz0123456789";

    #[test]
    fn redacts_hub_tokens_and_bearer_credentials() {
        let cases = [
            (
                format!("token {TOKEN} rejected"),
                "token hf_*** rejected".to_string(),
            ),
            (
                format!("url?token={TOKEN}&x=1"),
                "url?token=hf_***&x=1".into(),
            ),
            (format!("{TOKEN}{TOKEN}"), "hf_***".into()),
            (format!("{TOKEN}_suffix"), "hf_***_suffix".into()),
            (
                format!("Authorization: Bearer {TOKEN}"),
                "Authorization: Bearer hf_***".into(),
            ),
            (
                "authorization: bearer eyJhbGciOi.J9x_y-z==\n".into(),
                "authorization: bearer hf_***\n".into(),
            ),
            (
                "\"Authorization\": \"BEARER\tabcdefgh12\"".into(),
                "\"Authorization\": \"BEARER\thf_***\"".into(),
            ),
            ("é hf_é".into(), "é hf_é".into()),
        ];
        for (input, expected) in cases {
            assert_eq!(redact_secrets(&input), expected, "{input:?}");
        }
    }

    #[test]
    fn leaves_other_text_alone() {
        for text in [
            "hf_short123",
            "hf_",
            "the bearer of bad news",
            "Bearer",
            "Bearer ",
            "Bearerabcdefghijkl",
            "unbearer abcdefghijkl",
            "model-00001-of-00002.safetensors: 5.00 GB, ünïcödé",
        ] {
            assert_eq!(redact_secrets(text), text);
        }
    }

    proptest! {
        #[test]
        fn no_token_survives_and_redaction_is_idempotent(
            parts in prop::collection::vec(
                prop_oneof!["[a-zA-Z0-9 _:=é]{0,12}", "hf_[a-zA-Z0-9]{15,40}", "(Bearer|bearer) [a-zA-Z0-9.]{0,12}"],
                0..8,
            )
        ) {
            let text = parts.concat();
            let redacted = redact_secrets(&text);
            for part in &parts {
                if let Some(body) = part.strip_prefix("hf_").filter(|b| b.len() >= MIN_HF_TOKEN_CHARS) {
                    prop_assert!(!redacted.contains(&body[..MIN_HF_TOKEN_CHARS]), "{:?} -> {:?}", text, redacted);
                }
            }
            let bytes = redacted.as_bytes();
            for i in 0..bytes.len() {
                if bytes[i..].starts_with(b"hf_") {
                    let run = run_len(&bytes[i + 3..], |b| b.is_ascii_alphanumeric());
                    prop_assert!(run < MIN_HF_TOKEN_CHARS, "{:?} -> {:?}", text, redacted);
                }
            }
            prop_assert_eq!(redact_secrets(&redacted), redacted.clone());
            if !text.contains("hf_") && !text.to_ascii_lowercase().contains("bearer") {
                prop_assert_eq!(redacted, text);
            }
        }
    }
}
