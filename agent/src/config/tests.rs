use super::*;

const GOOD: &str = r#"
agentId: edge-berlin-1
dataDir: /var/lib/cairn
channel: stable
labels: {region: eu, tier: edge}
sources:
  - https://bundles.example.com/fleet
  - /mnt/usb/cairn
pollInterval: 30s
reconcileInterval: 1m
target:
  manifestsDir: /var/lib/rancher/k3s/server/manifests/cairn
listen:
  http: 127.0.0.1:9440
"#;

fn lines(text: &str) -> Vec<String> {
    Config::parse(text, "config f.yaml").unwrap_err().lines
}

#[test]
fn parses_the_documented_example() {
    let c = Config::parse(GOOD, "config f.yaml").unwrap();
    assert_eq!(c.channel, "stable");
    assert_eq!(c.sources.len(), 2);
    assert_eq!(c.reconcile_interval, Duration::from_secs(60));
    assert_eq!(c.labels["region"], "eu");
    assert!(matches!(c.target, TargetConfig::ManifestsDir(_)));
    assert_eq!(c.listen_http, Some("127.0.0.1:9440".parse().unwrap()));
}

#[test]
fn unknown_field_is_named() {
    let l = lines(&format!("{GOOD}\npollIntervall: 5s\n"));
    assert_eq!(l.len(), 1);
    assert!(l[0].starts_with("config f.yaml: "), "{l:?}");
    assert!(l[0].contains("pollIntervall"), "{l:?}");
    let l = lines("channel: a\ntarget: {manifestDir: /x}\n");
    assert!(l[0].contains("manifestDir"), "{l:?}");
}

#[test]
fn each_bad_value_is_one_line_naming_the_field() {
    let l = lines(
        "channel: Stable!\npollInterval: 30y\nreconcileInterval: 0s\nsources: [ftp://x]\n\
             target: {manifestsDir: /x}\nlisten: {http: localhost}\nlogFormat: xml\nagentId: -x\n",
    );
    let want = [
        "agentId:",
        "channel:",
        "sources[0]:",
        "pollInterval: `30y`: unknown unit",
        "reconcileInterval:",
        "listen.http:",
        "logFormat:",
    ];
    assert_eq!(l.len(), want.len(), "{l:#?}");
    for w in want {
        assert!(l.iter().any(|x| x.contains(w)), "missing {w}: {l:#?}");
    }
}

#[test]
fn missing_required_fields() {
    let l = lines("sources: []\n");
    assert!(l.iter().any(|x| x.contains("channel: required")), "{l:?}");
    assert!(l.iter().any(|x| x.contains("target: required")), "{l:?}");
}

#[test]
fn wrong_type_is_reported() {
    let l = lines("channel: stable\npollInterval: [1]\ntarget: {manifestsDir: /x}\n");
    assert!(l[0].contains("pollInterval"), "{l:?}");
}

#[test]
fn env_overrides_file() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("a.yaml");
    std::fs::write(&p, GOOD).unwrap();
    let env = |k: &str| match k {
        "CAIRN_CHANNEL" => Some("beta".to_owned()),
        "CAIRN_SOURCES" => Some("/a, https://b.example/x".to_owned()),
        "CAIRN_POLL_INTERVAL" => Some("5s".to_owned()),
        "CAIRN_LABELS" => Some("a=b,c=d".to_owned()),
        _ => None,
    };
    let c = Config::load_with_env(Some(&p), &env).unwrap();
    assert_eq!(c.channel, "beta");
    assert_eq!(
        c.sources,
        vec!["/a".to_owned(), "https://b.example/x".to_owned()]
    );
    assert_eq!(c.poll_interval, Duration::from_secs(5));
    assert_eq!(c.labels.len(), 2);
    let bad = |k: &str| (k == "CAIRN_POLL_INTERVAL").then(|| "soon".to_owned());
    let e = Config::load_with_env(Some(&p), &bad).unwrap_err();
    assert!(e.lines[0].contains("pollInterval"), "{e}");
}

#[test]
fn the_development_root_needs_the_insecure_key() {
    let base = "channel: stable\ntarget: {manifestsDir: /x}\n";
    let c = Config::parse(base, "x").unwrap();
    assert!(!c.insecure_allow_development_root);
    let e = c.check_trust_root("development").unwrap_err().to_string();
    assert!(e.contains("DEVELOPMENT trust root"), "{e}");
    assert!(e.contains("CAIRN_TRUST_ROOT="), "{e}");
    assert!(e.contains("insecureAllowDevelopmentRoot: true"), "{e}");
    c.check_trust_root("/etc/cairn/root.v1").unwrap();
    let c = Config::parse(&format!("{base}insecureAllowDevelopmentRoot: true\n"), "x").unwrap();
    c.check_trust_root("development").unwrap();

    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("a.yaml");
    std::fs::write(&p, base).unwrap();
    let env = |k: &str| (k == "CAIRN_INSECURE_ALLOW_DEVELOPMENT_ROOT").then(|| "true".to_owned());
    let c = Config::load_with_env(Some(&p), &env).unwrap();
    assert!(c.insecure_allow_development_root);
    let env = |k: &str| (k == "CAIRN_INSECURE_ALLOW_DEVELOPMENT_ROOT").then(|| "yes".to_owned());
    let e = Config::load_with_env(Some(&p), &env).unwrap_err();
    assert!(
        e.lines[0]
            .contains("insecureAllowDevelopmentRoot: CAIRN_INSECURE_ALLOW_DEVELOPMENT_ROOT=`yes`"),
        "{e}"
    );
}

