//! The read-only OCI distribution registry the cluster's container
//! runtime pulls from (`/v2/`, docs/IMAGES.md).

use super::*;

impl Images {
    /// Serves the registry until the task is aborted.
    pub async fn serve(self, listener: tokio::net::TcpListener) {
        loop {
            let (stream, _) = match listener.accept().await {
                Ok(s) => s,
                Err(e) => {
                    tracing::warn!(error = %e, "registry accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let this = self.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req| {
                    let this = this.clone();
                    async move { Ok::<_, Infallible>(this.route(req).await) }
                });
                let conn = hyper::server::conn::http1::Builder::new()
                    .timer(hyper_util::rt::TokioTimer::new())
                    .header_read_timeout(Duration::from_secs(10))
                    .serve_connection(TokioIo::new(stream), svc);
                if let Err(e) = conn.await {
                    tracing::debug!(error = %e, "registry connection ended with an error");
                }
            });
        }
    }

    async fn route<B>(&self, req: Request<B>) -> Response<BoxBody<Bytes, std::io::Error>> {
        let head = req.method() == Method::HEAD;
        if req.method() != Method::GET && !head {
            return error(
                StatusCode::METHOD_NOT_ALLOWED,
                "UNSUPPORTED",
                "read-only registry",
            );
        }
        let path = req.uri().path();
        let ns = req.uri().query().and_then(|q| {
            q.split('&')
                .find_map(|kv| kv.strip_prefix("ns="))
                .map(str::to_owned)
        });
        if path == "/v2/" || path == "/v2" {
            let mut r = full(Bytes::from_static(b"{}"), head);
            set(&mut r, "content-type", "application/json");
            return r;
        }
        let Some(rest) = path.strip_prefix("/v2/") else {
            return error(StatusCode::NOT_FOUND, "NOT_FOUND", "not found");
        };
        let (name, kind, reference) = match split_route(rest) {
            Some(x) => x,
            None => return error(StatusCode::NOT_FOUND, "NOT_FOUND", "not found"),
        };
        // The answer is looked up under the lock and the lock let go
        // before any IO.
        let (found, has_blob) = match self.catalog.read() {
            Ok(c) if kind == "manifests" => (c.manifest(name, ns.as_deref(), reference), false),
            Ok(c) => (None, c.has_blob(name, ns.as_deref(), reference)),
            Err(_) => return error(StatusCode::SERVICE_UNAVAILABLE, "UNAVAILABLE", "busy"),
        };
        match kind {
            "manifests" => {
                let Some((digest, mt)) = found else {
                    return error(
                        StatusCode::NOT_FOUND,
                        "MANIFEST_UNKNOWN",
                        "manifest unknown",
                    );
                };
                let Ok(a) = Address::parse(&digest) else {
                    return error(
                        StatusCode::NOT_FOUND,
                        "MANIFEST_UNKNOWN",
                        "manifest unknown",
                    );
                };
                let p = self.blob_path(&a);
                let bytes = tokio::task::spawn_blocking(move || {
                    crate::fsread::read_regular_file_capped(
                        &p,
                        cairn_core::images::MAX_MANIFEST_BLOB_BYTES,
                    )
                })
                .await;
                let Ok(Ok(bytes)) = bytes else {
                    return error(
                        StatusCode::NOT_FOUND,
                        "MANIFEST_UNKNOWN",
                        "manifest unknown",
                    );
                };
                if !head {
                    self.metrics.bytes_served.inc_by(bytes.len() as u64);
                }
                let mut r = full(Bytes::from(bytes), head);
                set(&mut r, "content-type", &mt);
                set(&mut r, "docker-content-digest", &digest);
                r
            }
            _ => {
                if !has_blob {
                    return error(StatusCode::NOT_FOUND, "BLOB_UNKNOWN", "blob unknown");
                }
                let Ok(a) = Address::parse(reference) else {
                    return error(StatusCode::NOT_FOUND, "BLOB_UNKNOWN", "blob unknown");
                };
                self.blob(&a, head).await
            }
        }
    }

    async fn blob(&self, a: &Address, head: bool) -> Response<BoxBody<Bytes, std::io::Error>> {
        let p = self.blob_path(a);
        let opened = tokio::task::spawn_blocking(move || {
            let f = std::fs::File::open(&p)?;
            let len = f.metadata()?.len();
            Ok::<_, std::io::Error>((f, len))
        })
        .await;
        let Ok(Ok((mut f, len))) = opened else {
            return error(StatusCode::NOT_FOUND, "BLOB_UNKNOWN", "blob unknown");
        };
        let mut r = if head {
            Response::new(Full::new(Bytes::new()).map_err(|e| match e {}).boxed())
        } else {
            let (tx, rx) = tokio::sync::mpsc::channel::<Result<Frame<Bytes>, std::io::Error>>(4);
            let served = self.metrics.bytes_served.clone();
            tokio::task::spawn_blocking(move || {
                use std::io::Read;
                let mut buf = vec![0u8; 256 << 10];
                loop {
                    match f.read(&mut buf) {
                        Ok(0) => break,
                        Ok(n) => {
                            served.inc_by(n as u64);
                            let chunk = Bytes::copy_from_slice(&buf[..n]);
                            if tx.blocking_send(Ok(Frame::data(chunk))).is_err() {
                                break;
                            }
                        }
                        Err(e) => {
                            let _ = tx.blocking_send(Err(e));
                            break;
                        }
                    }
                }
            });
            let stream =
                futures::stream::unfold(
                    rx,
                    |mut rx| async move { rx.recv().await.map(|x| (x, rx)) },
                );
            Response::new(StreamBody::new(stream).boxed())
        };
        set(&mut r, "content-length", &len.to_string());
        set(&mut r, "content-type", "application/octet-stream");
        set(&mut r, "docker-content-digest", a.as_str());
        r
    }

    /// The catalog's repositories (for status and tests).
    pub fn served(&self) -> Vec<String> {
        self.catalog
            .read()
            .map(|c| {
                c.repos
                    .keys()
                    .map(|(reg, repo)| format!("{reg}/{repo}"))
                    .collect()
            })
            .unwrap_or_default()
    }
}

