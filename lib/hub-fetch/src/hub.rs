//! The Hub's HTTP API: revision to commit, the paged tree listing, `/resolve` metadata, error
//! mapping and retries. Never sends the token outside the Hub's origins.

use std::error::Error as _;
use std::time::Duration;

use reqwest::header::{HeaderMap, ACCEPT_ENCODING, AUTHORIZATION, LOCATION};
use reqwest::{Method, RequestBuilder, Response, StatusCode};
use url::Url;

use crate::config::Token;
use crate::error::FetchError;
use crate::layout::RepoType;
use crate::paths::quote;
use crate::plan::TreeEntry;

/// Origins that may receive the token besides `HF_ENDPOINT`'s.
pub const HUB_ORIGINS: [&str; 3] = [
    "https://huggingface.co",
    "https://hf.co",
    "https://hub-ci.huggingface.co",
];

/// How transient failures (connection errors, 408, 429, 5xx) are retried.
#[derive(Debug, Clone, Copy)]
pub struct RetryPolicy {
    /// Retries after the first attempt without progress.
    pub max_retries: u32,
    /// First backoff; it doubles up to `cap`.
    pub base: Duration,
    /// Longest backoff (and longest `Retry-After` honoured).
    pub cap: Duration,
}

impl Default for RetryPolicy {
    /// 5 retries, 1, 2, 4, 8, 8 s (as huggingface_hub's `http_backoff`), `Retry-After` up to 2 min.
    fn default() -> Self {
        RetryPolicy {
            max_retries: 5,
            base: Duration::from_secs(1),
            cap: Duration::from_secs(8),
        }
    }
}

impl RetryPolicy {
    /// The wait before retry number `attempt` (0-based) after a response with `headers`
    /// (`RateLimit: …;r=0;t=N` then `Retry-After: N` win over the exponential backoff).
    pub fn delay(&self, attempt: u32, headers: Option<&HeaderMap>) -> Duration {
        if let Some(h) = headers {
            if let Some(d) = server_delay(h) {
                return d.min(Duration::from_secs(120));
            }
        }
        let exp = self.base.saturating_mul(1u32 << attempt.min(16));
        exp.min(self.cap)
    }
}

/// The wait a 429/503 response asks for: `RateLimit` with `r=0` gives `t + 1` s, else
/// `Retry-After` seconds.
pub fn server_delay(headers: &HeaderMap) -> Option<Duration> {
    if let Some(rl) = headers.get("ratelimit").and_then(|v| v.to_str().ok()) {
        let mut remaining = None;
        let mut reset = None;
        for part in rl.split(';') {
            let part = part.trim();
            if let Some(v) = part.strip_prefix("r=") {
                remaining = v.trim().parse::<u64>().ok();
            } else if let Some(v) = part.strip_prefix("t=") {
                reset = v.trim().parse::<u64>().ok();
            }
        }
        if let (Some(0), Some(t)) = (remaining, reset) {
            return Some(Duration::from_secs(t + 1));
        }
    }
    headers
        .get("retry-after")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok())
        .map(Duration::from_secs)
}

/// Whether a status is worth retrying.
pub fn retryable(status: StatusCode) -> bool {
    status == StatusCode::REQUEST_TIMEOUT
        || status == StatusCode::TOO_MANY_REQUESTS
        || status.is_server_error()
}

/// A reqwest error as one line without URLs (signed CDN URLs are secrets).
pub fn describe(e: &reqwest::Error) -> String {
    let mut s = if e.is_timeout() {
        "timed out".to_string()
    } else if e.is_connect() {
        "connection failed".to_string()
    } else if e.is_body() || e.is_decode() {
        "connection dropped while reading the body".to_string()
    } else {
        "request failed".to_string()
    };
    let mut source = e.source();
    while let Some(inner) = source {
        let text = inner.to_string();
        if !s.ends_with(&text) {
            s.push_str(": ");
            s.push_str(&text);
        }
        source = inner.source();
    }
    s
}

/// `ETag` normalised as huggingface_hub does: `W/` and quotes removed.
pub fn normalize_etag(v: &str) -> String {
    v.trim()
        .trim_start_matches("W/")
        .trim_matches('"')
        .to_string()
}

