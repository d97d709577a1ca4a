//! kube-rs against the in-process test API server.
#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use cairn_test_apiserver::{Config, TestApiServer};
use common::{client_for, eventually, Env};
use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::ConfigMap;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{
    Api, DynamicObject, ListParams, Patch, PatchParams, PostParams, WatchEvent, WatchParams,
};
use kube::discovery::{ApiResource, Discovery, Scope};
use kube::runtime::watcher;
use serde_json::{json, Value};

fn crd() -> Value {
    json!({
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": "gadgets.cairn.dev"},
        "spec": {
            "group": "cairn.dev",
            "scope": "Cluster",
            "names": {"plural": "gadgets", "singular": "gadget", "kind": "Gadget", "shortNames": ["gd"]},
            "versions": [{
                "name": "v1alpha1", "served": true, "storage": true,
                "schema": {"openAPIV3Schema": {"type": "object", "x-kubernetes-preserve-unknown-fields": true}},
                "subresources": {"status": {}}
            }]
        }
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn discovery_finds_crd_resources() {
    let env = Env::default().await;
    let client = env.client();
    let d = Discovery::new(client.clone())
        .run()
        .await
        .expect("discovery");
    assert!(!d.has_group("cairn.dev"));
    let apps = d.get("apps").expect("apps group");
    let (ar, caps) = apps
        .recommended_resources()
        .into_iter()
        .find(|(ar, _)| ar.kind == "Deployment")
        .expect("deployments");
    assert_eq!(ar.plural, "deployments");
    assert_eq!(caps.scope, Scope::Namespaced);
    assert!(
        caps.subresources.iter().any(|(s, _)| s.plural == "status"),
        "{:?}",
        caps.subresources
    );

    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    let applied = crds
        .patch(
            "gadgets.cairn.dev",
            &PatchParams::apply("cairn"),
            &Patch::Apply(crd()),
        )
        .await
        .expect("apply CRD");
    let conds = applied
        .status
        .expect("status")
        .conditions
        .expect("conditions");
    assert!(conds
        .iter()
        .any(|c| c.type_ == "Established" && c.status == "True"));
    assert!(conds
        .iter()
        .any(|c| c.type_ == "NamesAccepted" && c.status == "True"));

    let d = Discovery::new(client.clone())
        .run()
        .await
        .expect("discovery");
    let g = d.get("cairn.dev").expect("CRD group is discovered");
    let (ar, caps) = g.recommended_kind("Gadget").expect("Gadget kind");
    assert_eq!(ar.plural, "gadgets");
    assert_eq!(ar.version, "v1alpha1");
    assert_eq!(caps.scope, Scope::Cluster);

    // Use it dynamically.
    let gadgets: Api<DynamicObject> = Api::all_with(client.clone(), &ar);
    let obj = json!({"apiVersion": "cairn.dev/v1alpha1", "kind": "Gadget", "metadata": {"name": "g1"}, "spec": {"x": 1}, "status": {"ignored": true}});
    let created = gadgets
        .patch("g1", &PatchParams::apply("cairn"), &Patch::Apply(&obj))
        .await
        .expect("apply gadget");
    assert_eq!(created.data["spec"]["x"], 1);
    assert!(
        created.data.get("status").is_none(),
        "status is a subresource"
    );
    let st = gadgets
        .patch_status(
            "g1",
            &PatchParams::default(),
            &Patch::Merge(json!({"status": {"phase": "Ready"}, "spec": {"x": 99}})),
        )
        .await
        .expect("status patch");
    assert_eq!(st.data["status"]["phase"], "Ready");
    assert_eq!(
        st.data["spec"]["x"], 1,
        "status subresource does not change spec"
    );
    assert_eq!(st.metadata.generation, Some(1));

    // Deleting the CRD stops serving the kind.
    crds.delete("gadgets.cairn.dev", &Default::default())
        .await
        .expect("delete crd");
    let d = Discovery::new(client.clone())
        .run()
        .await
        .expect("discovery");
    assert!(!d.has_group("cairn.dev"));
    let err = gadgets.get("g1").await.expect_err("kind gone");
    assert!(
        matches!(err, kube::Error::Api(ref e) if e.code == 404),
        "{err:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_side_apply_round_trip() {
    let env = Env::default().await;
    let cms: Api<ConfigMap> = Api::namespaced(env.client(), "default");
    let pp = PatchParams::apply("cairn");
    let v1 = json!({"apiVersion": "v1", "kind": "ConfigMap",
        "metadata": {"name": "ssa", "labels": {"a": "1", "b": "2"}},
        "data": {"one": "1", "two": "2"}});
    let cm = cms
        .patch("ssa", &pp, &Patch::Apply(&v1))
        .await
        .expect("apply create");
    assert_eq!(
        cm.data
            .as_ref()
            .and_then(|d| d.get("two"))
            .map(String::as_str),
        Some("2")
    );
    let rv1: u64 = cm
        .metadata
        .resource_version
        .clone()
        .expect("rv")
        .parse()
        .expect("numeric rv");
    let mf = cm.metadata.managed_fields.clone().expect("managedFields");
    assert_eq!(mf.len(), 1);
    assert_eq!(mf[0].manager.as_deref(), Some("cairn"));
    assert_eq!(mf[0].operation.as_deref(), Some("Apply"));
    assert_eq!(mf[0].fields_type.as_deref(), Some("FieldsV1"));
    let fields = &mf[0].fields_v1.as_ref().expect("fieldsV1").0;
    assert_eq!(fields["f:data"]["f:two"], json!({}));
    assert_eq!(fields["f:metadata"]["f:labels"]["f:b"], json!({}));

    // Re-applying the same thing is a no-op.
    let same = cms
        .patch("ssa", &pp, &Patch::Apply(&v1))
        .await
        .expect("reapply");
    assert_eq!(same.metadata.resource_version, cm.metadata.resource_version);

    // Removing fields from the applied object removes them from the live object.
    let v2 = json!({"apiVersion": "v1", "kind": "ConfigMap",
        "metadata": {"name": "ssa", "labels": {"a": "1"}},
        "data": {"one": "uno"}});
    let cm = cms
        .patch("ssa", &pp, &Patch::Apply(&v2))
        .await
        .expect("apply 2");
    let data = cm.data.clone().expect("data");
    assert_eq!(data.get("one").map(String::as_str), Some("uno"));
    assert!(!data.contains_key("two"), "{data:?}");
    let labels = cm.metadata.labels.clone().expect("labels");
    assert!(!labels.contains_key("b"));
    let rv2: u64 = cm
        .metadata
        .resource_version
        .clone()
        .expect("rv")
        .parse()
        .expect("rv");
    assert!(rv2 > rv1);

    // A conflicting manager gets a 409 with FieldManagerConflict causes.
    let theirs = json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "ssa"}, "data": {"one": "eins"}});
    let err = cms
        .patch(
            "ssa",
            &PatchParams::apply("intruder"),
            &Patch::Apply(&theirs),
        )
        .await
        .expect_err("conflict");
    match err {
        kube::Error::Api(e) => {
            assert_eq!(e.code, 409);
            assert_eq!(e.reason, "Conflict");
            assert!(
                e.message.contains(r#"conflict with "cairn""#) && e.message.contains(".data.one"),
                "{}",
                e.message
            );
        }
        other => panic!("unexpected {other:?}"),
    }
    let forced = cms
        .patch(
            "ssa",
            &PatchParams::apply("intruder").force(),
            &Patch::Apply(&theirs),
        )
        .await
        .expect("forced");
    assert_eq!(forced.data.expect("data")["one"], "eins");
    let owners: Vec<String> = forced
        .metadata
        .managed_fields
        .expect("mf")
        .iter()
        .filter(|e| {
            e.fields_v1
                .as_ref()
                .is_some_and(|f| f.0["f:data"].get("f:one").is_some())
        })
        .filter_map(|e| e.manager.clone())
        .collect();
    assert_eq!(owners, vec!["intruder".to_string()]);

    // fieldManager is required for apply.
    let err = cms
        .patch("ssa", &PatchParams::default(), &Patch::Apply(&v2))
        .await
        .expect_err("no manager");
    assert!(
        matches!(err, kube::Error::Api(ref e) if e.code == 400),
        "{err:?}"
    );

    // Optimistic concurrency on replace.
    let mut stale = cms.get("ssa").await.expect("get");
    stale.metadata.resource_version = Some("1".into());
    let err = cms
        .replace("ssa", &PostParams::default(), &stale)
        .await
        .expect_err("conflict");
    assert!(
        matches!(err, kube::Error::Api(ref e) if e.code == 409 && e.reason == "Conflict"),
        "{err:?}"
    );

    // Deployments: keyed container lists merge by name; generation tracks spec.
    let deploys: Api<Deployment> = Api::namespaced(env.client(), "default");
    let d1 = json!({"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "app"},
        "spec": {"selector": {"matchLabels": {"app": "a"}}, "template": {"metadata": {"labels": {"app": "a"}},
        "spec": {"containers": [{"name": "main", "image": "img:1"}, {"name": "side", "image": "side:1"}]}}}});
    let d = deploys
        .patch("app", &pp, &Patch::Apply(&d1))
        .await
        .expect("apply deploy");
    assert_eq!(d.metadata.generation, Some(1));
    let mf = &d.metadata.managed_fields.expect("mf")[0];
    let f = &mf.fields_v1.as_ref().expect("f").0;
    assert!(
        f["f:spec"]["f:template"]["f:spec"]["f:containers"]["k:{\"name\":\"main\"}"]["f:image"]
            .is_object(),
        "{f}"
    );
    let mut d2 = d1.clone();
    d2["spec"]["template"]["spec"]["containers"] = json!([{"name": "main", "image": "img:2"}]);
    let d = deploys
        .patch("app", &pp, &Patch::Apply(&d2))
        .await
        .expect("apply deploy 2");
    let dv = serde_json::to_value(&d).expect("json");
    let c = dv["spec"]["template"]["spec"]["containers"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    assert_eq!(c.len(), 1);
    assert_eq!(c[0]["image"], "img:2");
    assert_eq!(d.metadata.generation, Some(2));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_streams_added_modified_deleted() {
    let env = Env::default().await;
    let client = env.client();
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), "default");
    let list = cms.list(&ListParams::default()).await.expect("list");
    let rv = list.metadata.resource_version.clone().expect("list rv");

    let stream = cms
        .watch(&WatchParams::default().labels("watch=me").timeout(20), &rv)
        .await
        .expect("watch");
    let collector = tokio::spawn(async move {
        let mut seen = Vec::new();
        let mut stream = stream.boxed();
        while let Some(ev) = stream.next().await {
            let ev = ev.expect("event");
            let (kind, name) = match &ev {
                WatchEvent::Added(o) => ("ADDED", o.metadata.name.clone()),
                WatchEvent::Modified(o) => ("MODIFIED", o.metadata.name.clone()),
                WatchEvent::Deleted(o) => ("DELETED", o.metadata.name.clone()),
                WatchEvent::Bookmark(_) => continue,
                WatchEvent::Error(e) => panic!("watch error {e:?}"),
            };
            seen.push(format!("{kind} {}", name.unwrap_or_default()));
            if kind == "DELETED" {
                break;
            }
        }
        seen
    });

    // Also a kube-runtime watcher.
    let w_api: Api<ConfigMap> = Api::namespaced(client.clone(), "default");
    let runtime_seen = tokio::spawn(async move {
        let mut s = watcher(w_api, watcher::Config::default().labels("watch=me")).boxed();
        let mut out = Vec::new();
        while let Ok(Some(ev)) = tokio::time::timeout(Duration::from_secs(20), s.try_next())
            .await
            .map(|r| r.ok().flatten())
        {
            match ev {
                watcher::Event::Apply(o) => {
                    out.push(format!("apply {}", o.metadata.name.unwrap_or_default()))
                }
                watcher::Event::Delete(o) => {
                    out.push(format!("delete {}", o.metadata.name.unwrap_or_default()));
                    break;
                }
                watcher::Event::InitDone => out.push("init-done".into()),
                _ => {}
            }
        }
        out
    });
    tokio::time::sleep(Duration::from_millis(300)).await;

    let pp = PatchParams::apply("cairn");
    let mut obj = json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "w", "labels": {"watch": "me"}}, "data": {"v": "1"}});
    cms.patch("w", &pp, &Patch::Apply(&obj))
        .await
        .expect("create");
    // Not matching the selector: never seen.
    cms.create(
        &PostParams::default(),
        &serde_json::from_value(json!({"metadata": {"name": "other"}})).expect("cm"),
    )
    .await
    .expect("create other");
    obj["data"]["v"] = json!("2");
    cms.patch("w", &pp, &Patch::Apply(&obj))
        .await
        .expect("modify");
    cms.delete("w", &Default::default()).await.expect("delete");

    let seen = tokio::time::timeout(Duration::from_secs(20), collector)
        .await
        .expect("collector finished")
        .expect("join");
    assert_eq!(seen, vec!["ADDED w", "MODIFIED w", "DELETED w"]);
    let rt = tokio::time::timeout(Duration::from_secs(20), runtime_seen)
        .await
        .expect("watcher finished")
        .expect("join");
    assert!(rt.contains(&"init-done".to_string()), "{rt:?}");
    assert!(rt.contains(&"apply w".to_string()), "{rt:?}");
    assert_eq!(rt.last().map(String::as_str), Some("delete w"), "{rt:?}");

    // Resuming from an old resourceVersion replays history.
    let replay = cms
        .watch(&WatchParams::default().labels("watch=me").timeout(1), &rv)
        .await
        .expect("watch");
    let events: Vec<_> = replay.take(3).collect().await;
    assert_eq!(events.len(), 3);
    assert!(matches!(events[0], Ok(WatchEvent::Added(_))));
    assert!(matches!(events[2], Ok(WatchEvent::Deleted(_))));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_from_expired_resource_version_gets_410() {
    let server = TestApiServer::start(Config {
        history_limit: 3,
        ..Config::default()
    })
    .await
    .expect("server");
    let cms: Api<ConfigMap> = Api::namespaced(client_for(&server.url()), "default");
    let rv = cms
        .list(&ListParams::default())
        .await
        .expect("list")
        .metadata
        .resource_version
        .expect("rv");
    for i in 0..6 {
        cms.create(
            &PostParams::default(),
            &serde_json::from_value(json!({"metadata": {"name": format!("c{i}")}})).expect("cm"),
        )
        .await
        .expect("create");
    }
    let s = cms
        .watch(&WatchParams::default().timeout(2), &rv)
        .await
        .expect("watch");
    let events: Vec<_> = s.collect().await;
    match events.first() {
        Some(Ok(WatchEvent::Error(e))) => {
            assert_eq!(e.code, 410);
            assert_eq!(e.reason, "Expired");
        }
        other => panic!("expected 410 Expired, got {other:?}"),
    }
    // kube-runtime recovers by re-listing.
    let w = watcher(cms.clone(), watcher::Config::default());
    let names = tokio::time::timeout(Duration::from_secs(10), async {
        let mut s = w.boxed();
        let mut names = Vec::new();
        while let Some(Ok(ev)) = s.next().await {
            match ev {
                watcher::Event::InitApply(o) => names.push(o.metadata.name.unwrap_or_default()),
                watcher::Event::InitDone => break,
                _ => {}
            }
        }
        names
    })
    .await
    .expect("initial list");
    assert_eq!(names.len(), 6);
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deployments_become_available_unless_broken() {
    let delay = Duration::from_millis(200);
    let server = TestApiServer::start(Config {
        deployment_ready_delay: delay,
        ..Config::default()
    })
    .await
    .expect("server");
    let client = client_for(&server.url());
    let deploys: Api<Deployment> = Api::namespaced(client, "default");
    let mk = |name: &str, image: &str| {
        json!({"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": name},
            "spec": {"replicas": 2, "selector": {"matchLabels": {"app": name}},
            "template": {"metadata": {"labels": {"app": name}}, "spec": {"containers": [{"name": "c", "image": image}]}}}})
    };
    let pp = PatchParams::apply("cairn");
    deploys
        .patch("good", &pp, &Patch::Apply(mk("good", "nginx:1")))
        .await
        .expect("good");
    deploys
        .patch("bad", &pp, &Patch::Apply(mk("bad", "example/broken:1")))
        .await
        .expect("bad");

    let available = |d: &Deployment| -> Option<String> {
        let v = serde_json::to_value(d).ok()?;
        v["status"]["conditions"]
            .as_array()?
            .iter()
            .find(|c| c["type"] == "Available")
            .and_then(|c| c["status"].as_str().map(String::from))
    };
    let good = eventually(Duration::from_secs(20), || async {
        let d = deploys.get("good").await.ok()?;
        (available(&d).as_deref() == Some("True")).then_some(d)
    })
    .await
    .expect("good deployment becomes available");
    let st = good.status.clone().expect("status");
    assert_eq!(st.observed_generation, good.metadata.generation);
    assert_eq!(st.ready_replicas, Some(2));
    assert_eq!(st.available_replicas, Some(2));
    assert_eq!(st.updated_replicas, Some(2));
    let sv = serde_json::to_value(&st).expect("json");
    let progressing = sv["conditions"]
        .as_array()
        .and_then(|c| c.iter().find(|c| c["type"] == "Progressing"))
        .cloned()
        .expect("progressing");
    assert_eq!(progressing["reason"], "NewReplicaSetAvailable");
    let mf = good.metadata.managed_fields.expect("mf");
    assert!(mf
        .iter()
        .any(|e| e.manager.as_deref() == Some("kube-controller-manager")
            && e.subresource.as_deref() == Some("status")));

    tokio::time::sleep(delay * 8).await;
    let bad = deploys.get("bad").await.expect("bad");
    assert_eq!(available(&bad).as_deref(), Some("False"));
    assert_eq!(bad.status.as_ref().and_then(|s| s.available_replicas), None);

    // A spec change re-runs the rollout for the new generation.
    let fixed = deploys
        .patch("bad", &pp, &Patch::Apply(mk("bad", "example/fixed:2")))
        .await
        .expect("fix");
    assert_eq!(fixed.metadata.generation, Some(2));
    let ok = eventually(Duration::from_secs(20), || async {
        let d = deploys.get("bad").await.ok()?;
        let s = d.status.clone()?;
        (available(&d).as_deref() == Some("True") && s.observed_generation == Some(2)).then_some(())
    })
    .await;
    assert!(ok.is_some(), "fixed deployment becomes available");
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dynamic_api_and_errors() {
    let env = Env::default().await;
    let client = env.client();
    let ar = ApiResource::erase::<ConfigMap>(&());
    let api: Api<DynamicObject> = Api::namespaced_with(client.clone(), "default", &ar);
    let err = api.get("missing").await.expect_err("404");
    match err {
        kube::Error::Api(e) => {
            assert_eq!(e.code, 404);
            assert_eq!(e.reason, "NotFound");
            assert_eq!(e.message, r#"configmaps "missing" not found"#);
        }
        other => panic!("{other:?}"),
    }
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), "default");
    let cm: ConfigMap = serde_json::from_value(json!({"metadata": {"name": "dup"}})).expect("cm");
    cms.create(&PostParams::default(), &cm)
        .await
        .expect("create");
    let err = cms
        .create(&PostParams::default(), &cm)
        .await
        .expect_err("409");
    assert!(
        matches!(err, kube::Error::Api(ref e) if e.code == 409 && e.reason == "AlreadyExists"),
        "{err:?}"
    );
    let bad: ConfigMap =
        serde_json::from_value(json!({"metadata": {"name": "Bad_Name"}})).expect("cm");
    let err = cms
        .create(&PostParams::default(), &bad)
        .await
        .expect_err("422");
    assert!(
        matches!(err, kube::Error::Api(ref e) if e.code == 422 && e.reason == "Invalid"),
        "{err:?}"
    );
    let elsewhere: Api<ConfigMap> = Api::namespaced(client.clone(), "nope");
    let err = elsewhere
        .create(&PostParams::default(), &cm)
        .await
        .expect_err("ns 404");
    assert!(
        matches!(err, kube::Error::Api(ref e) if e.code == 404 && e.message == r#"namespaces "nope" not found"#),
        "{err:?}"
    );
    // JSON patch test failure.
    let err = cms
        .patch(
            "dup",
            &PatchParams::default(),
            &Patch::<()>::Json(
                serde_json::from_value(
                    json!([{"op": "test", "path": "/metadata/name", "value": "x"}]),
                )
                .expect("patch"),
            ),
        )
        .await
        .expect_err("test op fails");
    assert!(
        matches!(err, kube::Error::Api(ref e) if e.code == 422),
        "{err:?}"
    );
    // Field selectors.
    let l = cms
        .list(&ListParams::default().fields("metadata.name=dup"))
        .await
        .expect("list");
    assert_eq!(l.items.len(), 1);
    let l = cms
        .list(&ListParams::default().fields("metadata.name!=dup"))
        .await
        .expect("list");
    assert!(l.items.is_empty());
}