/// `NAME/manifests/REF` or `NAME/blobs/DIGEST` (NAME may contain `/`).
pub(super) fn split_route(rest: &str) -> Option<(&str, &'static str, &str)> {
    for kind in ["manifests", "blobs"] {
        let sep = format!("/{kind}/");
        if let Some(i) = rest.rfind(&sep) {
            let (name, reference) = (&rest[..i], &rest[i + sep.len()..]);
            if name.is_empty() || reference.is_empty() || reference.contains('/') {
                return None;
            }
            if kind == "blobs" && !cairn_core::bundle::is_address(reference) {
                return None;
            }
            return Some((
                name,
                if kind == "blobs" {
                    "blobs"
                } else {
                    "manifests"
                },
                reference,
            ));
        }
    }
    None
}

fn full(b: Bytes, head: bool) -> Response<BoxBody<Bytes, std::io::Error>> {
    let len = b.len();
    let body = if head { Bytes::new() } else { b };
    let mut r = Response::new(Full::new(body).map_err(|e| match e {}).boxed());
    set(&mut r, "content-length", &len.to_string());
    r
}

fn set<B>(r: &mut Response<B>, k: &'static str, v: &str) {
    if let Ok(v) = hyper::header::HeaderValue::from_str(v) {
        r.headers_mut().insert(k, v);
    }
    r.headers_mut().insert(
        "docker-distribution-api-version",
        hyper::header::HeaderValue::from_static("registry/2.0"),
    );
}

fn error(status: StatusCode, code: &str, msg: &str) -> Response<BoxBody<Bytes, std::io::Error>> {
    let body = format!(r#"{{"errors":[{{"code":"{code}","message":"{msg}"}}]}}"#);
    let mut r = Response::new(Full::new(Bytes::from(body)).map_err(|e| match e {}).boxed());
    *r.status_mut() = status;
    set(&mut r, "content-type", "application/json");
    r
}
