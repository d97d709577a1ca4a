//! A built-in "controller" that fakes workload status.
//!
//! When a Deployment, StatefulSet, DaemonSet or Job is created or its spec changes
//! (new `metadata.generation`), it immediately writes an in-progress status, and
//! after the configured delay (`--deployment-ready-delay-ms`, default 300 ms) a
//! ready/complete status — unless any container image of the pod template contains
//! the substring `broken`: then workloads never become ready and Jobs fail.
//! Status writes are recorded as `Update` by `kube-controller-manager` on the
//! `status` subresource.

use std::collections::HashMap;
use std::sync::Arc;

use serde_json::{json, Value};
use tokio::sync::broadcast::error::RecvError;

use crate::api;
use crate::discovery::fnv;
use crate::store::{EventType, ObjKey};
use crate::util;
use crate::Shared;

fn is_workload(k: &ObjKey) -> bool {
    matches!(
        (k.group.as_str(), k.resource.as_str()),
        ("apps", "deployments")
            | ("apps", "statefulsets")
            | ("apps", "daemonsets")
            | ("batch", "jobs")
    )
}

/// Whether any container image of the pod template contains `broken`.
pub fn is_broken(obj: &Value) -> bool {
    ["containers", "initContainers"].iter().any(|f| {
        obj.pointer(&format!("/spec/template/spec/{f}"))
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .any(|c| {
                c.get("image")
                    .and_then(Value::as_str)
                    .is_some_and(|i| i.contains("broken"))
            })
    })
}

fn cond(ty: &str, status: bool, reason: &str, msg: &str, now: &str) -> Value {
    json!({
        "type": ty,
        "status": if status { "True" } else { "False" },
        "lastUpdateTime": now,
        "lastTransitionTime": now,
        "reason": reason,
        "message": msg,
    })
}

/// The status a workload has while rolling out (`done == false`) or once settled.
pub fn workload_status(key: &ObjKey, obj: &Value, done: bool) -> Value {
    let now = util::now_rfc3339();
    let gen = obj
        .pointer("/metadata/generation")
        .and_then(Value::as_i64)
        .unwrap_or(1);
    let replicas = obj
        .pointer("/spec/replicas")
        .and_then(Value::as_i64)
        .unwrap_or(1);
    let broken = is_broken(obj);
    let ready = done && !broken;
    let tmpl = obj
        .pointer("/spec/template")
        .map(|t| t.to_string())
        .unwrap_or_default();
    let hash = format!("{:010x}", fnv(&tmpl) & 0xff_ffff_ffff);
    let name = &key.name;
    match key.resource.as_str() {
        "deployments" => {
            let rs = format!("{name}-{}", &hash[..10]);
            if ready || replicas == 0 {
                json!({
                    "observedGeneration": gen,
                    "replicas": replicas,
                    "updatedReplicas": replicas,
                    "readyReplicas": replicas,
                    "availableReplicas": replicas,
                    "conditions": [
                        cond("Available", true, "MinimumReplicasAvailable", "Deployment has minimum availability.", &now),
                        cond("Progressing", true, "NewReplicaSetAvailable", &format!("ReplicaSet \"{rs}\" has successfully progressed."), &now),
                    ]
                })
            } else {
                json!({
                    "observedGeneration": gen,
                    "replicas": replicas,
                    "updatedReplicas": replicas,
                    "unavailableReplicas": replicas,
                    "conditions": [
                        cond("Available", false, "MinimumReplicasUnavailable", "Deployment does not have minimum availability.", &now),
                        cond("Progressing", true, "ReplicaSetUpdated", &format!("ReplicaSet \"{rs}\" is progressing."), &now),
                    ]
                })
            }
        }
        "statefulsets" => {
            let rev = format!("{name}-{}", &hash[..10]);
            let n = if ready || replicas == 0 { replicas } else { 0 };
            json!({
                "observedGeneration": gen,
                "replicas": replicas,
                "readyReplicas": n,
                "availableReplicas": n,
                "currentReplicas": replicas,
                "updatedReplicas": replicas,
                "currentRevision": rev,
                "updateRevision": rev,
                "collisionCount": 0,
            })
        }
        "daemonsets" => {
            let mut st = json!({
                "observedGeneration": gen,
                "desiredNumberScheduled": 1,
                "currentNumberScheduled": 1,
                "updatedNumberScheduled": 1,
                "numberMisscheduled": 0,
                "numberReady": if ready { 1 } else { 0 },
            });
            if ready {
                st["numberAvailable"] = json!(1);
            } else {
                st["numberUnavailable"] = json!(1);
            }
            st
        }
        _ => {
            // Jobs.
            let start = obj
                .pointer("/status/startTime")
                .cloned()
                .unwrap_or_else(|| json!(now));
            if !done {
                json!({"startTime": start, "active": 1, "ready": 0, "uncountedTerminatedPods": {}})
            } else if broken {
                json!({
                    "startTime": start,
                    "failed": 1,
                    "ready": 0,
                    "uncountedTerminatedPods": {},
                    "conditions": [
                        cond("FailureTarget", true, "BackoffLimitExceeded", "Job has reached the specified backoff limit", &now),
                        cond("Failed", true, "BackoffLimitExceeded", "Job has reached the specified backoff limit", &now),
                    ]
                })
            } else {
                json!({
                    "startTime": start,
                    "completionTime": now,
                    "succeeded": 1,
                    "ready": 0,
                    "uncountedTerminatedPods": {},
                    "conditions": [
                        cond("SuccessCriteriaMet", true, "CompletionsReached", "Reached expected number of succeeded pods", &now),
                        cond("Complete", true, "CompletionsReached", "Reached expected number of succeeded pods", &now),
                    ]
                })
            }
        }
    }
}

