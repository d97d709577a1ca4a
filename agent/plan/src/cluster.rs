//! The kube-rs shell of the Kubernetes target: resolves kinds through
//! discovery, server-side applies with field manager `cairn`, reads live
//! objects, deletes, and waits for CRDs to be established.
//!
//! Errors are per object and carry the object's name and the API server's
//! code and message, so one bad object never hides the rest.

use crate::plan::{ObjectRef, MANAGER};
use kube::api::{Api, ApiResource, DeleteParams, DynamicObject, ListParams, Patch, PatchParams};
use kube::core::GroupVersionKind;
use kube::discovery::{verbs, Discovery, Scope};
use kube::Client;
use serde_json::Value;
use std::collections::HashMap;
use std::path::Path;
use std::time::Duration;

/// A failure for one object: which object, and what the API server said.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ObjectError {
    /// `Kind ns/name`.
    pub object: String,
    /// HTTP code from the API server, 0 when the request did not get one
    /// (timeout, connection refused).
    pub code: u16,
    /// The message.
    pub message: String,
}

impl std::fmt::Display for ObjectError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.code == 0 {
            write!(f, "{}: {}", self.object, self.message)
        } else {
            write!(f, "{}: {} {}", self.object, self.code, self.message)
        }
    }
}

fn object_error(r: &ObjectRef, e: kube::Error) -> ObjectError {
    match e {
        kube::Error::Api(s) => ObjectError {
            object: r.display(),
            code: s.code,
            message: if s.reason.is_empty() {
                s.message.clone()
            } else {
                format!("{}: {}", s.reason, s.message)
            },
        },
        other => ObjectError {
            object: r.display(),
            code: 0,
            message: other.to_string(),
        },
    }
}

/// A connection to one cluster, with a cache of resolved kinds.
pub struct Cluster {
    client: Client,
    kinds: HashMap<(String, String, String), (ApiResource, bool)>,
    /// Timeout for each API request.
    pub request_timeout: Duration,
}

impl Cluster {
    /// Connects with a kubeconfig file, or in-cluster / default config when
    /// `kubeconfig` is `None` (kube's `Client::try_default`).
    pub async fn connect(kubeconfig: Option<&Path>) -> Result<Self, String> {
        let config = match kubeconfig {
            Some(p) => {
                let kc = kube::config::Kubeconfig::read_from(p)
                    .map_err(|e| format!("kubeconfig {}: {e}", p.display()))?;
                kube::Config::from_custom_kubeconfig(kc, &Default::default())
                    .await
                    .map_err(|e| format!("kubeconfig {}: {e}", p.display()))?
            }
            None => kube::Config::infer()
                .await
                .map_err(|e| format!("no kubeconfig given and no in-cluster config: {e}"))?,
        };
        Self::with_config(config)
    }

    /// Builds a client from a kube config.
    pub fn with_config(mut config: kube::Config) -> Result<Self, String> {
        let timeout = Duration::from_secs(30);
        config.connect_timeout = Some(Duration::from_secs(10));
        config.read_timeout = Some(timeout);
        config.write_timeout = Some(timeout);
        let client = Client::try_from(config).map_err(|e| format!("kube client: {e}"))?;
        Ok(Self {
            client,
            kinds: HashMap::new(),
            request_timeout: timeout,
        })
    }

    /// The underlying client.
    pub fn client(&self) -> &Client {
        &self.client
    }

    /// Forgets resolved kinds (after CRDs change).
    pub fn forget_kinds(&mut self) {
        self.kinds.clear();
    }

    async fn api(&mut self, r: &ObjectRef) -> Result<Api<DynamicObject>, ObjectError> {
        let key = (r.group.clone(), r.version.clone(), r.kind.clone());
        if !self.kinds.contains_key(&key) {
            let gvk = GroupVersionKind::gvk(&r.group, &r.version, &r.kind);
            let (ar, caps) = kube::discovery::pinned_kind(&self.client, &gvk)
                .await
                .map_err(|e| object_error(r, e))?;
            self.kinds
                .insert(key.clone(), (ar, caps.scope == Scope::Namespaced));
        }
        let (ar, namespaced) = &self.kinds[&key];
        Ok(if *namespaced {
            let ns = if r.namespace.is_empty() {
                "default"
            } else {
                &r.namespace
            };
            Api::namespaced_with(self.client.clone(), ns, ar)
        } else {
            Api::all_with(self.client.clone(), ar)
        })
    }

    /// Reads a live object; `None` if it does not exist.
    pub async fn get(&mut self, r: &ObjectRef) -> Result<Option<Value>, ObjectError> {
        let api = self.api(r).await?;
        match api.get_opt(&r.name).await {
            Ok(Some(o)) => serde_json::to_value(o).map(Some).map_err(|e| ObjectError {
                object: r.display(),
                code: 0,
                message: e.to_string(),
            }),
            Ok(None) => Ok(None),
            Err(e) => Err(object_error(r, e)),
        }
    }

