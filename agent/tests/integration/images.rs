//! Air-gapped images (docs/IMAGES.md), through real tools: a small image
//! made with Debian's `umoci` is pushed with `skopeo` to Debian's
//! `docker-registry` on loopback (TLS from a test CA, htpasswd);
//! `cairn bundle build --images` reads it from there, `cairn release`
//! puts its blobs into the repository, an agent whose source is that
//! repository fetches and verifies them, and `skopeo copy` pulls the
//! image from the agent's registry by digest and by tag. A tampered layer
//! in the repository is refused and not served; a tag the registry does
//! not have fails the build naming the object. Over the mesh: three
//! agents where only the first has a source all serve the image, a second
//! release moves only its new layer, and a layer tampered on a peer's
//! disk is refused by the agent fetching it.

use crate::support::*;
use cairn_test_support::fixture::commit_files;
use cairn_test_support::registry::Registry;
use cairn_test_support::wait_until;
use std::time::Duration;

/// Waits up to `secs` for `cond`; on time-out the agent's log tail is in
/// the panic message.
fn wait_logged(w: &World, secs: u64, what: &str, cond: impl FnMut() -> bool) {
    wait_until(
        Duration::from_secs(secs),
        Duration::from_millis(200),
        what,
        cond,
        || tail(&w.log("agent.log"), 30),
    );
}
use std::path::{Path, PathBuf};
use std::process::Command;

/// An OCI layout with one image `tag` whose one layer holds `files`.
fn make_image(dir: &Path, tag: &str, files: &[(&str, &str)]) -> PathBuf {
    let layout = dir.join("layout");
    if !layout.exists() {
        ok(Command::new("umoci")
            .args(["init", "--layout"])
            .arg(&layout));
    }
    let image = format!("{}:{tag}", layout.display());
    ok(Command::new("umoci").args(["new", "--image", &image]));
    let bundle = dir.join(format!("unpacked-{tag}"));
    ok(Command::new("umoci")
        .args(["unpack", "--rootless", "--image", &image])
        .arg(&bundle));
    for (p, text) in files {
        let f = bundle.join("rootfs").join(p);
        std::fs::create_dir_all(f.parent().unwrap()).unwrap();
        std::fs::write(f, text).unwrap();
    }
    ok(Command::new("umoci")
        .args(["repack", "--image", &image])
        .arg(&bundle));
    layout
}

fn skopeo_push(w: &World, reg: &Registry, layout: &Path, tag: &str, dest: &str) {
    let (u, p) = reg.credentials();
    ok(Command::new("skopeo")
        .args(["copy", "--dest-cert-dir"])
        .arg(reg.cert_dir())
        .args(["--dest-creds", &format!("{u}:{p}")])
        .arg(format!("oci:{}:{tag}", layout.display()))
        .arg(format!("docker://{}/{dest}", reg.host()))
        .env("HOME", w.tmp.path()));
}

/// `skopeo copy` from the agent's plain-HTTP registry into an OCI layout;
/// returns the manifest digest skopeo wrote, or its error.
fn skopeo_pull(w: &World, from: &str, dest: &Path) -> Result<String, String> {
    let out = Command::new("skopeo")
        .args(["copy", "--src-tls-verify=false"])
        .arg(format!("docker://{from}"))
        .arg(format!("oci:{}:pulled", dest.display()))
        .env("HOME", w.tmp.path())
        .output()
        .unwrap();
    if !out.status.success() {
        return Err(String::from_utf8_lossy(&out.stderr).into_owned());
    }
    let index: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dest.join("index.json")).unwrap()).unwrap();
    Ok(index["manifests"][0]["digest"].as_str().unwrap().to_owned())
}

/// Starts an agent whose source is the world's repository, with its image
/// registry on a free loopback port; returns it and the registry's
/// address (from its start-up log line).
fn spawn_with_registry(w: &World) -> (AgentProcess, String) {
    spawn_with_registry_from(w, &w.repo)
}

/// [`spawn_with_registry`] with `source` as the agent's only source.
fn spawn_with_registry_from(w: &World, source: &Path) -> (AgentProcess, String) {
    let mut c = w.agent_config(&[source.display().to_string()]);
    c.http = "127.0.0.1:0\n  registry: 127.0.0.1:0".into();
    let cfg = c.write(&w.path("agent.yaml"));
    let agent = w.spawn(&cfg, "agent.log");
    let mut addr = String::new();
    wait_logged(w, 30, "the image registry listens", || {
        let log = w.log("agent.log");
        let line = log
            .lines()
            .find(|l| l.contains("serving the image registry"));
        if let Some(v) = line.and_then(|l| serde_json::from_str::<serde_json::Value>(l).ok()) {
            addr = v["address"].as_str().unwrap_or_default().to_owned();
        }
        !addr.is_empty()
    });
    (agent, addr)
}

fn deployment(image: &str) -> String {
    format!(
        "apiVersion: apps/v1\nkind: Deployment\nmetadata:\n  name: web\n  namespace: apps\n\
         spec:\n  selector:\n    matchLabels: {{app: web}}\n  template:\n    metadata:\n      \
         labels: {{app: web}}\n    spec:\n      initContainers:\n      - name: init\n        \
         image: {image}\n      containers:\n      - name: web\n        image: {image}\n"
    )
}

struct Setup {
    w: World,
    reg: Registry,
    layout: PathBuf,
    image: String,
}

impl Setup {
    fn new() -> Self {
        let w = World::new(1, 1, 1);
        let reg = Registry::start().unwrap();
        let (u, p) = reg.credentials();
        std::fs::write(
            w.path("creds.json"),
            serde_json::json!({"username": u, "password": p}).to_string(),
        )
        .unwrap();
        let layout = make_image(&w.path("img"), "v1", &[("etc/hello.txt", "hello\n")]);
        skopeo_push(&w, &reg, &layout, "v1", "team/web:v1");
        // The fixture's own Deployment names registry.local/edge/app-0000:1.0.0:
        // the build registry is a mirror, looked up by repository path.
        skopeo_push(&w, &reg, &layout, "v1", "edge/app-0000:1.0.0");
        let image = format!("{}/team/web:v1", reg.host());
        commit_files(
            &w.git,
            &[("apps/web.yaml", &deployment(&image))],
            "web",
            "2024-01-02T00:00:00Z",
        )
        .unwrap();
        Setup {
            w,
            reg,
            layout,
            image,
        }
    }

    fn build(&self, out: &str, extra: &[&str]) -> std::process::Output {
        build_with(&self.w, &self.reg, out, extra)
    }
}

/// `cairn bundle build --images oci://<reg>` of the world's Git HEAD.
fn build_with(w: &World, reg: &Registry, out: &str, extra: &[&str]) -> std::process::Output {
    Command::new(cairn_bin())
        .args(["bundle", "build", "--git"])
        .arg(&w.git)
        .arg("--out")
        .arg(w.path(out))
        .args(["--images", &format!("oci://{}", reg.host())])
        .arg("--images-ca-file")
        .arg(reg.ca_file())
        .arg("--images-credentials-file")
        .arg(w.path("creds.json"))
        .args(extra)
        .env("CAIRN_KUBECTL", "/nonexistent-kubectl")
        .output()
        .unwrap()
}

