use super::*;

/// A distinct digest per short label.
fn h(label: &str) -> Digest {
    Digest::of(label.as_bytes())
}

fn d<'a>(name: &'a str, addr: &str) -> DesiredFile<'a> {
    sized(name, addr, 10)
}

fn sized<'a>(name: &'a str, addr: &str, size: u64) -> DesiredFile<'a> {
    DesiredFile {
        name,
        address: h(addr),
        size,
    }
}

fn want<'a>(files: &[DesiredFile<'a>]) -> DesiredFiles<'a> {
    DesiredFiles::new(files.to_vec())
}

fn obs(desired: &DesiredFiles<'_>, pairs: &[(&str, Observed)]) -> Observations {
    let mut o = Observations {
        desired: vec![Observed::Missing; desired.files().len()],
        other: BTreeMap::new(),
    };
    for (n, x) in pairs {
        match desired.index_of(n) {
            Some(i) => o.desired[i] = x.clone(),
            None => {
                o.other.insert(n.to_string(), x.clone());
            }
        }
    }
    o
}

fn inv(pairs: &[(&str, &str)]) -> Inventory {
    pairs.iter().map(|(n, a)| (n.to_string(), h(a))).collect()
}

fn owns(pairs: &[(&str, &str)]) -> Ownership {
    Ownership {
        files: inv(pairs),
        pending: Pending::new(),
    }
}

fn c(a: &str) -> Observed {
    cs(a, 10)
}

fn cs(a: &str, size: u64) -> Observed {
    Observed::Content {
        address: h(a),
        size,
    }
}

fn write(
    desired: &DesiredFiles<'_>,
    name: &str,
    reason: WriteReason,
    previous: Option<&str>,
) -> Action {
    Action::Write {
        index: desired.index_of(name).unwrap(),
        reason,
        previous: previous.map(h),
    }
}

fn delete(name: &str, previous: Option<&str>) -> Action {
    Action::Delete {
        name: name.into(),
        previous: previous.map(h),
    }
}

#[test]
fn fresh_directory_creates_everything_and_announces_it() {
    let w = want(&[d("a", "1"), d("b", "2")]);
    let p = plan(&w, Ownership::default(), &obs(&w, &[]));
    assert_eq!(
        p.actions,
        vec![
            write(&w, "a", WriteReason::Create, None),
            write(&w, "b", WriteReason::Create, None)
        ]
    );
    assert_eq!(p.after(&w).to_map(), inv(&[("a", "1"), ("b", "2")]));
    assert_eq!(
        p.pending(&w).to_map(),
        [
            ("a".to_string(), Some(h("1"))),
            ("b".to_string(), Some(h("2")))
        ]
        .into()
    );
    assert!(p.before.is_empty());
}

#[test]
fn in_sync_is_noop() {
    let w = want(&[d("a", "1")]);
    let p = plan(&w, owns(&[("a", "1")]), &obs(&w, &[("a", c("1"))]));
    assert!(p.is_noop());
    assert!(p.pending(&w).to_map().is_empty());
    assert!(p.after(&w).same_as(&p.before));
    assert_eq!(p.unchanged, 1);
}

#[test]
fn update_prune_and_drift_deletes_first() {
    let w = want(&[d("a", "1"), d("b", "3"), d("e", "5")]);
    let p = plan(
        &w,
        owns(&[
            ("a", "1"),
            ("b", "2"),
            ("c", "4"),
            ("gone", "9"),
            ("e", "5"),
        ]),
        &obs(
            &w,
            &[
                ("a", c("x")),
                ("b", c("2")),
                ("c", c("4")),
                ("e", Observed::Missing),
            ],
        ),
    );
    assert_eq!(
        p.actions,
        vec![
            delete("c", Some("4")),
            write(&w, "a", WriteReason::Drift, Some("x")),
            write(&w, "b", WriteReason::Update, Some("2")),
            write(&w, "e", WriteReason::Drift, None),
        ]
    );
    let pending = p.pending(&w).to_map();
    assert_eq!(pending.get("c"), Some(&None), "deletes are announced");
    assert_eq!(pending.get("b"), Some(&Some(h("3"))));
    assert_eq!(pending.len(), 4, "{pending:?}");
    assert_eq!(
        p.after(&w).to_map(),
        inv(&[("a", "1"), ("b", "3"), ("e", "5")])
    );
    assert!(!p.after(&w).same_as(&p.before));
}

