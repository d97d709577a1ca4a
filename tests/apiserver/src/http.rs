//! HTTP serving and routing.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full, Limited, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::header::{HeaderValue, CONTENT_TYPE};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde_json::{json, Value};
use tokio::net::TcpListener;
use tokio::sync::broadcast::error::RecvError;
use tokio::task::JoinSet;

use crate::api::{self, Params, Target};
use crate::discovery;
use crate::error::{ApiError, ApiResult};
use crate::selector::{FieldSelector, LabelSelector};
use crate::store::{Event, EventType};
use crate::table::{self, IncludeObject};
use crate::util;
use crate::{deny, Shared};

/// Response body type.
pub type Body = UnsyncBoxBody<Bytes, Infallible>;

fn full(b: impl Into<Bytes>) -> Body {
    Full::new(b.into()).boxed_unsync()
}

/// A JSON response.
pub fn json_response(code: u16, v: &Value) -> Response<Body> {
    let mut r = Response::new(full(serde_json::to_vec(v).unwrap_or_default()));
    *r.status_mut() = StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    r.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    r
}

fn error_response(e: &ApiError) -> Response<Body> {
    json_response(e.code, &e.to_status())
}

/// Accepts connections until shutdown is signalled.
pub async fn serve(listener: TcpListener, shared: Arc<Shared>) {
    let mut shutdown = shared.shutdown.clone();
    let mut conns = JoinSet::new();
    loop {
        tokio::select! {
            _ = crate::wait_shutdown(&mut shutdown) => break,
            r = listener.accept() => match r {
                Ok((stream, _)) => {
                    let sh = shared.clone();
                    conns.spawn(async move {
                        let mut sd = sh.shutdown.clone();
                        let svc_sh = sh.clone();
                        let svc = hyper::service::service_fn(move |req| {
                            let sh = svc_sh.clone();
                            async move { Ok::<_, Infallible>(handle(sh, req).await) }
                        });
                        let conn = hyper::server::conn::http1::Builder::new()
                            .serve_connection(TokioIo::new(stream), svc);
                        tokio::pin!(conn);
                        tokio::select! {
                            _ = conn.as_mut() => {}
                            _ = crate::wait_shutdown(&mut sd) => {
                                conn.as_mut().graceful_shutdown();
                                let _ = tokio::time::timeout(Duration::from_secs(2), conn).await;
                            }
                        }
                    });
                }
                Err(e) => {
                    tracing::warn!("accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            },
        }
        while conns.try_join_next().is_some() {}
    }
    let _ = tokio::time::timeout(Duration::from_secs(3), async {
        while conns.join_next().await.is_some() {}
    })
    .await;
    conns.abort_all();
}

async fn handle(sh: Arc<Shared>, req: Request<Incoming>) -> Response<Body> {
    let method = req.method().clone();
    let uri = req.uri().clone();
    let resp = match route(&sh, req).await {
        Ok(r) => r,
        Err(e) => error_response(&e),
    };
    tracing::debug!(%method, %uri, status = resp.status().as_u16(), "request");
    resp
}

fn header(req: &Request<Incoming>, name: &str) -> String {
    req.headers()
        .get(name)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string()
}

async fn read_body(sh: &Shared, req: Request<Incoming>) -> ApiResult<Bytes> {
    let limit = sh.config.max_body_bytes;
    let declared = req
        .headers()
        .get(hyper::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok());
    if declared.is_some_and(|n| n > limit) {
        return Err(ApiError::too_large(limit));
    }
    match Limited::new(req.into_body(), limit).collect().await {
        Ok(c) => Ok(c.to_bytes()),
        Err(e) => {
            if e.downcast_ref::<http_body_util::LengthLimitError>()
                .is_some()
            {
                Err(ApiError::too_large(limit))
            } else {
                Err(ApiError::bad_request(format!(
                    "error reading request body: {e}"
                )))
            }
        }
    }
}

async fn route(sh: &Arc<Shared>, req: Request<Incoming>) -> ApiResult<Response<Body>> {
    let path = req.uri().path().to_string();
    let segs: Vec<String> = path
        .split('/')
        .filter(|s| !s.is_empty())
        .map(util::percent_decode)
        .collect();
    let segs: Vec<&str> = segs.iter().map(String::as_str).collect();
    let method = req.method().clone();
    let discovery_get = |v: ApiResult<Value>| -> ApiResult<Response<Body>> {
        if method != Method::GET {
            return Err(ApiError::method_not_allowed());
        }
        v.map(|v| json_response(200, &v))
    };
    let resources = || sh.store.lock().resources();
    match segs.as_slice() {
        [] => discovery_get(Ok(json!({"paths": [
            "/api", "/api/v1", "/apis", "/healthz", "/livez", "/readyz", "/version"
        ]}))),
        ["version"] => discovery_get(Ok(discovery::version_doc())),
        ["healthz"] | ["livez"] | ["readyz"] => {
            let mut r = Response::new(full("ok"));
            r.headers_mut().insert(
                CONTENT_TYPE,
                HeaderValue::from_static("text/plain; charset=utf-8"),
            );
            Ok(r)
        }
        ["api"] => discovery_get(Ok(discovery::core_versions(&sh.addr.to_string()))),
        ["apis"] => discovery_get(Ok(discovery::group_list(&resources()))),
        ["apis", g] => discovery_get(discovery::group_doc(&resources(), g)),
        ["api", v] => discovery_get(discovery::resource_list(&resources(), "", v)),
        ["apis", g, v] => discovery_get(discovery::resource_list(&resources(), g, v)),
        ["openapi", "v3"] => discovery_get(Ok(crate::openapi::root(&resources()))),
        ["openapi", "v3", rest @ ..] => {
            discovery_get(crate::openapi::group_version(&resources(), rest))
        }
        ["api", v, rest @ ..] => {
            let (v, rest) = (v.to_string(), rest.iter().map(|s| s.to_string()).collect());
            resource_request(sh, req, String::new(), v, rest).await
        }
        ["apis", g, v, rest @ ..] => {
            let (g, v) = (g.to_string(), v.to_string());
            let rest = rest.iter().map(|s| s.to_string()).collect();
            resource_request(sh, req, g, v, rest).await
        }
        _ => Err(ApiError::no_route()),
    }
}

fn parse_target(sh: &Shared, group: &str, version: &str, rest: &[String]) -> ApiResult<Target> {
    let mut rest: Vec<&str> = rest.iter().map(String::as_str).collect();
    let mut namespace = None;
    if rest.first() == Some(&"namespaces")
        && rest.len() >= 3
        && !(rest.len() == 3 && (rest[2] == "status" || rest[2] == "finalize"))
    {
        namespace = Some(rest[1].to_string());
        rest.drain(..2);
    }
    let (resource, name, sub) = match rest.as_slice() {
        [r] => (*r, None, None),
        [r, n] => (*r, Some(n.to_string()), None),
        [r, n, s] => (*r, Some(n.to_string()), Some(s.to_string())),
        _ => return Err(ApiError::no_route()),
    };
    let info = sh
        .store
        .lock()
        .find_resource(group, version, resource)
        .ok_or_else(ApiError::no_route)?;
    if namespace.is_some() && !info.namespaced {
        return Err(ApiError::no_route());
    }
    if info.namespaced && namespace.is_none() && name.is_some() {
        return Err(ApiError::no_route());
    }
    if let Some(s) = &sub {
        let ok =
            (s == "status" && info.status_subresource) || (s == "scale" && api::has_scale(&info));
        if !ok {
            return Err(ApiError::no_route());
        }
    }
    if name.as_deref() == Some("") {
        return Err(ApiError::no_route());
    }
    Ok(Target {
        info,
        version: version.to_string(),
        namespace,
        name,
        sub,
    })
}

fn check_deny(sh: &Shared, t: &Target, verb: &str, name: Option<&str>) -> ApiResult<()> {
    let rules = sh.deny.read().unwrap_or_else(|e| e.into_inner());
    if rules.iter().any(|r| r.matches(&t.info, verb)) {
        return Err(deny::forbidden(
            &sh.config.user,
            &t.info,
            verb,
            t.sub.as_deref(),
            t.namespace.as_deref(),
            name,
        ));
    }
    Ok(())
}

fn default_manager(ua: &str) -> String {
    let m = ua.split('/').next().unwrap_or("").trim();
    if m.is_empty() {
        "unknown".into()
    } else {
        m.chars().take(128).collect()
    }
}

fn table_wanted(accept: &str) -> bool {
    accept
        .split(',')
        .next()
        .is_some_and(|first| first.contains("as=Table"))
}

async fn resource_request(
    sh: &Arc<Shared>,
    req: Request<Incoming>,
    group: String,
    version: String,
    rest: Vec<String>,
) -> ApiResult<Response<Body>> {
    let t = parse_target(sh, &group, &version, &rest)?;
    let params = Params(util::parse_query(req.uri().query()));
    let accept = header(&req, "accept");
    let content_type = header(&req, "content-type");
    let manager = params
        .get("fieldManager")
        .map(String::from)
        .unwrap_or_else(|| default_manager(&header(&req, "user-agent")));
    let method = req.method().clone();
    let labels = LabelSelector::parse(params.get("labelSelector").unwrap_or(""))?;
    let fields = FieldSelector::parse(params.get("fieldSelector").unwrap_or(""))?;
    let include = IncludeObject::parse(params.get("includeObject"));
    let table = table_wanted(&accept);
    let dry_run = params.dry_run();
    let name = t.name.clone();

    if t.sub.as_deref() == Some("scale") {
        return scale_request(sh, req, &t, &params, &manager, &content_type).await;
    }
    match (method, name.is_some()) {
        (Method::GET, false) => {
            let watch = params.flag("watch");
            check_deny(sh, &t, if watch { "watch" } else { "list" }, None)?;
            if watch {
                return watch_response(
                    sh.clone(),
                    t,
                    &params,
                    labels,
                    fields,
                    table.then_some(include),
                );
            }
            let s = sh.store.lock();
            if table {
                let items = api::select(&s, &t, &labels, &fields);
                Ok(json_response(
                    200,
                    &table::table(&t.info, &items, Some(s.rv.to_string()), include, true),
                ))
            } else {
                Ok(json_response(200, &api::list(&s, &t, &labels, &fields)))
            }
        }
        (Method::GET, true) => {
            check_deny(sh, &t, "get", name.as_deref())?;
            let s = sh.store.lock();
            let obj = api::get(&s, &t)?;
            if table {
                Ok(json_response(
                    200,
                    &table::table(&t.info, &[obj], None, include, true),
                ))
            } else {
                Ok(json_response(200, &obj))
            }
        }
        (Method::POST, false) => {
            check_media(&content_type)?;
            let body = read_body(sh, req).await?;
            let obj = api::parse_body(&body, content_type.contains("yaml"))?;
            let body_name = obj.pointer("/metadata/name").and_then(Value::as_str);
            check_deny(sh, &t, "create", body_name)?;
            let mut s = sh.store.lock();
            let created = api::create(&mut s, &t, obj, api::Managed::Update(&manager), dry_run)?;
            Ok(json_response(201, &created))
        }
        (Method::PUT, true) => {
            check_deny(sh, &t, "update", name.as_deref())?;
            check_media(&content_type)?;
            let body = read_body(sh, req).await?;
            let obj = api::parse_body(&body, content_type.contains("yaml"))?;
            let mut s = sh.store.lock();
            let (code, v) = api::update(&mut s, &t, obj, &manager, dry_run)?;
            Ok(json_response(code, &v))
        }
        (Method::PATCH, true) => {
            check_deny(sh, &t, "patch", name.as_deref())?;
            let body = read_body(sh, req).await?;
            let mut s = sh.store.lock();
            let (code, v) = api::patch(&mut s, &t, &content_type, &body, &params, &manager)?;
            Ok(json_response(code, &v))
        }
        (Method::DELETE, true) => {
            check_deny(sh, &t, "delete", name.as_deref())?;
            let body = read_body(sh, req).await?;
            let options = if body.iter().all(u8::is_ascii_whitespace) {
                Value::Null
            } else {
                api::parse_body(&body, false)?
            };
            let dry = dry_run
                || options
                    .get("dryRun")
                    .and_then(Value::as_array)
                    .is_some_and(|a| !a.is_empty());
            let mut s = sh.store.lock();
            let (code, v) = api::delete(&mut s, &t, &options, dry)?;
            Ok(json_response(code, &v))
        }
        (Method::DELETE, false) => {
            check_deny(sh, &t, "deletecollection", None)?;
            let mut s = sh.store.lock();
            let (code, v) = api::delete_collection(&mut s, &t, &labels, &fields, dry_run)?;
            Ok(json_response(code, &v))
        }
        _ => Err(ApiError::method_not_allowed()),
    }
}

async fn scale_request(
    sh: &Arc<Shared>,
    req: Request<Incoming>,
    t: &Target,
    params: &Params,
    manager: &str,
    content_type: &str,
) -> ApiResult<Response<Body>> {
    let name = t.name.clone();
    let method = req.method().clone();
    let verb = match method {
        Method::GET => "get",
        Method::PUT => "update",
        Method::PATCH => "patch",
        _ => return Err(ApiError::method_not_allowed()),
    };
    check_deny(sh, t, verb, name.as_deref())?;
    let body = if method == Method::GET {
        Bytes::new()
    } else {
        read_body(sh, req).await?
    };
    let ct = content_type
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_string();
    let change = |current: Value| -> ApiResult<Value> {
        if method == Method::PUT {
            return api::parse_body(&body, ct.contains("yaml"));
        }
        let mut doc = current;
        let p = api::parse_body(&body, ct.contains("yaml"))?;
        match ct.as_str() {
            "application/json-patch+json" => crate::patch::json_patch(&mut doc, &p)?,
            "application/merge-patch+json" => crate::patch::merge_patch(&mut doc, &p),
            "application/strategic-merge-patch+json" => {
                crate::patch::strategic_merge_patch(&mut doc, &p)
            }
            "application/apply-patch+yaml" => crate::apply::merge_applied(&mut doc, &p, false),
            other => return Err(ApiError::unsupported_media_type(other, api::PATCH_TYPES)),
        }
        Ok(doc)
    };
    let mut s = sh.store.lock();
    let (code, v) = if method == Method::GET {
        api::scale(&mut s, t, None, manager, false)?
    } else {
        api::scale(&mut s, t, Some(&change), manager, params.dry_run())?
    };
    Ok(json_response(code, &v))
}

fn check_media(ct: &str) -> ApiResult<()> {
    let base = ct.split(';').next().unwrap_or("").trim();
    match base {
        "" | "application/json" | "application/yaml" | "application/x-yaml" | "text/yaml"
        | "*/*" => Ok(()),
        other => Err(ApiError::unsupported_media_type(
            other,
            &["application/json", "application/yaml"],
        )),
    }
}

struct WatchFilter {
    t: Target,
    labels: LabelSelector,
    fields: FieldSelector,
    table: Option<IncludeObject>,
}

impl WatchFilter {
    fn relevant(&self, ev: &Event) -> bool {
        ev.key.group == self.t.info.group
            && ev.key.resource == self.t.info.plural
            && self
                .t
                .namespace
                .as_deref()
                .is_none_or(|ns| ns == ev.key.namespace)
    }

    fn selected(&self, obj: &Value) -> bool {
        self.labels.matches(obj) && self.fields.matches(obj)
    }

    fn frame(&self, etype: &str, obj: &Value, first: &mut bool) -> Bytes {
        let obj = api::output(&self.t, obj);
        let object = match self.table {
            Some(include) if etype != "BOOKMARK" && etype != "ERROR" => {
                let t = table::table(&self.t.info, &[obj], None, include, *first);
                *first = false;
                t
            }
            _ => obj,
        };
        let mut line =
            serde_json::to_vec(&json!({"type": etype, "object": object})).unwrap_or_default();
        line.push(b'\n');
        Bytes::from(line)
    }

    fn render(&self, ev: &Event, first: &mut bool) -> Option<Bytes> {
        if !self.relevant(ev) {
            return None;
        }
        let now = self.selected(&ev.object);
        let etype = match ev.etype {
            EventType::Added => now.then_some("ADDED")?,
            EventType::Deleted => now.then_some("DELETED")?,
            EventType::Modified => {
                let before = ev.old.as_ref().is_some_and(|o| self.selected(o));
                match (before, now) {
                    (true, true) => "MODIFIED",
                    (false, true) => "ADDED",
                    (true, false) => "DELETED",
                    (false, false) => return None,
                }
            }
        };
        Some(self.frame(etype, &ev.object, first))
    }
}

fn error_frame(e: &ApiError) -> Bytes {
    let mut line =
        serde_json::to_vec(&json!({"type": "ERROR", "object": e.to_status()})).unwrap_or_default();
    line.push(b'\n');
    Bytes::from(line)
}

fn watch_response(
    sh: Arc<Shared>,
    t: Target,
    params: &Params,
    labels: LabelSelector,
    fields: FieldSelector,
    table: Option<IncludeObject>,
) -> ApiResult<Response<Body>> {
    let timeout = params
        .get("timeoutSeconds")
        .and_then(|v| v.parse::<u64>().ok())
        .unwrap_or(1800);
    let send_initial = params.flag("sendInitialEvents");
    let rv_param = params.get("resourceVersion").unwrap_or("").to_string();
    let filter = WatchFilter {
        t,
        labels,
        fields,
        table,
    };
    let mut first = true;
    let mut frames: Vec<Bytes> = Vec::new();
    let mut finished = false;
    let (start_rv, mut sub) = {
        let s = sh.store.lock();
        let sub = s.subscribe();
        if send_initial || rv_param.is_empty() || rv_param == "0" {
            for obj in api::select(&s, &filter.t, &filter.labels, &filter.fields) {
                frames.push(filter.frame("ADDED", &obj, &mut first));
            }
            if send_initial {
                let bm = json!({
                    "kind": filter.t.info.kind,
                    "apiVersion": filter.t.api_version(),
                    "metadata": {
                        "resourceVersion": s.rv.to_string(),
                        "annotations": {"k8s.io/initial-events-end": "true"}
                    }
                });
                frames.push(filter.frame("BOOKMARK", &bm, &mut first));
            }
        } else {
            let rv: u64 = rv_param.parse().map_err(|_| {
                ApiError::bad_request(format!("invalid resource version: {rv_param}"))
            })?;
            match s.history_since(rv) {
                Err(floor) => {
                    frames.push(error_frame(&ApiError::expired(rv, floor)));
                    finished = true;
                }
                Ok(evs) => {
                    for ev in evs {
                        if let Some(f) = filter.render(&ev, &mut first) {
                            frames.push(f);
                        }
                    }
                }
            }
        }
        (s.rv, sub)
    };
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Bytes>(256);
    if !finished {
        let mut shutdown = sh.shutdown.clone();
        let tx = tx.clone();
        tokio::spawn(async move {
            let deadline = tokio::time::sleep(Duration::from_secs(timeout));
            tokio::pin!(deadline);
            loop {
                tokio::select! {
                    _ = &mut deadline => break,
                    _ = crate::wait_shutdown(&mut shutdown) => break,
                    _ = tx.closed() => break,
                    r = sub.recv() => match r {
                        Ok(ev) => {
                            if ev.rv <= start_rv {
                                continue;
                            }
                            if let Some(f) = filter.render(&ev, &mut first) {
                                if tx.send(f).await.is_err() {
                                    break;
                                }
                            }
                        }
                        Err(RecvError::Lagged(_)) => {
                            let _ = tx.send(error_frame(&ApiError::expired(start_rv, start_rv))).await;
                            break;
                        }
                        Err(RecvError::Closed) => break,
                    }
                }
            }
        });
    }
    drop(tx);
    let live = futures::stream::poll_fn(move |cx| rx.poll_recv(cx));
    let stream = futures::stream::iter(frames)
        .chain(live)
        .map(|b| Ok::<_, Infallible>(Frame::data(b)));
    let mut r = Response::new(StreamBody::new(stream).boxed_unsync());
    r.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    r.headers_mut().insert(
        "cache-control",
        HeaderValue::from_static("no-cache, private"),
    );
    Ok(r)
}