fn observe(shared: &Arc<Shared>, seen: &mut HashMap<String, i64>, key: &ObjKey, obj: &Value) {
    let uid = obj
        .pointer("/metadata/uid")
        .and_then(Value::as_str)
        .unwrap_or("")
        .to_string();
    let gen = obj
        .pointer("/metadata/generation")
        .and_then(Value::as_i64)
        .unwrap_or(1);
    if seen.get(&uid) == Some(&gen) {
        return;
    }
    seen.insert(uid.clone(), gen);
    // A finished Job whose spec did not change is left alone (e.g. after restore).
    let job_done = key.resource == "jobs"
        && obj
            .pointer("/status/conditions")
            .and_then(Value::as_array)
            .is_some_and(|c| !c.is_empty());
    if !job_done {
        let status = workload_status(key, obj, false);
        let mut s = shared.store.lock();
        api::controller_status_update(&mut s, key, &uid, gen, status);
    }
    let shared = shared.clone();
    let key = key.clone();
    let delay = shared.config.deployment_ready_delay;
    tokio::spawn(async move {
        tokio::time::sleep(delay).await;
        let mut s = shared.store.lock();
        let Some(current) = s.objects.get(&key).cloned() else {
            return;
        };
        if current
            .pointer("/metadata/generation")
            .and_then(Value::as_i64)
            != Some(gen)
        {
            return;
        }
        let status = workload_status(&key, &current, true);
        api::controller_status_update(&mut s, &key, &uid, gen, status);
    });
}

/// Runs the controller until shutdown.
pub async fn run(shared: Arc<Shared>) {
    let mut rx = shared.store.subscribe();
    let mut shutdown = shared.shutdown.clone();
    let mut seen: HashMap<String, i64> = HashMap::new();
    let scan = |shared: &Arc<Shared>, seen: &mut HashMap<String, i64>| {
        let items: Vec<(ObjKey, Value)> = {
            let s = shared.store.lock();
            s.objects
                .iter()
                .filter(|(k, _)| is_workload(k))
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect()
        };
        for (k, v) in items {
            observe(shared, seen, &k, &v);
        }
    };
    scan(&shared, &mut seen);
    loop {
        tokio::select! {
            _ = crate::wait_shutdown(&mut shutdown) => break,
            r = rx.recv() => match r {
                Ok(ev) => {
                    if !is_workload(&ev.key) {
                        continue;
                    }
                    if ev.etype == EventType::Deleted {
                        if let Some(uid) = ev.object.pointer("/metadata/uid").and_then(Value::as_str) {
                            seen.remove(uid);
                        }
                        continue;
                    }
                    observe(&shared, &mut seen, &ev.key, &ev.object);
                }
                Err(RecvError::Lagged(_)) => scan(&shared, &mut seen),
                Err(RecvError::Closed) => break,
            }
        }
    }
}
