//! Object storage: objects keyed by group/resource/namespace/name, the global
//! resourceVersion counter, a bounded event history and a broadcast of events for
//! watches and the built-in controller.

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};

use serde_json::{json, Value};
use tokio::sync::broadcast;

use crate::discovery::{builtins, crd_resource, ResourceInfo};

/// The group of CustomResourceDefinitions.
pub const CRD_GROUP: &str = "apiextensions.k8s.io";
/// The resource name of CustomResourceDefinitions.
pub const CRD_RESOURCE: &str = "customresourcedefinitions";

/// Identifies one stored object.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ObjKey {
    /// API group (`""` for core).
    pub group: String,
    /// Plural resource name.
    pub resource: String,
    /// Namespace (`""` for cluster-scoped objects).
    pub namespace: String,
    /// Object name.
    pub name: String,
}

/// Watch event type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventType {
    /// Object created.
    Added,
    /// Object changed.
    Modified,
    /// Object removed.
    Deleted,
}

impl EventType {
    /// The wire name (`ADDED`...).
    pub fn as_str(self) -> &'static str {
        match self {
            EventType::Added => "ADDED",
            EventType::Modified => "MODIFIED",
            EventType::Deleted => "DELETED",
        }
    }
}

/// One change to the store.
#[derive(Debug, Clone)]
pub struct Event {
    /// The resourceVersion produced by this change.
    pub rv: u64,
    /// What happened.
    pub etype: EventType,
    /// Which object.
    pub key: ObjKey,
    /// The object after the change (for deletions: the last state).
    pub object: Value,
    /// The object before the change (modifications only).
    pub old: Option<Value>,
}

/// The mutable state behind the store lock.
pub struct StoreInner {
    /// Last issued resourceVersion.
    pub rv: u64,
    /// All objects.
    pub objects: BTreeMap<ObjKey, Value>,
    history: VecDeque<Arc<Event>>,
    history_limit: usize,
    /// Watches starting at a resourceVersion older than this are expired (410).
    pub floor: u64,
    crds: BTreeMap<String, ResourceInfo>,
    builtins: Vec<ResourceInfo>,
    tx: broadcast::Sender<Arc<Event>>,
    next_ip: u32,
}

/// Thread-safe store.
pub struct Store {
    inner: Mutex<StoreInner>,
    tx: broadcast::Sender<Arc<Event>>,
}

impl Store {
    /// A store holding the default namespaces.
    pub fn new(history_limit: usize) -> Self {
        let (tx, _) = broadcast::channel(4096);
        let mut inner = StoreInner {
            rv: 0,
            objects: BTreeMap::new(),
            history: VecDeque::new(),
            history_limit: history_limit.max(1),
            floor: 0,
            crds: BTreeMap::new(),
            builtins: builtins(),
            tx: tx.clone(),
            next_ip: 10,
        };
        for ns in ["default", "kube-system", "kube-public", "kube-node-lease"] {
            let now = crate::util::now_rfc3339();
            let obj = json!({
                "apiVersion": "v1",
                "kind": "Namespace",
                "metadata": {
                    "name": ns,
                    "uid": crate::util::uuid(),
                    "creationTimestamp": now,
                    "labels": {"kubernetes.io/metadata.name": ns},
                },
                "spec": {"finalizers": ["kubernetes"]},
                "status": {"phase": "Active"}
            });
            inner.put(
                ObjKey {
                    group: String::new(),
                    resource: "namespaces".into(),
                    namespace: String::new(),
                    name: ns.into(),
                },
                obj,
                None,
            );
        }
        Store {
            inner: Mutex::new(inner),
            tx,
        }
    }

    /// Locks the store (a poisoned lock is recovered: state is plain data).
    pub fn lock(&self) -> MutexGuard<'_, StoreInner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Subscribes to future events.
    pub fn subscribe(&self) -> broadcast::Receiver<Arc<Event>> {
        self.tx.subscribe()
    }
}

impl StoreInner {
    /// All served resource types (built-ins, then CRD-defined ones).
    pub fn resources(&self) -> Vec<ResourceInfo> {
        let mut v = self.builtins.clone();
        v.extend(self.crds.values().cloned());
        v
    }

    /// Finds a served resource by group, version and plural name.
    pub fn find_resource(&self, group: &str, version: &str, plural: &str) -> Option<ResourceInfo> {
        self.builtins
            .iter()
            .chain(self.crds.values())
            .find(|r| r.group == group && r.plural == plural && r.serves(version))
            .cloned()
    }

    /// Finds a served resource by group and plural name (any version).
    pub fn resource_by_name(&self, group: &str, plural: &str) -> Option<ResourceInfo> {
        self.builtins
            .iter()
            .chain(self.crds.values())
            .find(|r| r.group == group && r.plural == plural)
            .cloned()
    }

    /// Subscribes to future events (call while holding the lock to get a gap-free
    /// view together with [`StoreInner::history_since`]).
    pub fn subscribe(&self) -> broadcast::Receiver<Arc<Event>> {
        self.tx.subscribe()
    }

    /// Events newer than `rv`, or `Err(floor)` if some were already evicted.
    pub fn history_since(&self, rv: u64) -> Result<Vec<Arc<Event>>, u64> {
        if rv < self.floor {
            return Err(self.floor);
        }
        Ok(self.history.iter().filter(|e| e.rv > rv).cloned().collect())
    }