#[test]
fn writes_are_ordered_to_keep_the_peak_low() {
    // Shrinking updates free space before growing ones and creates.
    let w = want(&[
        sized("grow", "g2", 500),
        sized("new", "n", 100),
        sized("shrink", "s2", 10),
    ]);
    let p = plan(
        &w,
        owns(&[("grow", "g1"), ("shrink", "s1"), ("old", "o")]),
        &obs(
            &w,
            &[
                ("grow", cs("g1", 400)),
                ("shrink", cs("s1", 900)),
                ("old", cs("o", 1000)),
            ],
        ),
    );
    let names: Vec<&str> = p.actions.iter().map(|a| action_name(a, &w)).collect();
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
        .map(|(n, a)| (n.to_string(), a.map(h)))
        .collect(),
    };
    let seen = [("a", c("2")), ("b", c("2")), ("d", c("5"))];
    // The same release again: finish it.
    let w = want(&[d("a", "2"), d("b", "3"), d("c", "4"), d("d", "5")]);
    let p = plan(&w, owned.clone(), &obs(&w, &seen));
    assert_eq!(
        p.actions,
        vec![
            write(&w, "b", WriteReason::Update, Some("2")),
            write(&w, "c", WriteReason::Create, None),
        ]
    );
    assert_eq!(p.unchanged, 2);
    assert!(
        p.before.contains_key("d"),
        "a completed pending create is owned"
    );
    // A newer release that drops d and wants x back (x had the same
    // content before): d is pruned, x is recreated, nothing is drift.
    let w = want(&[d("a", "2"), d("x", "9")]);
    let p = plan(&w, owned.clone(), &obs(&w, &seen));
    assert!(p.actions.contains(&delete("d", Some("5"))));
    assert!(p
        .actions
        .contains(&write(&w, "x", WriteReason::Create, None)));
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
        pending: [("c".to_string(), Some(h("4")))].into(),
    };
    // Someone else's file took the name: a conflict, and never pruned.
    let w = want(&[d("c", "4")]);
    let p = plan(&w, owned.clone(), &obs(&w, &[("c", c("theirs"))]));
    assert_eq!(p.actions, vec![Action::Conflict { index: 0 }]);
    let w = want(&[]);
    let p = plan(&w, owned.clone(), &obs(&w, &[("c", c("theirs"))]));
    assert!(p.is_noop());
}

#[test]
fn foreign_files_are_never_touched() {
    let w = want(&[d("a", "1"), d("same", "2")]);
    let p = plan(
        &w,
        Ownership::default(),
        &obs(
            &w,
            &[("a", c("other")), ("same", c("2")), ("foreign", c("f"))],
        ),
    );
    assert_eq!(p.actions, vec![Action::Conflict { index: 0 }]);
    assert_eq!(action_name(&p.actions[0], &w), "a");
    let after = p.after(&w).to_map();
    assert!(!after.contains_key("a"));
    assert!(
        after.contains_key("same"),
        "identical foreign file is adopted"
    );
    assert!(!p.pending(&w).to_map().contains_key("foreign"));
}

#[test]
fn changed_file_type_is_rewritten_only_if_owned() {
    let w = want(&[d("a", "1")]);
    let p = plan(&w, owns(&[("a", "1")]), &obs(&w, &[("a", Observed::Other)]));
    assert!(matches!(
        p.actions[0],
        Action::Write {
            reason: WriteReason::Drift,
            previous: None,
            ..
        }
    ));
}

/// Of desired files sharing a name, the last counts (as a map keyed by
/// name kept it before): one write, of its address.
#[test]
fn a_shared_name_is_planned_once_with_the_last_file() {
    let w = want(&[d("a", "1"), d("b", "2"), d("a", "3")]);
    let p = plan(&w, Ownership::default(), &obs(&w, &[]));
    assert_eq!(
        p.actions,
        vec![
            write(&w, "a", WriteReason::Create, None),
            write(&w, "b", WriteReason::Create, None),
        ]
    );
    assert_eq!(w.index_of("a"), Some(2));
    assert_eq!(p.after(&w).to_map(), inv(&[("a", "3"), ("b", "2")]));
}

/// The views serialize as the maps they stand for would, in name order,
/// writes and deletes merged.
#[test]
fn views_serialize_as_the_maps() {
    let w = want(&[d("b", "1"), d("d", "2"), d("a", "0")]);
    let p = plan(
        &w,
        owns(&[("c", "9"), ("e", "8")]),
        &obs(&w, &[("c", c("9")), ("e", c("8"))]),
    );
    let pending = p.pending(&w);
    assert_eq!(
        serde_json::to_string(&pending).unwrap(),
        serde_json::to_string(&pending.to_map()).unwrap()
    );
    let names: Vec<&str> = pending.iter().map(|(n, _)| n).collect();
    assert_eq!(names, ["a", "b", "c", "d", "e"]);
    let after = p.after(&w);
    assert_eq!(
        serde_json::to_string(&after).unwrap(),
        serde_json::to_string(&after.to_map()).unwrap()
    );
    assert!(after.same_as(&after.to_map()));
}

#[test]
fn digests_read_and_write_as_addresses() {
    let a = cairn_core::Address::of(b"x");
    let dg = Digest::of_address(&a);
    assert_eq!(dg.to_string(), a.to_string());
    assert_eq!(dg.to_address(), a);
    assert_eq!(Digest::of(b"x"), dg);
    assert_eq!(Digest::parse(&a), Some(dg));
    assert_eq!(serde_json::to_string(&dg).unwrap(), format!("\"{a}\""));
    for bad in [
        "",
        "sha256:",
        "sha256:zz",
        &format!("sha256:{}", "A".repeat(64)),
        &format!("sha256:{}", "a".repeat(63)),
        &format!("sha256:{}", "a".repeat(65)),
        &format!("sha512:{}", "a".repeat(64)),
        &format!("sha256:{}é", "a".repeat(62)),
    ] {
        assert_eq!(Digest::parse(bad), None, "{bad}");
        let e = serde_json::from_str::<Digest>(&serde_json::to_string(bad).unwrap()).unwrap_err();
        assert!(e.to_string().contains("is not an object address"), "{e}");
    }
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