#[test]
fn an_agent_serves_the_images_of_its_release_to_skopeo() {
    let s = Setup::new();
    let w = &s.w;
    let out = s.build("b.bundle", &[]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "build failed: {err}");
    assert!(err.contains("images: 2 image(s), 3 blob(s)"), "{err}");
    // inspect lists the image with its size.
    let inspect = ok(Command::new(cairn_bin())
        .args(["bundle", "inspect", "--json"])
        .arg(w.path("b.bundle")));
    let v: serde_json::Value = serde_json::from_str(&inspect).unwrap();
    let img = v["images"]
        .as_array()
        .unwrap()
        .iter()
        .find(|i| i["reference"] == s.image.as_str())
        .unwrap();
    assert_eq!(img["reference"], s.image.as_str());
    assert!(
        img["platform"].as_str().unwrap().starts_with("linux/"),
        "{img}"
    );
    assert!(img["bytes"].as_u64().unwrap() > 300, "{img}");
    let digest = img["digest"].as_str().unwrap().to_owned();
    // The registry's own digest for the tag is the one recorded.
    let (u, p) = s.reg.credentials();
    let raw = ok(Command::new("skopeo")
        .args(["inspect", "--format", "{{.Digest}}", "--cert-dir"])
        .arg(s.reg.cert_dir())
        .args(["--creds", &format!("{u}:{p}")])
        .arg(format!("docker://{}", s.image))
        .env("HOME", w.tmp.path()));
    assert_eq!(raw.trim(), digest);

    w.release(&w.path("b.bundle"));
    // The repository now holds the image's blobs as objects.
    let hex = digest.trim_start_matches("sha256:");
    assert!(w
        .repo
        .join("objects/sha256")
        .join(&hex[..2])
        .join(hex)
        .is_file());

    let (mut agent, addr) = spawn_with_registry(w);
    let by_digest = format!("{addr}/team/web@{digest}");
    let mut last = String::new();
    wait_logged(w, 60, "the agent serves the image", || {
        match skopeo_pull(w, &by_digest, &w.path("pulled-digest")) {
            Ok(d) => {
                last = d;
                true
            }
            Err(e) => {
                last = e;
                false
            }
        }
    });
    assert_eq!(last, digest, "skopeo got the signed digest");
    let by_tag = skopeo_pull(w, &format!("{addr}/team/web:v1"), &w.path("pulled-tag")).unwrap();
    assert_eq!(by_tag, digest);
    // The pulled layer is the original one.
    let orig: serde_json::Value =
        serde_json::from_slice(&std::fs::read(s.layout.join("blobs/sha256").join(hex)).unwrap())
            .unwrap();
    let layer = orig["layers"][0]["digest"].as_str().unwrap();
    assert!(w
        .path("pulled-tag/blobs/sha256")
        .join(layer.trim_start_matches("sha256:"))
        .is_file());
    // Unknown names, tags and writes are refused.
    assert_eq!(http_get(&addr, "/v2/team/web/manifests/v2").0, 404);
    assert_eq!(http_get(&addr, "/v2/other/manifests/v1").0, 404);
    let (code, _) = http_get(
        &addr,
        &format!("/v2/team/web/blobs/sha256:{}", "0".repeat(64)),
    );
    assert_eq!(code, 404);
    let st = Command::new("curl")
        .args(["-s", "-o", "/dev/null", "-w", "%{http_code}", "-X", "POST"])
        .arg(format!("http://{addr}/v2/team/web/blobs/uploads/"))
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&st.stdout), "405");
    // The byte counters saw the blobs come in and go out.
    let http = w.status().unwrap().listen.unwrap();
    let metrics = http_get(&http, "/metrics").1;
    let value = |name: &str| -> u64 {
        metrics
            .lines()
            .find_map(|l| l.strip_prefix(name)?.trim().parse().ok())
            .unwrap_or_else(|| panic!("{name} in {metrics}"))
    };
    let image_bytes = v["image_bytes"].as_u64().unwrap();
    assert_eq!(value("cairn_image_bytes_fetched_total"), image_bytes);
    assert_eq!(value("cairn_image_bytes_held"), image_bytes);
    assert!(value("cairn_image_bytes_served_total") >= image_bytes);
    terminate(&mut agent.0);
}