    /// A fresh fake ClusterIP.
    pub fn allocate_ip(&mut self) -> String {
        self.next_ip += 1;
        let n = self.next_ip;
        format!("10.96.{}.{}", (n >> 8) & 0xff, n & 0xff)
    }

    /// Objects of one resource, optionally in one namespace, in key order.
    pub fn list(&self, group: &str, resource: &str, namespace: Option<&str>) -> Vec<&Value> {
        self.objects
            .iter()
            .filter(|(k, _)| {
                k.group == group
                    && k.resource == resource
                    && namespace.is_none_or(|ns| k.namespace == ns)
            })
            .map(|(_, v)| v)
            .collect()
    }

    /// Whether a namespace exists.
    pub fn namespace_exists(&self, ns: &str) -> bool {
        self.objects.contains_key(&ObjKey {
            group: String::new(),
            resource: "namespaces".into(),
            namespace: String::new(),
            name: ns.into(),
        })
    }

    fn record(&mut self, ev: Event) {
        let ev = Arc::new(ev);
        self.history.push_back(ev.clone());
        while self.history.len() > self.history_limit {
            if let Some(old) = self.history.pop_front() {
                self.floor = old.rv;
            }
        }
        let _ = self.tx.send(ev);
    }

    /// Stores `obj` under `key` with a new resourceVersion and emits ADDED or
    /// MODIFIED. `old` is the previous state (None for creations).
    pub fn put(&mut self, key: ObjKey, mut obj: Value, old: Option<Value>) -> Value {
        self.rv += 1;
        let rv = self.rv;
        if let Some(m) = obj.get_mut("metadata").and_then(Value::as_object_mut) {
            m.insert("resourceVersion".into(), json!(rv.to_string()));
        }
        if key.group == CRD_GROUP && key.resource == CRD_RESOURCE {
            if let Ok(info) = crd_resource(&obj) {
                self.crds.insert(key.name.clone(), info);
            }
        }
        self.objects.insert(key.clone(), obj.clone());
        let etype = if old.is_some() {
            EventType::Modified
        } else {
            EventType::Added
        };
        self.record(Event {
            rv,
            etype,
            key,
            object: obj.clone(),
            old,
        });
        obj
    }

    /// Removes an object, emitting DELETED (cascading to namespace contents and to
    /// the custom objects of a deleted CRD). Returns the removed object.
    pub fn remove(&mut self, key: &ObjKey) -> Option<Value> {
        let mut obj = self.objects.remove(key)?;
        if key.group.is_empty() && key.resource == "namespaces" {
            let inside: Vec<ObjKey> = self
                .objects
                .keys()
                .filter(|k| k.namespace == key.name)
                .cloned()
                .collect();
            for k in inside {
                self.remove(&k);
            }
        }
        if key.group == CRD_GROUP && key.resource == CRD_RESOURCE {
            if let Some(info) = self.crds.remove(&key.name) {
                let owned: Vec<ObjKey> = self
                    .objects
                    .keys()
                    .filter(|k| k.group == info.group && k.resource == info.plural)
                    .cloned()
                    .collect();
                for k in owned {
                    self.remove(&k);
                }
            }
        }
        self.rv += 1;
        let rv = self.rv;
        if let Some(m) = obj.get_mut("metadata").and_then(Value::as_object_mut) {
            m.insert("resourceVersion".into(), json!(rv.to_string()));
        }
        self.record(Event {
            rv,
            etype: EventType::Deleted,
            key: key.clone(),
            object: obj.clone(),
            old: None,
        });
        Some(obj)
    }

    /// Serialises all objects and the resourceVersion (for `--state`).
    pub fn snapshot(&self) -> Value {
        let objects: Vec<Value> = self
            .objects
            .iter()
            .map(|(k, v)| {
                json!({"group": k.group, "resource": k.resource, "namespace": k.namespace, "name": k.name, "object": v})
            })
            .collect();
        json!({"resourceVersion": self.rv, "objects": objects})
    }

    /// Restores a [`StoreInner::snapshot`], replacing all objects. CRDs are
    /// restored first so their kinds are served again.
    pub fn restore(&mut self, snap: &Value) -> anyhow::Result<()> {
        let items = snap
            .get("objects")
            .and_then(Value::as_array)
            .ok_or_else(|| anyhow::anyhow!("state file has no objects array"))?;
        self.objects.clear();
        self.crds.clear();
        for it in items {
            let s = |f: &str| it.get(f).and_then(Value::as_str).unwrap_or("").to_string();
            let key = ObjKey {
                group: s("group"),
                resource: s("resource"),
                namespace: s("namespace"),
                name: s("name"),
            };
            let obj = it.get("object").cloned().unwrap_or(Value::Null);
            if key.group == CRD_GROUP && key.resource == CRD_RESOURCE {
                if let Ok(info) = crd_resource(&obj) {
                    self.crds.insert(key.name.clone(), info);
                }
            }
            self.objects.insert(key, obj);
        }
        let rv = snap
            .get("resourceVersion")
            .and_then(Value::as_u64)
            .unwrap_or(0);
        self.rv = self.rv.max(rv);
        self.floor = self.rv;
        self.history.clear();
        Ok(())
    }
}
