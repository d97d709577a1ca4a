//! The agent's HTTP listener (hyper): `/healthz`, `/readyz`, `/metrics`.
//!
//! * `/healthz`: 200 while the process runs.
//! * `/readyz`: 200 when a release is adopted and the last reconcile made
//!   the target match it; otherwise 503. The body is the reason, then a
//!   line `trust root: ORIGIN vN` naming the embedded trust root.
//! * `/metrics`: OpenMetrics or Prometheus text, by the `Accept` header
//!   ([`crate::metrics::negotiate`]).

use crate::Agent;
use bytes::Bytes;
use http_body_util::Full;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use std::convert::Infallible;
use tokio::net::TcpListener;

/// Serves until the task is aborted. Connection errors are logged, never
/// fatal.
pub async fn serve(listener: TcpListener, agent: Agent) {
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                continue;
            }
        };
        let agent = agent.clone();
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req| {
                let agent = agent.clone();
                async move { Ok::<_, Infallible>(route(&agent, &req)) }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(std::time::Duration::from_secs(10))
                .serve_connection(TokioIo::new(stream), svc);
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "http connection ended with an error");
            }
        });
    }
}

fn text(status: StatusCode, content_type: &str, body: String) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    if let Ok(v) = hyper::header::HeaderValue::from_str(content_type) {
        r.headers_mut().insert(hyper::header::CONTENT_TYPE, v);
    }
    r
}

/// Answers one request.
pub fn route<B>(agent: &Agent, req: &Request<B>) -> Response<Full<Bytes>> {
    const PLAIN: &str = "text/plain; charset=utf-8";
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return text(StatusCode::METHOD_NOT_ALLOWED, PLAIN, "only GET\n".into());
    }
    match req.uri().path() {
        "/healthz" => text(StatusCode::OK, PLAIN, "ok\n".into()),
        "/readyz" => {
            let (ready, reason) = agent.readiness();
            let code = if ready {
                StatusCode::OK
            } else {
                StatusCode::SERVICE_UNAVAILABLE
            };
            // The second line names the trust root, so a probe log shows a
            // development-root agent for what it is.
            text(
                code,
                PLAIN,
                format!(
                    "{reason}\ntrust root: {}\n",
                    crate::status::describe_embedded_root()
                ),
            )
        }
        "/metrics" => {
            // Refresh derived gauges (offline) before encoding.
            let _ = agent.status();
            let accept = req
                .headers()
                .get(hyper::header::ACCEPT)
                .and_then(|v| v.to_str().ok());
            let (content_type, body) = agent.metrics().exposition(accept);
            text(StatusCode::OK, content_type, body)
        }
        _ => text(
            StatusCode::NOT_FOUND,
            PLAIN,
            "not found; try /healthz, /readyz or /metrics\n".into(),
        ),
    }
}
