use super::*;
use cairn_core::bundle::Entry;

fn obj(kind: &str, api: &str, name: &str, json: serde_json::Value) -> DesiredObject {
    let bytes = serde_json::to_vec(&json).unwrap();
    DesiredObject {
        entry: Entry {
            path: format!("{name}.yaml"),
            document: 0,
            api_version: api.into(),
            kind: kind.into(),
            namespace: "prod".into(),
            name: name.into(),
            object: cairn_core::Address::of(&bytes),
            size: bytes.len() as u64,
        },
        bytes,
    }
}

fn values() -> DesiredObject {
    obj(
        VALUES_KIND,
        API_VERSION,
        "site",
        serde_json::json!({
            "apiVersion": API_VERSION, "kind": VALUES_KIND, "metadata": {"name": "site"},
            "variables": [
                {"name": "replicas", "default": "1", "pattern": "[0-9]{1,2}", "type": "integer"},
                {"name": "label:region", "pattern": "[a-z]+-[0-9]"},
                {"name": "greeting", "default": "hello"},
            ]
        }),
    )
}

fn deploy(data: serde_json::Value) -> DesiredObject {
    obj(
        "ConfigMap",
        "v1",
        "cm",
        serde_json::json!({"apiVersion": "v1", "kind": "ConfigMap",
            "metadata": {"name": "cm", "namespace": "prod"}, "data": data}),
    )
}

fn site(region: &str, values: &[(&str, &str)]) -> Site {
    Site {
        labels: [("region".to_owned(), region.to_owned())].into(),
        values: values
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect(),
        values_source: Some("values.yaml".into()),
        identities: None,
    }
}

fn rendered(objects: &[DesiredObject], site: &Site) -> serde_json::Value {
    let r = render(objects, site, true).unwrap();
    assert_eq!(r.objects.len(), 1, "CairnValues is not applied");
    serde_json::from_slice(&r.objects[0].bytes).unwrap()
}

#[test]
fn placeholders_labels_defaults_types_and_escapes() {
    let objs = [
        values(),
        deploy(serde_json::json!({
            "a": "${greeting} from ${label:region}",
            "n": "${replicas}",
            "lit": "$${greeting} costs $5",
            "list": ["x-${replicas}"],
        })),
    ];
    let v = rendered(&objs, &site("eu-1", &[("replicas", "3")]));
    assert_eq!(v["data"]["a"], "hello from eu-1");
    assert_eq!(v["data"]["n"], 3, "a whole integer placeholder is a number");
    assert_eq!(v["data"]["lit"], "${greeting} costs $5");
    assert_eq!(v["data"]["list"][0], "x-3");
    let other = rendered(&objs, &site("us-2", &[]));
    assert_eq!(other["data"]["a"], "hello from us-2");
    assert_eq!(other["data"]["n"], 1, "the default");
}

#[test]
fn deterministic_and_digest_follows_values() {
    let objs = [values(), deploy(serde_json::json!({"a": "${replicas}"}))];
    let a = render(&objs, &site("eu-1", &[("replicas", "3")]), true).unwrap();
    let b = render(&objs, &site("eu-1", &[("replicas", "3")]), true).unwrap();
    let c = render(&objs, &site("eu-1", &[("replicas", "4")]), true).unwrap();
    assert_eq!(a.objects[0].bytes, b.objects[0].bytes);
    assert_eq!(a.objects[0].entry.object, b.objects[0].entry.object);
    assert_eq!(a.values_digest, b.values_digest);
    assert!(a.values_digest.as_deref().unwrap().starts_with("sha256:"));
    assert_ne!(a.values_digest, c.values_digest);
    assert_ne!(a.objects[0].entry.object, c.objects[0].entry.object);
    // Without placeholders, the verified bytes pass through untouched.
    let plain = deploy(serde_json::json!({"a": "b"}));
    let r = render(std::slice::from_ref(&plain), &Site::default(), true).unwrap();
    assert_eq!(r.objects[0].bytes, plain.bytes);
    assert_eq!(r.values_digest, None);
}

