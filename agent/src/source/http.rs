//! HTTP(S) sources (reqwest with rustls and the ring provider).

use super::{Source, SourceError, SourceOptions};
use crate::ingest::Item;
use crate::BoxFuture;

/// A bundle repository served over HTTP(S) by any static file server.
///
/// Every request has a connect timeout and a total timeout; the body is
/// refused when `Content-Length` exceeds the limit, and streamed bytes are
/// counted so a server that lies about (or omits) the length cannot make
/// the agent hold more than the limit. 404 and 410 mean "absent"; other
/// non-success statuses are errors.
///
/// Redirects are followed only to the source's own host or to a host
/// listed in its `allowRedirectsTo`, at most `MAX_REDIRECTS` in a row,
/// and never from `https` to `http`: a mirror (or whoever controls its
/// redirects) cannot send the agent to arbitrary hosts, such as services
/// on the agent's own network.
#[derive(Debug, Clone)]
pub struct HttpSource {
    base: String,
    client: reqwest::Client,
    /// Basic-auth credentials from the source's `credentialsFile`
    /// (redacted in `Debug`).
    credentials: Option<cairn_oci::Credentials>,
}

// The redirect policy (same host or `allowRedirectsTo`, never https to
// http, at most `MAX_REDIRECTS`) is the one registry sources use too.
use cairn_oci::redirect_allowed;

impl HttpSource {
    /// A source rooted at `base` (e.g. `https://bundles.example.com/fleet`).
    pub fn new(base: &str, opts: &SourceOptions) -> Result<Self, String> {
        let allowed = opts.redirect_hosts.get(base).cloned().unwrap_or_default();
        let policy = reqwest::redirect::Policy::custom(move |attempt| {
            // `previous` holds every URL so far, the original request's
            // first; the redirect is judged against the one answering it.
            let hops = attempt.previous().len();
            let from = attempt.previous().last().cloned();
            let verdict = match &from {
                Some(from) => redirect_allowed(from, attempt.url(), &allowed, hops),
                None => Ok(()),
            };
            match verdict {
                Ok(()) => attempt.follow(),
                Err(reason) => attempt.error(reason),
            }
        });
        let builder = reqwest::Client::builder()
            .connect_timeout(opts.connect_timeout)
            .timeout(opts.request_timeout)
            .redirect(policy)
            .user_agent(concat!("cairn-agent/", env!("CARGO_PKG_VERSION")));
        let net = opts.tls.get(base).cloned().unwrap_or_default();
        let builder = net.apply_tls(builder).map_err(|e| format!("{base}: {e}"))?;
        let host = reqwest::Url::parse(base)
            .ok()
            .and_then(|u| {
                u.host_str()
                    .map(|h| u.port().map_or(h.to_owned(), |p| format!("{h}:{p}")))
            })
            .unwrap_or_default();
        let credentials = net.credentials(&host).map_err(|e| format!("{base}: {e}"))?;
        let client = builder
            .build()
            .map_err(|e| format!("{base}: cannot build an HTTP client: {e}"))?;
        Ok(Self {
            base: base.trim_end_matches('/').to_owned(),
            client,
            credentials,
        })
    }

    /// Sends the GET for `url` (`rel_path` below the base) with the
    /// source's credentials: `None` for 404/410, unavailable for a
    /// transport error or a 5xx (tried again later), invalid for any other
    /// non-success status. The body is the caller's to read, within its
    /// limit.
    async fn get(
        &self,
        url: &str,
        rel_path: &str,
    ) -> Result<Option<reqwest::Response>, SourceError> {
        let unavailable = |reason: String| SourceError::Unavailable {
            source_name: self.base.clone(),
            reason,
        };
        let mut req = self.client.get(url);
        if let Some(c) = &self.credentials {
            req = req.basic_auth(&c.username, Some(&c.password));
        }
        let resp = req
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
        Ok(Some(resp))
    }

    /// Reads one path below the base URL (`Source::get` maps an item onto
    /// its path); the limits, timeouts and redirect rules apply.
    pub async fn fetch(&self, rel_path: &str, limit: u64) -> Result<Option<Vec<u8>>, SourceError> {
        let url = format!("{}/{}", self.base, rel_path);
        let unavailable = |reason: String| SourceError::Unavailable {
            source_name: self.base.clone(),
            reason,
        };
        let Some(mut resp) = self.get(&url, rel_path).await? else {
            return Ok(None);
        };
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

impl HttpSource {
    /// Streams `objects/..` of `address` into `dest` (see
    /// [`Source::fetch_to_file`]).
    async fn stream(
        &self,
        address: &str,
        limit: u64,
        dest: &std::path::Path,
    ) -> Result<Option<u64>, SourceError> {
        let Some(rel_path) = Item::Object(address.to_owned()).path() else {
            return Ok(None);
        };
        let url = format!("{}/{}", self.base, rel_path);
        let Some(resp) = self.get(&url, &rel_path).await? else {
            return Ok(None);
        };
        cairn_oci::blobfile::download_verified(resp, address, limit, dest, &format!("GET {url}"))
            .await
            .map(Some)
            .map_err(|e| super::blob_error(&self.base, &rel_path, e))
    }
}

impl Source for HttpSource {
    fn fetch_to_file<'a>(
        &'a self,
        address: &'a str,
        limit: u64,
        dest: &'a std::path::Path,
    ) -> BoxFuture<'a, Result<Option<u64>, SourceError>> {
        Box::pin(self.stream(address, limit, dest))
    }

    fn name(&self) -> &str {
        &self.base
    }

    fn get<'a>(
        &'a self,
        item: &'a Item,
        limit: u64,
    ) -> BoxFuture<'a, Result<Option<Vec<u8>>, SourceError>> {
        Box::pin(async move {
            match item.path() {
                Some(rel_path) => self.fetch(&rel_path, limit).await,
                None => Ok(None),
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use cairn_oci::MAX_REDIRECTS;

    fn url(s: &str) -> reqwest::Url {
        reqwest::Url::parse(s).unwrap()
    }

    #[test]
    fn redirects_stay_on_the_host_unless_allowed() {
        let a = url("http://127.0.0.1:8080/fleet/channels/stable");
        assert!(redirect_allowed(&a, &url("http://127.0.0.1:9090/x"), &[], 1).is_ok());
        let e = redirect_allowed(&a, &url("http://127.0.0.2:8080/x"), &[], 1).unwrap_err();
        assert!(
            e.contains("`127.0.0.2`") && e.contains("allowRedirectsTo"),
            "{e}"
        );
        assert!(redirect_allowed(&a, &url("http://127.0.0.2/x"), &["127.0.0.2".into()], 1).is_ok());
        let v6 = url("http://[::1]:1/x");
        assert!(redirect_allowed(&a, &v6, &["::1".into()], 1).is_ok());
        assert!(
            redirect_allowed(&a, &url("http://CDN.example/x"), &["cdn.example".into()], 1).is_ok()
        );
        let e =
            redirect_allowed(&a, &url("http://127.0.0.1/x"), &[], MAX_REDIRECTS + 1).unwrap_err();
        assert!(e.contains("redirects in a row"), "{e}");
        let s = url("https://a.example/x");
        let e = redirect_allowed(&s, &url("http://a.example/y"), &[], 1).unwrap_err();
        assert!(e.contains("https to http"), "{e}");
    }
}
