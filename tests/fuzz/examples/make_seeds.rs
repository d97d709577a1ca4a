//! Writes the seed corpora `corpus/<target>/seed-*`: real encoded documents
//! signed with the checked-in development keys (`keys/trust/dev`).
//! Ed25519 signatures are deterministic, so running it again rewrites the
//! same bytes. Run from `tests/fuzz`: `cargo run --example make_seeds`.
//!
//! The fuzz targets read the signed seeds at run time (see `src/lib.rs`):
//! only messages signed here may ever verify.

use cairn_bundle::mesh::wire::{
    encode_frame, BlobRange, EntryFound, EntryRanges, Found, Head, Hello, Item, Message,
    SignedStatus, StatusRecord,
};
use cairn_bundle::mesh::MeshLimits;
use cairn_bundle::release::{FailureLimit, Release, Rollout, Wave, RELEASE_FORMAT};
use cairn_fuzz::fuzz_dir;
use cairn_keys::{embedded, keyfile, Envelope, KeyPair, PayloadType, Root};
use std::collections::BTreeMap;
use std::path::Path;

/// Far in the future (2096), so the seeds never expire.
const FAR: u64 = 4_000_000_000;
/// When the seed releases were "created" (2023-11-14).
const CREATED: u64 = 1_700_000_000;

fn key(name: &str) -> KeyPair {
    let path = fuzz_dir()
        .join("../../keys/trust/dev")
        .join(format!("{name}.key"));
    match keyfile::read_private(&path) {
        Ok(k) => k,
        Err(e) => panic!("{e}"),
    }
}

fn write(target: &str, name: &str, bytes: &[u8]) {
    let dir = fuzz_dir().join("corpus").join(target);
    std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
    let path = dir.join(format!("seed-{name}"));
    std::fs::write(&path, bytes).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    println!(
        "{} ({} bytes)",
        Path::new(target).join(format!("seed-{name}")).display(),
        bytes.len()
    );
}

fn frame(msg: &Message) -> Vec<u8> {
    match encode_frame(msg, MeshLimits::default().max_frame_bytes) {
        Ok(f) => f,
        Err(e) => panic!("{e}"),
    }
}