/// The outcome of the metadata request on `/resolve`.
#[derive(Debug, Clone)]
pub struct Resolved {
    /// Where to GET the bytes (the CDN for LFS files).
    pub url: Url,
    /// Whether `url` is a Hub origin (the token may be sent).
    pub auth: bool,
    /// `X-Linked-Size`, or `Content-Length` of a non-redirect.
    pub size: Option<u64>,
    /// `X-Linked-Etag` or `ETag`, normalised.
    pub etag: Option<String>,
    /// `X-Repo-Commit`.
    pub commit: Option<String>,
}

/// A client for one repo.
#[derive(Debug, Clone)]
pub struct Hub {
    http: reqwest::Client,
    endpoint: Url,
    token: Option<Token>,
    /// The repo id.
    pub repo: String,
    /// Its type.
    pub repo_type: RepoType,
    /// Retry policy.
    pub retry: RetryPolicy,
    meta_timeout: Duration,
}

fn origin(u: &Url) -> String {
    u.origin().ascii_serialization()
}

/// Where a redirect `response` to a request for `url` points (its `Location`, resolved against
/// `url`), if it says so readably.
pub fn redirect_target(response: &Response, url: &Url) -> Option<Url> {
    let location = response.headers().get(LOCATION)?.to_str().ok()?;
    url.join(location).ok()
}

impl Hub {
    /// A client for `repo` at `endpoint`. `read_timeout` bounds the silence on a body;
    /// `meta_timeout` whole metadata requests.
    pub fn new(
        endpoint: &str,
        token: Option<Token>,
        repo: &str,
        repo_type: RepoType,
        read_timeout: Duration,
        meta_timeout: Duration,
        connections: usize,
    ) -> Result<Hub, FetchError> {
        let endpoint = Url::parse(endpoint)
            .map_err(|e| FetchError::Usage(format!("HF_ENDPOINT is not a URL: {e}")))?;
        let http = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .connect_timeout(Duration::from_secs(10))
            .read_timeout(read_timeout)
            .pool_max_idle_per_host(connections.max(1))
            .user_agent(concat!(
                "hf-fetch/",
                env!("CARGO_PKG_VERSION"),
                "; hf_hub/compatible"
            ))
            .build()
            .map_err(|e| FetchError::Usage(format!("cannot set up HTTP: {}", describe(&e))))?;
        Ok(Hub {
            http,
            endpoint,
            token,
            repo: repo.to_string(),
            repo_type,
            retry: RetryPolicy::default(),
            meta_timeout,
        })
    }

    /// Whether the token may go to `url`: the endpoint's origin or a Hub origin.
    pub fn is_hub_origin(&self, url: &Url) -> bool {
        let o = origin(url);
        o == origin(&self.endpoint) || HUB_ORIGINS.contains(&o.as_str())
    }

    /// Whether a token is configured.
    pub fn has_token(&self) -> bool {
        self.token.is_some()
    }

    /// A request with `Accept-Encoding: identity`, and the token if `url` is a Hub origin.
    pub fn request(&self, method: Method, url: &Url) -> RequestBuilder {
        let mut rb = self
            .http
            .request(method, url.clone())
            .header(ACCEPT_ENCODING, "identity");
        if let (true, Some(t)) = (self.is_hub_origin(url), &self.token) {
            rb = rb.header(AUTHORIZATION, format!("Bearer {}", t.secret()));
        }
        rb
    }

    fn api_url(&self, tail: &str) -> Url {
        let base = self.endpoint.as_str().trim_end_matches('/');
        Url::parse(&format!(
            "{base}/api/{}/{}/{tail}",
            self.repo_type.plural(),
            self.repo
        ))
        .expect("endpoint URL plus a quoted path is a URL")
    }

    /// The `/resolve` URL of a file at a commit.
    pub fn resolve_url(&self, commit: &str, path: &str) -> Url {
        let base = self.endpoint.as_str().trim_end_matches('/');
        Url::parse(&format!(
            "{base}/{}{}/resolve/{}/{}",
            self.repo_type.url_prefix(),
            self.repo,
            quote(commit, ""),
            quote(path, "/")
        ))
        .expect("endpoint URL plus a quoted path is a URL")
    }

