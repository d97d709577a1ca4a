use super::*;

fn d(name: &str, addr: &str) -> DesiredFile {
    DesiredFile {
        name: name.into(),
        address: addr.into(),
        size: 10,
    }
}

fn sized(name: &str, addr: &str, size: u64) -> DesiredFile {
    DesiredFile {
        name: name.into(),
        address: addr.into(),
        size,
    }
}

fn obs<'a>(pairs: &[(&'a str, Observed)]) -> BTreeMap<&'a str, Observed> {
    pairs.iter().map(|(n, o)| (*n, o.clone())).collect()
}

fn inv(pairs: &[(&str, &str)]) -> Inventory {
    pairs
        .iter()
        .map(|(n, a)| (n.to_string(), a.to_string()))
        .collect()
}

fn owns(pairs: &[(&str, &str)]) -> Ownership {
    Ownership {
        files: inv(pairs),
        pending: Pending::new(),
    }
}

fn c(a: &str) -> Observed {
    Observed::Content {
        address: a.into(),
        size: 10,
    }
}

fn cs(a: &str, size: u64) -> Observed {
    Observed::Content {
        address: a.into(),
        size,
    }
}

fn write(name: &str, addr: &str, reason: WriteReason, previous: Option<&str>) -> Action {
    Action::Write {
        name: name.into(),
        address: addr.into(),
        reason,
        previous: previous.map(str::to_owned),
    }
}

#[test]
fn fresh_directory_creates_everything_and_announces_it() {
    let p = plan(
        &[d("a", "1"), d("b", "2")],
        Ownership::default(),
        &BTreeMap::new(),
    );
    assert_eq!(
        p.actions,
        vec![
            write("a", "1", WriteReason::Create, None),
            write("b", "2", WriteReason::Create, None)
        ]
    );
    assert_eq!(p.after, inv(&[("a", "1"), ("b", "2")]));
    assert_eq!(p.pending.len(), 2);
    assert!(p.before.is_empty());
}

#[test]
fn in_sync_is_noop() {
    let p = plan(&[d("a", "1")], owns(&[("a", "1")]), &obs(&[("a", c("1"))]));
    assert!(p.is_noop());
    assert!(p.pending.is_empty());
    assert_eq!(p.unchanged, 1);
}

#[test]
fn update_prune_and_drift_deletes_first() {
    let p = plan(
        &[d("a", "1"), d("b", "3"), d("e", "5")],
        owns(&[
            ("a", "1"),
            ("b", "2"),
            ("c", "4"),
            ("gone", "9"),
            ("e", "5"),
        ]),
        &obs(&[
            ("a", c("x")),
            ("b", c("2")),
            ("c", c("4")),
            ("e", Observed::Missing),
        ]),
    );
    assert_eq!(
        p.actions,
        vec![
            Action::Delete {
                name: "c".into(),
                previous: Some("4".into())
            },
            write("a", "1", WriteReason::Drift, Some("x")),
            write("b", "3", WriteReason::Update, Some("2")),
            write("e", "5", WriteReason::Drift, None),
        ]
    );
    assert_eq!(p.pending.get("c"), Some(&None), "deletes are announced");
    assert_eq!(p.after, inv(&[("a", "1"), ("b", "3"), ("e", "5")]));
}

#[test]
fn writes_are_ordered_to_keep_the_peak_low() {
    // Shrinking updates free space before growing ones and creates.
    let p = plan(
        &[
            sized("grow", "g2", 500),
            sized("new", "n", 100),
            sized("shrink", "s2", 10),
        ],
        owns(&[("grow", "g1"), ("shrink", "s1"), ("old", "o")]),
        &obs(&[
            ("grow", cs("g1", 400)),
            ("shrink", cs("s1", 900)),
            ("old", cs("o", 1000)),
        ]),
    );
    let names: Vec<&str> = p.actions.iter().map(action_name).collect();
    assert_eq!(names, ["old", "shrink", "grow", "new"]);
}