#[test]
fn errors_name_the_variable_and_the_object() {
    let objs = [values(), deploy(serde_json::json!({"a": "${zone}"}))];
    let e = render(&objs, &site("eu-1", &[]), true)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("ConfigMap prod/cm") && e.contains("field data.a"),
        "{e}"
    );
    assert!(e.contains("`${zone}`: undeclared variable"), "{e}");

    let objs = [values(), deploy(serde_json::json!({"a": "${replicas}"}))];
    let e = render(&objs, &site("eu-1", &[("replicas", "many")]), true)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("variable `replicas`: value `many` from valuesFile values.yaml does not match its pattern `[0-9]{1,2}`"),
        "{e}"
    );
    let e = render(&objs, &site("EU", &[]), true)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("variable `label:region`: value `EU` from the agent's labels"),
        "{e}"
    );
    let mut no_label = site("x", &[]);
    no_label.labels.clear();
    let e = render(&objs, &no_label, true).unwrap_err().to_string();
    assert!(e.contains("`label:region`: no value at this site"), "{e}");

    let unterminated = [values(), deploy(serde_json::json!({"a": "${greeting"}))];
    let e = render(&unterminated, &site("eu-1", &[]), true)
        .unwrap_err()
        .to_string();
    assert!(e.contains("unterminated"), "{e}");

    let hostile = [values(), deploy(serde_json::json!({"a": "${\u{1b}[31m}"}))];
    let e = render(&hostile, &site("eu-1", &[]), true)
        .unwrap_err()
        .to_string();
    assert!(!e.contains('\u{1b}'), "{e}");

    let renamed = obj(
        "ConfigMap",
        "v1",
        "cm",
        serde_json::json!({"apiVersion": "v1", "kind": "ConfigMap",
            "metadata": {"name": "cm-${greeting}", "namespace": "prod"}}),
    );
    let e = render(&[values(), renamed], &site("eu-1", &[]), true)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("not allowed in apiVersion, kind, metadata.name"),
        "{e}"
    );
}

#[test]
fn values_file_and_bad_declarations() {
    let v = parse_values_file("replicas: 3\nname: edge\nflag: true\n").unwrap();
    assert_eq!(v["replicas"], "3");
    assert_eq!(v["flag"], "true");
    assert!(parse_values_file("label:region: x\n")
        .unwrap_err()
        .contains("agent's labels"));
    assert!(parse_values_file("a: [1]\n")
        .unwrap_err()
        .contains("key `a`"));
    let bad = obj(
        VALUES_KIND,
        API_VERSION,
        "site",
        serde_json::json!({"apiVersion": API_VERSION, "kind": VALUES_KIND, "metadata": {"name": "site"},
            "variables": [{"name": "x", "default": "1", "pattern": "(["}]}),
    );
    let e = render(&[bad], &Site::default(), true)
        .unwrap_err()
        .to_string();
    assert!(e.contains("variables[0]: pattern"), "{e}");
}

#[test]
fn age_secret_without_key_is_a_per_object_error() {
    let (text, public) = cairn_secret::Identities::generate();
    let ids = cairn_secret::Identities::parse(&text, "site.key").unwrap();
    let recipients = cairn_secret::parse_recipients(&[public]).unwrap();
    let plain = b"apiVersion: v1\nkind: Secret\nmetadata:\n  name: db\n  namespace: prod\nstringData:\n  password: hunter2\n";
    let doc =
        cairn_secret::encrypt(plain, "s.yaml", &recipients, &cairn_secret::yaml_values).unwrap();
    let v: serde_json::Value = serde_norway::from_str(&doc).unwrap();
    let secret = obj(cairn_secret::KIND, API_VERSION, "db", v);
    let objs = [secret, deploy(serde_json::json!({"a": "b"}))];

    let with_key = Site {
        identities: Some(ids),
        ..Site::default()
    };
    let r = render(&objs, &with_key, true).unwrap();
    assert!(r.object_errors.is_empty(), "{:?}", r.object_errors);
    assert_eq!(r.objects[0].entry.kind, "Secret");
    assert_eq!(r.objects[0].entry.api_version, "v1");
    let s: serde_json::Value = serde_json::from_slice(&r.objects[0].bytes).unwrap();
    assert_eq!(s["stringData"]["password"], "hunter2");

    let r = render(&objs, &Site::default(), true).unwrap();
    assert_eq!(r.objects.len(), 1, "the rest applies");
    assert_eq!(r.objects[0].entry.kind, "ConfigMap");
    assert!(
        r.object_errors[0].contains("AgeSecret prod/db")
            && r.object_errors[0].contains("no ageIdentityFile"),
        "{:?}",
        r.object_errors
    );
    let (other, _) = cairn_secret::Identities::generate();
    let wrong = Site {
        identities: Some(cairn_secret::Identities::parse(&other, "other.key").unwrap()),
        ..Site::default()
    };
    let r = render(&objs, &wrong, true).unwrap();
    assert!(
        r.object_errors[0].contains("no identity in other.key can decrypt it"),
        "{:?}",
        r.object_errors
    );
}