    /// Sends `make()` until it is not a transient failure (connection error, 408, 429, 5xx),
    /// at most `retry.max_retries` times more; the last transient failure is returned as an
    /// error, other statuses as responses.
    pub async fn send(
        &self,
        what: &str,
        make: impl Fn() -> RequestBuilder,
    ) -> Result<Response, FetchError> {
        let mut attempt = 0;
        loop {
            let result = make().timeout(self.meta_timeout).send().await;
            let (delay, err) = match result {
                Ok(r) if retryable(r.status()) => {
                    let d = self.retry.delay(attempt, Some(r.headers()));
                    (d, self.error_from(r, what, None, None).await)
                }
                Ok(r) => return Ok(r),
                Err(e) => (
                    self.retry.delay(attempt, None),
                    FetchError::Network {
                        what: what.to_string(),
                        detail: describe(&e),
                    },
                ),
            };
            if attempt >= self.retry.max_retries {
                return Err(err);
            }
            tokio::time::sleep(delay).await;
            attempt += 1;
        }
    }

    /// The error for a failed response, read from `X-Error-Code`, `X-Error-Message`, the body
    /// and the status.
    pub async fn error_from(
        &self,
        r: Response,
        what: &str,
        path: Option<&str>,
        revision: Option<&str>,
    ) -> FetchError {
        let status = r.status().as_u16();
        let headers = r.headers().clone();
        let body = r.text().await.unwrap_or_default();
        self.classify(status, &headers, &body, what, path, revision)
    }

    /// See [`Hub::error_from`] (pure).
    pub fn classify(
        &self,
        status: u16,
        headers: &HeaderMap,
        body: &str,
        what: &str,
        path: Option<&str>,
        revision: Option<&str>,
    ) -> FetchError {
        let h = |k: &str| headers.get(k).and_then(|v| v.to_str().ok()).unwrap_or("");
        let code = h("x-error-code");
        let message = if h("x-error-message").is_empty() {
            body.trim()
        } else {
            h("x-error-message")
        };
        let repo = self.repo.clone();
        match code {
            "RepoNotFound" => {
                return FetchError::RepoNotFound {
                    repo,
                    status,
                    who: if self.has_token() {
                        "your token has no access to it"
                    } else {
                        "no token was sent"
                    },
                }
            }
            "GatedRepo" if status == 403 => {
                let page = format!(
                    "{}/{}{}",
                    self.endpoint.as_str().trim_end_matches('/'),
                    self.repo_type.url_prefix(),
                    self.repo
                );
                return FetchError::GatedNoAccess { repo, page };
            }
            "GatedRepo" => return FetchError::GatedNoToken { repo },
            "RevisionNotFound" => {
                return FetchError::RevisionNotFound {
                    repo,
                    revision: revision.unwrap_or("?").to_string(),
                }
            }
            "EntryNotFound" => {
                return FetchError::EntryNotFound {
                    repo,
                    path: path.unwrap_or("?").to_string(),
                    revision: revision.unwrap_or("?").to_string(),
                }
            }
            _ => {}
        }
        if message.contains("Invalid credentials in Authorization header")
            || message.contains("Invalid username or password")
        {
            return FetchError::BadToken;
        }
        if status == 403 && message.contains("disabled") {
            return FetchError::Disabled { repo };
        }
        if status == 401 {
            return FetchError::RepoNotFound {
                repo,
                status,
                who: if self.has_token() {
                    "your token has no access to it"
                } else {
                    "no token was sent"
                },
            };
        }
        let mut short: String = message.chars().take(200).collect();
        short = short.split_whitespace().collect::<Vec<_>>().join(" ");
        FetchError::Http {
            what: what.to_string(),
            status,
            message: if short.is_empty() {
                String::new()
            } else {
                format!(": {short}")
            },
        }
    }

    /// A GET on the API that follows redirects within the Hub's origins (a renamed or
    /// mis-cased repo answers a relative 307).
    async fn get_api(&self, what: &str, mut url: Url) -> Result<Response, FetchError> {
        for _hop in 0..10 {
            let r = self.send(what, || self.request(Method::GET, &url)).await?;
            if !r.status().is_redirection() {
                return Ok(r);
            }
            match redirect_target(&r, &url) {
                Some(n) if origin(&n) == origin(&url) || self.is_hub_origin(&n) => url = n,
                _ => return Ok(r),
            }
        }
        Err(FetchError::Protocol {
            what: what.to_string(),
            detail: "more than 10 redirects".into(),
        })
    }

    /// `GET /api/{type}s/{repo}/revision/{rev}` -> the commit sha.
    pub async fn commit(&self, revision: &str) -> Result<String, FetchError> {
        let url = self.api_url(&format!("revision/{}", quote(revision, "")));
        let what = format!("resolving revision {revision:?} of {}", self.repo);
        let r = self.get_api(&what, url).await?;
        if !r.status().is_success() {
            return Err(self.error_from(r, &what, None, Some(revision)).await);
        }
        let v: serde_json::Value = read_json(r, &what).await?;
        match v.get("sha").and_then(|s| s.as_str()) {
            Some(sha) if crate::paths::is_commit(sha) => Ok(sha.to_string()),
            _ => Err(FetchError::Protocol {
                what,
                detail: "no 40-hex `sha` in the repo info".into(),
            }),
        }
    }