#[test]
fn an_interrupted_switch_is_unfinished_work_not_drift() {
    // The crashed reconcile announced a→2 (done), b→3 (not done), c
    // created (not done), d created (done) and x deleted (done).
    let owned = Ownership {
        files: inv(&[("a", "1"), ("b", "2"), ("x", "9")]),
        pending: [
            ("a", Some("2")),
            ("b", Some("3")),
            ("c", Some("4")),
            ("d", Some("5")),
            ("x", None),
        ]
        .into_iter()
        .map(|(n, a)| (n.to_string(), a.map(str::to_owned)))
        .collect(),
    };
    let observed = obs(&[("a", c("2")), ("b", c("2")), ("d", c("5"))]);
    // The same release again: finish it.
    let p = plan(
        &[d("a", "2"), d("b", "3"), d("c", "4"), d("d", "5")],
        owned.clone(),
        &observed,
    );
    assert_eq!(
        p.actions,
        vec![
            write("b", "3", WriteReason::Update, Some("2")),
            write("c", "4", WriteReason::Create, None),
        ]
    );
    assert_eq!(p.unchanged, 2);
    assert!(
        p.before.contains_key("d"),
        "a completed pending create is owned"
    );
    // A newer release that drops d and wants x back (x had the same
    // content before): d is pruned, x is recreated, nothing is drift.
    let p = plan(&[d("a", "2"), d("x", "9")], owned.clone(), &observed);
    assert!(p.actions.contains(&Action::Delete {
        name: "d".into(),
        previous: Some("5".into())
    }));
    assert!(p
        .actions
        .contains(&write("x", "9", WriteReason::Create, None)));
    assert!(!p.actions.iter().any(|a| matches!(
        a,
        Action::Write {
            reason: WriteReason::Drift,
            ..
        }
    )));
}

#[test]
fn a_pending_name_with_foreign_content_is_not_owned() {
    let owned = Ownership {
        files: Inventory::new(),
        pending: [("c".to_string(), Some("4".to_string()))].into(),
    };
    // Someone else's file took the name: a conflict, and never pruned.
    let p = plan(&[d("c", "4")], owned.clone(), &obs(&[("c", c("theirs"))]));
    assert_eq!(p.actions, vec![Action::Conflict { name: "c".into() }]);
    let p = plan(&[], owned.clone(), &obs(&[("c", c("theirs"))]));
    assert!(p.is_noop());
}

#[test]
fn foreign_files_are_never_touched() {
    let p = plan(
        &[d("a", "1"), d("same", "2")],
        Ownership::default(),
        &obs(&[("a", c("other")), ("same", c("2")), ("foreign", c("f"))]),
    );
    assert_eq!(p.actions, vec![Action::Conflict { name: "a".into() }]);
    assert!(!p.after.contains_key("a"));
    assert!(
        p.after.contains_key("same"),
        "identical foreign file is adopted"
    );
    assert!(!p.pending.contains_key("foreign"));
}

#[test]
fn changed_file_type_is_rewritten_only_if_owned() {
    let p = plan(
        &[d("a", "1")],
        owns(&[("a", "1")]),
        &obs(&[("a", Observed::Other)]),
    );
    assert!(matches!(
        p.actions[0],
        Action::Write {
            reason: WriteReason::Drift,
            previous: None,
            ..
        }
    ));
}

#[test]
fn entry_names_stay_inside_the_directory() {
    for bad in [
        "",
        ".",
        "..",
        "../x.yaml",
        "a/b.yaml",
        "/etc/x.yaml",
        ".cairn-owner.json",
        ".hidden.yaml",
        "x.yml",
        "a\\b.yaml",
        "a\0.yaml",
    ] {
        assert!(!is_entry_name(bad), "{bad:?}");
    }
    assert!(is_entry_name("web__ConfigMap__a.yaml"));
    assert!(is_entry_name(&format!("{}.yaml", "a".repeat(250))));
    assert!(!is_entry_name(&format!("{}.yaml", "a".repeat(251))));
}

fn entry(group_version: &str, kind: &str, ns: &str, name: &str) -> Entry {
    Entry {
        path: "x".into(),
        document: 0,
        api_version: group_version.into(),
        kind: kind.into(),
        namespace: ns.into(),
        name: name.into(),
        object: cairn_core::Address::of(b""),
        size: 0,
    }
}

#[test]
fn file_names_are_stable_safe_and_unique() {
    let es = [
        entry("v1", "ConfigMap", "web", "conf"),
        entry("v1", "Namespace", "", "web"),
        entry("networking.k8s.io/v1", "Ingress", "web", "x"),
        entry("extensions/v1beta1", "Ingress", "web", "x"),
        entry("v1", "Secret", "../..", "a/b"),
    ];
    let n = file_names(&es);
    assert_eq!(n[0], "web__ConfigMap__conf.yaml");
    assert_eq!(n[1], "_cluster__Namespace__web.yaml");
    assert_eq!(n[2], "web__Ingress.networking.k8s.io__x.yaml");
    assert_eq!(n[3], "web__Ingress.extensions__x.yaml");
    assert_eq!(n[4], "_._..__Secret__a_b.yaml");
    assert!(n.iter().all(|x| !x.contains('/') && !x.starts_with('.')));
    assert!(n.iter().all(|x| is_entry_name(x)), "{n:?}");
}
