//! HTTP(S) sources (reqwest with rustls and the ring provider).

use super::{Source, SourceError, SourceOptions};
use crate::BoxFuture;

/// A bundle repository served over HTTP(S) by any static file server.
///
/// Every request has a connect timeout and a total timeout; the body is
/// refused when `Content-Length` exceeds the limit, and streamed bytes are
/// counted so a server that lies about (or omits) the length cannot make
/// the agent hold more than the limit. 404 and 410 mean "absent"; other
/// non-success statuses are errors.
#[derive(Debug, Clone)]
pub struct HttpSource {
    base: String,
    client: reqwest::Client,
}

impl HttpSource {
    /// A source rooted at `base` (e.g. `https://bundles.example.com/fleet`).
    pub fn new(base: &str, opts: &SourceOptions) -> Result<Self, String> {
        let client = reqwest::Client::builder()
            .connect_timeout(opts.connect_timeout)
            .timeout(opts.request_timeout)
            .redirect(reqwest::redirect::Policy::limited(5))
            .user_agent(concat!("cairn-agent/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| format!("{base}: cannot build an HTTP client: {e}"))?;
        Ok(Self {
            base: base.trim_end_matches('/').to_owned(),
            client,
        })
    }

    async fn fetch(&self, rel_path: &str, limit: u64) -> Result<Option<Vec<u8>>, SourceError> {
        let url = format!("{}/{}", self.base, rel_path);
        let unavailable = |reason: String| SourceError::Unavailable {
            source_name: self.base.clone(),
            reason,
        };
        let mut resp = self
            .client
            .get(&url)
            .send()
            .await
            .map_err(|e| unavailable(format!("GET {url}: {}", error_text(&e))))?;
        let status = resp.status();
        if status == reqwest::StatusCode::NOT_FOUND || status == reqwest::StatusCode::GONE {
            return Ok(None);
        }
        if status.is_server_error() {
            return Err(unavailable(format!("GET {url}: HTTP {status}")));
        }
        if !status.is_success() {
            return Err(SourceError::Invalid {
                source_name: self.base.clone(),
                path: rel_path.to_owned(),
                reason: format!("HTTP {status}"),
            });
        }
        let too_large = || SourceError::TooLarge {
            source_name: self.base.clone(),
            path: rel_path.to_owned(),
            limit,
        };
        if resp.content_length().is_some_and(|n| n > limit) {
            return Err(too_large());
        }
        // Never trust the announced length for allocation.
        let initial = resp.content_length().unwrap_or(0).min(limit).min(1 << 20);
        let mut body = Vec::with_capacity(initial as usize);
        while let Some(chunk) = resp
            .chunk()
            .await
            .map_err(|e| unavailable(format!("GET {url}: reading body: {}", error_text(&e))))?
        {
            if body.len() as u64 + chunk.len() as u64 > limit {
                return Err(too_large());
            }
            body.extend_from_slice(&chunk);
        }
        Ok(Some(body))
    }
}

/// The error and its causes on one line.
fn error_text(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let t = c.to_string();
        if !s.contains(&t) {
            s.push_str(": ");
            s.push_str(&t);
        }
        cur = c.source();
    }
    s
}

impl Source for HttpSource {
    fn name(&self) -> &str {
        &self.base
    }

    fn get<'a>(
        &'a self,
        rel_path: &'a str,
        limit: u64,
    ) -> BoxFuture<'a, Result<Option<Vec<u8>>, SourceError>> {
        Box::pin(self.fetch(rel_path, limit))
    }
}