#[test]
fn sources_may_allow_redirects_to_named_hosts() {
    let c = Config::parse(
        "channel: stable\ntarget: {manifestsDir: /x}\nsources:\n  - /usb\n  \
             - url: https://a.example/fleet\n    allowRedirectsTo: [cdn.example, 10.0.0.2]\n",
        "x",
    )
    .unwrap();
    assert_eq!(c.sources, ["/usb", "https://a.example/fleet"]);
    assert_eq!(
        c.redirect_hosts["https://a.example/fleet"],
        ["cdn.example", "10.0.0.2"]
    );
    let l = lines(
        "channel: stable\ntarget: {manifestsDir: /x}\nsources:\n  \
             - {url: /usb, allowRedirectsTo: [a]}\n  - {url: http://a, allowRedirectTo: [b]}\n  \
             - {url: http://a, allowRedirectsTo: ['http://b/x']}\n  - [1]\n",
    );
    let want = [
        "sources[0].allowRedirectsTo: only for http",
        "sources[1]: unknown field `allowRedirectTo`",
        "sources[2].allowRedirectsTo[0]: `http://b/x`",
        "sources[3]: expected a URL",
    ];
    assert_eq!(l.len(), want.len(), "{l:#?}");
    for w in want {
        assert!(l.iter().any(|x| x.contains(w)), "missing {w}: {l:#?}");
    }
}

#[test]
fn sources_take_oci_urls_cas_client_certificates_and_credentials() {
    let c = Config::parse(
        "channel: stable\ntarget: {manifestsDir: /x}\nsources:\n  \
         - {url: 'oci://r.example:5000/fleet/edge', caFile: /ca.pem, credentialsFile: /c.json}\n  \
         - {url: 'https://a.example/f', clientCertFile: /c.pem, clientKeyFile: /c.key}\n  \
         - oci://r.example/plain\n",
        "x",
    )
    .unwrap();
    assert_eq!(c.sources.len(), 3);
    let oci = &c.source_tls["oci://r.example:5000/fleet/edge"];
    assert_eq!(oci.ca_file.as_deref(), Some(Path::new("/ca.pem")));
    assert_eq!(oci.credentials_file.as_deref(), Some(Path::new("/c.json")));
    let https = &c.source_tls["https://a.example/f"];
    assert_eq!(https.client_key_file.as_deref(), Some(Path::new("/c.key")));
    assert!(!c.source_tls.contains_key("oci://r.example/plain"));
    let l = lines(
        "channel: stable\ntarget: {manifestsDir: /x}\nsources:\n  \
         - {url: /usb, caFile: /ca.pem}\n  - {url: 'https://a/x', clientCertFile: /c.pem}\n  \
         - 'oci://r.example/Fleet'\n  - 'oci://r.example'\n  - 'ftp://x/y'\n",
    );
    let want = [
        "sources[0]: caFile, clientCertFile, clientKeyFile and credentialsFile are only for",
        "sources[1]: clientCertFile and clientKeyFile go together",
        "sources[2]: `oci://r.example/Fleet`: bad repository name component `Fleet`",
        "sources[3]: `oci://r.example`: expected oci://HOST[:PORT]/NAME",
        "sources[4]: `ftp://x/y`: unsupported scheme (use http://, https://, oci://",
    ];
    assert_eq!(l.len(), want.len(), "{l:#?}");
    for w in want {
        assert!(l.iter().any(|x| x.contains(w)), "missing {w}: {l:#?}");
    }
}

#[test]
fn kubernetes_target_parses() {
    let c = Config::parse(
        "channel: stable\ntarget:\n  kubernetes: {namespace: cairn-system}\n",
        "x",
    )
    .unwrap();
    assert_eq!(
        c.target,
        TargetConfig::Kubernetes(KubernetesTarget {
            kubeconfig: None,
            namespace: "cairn-system".into(),
            health_timeout: Duration::from_secs(300),
            force: true,
        })
    );
}

#[test]
fn the_mesh_status_sample_defaults_to_the_mesh_constant_and_is_bounded_by_the_table() {
    let mesh = "mesh:\n  cert: /c/agent.crt\n  key: /c/agent.key\n  ca: /c/ca.crt\n";
    let c = Config::parse(&format!("{GOOD}{mesh}"), "config f.yaml").unwrap();
    assert_eq!(
        c.mesh.unwrap().status_sample,
        crate::mesh::DEFAULT_STATUS_SAMPLE
    );
    // docs/OPERATIONS.md and docs/MESH.md give this default.
    assert_eq!(crate::mesh::DEFAULT_STATUS_SAMPLE, 48);
    let c = Config::parse(
        &format!("{GOOD}{mesh}  statusSample: 4096\n"),
        "config f.yaml",
    )
    .unwrap();
    assert_eq!(c.mesh.unwrap().status_sample, 4096);
    for bad in ["0", "4097"] {
        let l = lines(&format!("{GOOD}{mesh}  statusSample: {bad}\n"));
        assert_eq!(l.len(), 1, "{l:?}");
        assert!(
            l[0].contains("mesh.statusSample") && l[0].contains(bad),
            "{l:?}"
        );
    }
}