    /// The recursive tree listing at `commit`, following `Link: <…>; rel="next"` pages.
    pub async fn tree(&self, commit: &str) -> Result<Vec<TreeEntry>, FetchError> {
        let mut url = self.api_url(&format!("tree/{commit}"));
        url.set_query(Some("recursive=true&expand=false"));
        let what = format!("listing the files of {} at {commit}", self.repo);
        let mut entries = Vec::new();
        for _page in 0..100_000 {
            let r = self.get_api(&what, url.clone()).await?;
            if !r.status().is_success() {
                return Err(self.error_from(r, &what, None, Some(commit)).await);
            }
            let next = next_link(r.headers()).and_then(|l| url.join(&l).ok());
            let page: Vec<TreeEntry> = read_json(r, &what).await?;
            entries.extend(page);
            match next {
                Some(n) if n != url => url = n,
                _ => return Ok(entries),
            }
        }
        Err(FetchError::Protocol {
            what,
            detail: "more than 100000 pages".into(),
        })
    }

    /// The metadata request for a file: HEAD on `/resolve`, following redirects while they
    /// stay on the same or a Hub origin; a redirect elsewhere (the CDN) is the answer.
    pub async fn resolve(&self, commit: &str, path: &str) -> Result<Resolved, FetchError> {
        let mut url = self.resolve_url(commit, path);
        let what = format!("{path}: resolving");
        for _hop in 0..20 {
            let r = self
                .send(&what, || self.request(Method::HEAD, &url))
                .await?;
            let status = r.status();
            let h = r.headers();
            let get = |k: &str| h.get(k).and_then(|v| v.to_str().ok());
            if status.is_redirection() {
                let Some(next) = get(LOCATION.as_str()).and_then(|l| url.join(l).ok()) else {
                    return Err(FetchError::Protocol {
                        what,
                        detail: format!("HTTP {} without a usable Location", status.as_u16()),
                    });
                };
                // Follow same-origin and Hub redirects (renamed repos, resolve-cache) unless
                // the redirect itself carries the metadata (a mirror-style CDN on the Hub origin).
                let same = origin(&next) == origin(&url) || self.is_hub_origin(&next);
                if same && get("x-linked-etag").is_none() && get("x-repo-commit").is_none() {
                    url = next;
                    continue;
                }
                return Ok(Resolved {
                    auth: self.is_hub_origin(&next),
                    size: get("x-linked-size").and_then(|s| s.trim().parse().ok()),
                    etag: get("x-linked-etag").or(get("etag")).map(normalize_etag),
                    commit: get("x-repo-commit").map(str::to_string),
                    url: next,
                });
            }
            if status.is_success() {
                return Ok(Resolved {
                    auth: self.is_hub_origin(&url),
                    size: get("x-linked-size")
                        .or(get("content-length"))
                        .and_then(|s| s.trim().parse().ok()),
                    etag: get("x-linked-etag").or(get("etag")).map(normalize_etag),
                    commit: get("x-repo-commit").map(str::to_string),
                    url,
                });
            }
            return Err(self.error_from(r, &what, Some(path), Some(commit)).await);
        }
        Err(FetchError::Protocol {
            what,
            detail: "more than 20 redirects".into(),
        })
    }
}

async fn read_json<T: serde::de::DeserializeOwned>(
    r: Response,
    what: &str,
) -> Result<T, FetchError> {
    let body = r.bytes().await.map_err(|e| FetchError::Network {
        what: what.to_string(),
        detail: describe(&e),
    })?;
    serde_json::from_slice(&body).map_err(|e| FetchError::Protocol {
        what: what.to_string(),
        detail: format!("bad JSON: {e}"),
    })
}