#[test]
fn a_tampered_layer_is_refused_and_not_served() {
    let s = Setup::new();
    let w = &s.w;
    let out = s.build("b.bundle", &[]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    w.release(&w.path("b.bundle"));
    let inspect = ok(Command::new(cairn_bin())
        .args(["bundle", "inspect", "--json"])
        .arg(w.path("b.bundle")));
    let v: serde_json::Value = serde_json::from_str(&inspect).unwrap();
    let digest = v["images"][0]["digest"].as_str().unwrap().to_owned();
    // Tamper with the layer in the repository (same size, other bytes).
    let hex = digest.trim_start_matches("sha256:");
    let m: serde_json::Value = serde_json::from_slice(
        &std::fs::read(w.repo.join("objects/sha256").join(&hex[..2]).join(hex)).unwrap(),
    )
    .unwrap();
    let layer = m["layers"][0]["digest"]
        .as_str()
        .unwrap()
        .trim_start_matches("sha256:")
        .to_owned();
    let lp = w.repo.join("objects/sha256").join(&layer[..2]).join(&layer);
    let mut bytes = std::fs::read(&lp).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0xff;
    std::fs::write(&lp, bytes).unwrap();

    let (mut agent, addr) = spawn_with_registry(w);
    wait_logged(w, 60, "the agent refuses the layer", || {
        w.log("agent.log").contains("does not match its digest")
    });
    // The release itself is adopted; the image is not served, nor the layer.
    wait_for(30, "adopted", || {
        w.status().is_some_and(|s| s.adopted.is_some())
    });
    assert_eq!(http_get(&addr, "/v2/team/web/manifests/v1").0, 404);
    assert_eq!(
        http_get(&addr, &format!("/v2/team/web/blobs/sha256:{layer}")).0,
        404
    );
    assert!(!w
        .data
        .join("images/sha256")
        .join(&layer[..2])
        .join(&layer)
        .exists());
    assert!(skopeo_pull(w, &format!("{addr}/team/web@{digest}"), &w.path("p")).is_err());
    terminate(&mut agent.0);
}

#[test]
fn an_unresolvable_tag_fails_the_build_naming_the_object() {
    let s = Setup::new();
    let missing = format!("{}/team/web:v9", s.reg.host());
    commit_files(
        &s.w.git,
        &[("apps/web.yaml", &deployment(&missing))],
        "v9",
        "2024-01-03T00:00:00Z",
    )
    .unwrap();
    let out = s.build("b.bundle", &[]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("Deployment apps/web") && err.contains("tag `v9` not found"),
        "{err}"
    );
    assert!(!s.w.path("b.bundle").exists());
}

#[test]
fn pinned_digests_are_written_into_the_objects() {
    let s = Setup::new();
    let out = s.build("b.bundle", &["--pin-digests"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let inspect = ok(Command::new(cairn_bin())
        .args(["bundle", "inspect", "--json"])
        .arg(s.w.path("b.bundle")));
    let v: serde_json::Value = serde_json::from_str(&inspect).unwrap();
    let digest = v["images"][0]["digest"].as_str().unwrap();
    let mut objs = Vec::new();
    cairn_bundle::bundle::read_bundle_file(
        &s.w.path("b.bundle"),
        &cairn_bundle::limits::Limits::default(),
        |e, b| {
            if e.kind == "Deployment" && e.name == "web" {
                objs.push(String::from_utf8(b).unwrap());
            }
            Ok(())
        },
    )
    .unwrap();
    let want = format!("\"image\":\"{}/team/web@{digest}\"", s.reg.host());
    assert_eq!(objs[0].matches(&want).count(), 2, "{}", objs[0]);
}

/// A containerd daemon on a private socket (its CRI plugin off), stopped
/// when dropped.
struct Containerd {
    child: std::process::Child,
    sock: PathBuf,
}

impl Containerd {
    fn start(dir: &Path) -> Self {
        std::fs::create_dir_all(dir).unwrap();
        let cfg = dir.join("config.toml");
        std::fs::write(
            &cfg,
            "version = 2\ndisabled_plugins = [\"io.containerd.grpc.v1.cri\"]\n",
        )
        .unwrap();
        let sock = dir.join("c.sock");
        let log = std::fs::File::create(dir.join("containerd.log")).unwrap();
        let child = Command::new("containerd")
            .arg("--root")
            .arg(dir.join("root"))
            .arg("--state")
            .arg(dir.join("state"))
            .arg("--address")
            .arg(&sock)
            .arg("--config")
            .arg(&cfg)
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("containerd (Debian package containerd) must be installed");
        let c = Containerd { child, sock };
        wait_until(
            Duration::from_secs(30),
            Duration::from_millis(100),
            "containerd boots",
            || c.ctr(&["version"]).status.success(),
            || std::fs::read_to_string(dir.join("containerd.log")).unwrap_or_default(),
        );
        c
    }

    fn ctr(&self, args: &[&str]) -> std::process::Output {
        Command::new("ctr")
            .arg("--address")
            .arg(&self.sock)
            .args(["--namespace", "cairn-test"])
            .args(args)
            .output()
            .unwrap()
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn containerd_pulls_through_the_agent_mirror() {
    let s = Setup::new();
    let w = &s.w;
    let out = s.build("b.bundle", &[]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    w.release(&w.path("b.bundle"));
    let inspect = ok(Command::new(cairn_bin())
        .args(["bundle", "inspect", "--json"])
        .arg(w.path("b.bundle")));
    let v: serde_json::Value = serde_json::from_str(&inspect).unwrap();
    let digest = v["images"][0]["digest"].as_str().unwrap().to_owned();
    let (mut agent, addr) = spawn_with_registry(w);
    wait_logged(w, 60, "the agent serves the image", || {
        std::net::TcpStream::connect(&addr).is_ok()
            && http_get(&addr, "/v2/edge/app-0000/manifests/1.0.0").0 == 200
    });
    // containerd's mirror configuration, as docs/IMAGES.md writes it: the
    // fixture's `registry.local` (which does not exist) mirrored by the agent.
    let hosts = w.path("certs.d/registry.local");
    std::fs::create_dir_all(&hosts).unwrap();
    std::fs::write(
        hosts.join("hosts.toml"),
        format!(
            "server = \"https://registry.local\"\n\n[host.\"http://{addr}\"]\n  \
             capabilities = [\"pull\", \"resolve\"]\n  skip_verify = true\n"
        ),
    )
    .unwrap();
    let ctrd = Containerd::start(&w.path("containerd"));
    let hosts_dir = w.path("certs.d");
    let out = ctrd.ctr(&[
        "content",
        "fetch",
        "--hosts-dir",
        hosts_dir.to_str().unwrap(),
        "registry.local/edge/app-0000:1.0.0",
    ]);
    assert!(
        out.status.success(),
        "ctr content fetch: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let ls = String::from_utf8_lossy(&ctrd.ctr(&["content", "ls", "-q"]).stdout).into_owned();
    assert!(
        ls.contains(&digest),
        "manifest {digest} in containerd: {ls}"
    );
    let m: serde_json::Value = serde_json::from_slice(
        &std::fs::read(
            s.layout
                .join("blobs/sha256")
                .join(digest.trim_start_matches("sha256:")),
        )
        .unwrap(),
    )
    .unwrap();
    let layer = m["layers"][0]["digest"].as_str().unwrap();
    assert!(ls.contains(layer), "layer {layer} in containerd: {ls}");
    terminate(&mut agent.0);
}

#[test]
fn an_oci_layout_directory_gives_the_same_images_as_the_registry() {
    let s = Setup::new();
    let w = &s.w;
    // A layout whose images are named `repository:tag`, as `skopeo copy
    // ... oci:DIR:NAME` writes them.
    let named = w.path("named-layout");
    for name in ["team/web:v1", "edge/app-0000:1.0.0"] {
        ok(Command::new("skopeo")
            .arg("copy")
            .arg(format!("oci:{}:v1", s.layout.display()))
            .arg(format!("oci:{}:{name}", named.display()))
            .env("HOME", w.tmp.path()));
    }
    let from_registry = s.build("r.bundle", &[]);
    assert!(from_registry.status.success());
    let out = Command::new(cairn_bin())
        .args(["bundle", "build", "--git"])
        .arg(&w.git)
        .arg("--out")
        .arg(w.path("l.bundle"))
        .arg("--images")
        .arg(&named)
        .env("CAIRN_KUBECTL", "/nonexistent-kubectl")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let id = |f: &str| {
        ok(Command::new(cairn_bin())
            .args(["bundle", "inspect", "--json"])
            .arg(w.path(f)))
    };
    let (a, b): (serde_json::Value, serde_json::Value) = (
        serde_json::from_str(&id("r.bundle")).unwrap(),
        serde_json::from_str(&id("l.bundle")).unwrap(),
    );
    assert_eq!(a["images"], b["images"]);
    assert_eq!(a["id"], b["id"], "same images, same signed bundle");
}

// ----- images on a USB stick (export / import) and `cairn verify` --------

/// Runs `cairn ARGS`; returns (success, stdout + stderr).
fn cairn(args: &[&std::ffi::OsStr]) -> (bool, String) {
    let out = Command::new(cairn_bin()).args(args).output().unwrap();
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

/// `cairn export --channel stable` of `repo` into `tar`.
fn export(repo: &Path, tar: &Path) -> String {
    let (ok, text) = cairn(&[
        "export".as_ref(),
        "--channel".as_ref(),
        "stable".as_ref(),
        "--repo".as_ref(),
        repo.as_os_str(),
        "--out".as_ref(),
        tar.as_os_str(),
    ]);
    assert!(ok, "export: {text}");
    text
}

fn import(tar: &Path, repo: &Path) -> (bool, String) {
    cairn(&[
        "import".as_ref(),
        tar.as_os_str(),
        "--repo".as_ref(),
        repo.as_os_str(),
    ])
}

fn verify(repo: &Path) -> (bool, String) {
    cairn(&[
        "verify".as_ref(),
        "--channel".as_ref(),
        "stable".as_ref(),
        "--repo".as_ref(),
        repo.as_os_str(),
    ])
}

/// Every file under `dir` (relative path → bytes), hidden ones included.
fn tree(dir: &Path) -> std::collections::BTreeMap<String, Vec<u8>> {
    fn walk(base: &Path, dir: &Path, out: &mut std::collections::BTreeMap<String, Vec<u8>>) {
        let Ok(rd) = std::fs::read_dir(dir) else {
            return;
        };
        for e in rd.flatten() {
            let p = e.path();
            if e.file_type().unwrap().is_dir() {
                walk(base, &p, out);
            } else {
                let rel = p.strip_prefix(base).unwrap().display().to_string();
                out.insert(rel, std::fs::read(&p).unwrap());
            }
        }
    }
    let mut out = std::collections::BTreeMap::new();
    walk(dir, dir, &mut out);
    out
}

/// The built bundle's image (manifest digest, layer digest).
fn image_of(s: &Setup, bundle: &str) -> (String, String) {
    let inspect = ok(Command::new(cairn_bin())
        .args(["bundle", "inspect", "--json"])
        .arg(s.w.path(bundle)));
    let v: serde_json::Value = serde_json::from_str(&inspect).unwrap();
    let digest = v["images"][0]["digest"].as_str().unwrap().to_owned();
    let m: serde_json::Value = serde_json::from_slice(
        &std::fs::read(
            s.layout
                .join("blobs/sha256")
                .join(digest.trim_start_matches("sha256:")),
        )
        .unwrap(),
    )
    .unwrap();
    let layer = m["layers"][0]["digest"].as_str().unwrap().to_owned();
    (digest, layer)
}

fn object_file(repo: &Path, digest: &str) -> PathBuf {
    let hex = digest.trim_start_matches("sha256:");
    repo.join("objects/sha256").join(&hex[..2]).join(hex)
}

#[test]
fn images_travel_in_an_export_archive_and_an_agent_serves_them_from_the_import() {
    let s = Setup::new();
    let w = &s.w;
    let out = s.build("b.bundle", &[]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    w.release(&w.path("b.bundle"));
    let (digest, layer) = image_of(&s, "b.bundle");
    // `cairn verify` checks the image blobs too.
    let (good, text) = verify(&w.repo);
    assert!(good, "{text}");
    assert!(text.contains("images   2 (3 blobs"), "{text}");

    let tar = w.path("usb.tar");
    let text = export(&w.repo, &tar);
    assert!(text.contains("3 image blob(s)"), "{text}");
    // The same repository state gives the same archive bytes.
    export(&w.repo, &w.path("again.tar"));
    assert_eq!(
        std::fs::read(&tar).unwrap(),
        std::fs::read(w.path("again.tar")).unwrap()
    );

    let site = w.path("site-repo");
    let (good, text) = import(&tar, &site);
    assert!(good, "{text}");
    assert!(text.contains("(3 image blob(s))"), "{text}");
    // Byte-identical: every object (image blobs and list included), root
    // and channel head; no staging directory left behind.
    assert_eq!(tree(&site), tree(&w.repo));
    let (good, text) = verify(&site);
    assert!(good, "{text}");
    // Importing again changes nothing.
    let (good, text) = import(&tar, &site);
    assert!(good && text.contains("0 new object(s)"), "{text}");

    // An agent whose only source is the imported repository serves the
    // image with the signed digest.
    let (mut agent, addr) = spawn_with_registry_from(w, &site);
    let mut last = String::new();
    wait_logged(w, 60, "the agent serves the image", || {
        match skopeo_pull(w, &format!("{addr}/team/web@{digest}"), &w.path("pulled")) {
            Ok(d) => {
                last = d;
                true
            }
            Err(e) => {
                last = e;
                false
            }
        }
    });
    assert_eq!(last, digest);
    assert_eq!(
        std::fs::read(
            w.path("pulled/blobs/sha256")
                .join(layer.trim_start_matches("sha256:"))
        )
        .unwrap(),
        std::fs::read(object_file(&w.repo, &layer)).unwrap()
    );
    terminate(&mut agent.0);
}

/// A ustar archive without the member `name` (headers of 512 bytes, an
/// octal size at 124, contents padded to 512).
fn without_member(archive: &[u8], name: &str) -> Vec<u8> {
    let mut out = Vec::new();
    let mut at = 0;
    while at + 512 <= archive.len() && archive[at] != 0 {
        let h = &archive[at..at + 512];
        let end = h[..100].iter().position(|&b| b == 0).unwrap_or(100);
        let size_field = String::from_utf8_lossy(&h[124..136]);
        let size = u64::from_str_radix(size_field.trim_matches(|c: char| c == '\0' || c == ' '), 8)
            .unwrap() as usize;
        let next = at + 512 + size.div_ceil(512) * 512;
        if &h[..end] != name.as_bytes() {
            out.extend_from_slice(&archive[at..next]);
        }
        at = next;
    }
    out.extend_from_slice(&[0u8; 1024]);
    out
}

/// One ustar member (header and padded content).
fn tar_member(name: &str, content: &[u8]) -> Vec<u8> {
    let mut h = [0u8; 512];
    h[..name.len()].copy_from_slice(name.as_bytes());
    h[100..107].copy_from_slice(b"0000644");
    h[108..115].copy_from_slice(b"0000000");
    h[116..123].copy_from_slice(b"0000000");
    h[124..135].copy_from_slice(format!("{:011o}", content.len()).as_bytes());
    h[136..147].copy_from_slice(b"00000000000");
    h[156] = b'0';
    h[257..263].copy_from_slice(b"ustar\0");
    h[263..265].copy_from_slice(b"00");
    h[148..156].copy_from_slice(b"        ");
    let sum: u32 = h.iter().map(|&b| u32::from(b)).sum();
    h[148..156].copy_from_slice(format!("{sum:06o}\0 ").as_bytes());
    let mut out = h.to_vec();
    out.extend_from_slice(content);
    out.resize(512 + content.len().div_ceil(512) * 512, 0);
    out
}

/// `archive` with `member` appended after its last member.
fn with_member(archive: &[u8], member: &[u8]) -> Vec<u8> {
    let mut out = without_member(archive, "");
    out.truncate(out.len() - 1024);
    out.extend_from_slice(member);
    out.extend_from_slice(&[0u8; 1024]);
    out
}

#[test]
fn a_tampered_or_incomplete_archive_is_refused_and_changes_nothing() {
    let s = Setup::new();
    let w = &s.w;
    let out = s.build("b.bundle", &[]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    w.release(&w.path("b.bundle"));
    let (_, layer) = image_of(&s, "b.bundle");
    let tar = w.path("usb.tar");
    export(&w.repo, &tar);
    let archive = std::fs::read(&tar).unwrap();
    let layer_bytes = std::fs::read(object_file(&w.repo, &layer)).unwrap();
    let at = archive
        .windows(layer_bytes.len())
        .position(|x| x == layer_bytes.as_slice())
        .expect("the layer is in the archive");

    // A tampered layer (same size, last byte flipped).
    let mut bad = archive.clone();
    bad[at + layer_bytes.len() - 1] ^= 0xff;
    let tampered = w.path("tampered.tar");
    std::fs::write(&tampered, &bad).unwrap();
    // Into a new directory: refused, and the directory is not left behind.
    let fresh = w.path("fresh");
    let (good, text) = import(&tampered, &fresh);
    assert!(!good);
    assert!(
        text.contains(&format!("image blob {layer}"))
            && text.contains("does not match its digest")
            && text.contains("tampered.tar"),
        "{text}"
    );
    assert!(!fresh.exists(), "nothing of a refused import is left");
    // Into an existing repository: nothing changes, no staging left.
    let site = w.path("site");
    std::fs::create_dir_all(site.join("roots")).unwrap();
    std::fs::write(site.join("README"), "site repository\n").unwrap();
    let before = tree(&site);
    let (good, text) = import(&tampered, &site);
    assert!(!good, "{text}");
    assert_eq!(tree(&site), before);
    assert_eq!(
        std::fs::read_dir(&site).unwrap().count(),
        2,
        "no staging dir"
    );

    // A layer left out of the archive: refused, naming it.
    let hex = layer.trim_start_matches("sha256:");
    let short = w.path("short.tar");
    std::fs::write(
        &short,
        without_member(&archive, &format!("images/sha256/{}/{hex}", &hex[..2])),
    )
    .unwrap();
    let (good, text) = import(&short, &site);
    assert!(!good);
    assert!(
        text.contains(&format!("image blob {layer}"))
            && text.contains("missing from the archive")
            && text.contains("short.tar"),
        "{text}"
    );
    assert_eq!(tree(&site), before);

    // A layer member of another size than the image list says (its header
    // and content both changed, checksum fixed): refused before it is read.
    let mut longer = archive.clone();
    let header = at - 512;
    let old_size = format!("{:011o}", layer_bytes.len());
    let new_size = format!("{:011o}", layer_bytes.len() - 1);
    assert_eq!(&longer[header + 124..header + 135], old_size.as_bytes());
    longer[header + 124..header + 135].copy_from_slice(new_size.as_bytes());
    longer[header + 148..header + 156].copy_from_slice(b"        ");
    let sum: u32 = longer[header..header + 512]
        .iter()
        .map(|&b| u32::from(b))
        .sum();
    longer[header + 148..header + 156].copy_from_slice(format!("{sum:06o}\0 ").as_bytes());
    let resized = w.path("resized.tar");
    std::fs::write(&resized, &longer).unwrap();
    let (good, text) = import(&resized, &site);
    assert!(!good);
    assert!(
        text.contains(&format!("image blob {layer}")) && text.contains("the image list says"),
        "{text}"
    );
    assert_eq!(tree(&site), before);

    // A blob no image list names, and a channel after the image blobs.
    let extra = b"not a layer of this release";
    let hex = cairn_keys::sha256_address(extra)
        .trim_start_matches("sha256:")
        .to_owned();
    let unlisted = w.path("unlisted.tar");
    std::fs::write(
        &unlisted,
        with_member(
            &archive,
            &tar_member(&format!("images/sha256/{}/{hex}", &hex[..2]), extra),
        ),
    )
    .unwrap();
    let (good, text) = import(&unlisted, &site);
    assert!(
        !good && text.contains("is not named by the image list of any release"),
        "{text}"
    );
    let late = w.path("late.tar");
    let head = std::fs::read(w.repo.join("channels/stable")).unwrap();
    std::fs::write(
        &late,
        with_member(&archive, &tar_member("channels/other", &head)),
    )
    .unwrap();
    let (good, text) = import(&late, &site);
    assert!(
        !good && text.contains("comes after the image blobs"),
        "{text}"
    );
    assert_eq!(tree(&site), before);

    // The untouched archive imports.
    let (good, text) = import(&tar, &site);
    assert!(good, "{text}");
    assert!(verify(&site).0);
}

#[test]
fn verify_names_a_missing_or_corrupted_image_blob() {
    let s = Setup::new();
    let w = &s.w;
    let out = s.build("b.bundle", &[]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    w.release(&w.path("b.bundle"));
    let (_, layer) = image_of(&s, "b.bundle");
    let path = object_file(&w.repo, &layer);
    let good_bytes = std::fs::read(&path).unwrap();
    let hex = layer.trim_start_matches("sha256:");
    let rel = format!("objects/sha256/{}/{hex}", &hex[..2]);

    let mut bytes = good_bytes.clone();
    let n = bytes.len() - 1;
    bytes[n] ^= 0xff;
    std::fs::write(&path, &bytes).unwrap();
    let (good, text) = verify(&w.repo);
    assert!(!good);
    assert!(
        text.contains(&rel) && text.contains("content hashes to") && text.contains(&layer),
        "{text}"
    );
    // Export refuses to carry it.
    let (good, text) = cairn(&[
        "export".as_ref(),
        "--channel".as_ref(),
        "stable".as_ref(),
        "--repo".as_ref(),
        w.repo.as_os_str(),
        "--out".as_ref(),
        w.path("x.tar").as_os_str(),
    ]);
    assert!(!good && text.contains(&layer), "{text}");
    assert!(!w.path("x.tar").exists());

    std::fs::write(&path, &bytes[..n]).unwrap();
    let (good, text) = verify(&w.repo);
    assert!(!good);
    assert!(
        text.contains(&rel) && text.contains("the image list says"),
        "{text}"
    );

    std::fs::remove_file(&path).unwrap();
    let (good, text) = verify(&w.repo);
    assert!(!good);
    assert!(
        text.contains(&format!("{rel}: missing (image blob {layer}")),
        "{text}"
    );
    // --json lists the problem.
    let out = Command::new(cairn_bin())
        .args(["verify", "--json", "--channel", "stable", "--repo"])
        .arg(&w.repo)
        .output()
        .unwrap();
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["ok"], false);
    assert!(v["problems"][0].as_str().unwrap().contains(&rel), "{v}");

    std::fs::write(&path, &good_bytes).unwrap();
    let (good, text) = verify(&w.repo);
    assert!(good, "{text}");
}

/// `cairn push` / `cairn pull` of channel `stable` to or from `url`.
fn registry_cmd(s: &Setup, verb: &str, url: &str, repo: &Path) -> (bool, String) {
    let dir = if verb == "push" { "--to" } else { "--from" };
    cairn(&[
        verb.as_ref(),
        "--channel".as_ref(),
        "stable".as_ref(),
        "--repo".as_ref(),
        repo.as_os_str(),
        dir.as_ref(),
        url.as_ref(),
        "--ca-file".as_ref(),
        s.reg.ca_file().as_os_str(),
        "--credentials-file".as_ref(),
        s.w.path("creds.json").as_os_str(),
    ])
}

#[test]
fn images_travel_through_an_oci_registry_and_an_oci_source_serves_them() {
    let s = Setup::new();
    let w = &s.w;
    let out = s.build("b.bundle", &[]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    w.release(&w.path("b.bundle"));
    let (digest, layer) = image_of(&s, "b.bundle");
    let url = format!("oci://{}/fleet", s.reg.host());
    let (good, text) = registry_cmd(&s, "push", &url, &w.repo);
    assert!(good, "{text}");
    // The layer is a blob of the registry repository, and a manifest of
    // the artifact references it (so the registry's GC keeps it).
    assert!(
        !s.reg
            .access_lines("PUT", "/v2/fleet/blobs/uploads/")
            .is_empty(),
        "uploads"
    );
    let (u, p) = s.reg.credentials();
    let curl = |path: &str| {
        Command::new("curl")
            .args(["-sS", "-o", "/dev/null", "-w", "%{http_code}", "--cacert"])
            .arg(s.reg.ca_file())
            .args(["-u", &format!("{u}:{p}")])
            .arg(format!("https://{}/v2/fleet/{path}", s.reg.host()))
            .output()
            .unwrap()
    };
    assert_eq!(
        String::from_utf8_lossy(&curl(&format!("blobs/{layer}")).stdout),
        "200"
    );
    // Pushing again uploads nothing new.
    let (good, text) = registry_cmd(&s, "push", &url, &w.repo);
    assert!(good && text.contains("0 blob(s) uploaded"), "{text}");

    // Pull into a new repository: byte-identical, and it verifies.
    let pulled = w.path("pulled-repo");
    let (good, text) = registry_cmd(&s, "pull", &url, &pulled);
    assert!(good, "{text}");
    assert!(text.contains("(3 image blob(s))"), "{text}");
    assert_eq!(tree(&pulled.join("objects")), tree(&w.repo.join("objects")));
    assert_eq!(
        tree(&pulled.join("channels")),
        tree(&w.repo.join("channels"))
    );
    assert!(
        std::fs::read_dir(&pulled)
            .unwrap()
            .flatten()
            .all(|e| !e.file_name().to_string_lossy().starts_with('.')),
        "no staging directory left"
    );
    let (good, text) = verify(&pulled);
    assert!(good, "{text}");

    // An agent whose only source is the registry serves the image.
    let mut c = w.agent_config(&[format!(
        "{{url: \"{url}\", caFile: \"{}\", credentialsFile: \"{}\"}}",
        s.reg.ca_file().display(),
        w.path("creds.json").display()
    )]);
    c.http = "127.0.0.1:0\n  registry: 127.0.0.1:0".into();
    let cfg = c.write(&w.path("agent-oci.yaml"));
    let mut agent = w.spawn(&cfg, "agent.log");
    let mut addr = String::new();
    wait_logged(w, 30, "the image registry listens", || {
        let log = w.log("agent.log");
        let line = log
            .lines()
            .find(|l| l.contains("serving the image registry"));
        if let Some(v) = line.and_then(|l| serde_json::from_str::<serde_json::Value>(l).ok()) {
            addr = v["address"].as_str().unwrap_or_default().to_owned();
        }
        !addr.is_empty()
    });
    let mut last = String::new();
    wait_logged(w, 60, "the agent serves the image", || {
        match skopeo_pull(w, &format!("{addr}/team/web@{digest}"), &w.path("pulled")) {
            Ok(d) => {
                last = d;
                true
            }
            Err(e) => {
                last = e;
                false
            }
        }
    });
    assert_eq!(last, digest);
    terminate(&mut agent.0);
}

/// The digests of every blob (manifest, config, layers) of `tag` in an
/// OCI layout.
fn blobs_of(layout: &Path, tag: &str) -> Vec<String> {
    let (manifest, _) = layers_of(layout, tag);
    let m: serde_json::Value = serde_json::from_slice(
        &std::fs::read(
            layout
                .join("blobs/sha256")
                .join(manifest.trim_start_matches("sha256:")),
        )
        .unwrap(),
    )
    .unwrap();
    let mut out = vec![manifest, m["config"]["digest"].as_str().unwrap().to_owned()];
    out.extend(
        m["layers"]
            .as_array()
            .unwrap()
            .iter()
            .map(|l| l["digest"].as_str().unwrap().to_owned()),
    );
    out
}

#[test]
fn blobs_no_release_names_are_removed_after_adoption_and_temporaries_at_start() {
    let s = Setup::new();
    let w = &s.w;
    let out = s.build("b1.bundle", &[]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    w.release(&w.path("b1.bundle"));
    let a_blobs = blobs_of(&s.layout, "v1");
    let (mut agent, addr) = spawn_with_registry(w);
    wait_logged(w, 60, "the agent serves image A", || {
        http_get(&addr, "/v2/team/web/manifests/v1").0 == 200
    });
    for d in &a_blobs {
        assert!(blob_file(&w.data, d).is_file(), "{d}");
    }

    // Release 2 names only image B (no blob in common with A): both the
    // Deployment and the fixture's `edge/app-0000:1.0.0` now resolve to B.
    let b_layout = make_image(&w.path("img-b"), "v1", &[("etc/other.txt", "other\n")]);
    let b_blobs = blobs_of(&b_layout, "v1");
    assert!(a_blobs.iter().all(|d| !b_blobs.contains(d)));
    skopeo_push(w, &s.reg, &b_layout, "v1", "team/other:v1");
    skopeo_push(w, &s.reg, &b_layout, "v1", "edge/app-0000:1.0.0");
    commit_files(
        &w.git,
        &[(
            "apps/web.yaml",
            &deployment(&format!("{}/team/other:v1", s.reg.host())),
        )],
        "other",
        "2024-01-03T00:00:00Z",
    )
    .unwrap();
    let out = s.build("b2.bundle", &[]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    w.release(&w.path("b2.bundle"));
    wait_logged(w, 60, "the agent serves image B", || {
        http_get(&addr, "/v2/team/other/manifests/v1").0 == 200
    });
    wait_logged(w, 60, "A's blobs are removed", || {
        a_blobs.iter().all(|d| !blob_file(&w.data, d).exists())
    });
    assert!(w
        .log("agent.log")
        .contains("image blobs no adopted or staged release names removed"));
    for d in &b_blobs {
        assert!(blob_file(&w.data, d).is_file(), "{d} kept");
    }
    assert_eq!(http_get(&addr, "/v2/team/web/manifests/v1").0, 404);
    assert_eq!(
        http_get(&addr, &format!("/v2/team/web/manifests/{}", a_blobs[0])).0,
        404
    );
    assert_eq!(
        http_get(&addr, &format!("/v2/team/web/blobs/{}", a_blobs[2])).0,
        404
    );
    terminate(&mut agent.0);

    // An interrupted fetch's temporary file, and a link named like an
    // unused blob to a file outside: at restart the temporary file goes,
    // the link and its target stay.
    let b_layer = blob_file(&w.data, &b_blobs[2]);
    let dir = b_layer.parent().unwrap().to_path_buf();
    let hex = b_blobs[2].trim_start_matches("sha256:");
    let temp = dir.join(format!(".{hex}.peer.4242.7.1"));
    std::fs::write(&temp, b"half a layer").unwrap();
    let outside = w.path("outside.txt");
    std::fs::write(&outside, b"not an image").unwrap();
    let link = dir.join(format!("{}{}", &hex[..2], "e".repeat(62)));
    std::os::unix::fs::symlink(&outside, &link).unwrap();
    let (mut agent, addr) = spawn_with_registry(w);
    wait_logged(w, 60, "the temporary file is removed", || !temp.exists());
    wait_logged(w, 60, "the agent serves image B again", || {
        http_get(&addr, "/v2/team/other/manifests/v1").0 == 200
    });
    assert!(b_layer.is_file());
    assert!(std::fs::symlink_metadata(&link).is_ok() && outside.is_file());
    terminate(&mut agent.0);
}

// ----- images over the mesh ----------------------------------------------

/// Bytes of the large layer: more than two mesh pieces of 1 MiB.
const BIG_LAYER: usize = (5 << 20) / 2;

/// Deterministic incompressible bytes (a gzip layer stays as large).
fn noise(n: usize) -> Vec<u8> {
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// An OCI layout whose tag `v1` has one layer of [`BIG_LAYER`] noise
/// bytes, and `v2` is `v1` with one more small layer on top.
fn layered_image(dir: &Path) -> PathBuf {
    let layout = dir.join("layout");
    ok(Command::new("umoci")
        .args(["init", "--layout"])
        .arg(&layout));
    let tag = |t: &str| format!("{}:{t}", layout.display());
    ok(Command::new("umoci").args(["new", "--image", &tag("v1")]));
    let b1 = dir.join("b1");
    ok(Command::new("umoci")
        .args(["unpack", "--rootless", "--image", &tag("v1")])
        .arg(&b1));
    std::fs::write(b1.join("rootfs/big.bin"), noise(BIG_LAYER)).unwrap();
    ok(Command::new("umoci")
        .args(["repack", "--image", &tag("v1")])
        .arg(&b1));
    let b2 = dir.join("b2");
    ok(Command::new("umoci")
        .args(["unpack", "--rootless", "--image", &tag("v1")])
        .arg(&b2));
    std::fs::write(b2.join("rootfs/etc-new.txt"), "the second release\n").unwrap();
    ok(Command::new("umoci")
        .args(["repack", "--image", &tag("v2")])
        .arg(&b2));
    layout
}

/// The layers (digest, size) of `tag` in an OCI layout, and its manifest
/// digest.
fn layers_of(layout: &Path, tag: &str) -> (String, Vec<(String, u64)>) {
    let index: serde_json::Value =
        serde_json::from_slice(&std::fs::read(layout.join("index.json")).unwrap()).unwrap();
    let digest = index["manifests"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["annotations"]["org.opencontainers.image.ref.name"] == tag)
        .unwrap()["digest"]
        .as_str()
        .unwrap()
        .to_owned();
    let m: serde_json::Value = serde_json::from_slice(
        &std::fs::read(
            layout
                .join("blobs/sha256")
                .join(digest.trim_start_matches("sha256:")),
        )
        .unwrap(),
    )
    .unwrap();
    let layers = m["layers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| {
            (
                l["digest"].as_str().unwrap().to_owned(),
                l["size"].as_u64().unwrap(),
            )
        })
        .collect();
    (digest, layers)
}

/// A world with the layered image pushed as `team/web:v1`, `team/web:v2`
/// and (the fixture's own Deployment) `edge/app-0000:1.0.0`, and a
/// Deployment naming `team/web:v1` committed.
fn mesh_setup() -> (World, Registry, PathBuf) {
    let w = World::new(1, 1, 1);
    let reg = Registry::start().unwrap();
    let (u, p) = reg.credentials();
    std::fs::write(
        w.path("creds.json"),
        serde_json::json!({"username": u, "password": p}).to_string(),
    )
    .unwrap();
    let layout = layered_image(&w.path("img"));
    skopeo_push(&w, &reg, &layout, "v1", "team/web:v1");
    skopeo_push(&w, &reg, &layout, "v2", "team/web:v2");
    skopeo_push(&w, &reg, &layout, "v1", "edge/app-0000:1.0.0");
    commit_image(&w, &reg, "v1", "2024-01-02T00:00:00Z");
    (w, reg, layout)
}

fn commit_image(w: &World, reg: &Registry, tag: &str, date: &str) {
    let image = format!("{}/team/web:{tag}", reg.host());
    commit_files(&w.git, &[("apps/web.yaml", &deployment(&image))], tag, date).unwrap();
}

/// Starts fleet agent i with an image registry on a free loopback port:
/// the repository as its only source if `source`, agent i-1 as its seed.
/// Returns the registry's address.
fn spawn_image_agent(f: &mut Fleet, i: usize, source: bool) -> String {
    let cert = f.issue(&f.ca.clone(), i);
    let sources = if source {
        vec![f.w.repo.display().to_string()]
    } else {
        Vec::new()
    };
    let seeds = if i == 0 { vec![] } else { vec![f.addr(i - 1)] };
    let mut c = f.agent_config(i, &sources, &seeds, &cert);
    c.http = "127.0.0.1:0\n  registry: 127.0.0.1:0".into();
    let cfg = c.write(&f.dir(i, "config.yaml"));
    f.spawn(i, &cfg);
    let mut addr = String::new();
    f.wait(30, "the image registry listens", |f| {
        let line = f
            .log(i)
            .lines()
            .find(|l| l.contains("serving the image registry"))
            .map(str::to_owned);
        if let Some(v) = line.and_then(|l| serde_json::from_str::<serde_json::Value>(&l).ok()) {
            addr = v["address"].as_str().unwrap_or_default().to_owned();
        }
        !addr.is_empty()
    });
    addr
}

/// Sum of a metric's samples whose line contains every `filter`.
fn metric(text: &str, name: &str, filters: &[&str]) -> u64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| {
            l.starts_with(name)
                && (l[name.len()..].starts_with('{') || l[name.len()..].starts_with(' '))
        })
        .filter(|l| filters.iter().all(|f| l.contains(f)))
        .filter_map(|l| l.rsplit(' ').next().and_then(|v| v.parse::<f64>().ok()))
        .sum::<f64>() as u64
}

fn blob_file(data: &Path, digest: &str) -> PathBuf {
    let hex = digest.trim_start_matches("sha256:");
    data.join("images/sha256").join(&hex[..2]).join(hex)
}

#[test]
fn images_cross_a_mesh_of_three_and_a_new_layer_moves_alone() {
    let (w, reg, layout) = mesh_setup();
    let b1 = build_with(&w, &reg, "b1.bundle", &[]);
    assert!(
        b1.status.success(),
        "{}",
        String::from_utf8_lossy(&b1.stderr)
    );
    w.release(&w.path("b1.bundle"));
    let (digest1, layers1) = layers_of(&layout, "v1");
    let (digest2, layers2) = layers_of(&layout, "v2");
    assert_eq!(layers1.len(), 1);
    assert!(layers1[0].1 > 2 << 20, "the big layer takes three pieces");
    assert_eq!(layers2.len(), 2);
    assert_eq!(layers2[0], layers1[0], "v2 shares v1's layer");
    let new_layer = layers2[1].clone();

    let mut f = fleet(w, Vec::new());
    f.log_filter = "info,cairn_agent::mesh=debug".into();
    let regs: Vec<String> = (0..3)
        .map(|i| spawn_image_agent(&mut f, i, i == 0))
        .collect();
    f.wait_sequence(&[0, 1, 2], 1, 90);
    // The third agent, two hops from any source, serves the image to
    // skopeo by digest, with the signed digest.
    let mut last = String::new();
    let dest = f.w.path("pulled-from-a2");
    f.wait(90, "agent 2 serves the image", |f| {
        match skopeo_pull(&f.w, &format!("{}/team/web@{digest1}", regs[2]), &dest) {
            Ok(d) => {
                last = d;
                true
            }
            Err(e) => {
                last = e;
                false
            }
        }
    });
    assert_eq!(last, digest1, "skopeo got the signed digest from agent 2");
    let (big, big_size) = &layers1[0];
    assert!(dest
        .join("blobs/sha256")
        .join(big.trim_start_matches("sha256:"))
        .is_file());
    for (i, r) in regs.iter().enumerate() {
        assert_eq!(
            http_get(r, "/v2/team/web/manifests/v1").0,
            200,
            "agent {i} serves the tag"
        );
        assert!(blob_file(&f.dir(i, "data"), big).is_file(), "agent {i}");
    }
    // Agents 1 and 2 have no source: every image byte came from peers.
    let m0 = f.metrics(0);
    assert_eq!(metric(&m0, "cairn_image_peer_bytes_total", &[]), 0);
    assert!(metric(&m0, "cairn_image_bytes_fetched_total", &[]) >= *big_size);
    let mut before = Vec::new();
    for i in [1, 2] {
        let m = f.metrics(i);
        assert_eq!(metric(&m, "cairn_image_bytes_fetched_total", &[]), 0);
        let peer = metric(&m, "cairn_image_peer_bytes_total", &[]);
        assert!(peer >= *big_size, "agent {i}: {peer} bytes from peers");
        assert_eq!(metric(&m, "cairn_mesh_rejections_total", &[]), 0, "{m}");
        before.push(peer);
    }

    // Release 2: the same image with one more layer. Only that layer (and
    // the small new manifest, config and image list) moves.
    commit_image(&f.w, &reg, "v2", "2024-01-03T00:00:00Z");
    let b2 = build_with(&f.w, &reg, "b2.bundle", &[]);
    assert!(
        b2.status.success(),
        "{}",
        String::from_utf8_lossy(&b2.stderr)
    );
    f.w.release(&f.w.path("b2.bundle"));
    f.wait_sequence(&[0, 1, 2], 2, 90);
    f.wait(90, "agents 1 and 2 serve v2", |_| {
        [1, 2]
            .iter()
            .all(|&i| http_get(&regs[i], &format!("/v2/team/web/manifests/{digest2}")).0 == 200)
    });
    let pulled = skopeo_pull(
        &f.w,
        &format!("{}/team/web:v2", regs[2]),
        &f.w.path("pulled-v2"),
    )
    .unwrap();
    assert_eq!(pulled, digest2);
    for (k, i) in [1usize, 2].into_iter().enumerate() {
        let moved = metric(&f.metrics(i), "cairn_image_peer_bytes_total", &[]) - before[k];
        eprintln!(
            "agent {i}: {} bytes from peers for release 1, {moved} for release 2 (new layer {})",
            before[k], new_layer.1
        );
        assert!(
            moved >= new_layer.1 && moved < new_layer.1 + (64 << 10),
            "agent {i}: {moved} bytes from peers for a new layer of {} (the old layer is {big_size})",
            new_layer.1
        );
    }
}

#[test]
fn a_layer_tampered_on_a_peer_is_refused_and_not_stored() {
    let (w, reg, layout) = mesh_setup();
    let b1 = build_with(&w, &reg, "b1.bundle", &[]);
    assert!(
        b1.status.success(),
        "{}",
        String::from_utf8_lossy(&b1.stderr)
    );
    w.release(&w.path("b1.bundle"));
    let (digest, layers) = layers_of(&layout, "v1");
    let (big, _) = layers[0].clone();
    let mut f = fleet(w, Vec::new());
    f.log_filter = "info,cairn_agent::mesh=debug".into();
    let r0 = spawn_image_agent(&mut f, 0, true);
    f.wait(90, "agent 0 serves the image", |_| {
        http_get(&r0, "/v2/team/web/manifests/v1").0 == 200
    });
    // Agent 0's copy of the layer on disk is altered (same size, last
    // byte flipped) after it verified it: it now serves wrong bytes.
    let path = blob_file(&f.dir(0, "data"), &big);
    let mut bytes = std::fs::read(&path).unwrap();
    let n = bytes.len() - 1;
    bytes[n] ^= 0xff;
    std::fs::write(&path, bytes).unwrap();

    let r1 = spawn_image_agent(&mut f, 1, false);
    f.wait_sequence(&[1], 1, 90);
    f.wait(90, "agent 1 refuses the layer and cuts agent 0 off", |f| {
        metric(
            &f.metrics(1),
            "cairn_mesh_rejections_total",
            &["peer=\"a0\"", "reason=\"blob_mismatch\""],
        ) >= 1
    });
    let m = f.metrics(1);
    assert!(
        metric(&m, "cairn_image_blobs_refused_total", &[]) >= 1,
        "{m}"
    );
    assert!(
        f.log(1).contains("image blob from mesh peer refused")
            && f.log(1).contains("does not match its digest"),
        "{}",
        f.log(1)
    );
    // Nothing of it reached agent 1's store, not even a partial file.
    let data1 = f.dir(1, "data");
    assert!(!blob_file(&data1, &big).exists());
    let hex = big.trim_start_matches("sha256:");
    let dir = data1.join("images/sha256").join(&hex[..2]);
    let leftovers: Vec<String> = std::fs::read_dir(&dir)
        .map(|rd| {
            rd.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    assert!(leftovers.is_empty(), "{leftovers:?} in {}", dir.display());
    assert_eq!(http_get(&r1, "/v2/team/web/manifests/v1").0, 404);
    assert_eq!(http_get(&r1, &format!("/v2/team/web/blobs/{big}")).0, 404);
    assert!(skopeo_pull(&f.w, &format!("{r1}/team/web@{digest}"), &f.w.path("p")).is_err());
}