fn main() {
    let root1 = key("dev-root-1");
    let root2 = key("dev-root-2");
    let rel1 = key("dev-release-1");
    let rel2 = key("dev-release-2");
    let embedded = match embedded::root() {
        Ok(r) => r,
        Err(e) => panic!("embedded root: {e}"),
    };
    assert_eq!(
        embedded.root().version,
        1,
        "seeds expect the development root (build without CAIRN_TRUST_ROOT)"
    );

    // Roots: v1 as shipped, v2 a rotation to the same keys signed by one
    // root key (threshold 1 of both v1 and v2).
    let v1 = embedded.bytes().to_vec();
    let root_v2 = match Root::new(
        2,
        FAR,
        &[root1.public_key(), root2.public_key()],
        1,
        &[rel1.public_key(), rel2.public_key()],
        1,
    ) {
        Ok(r) => r,
        Err(e) => panic!("{e}"),
    };
    let v2 = root_v2.sign(&[&root1]).encode();
    let v2_both = root_v2.sign(&[&root1, &root2]).encode();

    // Releases.
    let bundle = cairn_bundle::BundleId::of_manifest(b"fuzz seed bundle");
    let simple = Release {
        format: RELEASE_FORMAT,
        channel: "stable".parse().unwrap(),
        sequence: 1,
        bundle: bundle.clone(),
        created: CREATED,
        expires: FAR,
        rollout: Rollout::default(),
        selector: BTreeMap::new(),
    };
    let staged = Release {
        channel: "edge-eu-1".parse().unwrap(),
        sequence: 42,
        rollout: Rollout {
            waves: vec![
                Wave {
                    basis_points: 1000,
                    delay_secs: 0,
                },
                Wave {
                    basis_points: 10000,
                    delay_secs: 3600,
                },
            ],
            max_failures: Some(FailureLimit::BasisPoints(500)),
        },
        selector: [
            ("site".to_string(), "north".to_string()),
            ("tier".to_string(), "edge".to_string()),
        ]
        .into(),
        ..simple.clone()
    };
    let counted = Release {
        sequence: 7,
        rollout: Rollout {
            waves: Vec::new(),
            max_failures: Some(FailureLimit::Count(3)),
        },
        ..simple.clone()
    };
    let release_simple = simple.sign(&[&rel1]).encode();
    let release_staged = staged.sign(&[&rel1, &rel2]).encode();
    let release_counted = counted.sign(&[&rel2]).encode();
    // Signed by a root key: a valid signature by the wrong role.
    let release_by_root_key = simple.sign(&[&root1]).encode();
    let unsigned = Envelope::new(PayloadType::Release, b"not cbor".to_vec()).encode();

    for (name, bytes) in [
        ("root-v1", &v1),
        ("root-v2", &v2),
        ("root-v2-both", &v2_both),
    ] {
        write("root", name, bytes);
        write("envelope", name, bytes);
    }
    for (name, bytes) in [
        ("release-simple", &release_simple),
        ("release-staged", &release_staged),
        ("release-counted", &release_counted),
        ("release-by-root-key", &release_by_root_key),
    ] {
        write("release", name, bytes);
        write("envelope", name, bytes);
    }
    write("envelope", "unsigned", &unsigned);

    // Mesh frames: one of each message, and a stream of several.
    let messages = vec![
        (
            "hello",
            Message::Hello(Hello::new(Some("127.0.0.1:7440".into()))),
        ),
        (
            "heads",
            Message::Heads(vec![Head {
                channel: "stable".into(),
                sequence: 3,
                bundle: bundle.to_string(),
                root_version: 1,
            }]),
        ),
        (
            "want",
            Message::Want {
                id: 7,
                items: vec![
                    Item::Root(2),
                    Item::Release("stable".parse().unwrap()),
                    Item::Object(bundle.as_address().clone()),
                ],
            },
        ),
        (
            "data",
            Message::Data {
                id: 7,
                items: vec![
                    Found {
                        item: Item::Release("stable".parse().unwrap()),
                        bytes: Some(release_simple.clone()),
                    },
                    Found {
                        item: Item::Root(2),
                        bytes: None,
                    },
                ],
                more: true,
                entries: vec![EntryFound(0, Some(b"{}".to_vec())), EntryFound(9, None)],
            },
        ),
        (
            "want_entries",
            Message::Want {
                id: 8,
                items: vec![Item::Entries(EntryRanges {
                    bundle: bundle.clone(),
                    ranges: vec![(0, 100), (250, 1)],
                })],
            },
        ),
        (
            // Protocol version 4: the second 1 MiB piece of an image layer.
            "want_blob",
            Message::Want {
                id: 9,
                items: vec![Item::Blob(BlobRange {
                    digest: cairn_bundle::Address::of(b"fuzz seed layer"),
                    offset: 1 << 20,
                    length: 1 << 20,
                })],
            },
        ),
        (
            // Its answer: a short last piece.
            "data_blob",
            Message::Data {
                id: 9,
                items: vec![Found {
                    item: Item::Blob(BlobRange {
                        digest: cairn_bundle::Address::of(b"fuzz seed layer"),
                        offset: 1 << 20,
                        length: 1 << 20,
                    }),
                    bytes: Some(b"the end of a layer".to_vec()),
                }],
                more: false,
                entries: Vec::new(),
            },
        ),
        (
            "status_digest",
            Message::StatusDigest(vec![("edge-1".parse().unwrap(), 1_800_000_000_000)]),
        ),
        (
            "status_pull",
            Message::StatusPull(vec!["edge-1".parse().unwrap()]),
        ),
        (
            "status",
            // Signature and certificate are placeholders: the decoder only
            // bounds them; verification is the receiver's `RecordKeys`.
            Message::status(vec![SignedStatus {
                record: cairn_keys::codec::encode(&StatusRecord {
                    agent_id: "agent-1".parse().unwrap(),
                    channel: "stable".into(),
                    labels: [("site".to_string(), "north".to_string())].into(),
                    sequence: 3,
                    bundle: bundle.to_string(),
                    health: "healthy".into(),
                    time: 1_700_000_000_000,
                    rollout: Default::default(),
                    listen: Some("10.0.0.1:7440".into()),
                    values_digest: None,
                }),
                cert: vec![0x30; 64],
                sig: vec![0x30; 70],
            }]),
        ),
        ("status-request", Message::StatusRequest),
        ("bye", Message::Bye("shutting down".into())),
    ];
    let mut stream = Vec::new();
    for (name, msg) in &messages {
        let f = frame(msg);
        write("wire_frame", name, &f);
        stream.extend_from_slice(&f);
    }
    write("wire_frame", "stream", &stream);

    // YAML manifests.
    let yaml: &[(&str, &str)] = &[
        (
            "configmap.yaml",
            "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: settings\n  namespace: app\ndata:\n  mode: \"fast\"\n  count: '3'\n",
        ),
        (
            "multi.yaml",
            "# two objects and an empty document\n---\napiVersion: v1\nkind: Namespace\nmetadata: {name: app}\n---\n---\napiVersion: v1\nkind: Service\nmetadata: {name: web, namespace: app, labels: {app: web}}\nspec:\n  ports: [{port: 80, targetPort: 8080}]\n  selector: {app: web}\n",
        ),
        (
            "deployment-anchors.yaml",
            "apiVersion: apps/v1\nkind: Deployment\nmetadata:\n  name: web\n  labels: &labels\n    app: web\n    tier: front\nspec:\n  replicas: 2\n  selector:\n    matchLabels: *labels\n  template:\n    metadata:\n      labels:\n        <<: *labels\n        extra: \"yes\"\n    spec:\n      containers:\n        - name: web\n          image: registry.local/web:1.2.3\n          args: [\"--port\", \"8080\"]\n          resources: {limits: {cpu: 500m, memory: 128Mi}}\n          env:\n            - {name: RATIO, value: \"0.5\"}\n",
        ),
        (
            "block-scalars.yaml",
            "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: scripts\ndata:\n  run.sh: |\n    #!/bin/sh\n    echo \"hello\"\n  folded: >-\n    one\n    two\n  quoted: \"tab\\there \\u00e9\"\n  number: !!str 12\nnumbers: [1, -2, 3.5, 0x1f, 1e3, true, null, ~]\n",
        ),
        (
            "crd.yaml",
            "apiVersion: apiextensions.k8s.io/v1\nkind: CustomResourceDefinition\nmetadata:\n  name: widgets.example.com\nspec:\n  group: example.com\n  names: {kind: Widget, plural: widgets}\n  scope: Namespaced\n  versions:\n    - name: v1\n      served: true\n      storage: true\n      schema:\n        openAPIV3Schema:\n          type: object\n          properties:\n            spec: {type: object, x-kubernetes-preserve-unknown-fields: true}\n",
        ),
    ];
    for (name, text) in yaml {
        write("yaml_objects", name, text.as_bytes());
    }
}