    /// Server-side applies `obj` with field manager `cairn`.
    pub async fn apply(
        &mut self,
        r: &ObjectRef,
        obj: &Value,
        force: bool,
    ) -> Result<Value, ObjectError> {
        let api = self.api(r).await?;
        let mut pp = PatchParams::apply(MANAGER);
        if force {
            pp = pp.force();
        }
        let live = api
            .patch(&r.name, &pp, &Patch::Apply(obj))
            .await
            .map_err(|e| object_error(r, e))?;
        serde_json::to_value(live).map_err(|e| ObjectError {
            object: r.display(),
            code: 0,
            message: e.to_string(),
        })
    }

    /// A server-side apply dry run (`?dryRun=All`) with field manager
    /// `cairn`: what the object would look like after [`Self::apply`].
    pub async fn apply_dry_run(
        &mut self,
        r: &ObjectRef,
        obj: &Value,
        force: bool,
    ) -> Result<Value, ObjectError> {
        let api = self.api(r).await?;
        let mut pp = PatchParams::apply(MANAGER).dry_run();
        if force {
            pp = pp.force();
        }
        let after = api
            .patch(&r.name, &pp, &Patch::Apply(obj))
            .await
            .map_err(|e| object_error(r, e))?;
        serde_json::to_value(after).map_err(|e| ObjectError {
            object: r.display(),
            code: 0,
            message: e.to_string(),
        })
    }

    /// Deletes an object; `Ok(false)` if it was already gone.
    pub async fn delete(&mut self, r: &ObjectRef) -> Result<bool, ObjectError> {
        let api = match self.api(r).await {
            Ok(a) => a,
            // The kind itself is gone (its CRD was pruned): so is the object.
            Err(e) if e.code == 404 => return Ok(false),
            Err(e) => return Err(e),
        };
        match api.delete(&r.name, &DeleteParams::background()).await {
            Ok(_) => Ok(true),
            Err(kube::Error::Api(s)) if s.code == 404 => Ok(false),
            Err(e) => Err(object_error(r, e)),
        }
    }

    /// Waits until a CRD reports `Established`, then forgets cached kinds
    /// so its resources resolve.
    pub async fn wait_established(
        &mut self,
        r: &ObjectRef,
        timeout: Duration,
    ) -> Result<(), ObjectError> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if let Some(live) = self.get(r).await? {
                if crate::plan::health(r, &live) == crate::plan::Health::Healthy {
                    self.forget_kinds();
                    return Ok(());
                }
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(ObjectError {
                    object: r.display(),
                    code: 0,
                    message: format!("not established after {}s", timeout.as_secs()),
                });
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Every object carrying the labels of `selector` (`k=v,k=v`), over
    /// every listable kind the API server serves (each group's preferred
    /// version), like `kubectl apply --prune -l`. Kinds the credentials
    /// may not list (403), or that vanished (404, 405), are skipped and
    /// named in the second value; any other error stops the listing.
    pub async fn list_labelled(
        &mut self,
        selector: &str,
    ) -> Result<(Vec<Value>, Vec<String>), ObjectError> {
        let discovery = Discovery::new(self.client.clone())
            .run()
            .await
            .map_err(|e| ObjectError {
                object: "API discovery".into(),
                code: 0,
                message: e.to_string(),
            })?;
        let lp = ListParams::default().labels(selector);
        let mut out = Vec::new();
        let mut skipped = Vec::new();
        for group in discovery.groups() {
            for (ar, caps) in group.recommended_resources() {
                if !caps.supports_operation(verbs::LIST) || ar.plural.contains('/') {
                    continue;
                }
                let api: Api<DynamicObject> = Api::all_with(self.client.clone(), &ar);
                let what = if ar.group.is_empty() {
                    ar.plural.clone()
                } else {
                    format!("{}.{}", ar.plural, ar.group)
                };
                match api.list(&lp).await {
                    Ok(list) => {
                        for mut o in list.items {
                            // List items carry no type; put it back.
                            o.types = Some(kube::core::TypeMeta {
                                api_version: ar.api_version.clone(),
                                kind: ar.kind.clone(),
                            });
                            let v = serde_json::to_value(o).map_err(|e| ObjectError {
                                object: what.clone(),
                                code: 0,
                                message: e.to_string(),
                            })?;
                            out.push(v);
                        }
                    }
                    Err(kube::Error::Api(s)) if (403..=405).contains(&s.code) => {
                        skipped.push(format!("{what}: {} {}", s.code, s.message));
                    }
                    Err(e) => {
                        return Err(ObjectError {
                            object: what,
                            code: 0,
                            message: e.to_string(),
                        })
                    }
                }
            }
        }
        Ok((out, skipped))
    }
}