/// The `rel="next"` URL of a `Link` header.
pub fn next_link(headers: &HeaderMap) -> Option<String> {
    for value in headers.get_all("link") {
        let Ok(v) = value.to_str() else { continue };
        for part in v.split(',') {
            let mut pieces = part.split(';');
            let target = pieces.next()?.trim();
            if pieces.any(|p| {
                let p = p.trim().replace(' ', "");
                p == "rel=\"next\"" || p == "rel=next"
            }) {
                return Some(
                    target
                        .trim_start_matches('<')
                        .trim_end_matches('>')
                        .to_string(),
                );
            }
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use reqwest::header::HeaderValue;

    fn hub(token: bool) -> Hub {
        Hub::new(
            "http://127.0.0.1:9",
            token.then(|| Token::new("hf_abcdefghijklmnopqrstuvwxyz").unwrap()),
            "org/m",
            RepoType::Model,
            Duration::from_secs(1),
            Duration::from_secs(1),
            4,
        )
        .unwrap()
    }

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(*k, HeaderValue::from_str(v).unwrap());
        }
        h
    }

    #[test]
    fn links_and_etags() {
        let h = headers(&[(
            "link",
            "<http://x/api/models/o/m/tree/c?cursor=abc>; rel=\"next\"",
        )]);
        assert_eq!(
            next_link(&h).unwrap(),
            "http://x/api/models/o/m/tree/c?cursor=abc"
        );
        assert_eq!(next_link(&headers(&[("link", "<a>; rel=\"prev\"")])), None);
        assert_eq!(normalize_etag("W/\"abc\""), "abc");
        assert_eq!(normalize_etag("\"abc\""), "abc");
    }

    #[test]
    fn delays() {
        let p = RetryPolicy::default();
        let secs: Vec<u64> = (0..5).map(|i| p.delay(i, None).as_secs()).collect();
        assert_eq!(secs, [1, 2, 4, 8, 8]);
        let h = headers(&[("ratelimit", "\"api\";r=0;t=3"), ("retry-after", "9")]);
        assert_eq!(p.delay(0, Some(&h)), Duration::from_secs(4));
        let h = headers(&[("retry-after", "2")]);
        assert_eq!(p.delay(3, Some(&h)), Duration::from_secs(2));
    }

    #[test]
    fn origins_and_urls() {
        let h = hub(true);
        assert!(h.is_hub_origin(&Url::parse("http://127.0.0.1:9/x").unwrap()));
        assert!(h.is_hub_origin(&Url::parse("https://huggingface.co/x").unwrap()));
        assert!(!h.is_hub_origin(&Url::parse("http://127.0.0.1:10/x").unwrap()));
        assert!(!h.is_hub_origin(&Url::parse("https://cdn-lfs.hf.co/x").unwrap()));
        assert_eq!(
            h.resolve_url("refs/pr/1", "sub/weird name (1).txt")
                .as_str(),
            "http://127.0.0.1:9/org/m/resolve/refs%2Fpr%2F1/sub/weird%20name%20%281%29.txt"
        );
    }

    #[test]
    fn error_mapping() {
        let (anon, with) = (hub(false), hub(true));
        let c = |h: &Hub, s, pairs: &[(&'static str, &str)], body| {
            h.classify(s, &headers(pairs), body, "x", Some("f"), Some("main"))
        };
        assert!(matches!(
            c(&anon, 401, &[("x-error-code", "RepoNotFound")], ""),
            FetchError::RepoNotFound { status: 401, .. }
        ));
        assert!(matches!(
            c(&anon, 401, &[("x-error-code", "GatedRepo")], ""),
            FetchError::GatedNoToken { .. }
        ));
        assert!(matches!(
            c(&with, 403, &[("x-error-code", "GatedRepo")], ""),
            FetchError::GatedNoAccess { .. }
        ));
        assert!(matches!(
            c(
                &with,
                401,
                &[(
                    "x-error-message",
                    "Invalid credentials in Authorization header"
                )],
                ""
            ),
            FetchError::BadToken
        ));
        assert!(matches!(
            c(&with, 404, &[("x-error-code", "RevisionNotFound")], ""),
            FetchError::RevisionNotFound { .. }
        ));
        assert!(matches!(
            c(&with, 404, &[("x-error-code", "EntryNotFound")], ""),
            FetchError::EntryNotFound { .. }
        ));
        assert!(matches!(
            c(&with, 500, &[], "boom\nline"),
            FetchError::Http { status: 500, .. }
        ));
        for e in [
            c(&anon, 401, &[("x-error-code", "GatedRepo")], ""),
            c(&with, 403, &[("x-error-code", "GatedRepo")], ""),
            FetchError::BadToken,
        ] {
            assert!(e.hint().is_some());
            assert!(!e.to_string().contains('\n'));
        }
    }
}
