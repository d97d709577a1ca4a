//! `cairn demo`: the whole loop on one machine, with no cluster.
//!
//! It writes a Git repository of manifests (a small generator below: a
//! namespace, a CRD and a custom object, Deployments, Services and
//! ConfigMaps), builds and releases it into a local bundle repository with
//! the same library calls as `cairn bundle build` and `cairn release`
//! ([`build`], [`publish`]), signed with the **development** release key
//! compiled into this binary, creates a mesh CA and one certificate per
//! agent, and starts N `cairn-agent` processes in a line: only the first
//! reads the repository, agent k peers with agent k-1, each writes a
//! manifests directory. It shows release 1 spreading, then commits a change
//! to one ConfigMap, releases it as sequence 2 and shows how few bytes move
//! (from the agents' `/metrics`).
//!
//! Everything it observes comes from the agents themselves: `status.json`
//! in each data directory (adopted release, last reconcile) and `/metrics`
//! (`cairn_mesh_object_bytes_fetched_total{from="peer"}`).
//!
//! The `--json` summary (stdout) is documented in the README ("The demo").

use crate::build::{build, BuildOptions};
use crate::bundle::Manifest;
use crate::diff::diff;
use crate::limits::Limits;
use crate::mesh::pki::{self, PeerIdentity};
use crate::publish::{publish, ReleaseRequest};
use crate::repo::RepoDir;
use crate::trust::TrustChain;
use anyhow::{bail, Context, Result};
use clap::Args;
use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use std::io::{IsTerminal, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

/// The development release key (`keys/trust/dev/dev-release-1.key`).
/// cairn-keys compiles it in only when the embedded root is the
/// development root (cfg `cairn_dev_root`): a `cairn` built with
/// `CAIRN_TRUST_ROOT` does not contain it, and its demo refuses to run.
fn dev_release_key() -> Result<cairn_keys::KeyPair> {
    cairn_keys::KeyPair::from_pkcs8(dev_release_key_bytes()?)
        .map_err(|e| anyhow::anyhow!("the embedded development release key: {e}"))
}

/// [`dev_release_key`] as PKCS#8 bytes.
fn dev_release_key_bytes() -> Result<&'static [u8]> {
    cairn_keys::embedded::development_release_key().ok_or_else(|| {
        anyhow::anyhow!(
            "the demo signs with the development release key, but this cairn embeds the trust root from {} \
             (CAIRN_TRUST_ROOT at build time) and does not contain that key; \
             run the demo from a build without CAIRN_TRUST_ROOT",
            cairn_keys::embedded::ORIGIN
        )
    })
}

/// The channel the demo releases on and the agents follow.
const CHANNEL: &str = "demo";
/// `source.repository` recorded in the demo's bundles.
const SOURCE_NAME: &str = "cairn-demo";
/// Namespace of the demo applications.
const NAMESPACE: &str = "cairn-demo";
/// Validity of the demo's certificates and releases.
const VALID_DAYS: u32 = 30;
/// Version of the `--json` summary.
const SUMMARY_FORMAT: u32 = 1;

/// `cairn demo`.
#[derive(Debug, Args)]
pub(super) struct DemoArgs {
    /// Directory for everything the demo creates (must be empty or
    /// missing) [default: a new directory under the system temp dir].
    #[arg(long, value_name = "DIR")]
    dir: Option<PathBuf>,
    /// Number of agents, meshed in a line (agent k peers with agent k-1).
    #[arg(long, value_name = "N", default_value_t = 3,
          value_parser = clap::value_parser!(u16).range(1..=32))]
    agents: u16,
    /// Print a machine-readable summary on stdout at the end (see the
    /// README); progress still goes to stderr.
    #[arg(long)]
    json: bool,
    /// Leave the agents running when the demo ends and print their PIDs.
    #[arg(long)]
    keep_running: bool,
    /// How long each release may take to reach every agent's target.
    #[arg(long, value_name = "DURATION", default_value = "60s",
          value_parser = crate::duration::parse_duration)]
    timeout: Duration,
}

/// Set by SIGINT / SIGTERM; the demo polls it.
static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

/// Ctrl-C (and SIGTERM) only set [`INTERRUPTED`]; the demo then stops its
/// agents and exits. The agents run in their own process groups, so the
/// terminal's Ctrl-C reaches only the demo.
fn install_interrupt_handler() {
    // SAFETY: the handler only stores to an atomic (async-signal-safe);
    // the sigaction struct is fully initialised before use.
    unsafe {
        let mut sa: libc::sigaction = std::mem::zeroed();
        sa.sa_sigaction = on_signal as extern "C" fn(libc::c_int) as usize;
        libc::sigemptyset(&mut sa.sa_mask);
        libc::sigaction(libc::SIGINT, &sa, std::ptr::null_mut());
        libc::sigaction(libc::SIGTERM, &sa, std::ptr::null_mut());
    }
}

fn interrupted() -> bool {
    INTERRUPTED.load(Ordering::SeqCst)
}

/// Sleeps up to `d`, waking early on Ctrl-C.
fn nap(d: Duration) {
    let end = Instant::now() + d;
    while !interrupted() && Instant::now() < end {
        std::thread::sleep(Duration::from_millis(50).min(end - Instant::now()));
    }
}

// ---------------------------------------------------------------------------
// The demo repository of manifests.

/// Fixed identity and dates for the demo's commits, so the same demo always
/// gives the same commit ids and bundle ids.
const COMMIT_DATES: [&str; 2] = ["2026-01-01T12:00:00Z", "2026-01-02T12:00:00Z"];

fn git(dir: &Path, date: &str, args: &[&str]) -> Result<String> {
    let mut c = Command::new("git");
    c.current_dir(dir);
    for who in ["AUTHOR", "COMMITTER"] {
        c.env(format!("GIT_{who}_NAME"), "Cairn Demo");
        c.env(format!("GIT_{who}_EMAIL"), "demo@cairn.invalid");
        c.env(format!("GIT_{who}_DATE"), date);
    }
    c.env("GIT_CONFIG_NOSYSTEM", "1")
        .env("GIT_CONFIG_GLOBAL", "/dev/null")
        .env_remove("GIT_DIR")
        .env_remove("GIT_WORK_TREE")
        .env_remove("GIT_INDEX_FILE")
        .args([
            "-c",
            "commit.gpgsign=false",
            "-c",
            "core.hooksPath=/dev/null",
        ])
        .args(["-c", "core.autocrlf=false", "-c", "init.defaultBranch=main"])
        .args(args)
        .stdin(Stdio::null());
    let out = c.output().with_context(|| {
        format!(
            "running git {} (is git installed and on PATH?)",
            args.join(" ")
        )
    })?;
    if !out.status.success() {
        bail!(
            "git {} in {} failed: {}",
            args.join(" "),
            dir.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

/// The files of the demo repository at `revision` (1 or 2): path and text.
/// Revision 2 changes one line of one ConfigMap (`web-config`).
fn demo_files(revision: u32) -> Vec<(String, String)> {
    let mut files = vec![
        (
            "README.md".to_owned(),
            "# cairn demo\n\nManifests released by `cairn demo`. Non-YAML files are ignored.\n"
                .to_owned(),
        ),
        (
            "cluster/namespace.yaml".to_owned(),
            format!(
                "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: {NAMESPACE}\n  labels:\n    \
                 app.kubernetes.io/part-of: cairn-demo\n"
            ),
        ),
        ("cluster/gadget-crd.yaml".to_owned(), gadget_crd()),
        (
            "gadgets/sprocket.yaml".to_owned(),
            format!(
                "apiVersion: demo.cairn.dev/v1\nkind: Gadget\nmetadata:\n  name: sprocket\n  \
                 namespace: {NAMESPACE}\nspec:\n  color: teal\n  size: 3\n"
            ),
        ),
    ];
    let greeting = format!("Hello from release {revision}");
    let apps: [(&str, u16, usize, &str); 3] = [
        ("web", 8080, 2, "nginx.conf"),
        ("api", 9090, 2, "routes.txt"),
        ("catalog", 7070, 1, "catalog.csv"),
    ];
    for (app, port, replicas, data_file) in apps {
        let mut data = vec![(data_file.to_owned(), app_data(app))];
        if app == "web" {
            data.push(("greeting".to_owned(), greeting.clone()));
        }
        files.push((
            format!("apps/{app}/configmap.yaml"),
            configmap(&format!("{app}-config"), &data),
        ));
        files.push((
            format!("apps/{app}/deployment.yaml"),
            deployment(app, port, replicas),
        ));
        // Two documents in one file: the Service and its ServiceAccount.
        files.push((
            format!("apps/{app}/service.yaml"),
            format!(
                "{}---\napiVersion: v1\nkind: ServiceAccount\nmetadata:\n  name: {app}\n  \
                 namespace: {NAMESPACE}\n",
                service(app, port)
            ),
        ));
    }
    files
}

fn gadget_crd() -> String {
    "apiVersion: apiextensions.k8s.io/v1\nkind: CustomResourceDefinition\nmetadata:\n  \
     name: gadgets.demo.cairn.dev\nspec:\n  group: demo.cairn.dev\n  scope: Namespaced\n  \
     names:\n    plural: gadgets\n    singular: gadget\n    kind: Gadget\n    listKind: GadgetList\n  \
     versions:\n    - name: v1\n      served: true\n      storage: true\n      schema:\n        \
     openAPIV3Schema:\n          type: object\n          properties:\n            spec:\n              \
     type: object\n              properties:\n                color: {type: string}\n                \
     size: {type: integer}\n"
        .to_owned()
}

/// Deterministic file content for an app's ConfigMap, a few KiB (the
/// catalog about 48 KiB), so that "only the changed object moves" is
/// visible in bytes.
fn app_data(app: &str) -> String {
    let mut s = String::new();
    match app {
        "web" => {
            s.push_str("server {\n  listen 8080;\n");
            for i in 0..40 {
                s.push_str(&format!(
                    "  location /shop/{i:03} {{ proxy_pass http://api:9090/items/{i}; }}\n"
                ));
            }
            s.push_str("}\n");
        }
        "api" => {
            for i in 0..80 {
                s.push_str(&format!("GET /items/{i} -> catalog row {i}\n"));
            }
        }
        _ => {
            s.push_str("sku,name,price_cents,stock\n");
            for i in 0..1200u32 {
                s.push_str(&format!(
                    "SKU-{i:05},gadget model {i},{},{}\n",
                    (i * 7919) % 10_000,
                    (i * 31) % 500
                ));
            }
        }
    }
    s
}

fn configmap(name: &str, data: &[(String, String)]) -> String {
    let mut s = format!(
        "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: {name}\n  namespace: {NAMESPACE}\ndata:\n"
    );
    for (k, v) in data {
        if v.contains('\n') {
            s.push_str(&format!("  {k}: |\n"));
            for line in v.lines() {
                s.push_str(&format!("    {line}\n"));
            }
        } else {
            s.push_str(&format!("  {k}: \"{v}\"\n"));
        }
    }
    s
}

fn deployment(app: &str, port: u16, replicas: usize) -> String {
    format!(
        "apiVersion: apps/v1\nkind: Deployment\nmetadata:\n  name: {app}\n  namespace: {NAMESPACE}\n  \
         labels: {{app: {app}}}\nspec:\n  replicas: {replicas}\n  selector:\n    matchLabels: {{app: {app}}}\n  \
         template:\n    metadata:\n      labels: {{app: {app}}}\n    spec:\n      serviceAccountName: {app}\n      \
         containers:\n        - name: {app}\n          image: registry.local/demo/{app}:1.0.0\n          \
         ports: [{{containerPort: {port}}}]\n          envFrom: [{{configMapRef: {{name: {app}-config}}}}]\n          \
         resources:\n            requests: {{cpu: 10m, memory: 32Mi}}\n            limits: {{memory: 64Mi}}\n"
    )
}

fn service(app: &str, port: u16) -> String {
    format!(
        "apiVersion: v1\nkind: Service\nmetadata:\n  name: {app}\n  namespace: {NAMESPACE}\nspec:\n  \
         selector: {{app: {app}}}\n  ports:\n    - port: 80\n      targetPort: {port}\n"
    )
}

/// Writes revision `rev` of the demo files into `repo` and commits them.
/// Returns the commit id.
fn commit_revision(repo: &Path, rev: u32) -> Result<String> {
    let date = COMMIT_DATES[(rev as usize - 1).min(COMMIT_DATES.len() - 1)];
    for (rel, text) in demo_files(rev) {
        let path = repo.join(&rel);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)
                .with_context(|| format!("creating {}", parent.display()))?;
        }
        std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
    }
    git(repo, date, &["add", "--all", "."])?;
    let message = if rev == 1 {
        "demo: three apps, a namespace, a CRD and a gadget".to_owned()
    } else {
        format!("web: greeting for release {rev}")
    };
    git(repo, date, &["commit", "--quiet", "-m", &message])?;
    git(repo, date, &["rev-parse", "HEAD"])
}

// ---------------------------------------------------------------------------
// Bundles and releases (the same calls as `cairn bundle build` and
// `cairn release`).

/// One release the demo made.
#[derive(Clone, Debug)]
struct DemoRelease {
    sequence: u64,
    /// Address of the signed release envelope.
    release: String,
    manifest: Manifest,
    commit: String,
    /// Objects plus the manifest, in bytes (what a fresh agent fetches).
    bytes: u64,
}

fn build_and_release(layout: &Layout, rev: u32, commit: &str) -> Result<DemoRelease> {
    let mut opts = BuildOptions::new(&layout.git);
    opts.source_name = SOURCE_NAME.to_owned();
    let built = build(&opts).context("building the demo bundle")?;
    let file = layout.dir.join("bundles").join(format!("{rev}.bundle"));
    std::fs::create_dir_all(layout.dir.join("bundles"))
        .with_context(|| format!("creating {}", layout.dir.join("bundles").display()))?;
    built.write_file(&file)?;

    let limits = Limits::default();
    let repo = RepoDir::new(&layout.repository);
    let mut chain = TrustChain::embedded().context("embedded root")?;
    chain.extend(&repo.path().display().to_string(), &repo.roots()?)?;
    let key = dev_release_key()?;
    let req = ReleaseRequest {
        channel: CHANNEL.to_owned(),
        expires_in: u64::from(VALID_DAYS) * 86_400,
        rollout: Default::default(),
        selector: Default::default(),
        now: crate::unix_now(),
    };
    let v = publish(&repo, &chain, &file, &[key], &req, &limits)
        .context("releasing the demo bundle")?;
    let envelope = repo
        .channel(CHANNEL, limits.max_release_bytes)?
        .context("the channel head is missing right after releasing")?;
    let manifest = built.manifest;
    Ok(DemoRelease {
        sequence: v.release().sequence,
        release: cairn_keys::sha256_address(&envelope),
        bytes: manifest.total_size() + manifest.encode_all().len(),
        manifest,
        commit: commit.to_owned(),
    })
}

// ---------------------------------------------------------------------------
// Layout, certificates, agents.

/// Where everything lives.
struct Layout {
    dir: PathBuf,
    git: PathBuf,
    repository: PathBuf,
    ca: PathBuf,
    operator: PathBuf,
}

impl Layout {
    fn new(dir: PathBuf) -> Layout {
        Layout {
            git: dir.join("git"),
            repository: dir.join("repository"),
            ca: dir.join("mesh").join("ca"),
            operator: dir.join("mesh").join("operator"),
            dir,
        }
    }

    fn agent_dir(&self, id: &str) -> PathBuf {
        self.dir.join("agents").join(id)
    }
}

/// The demo directory: `--dir` (created; must be empty) or a new one under
/// the temp dir. Returned as an absolute path.
fn demo_dir(requested: Option<PathBuf>) -> Result<PathBuf> {
    let dir = match requested {
        Some(d) => {
            if d.exists() {
                let mut entries = std::fs::read_dir(&d)
                    .with_context(|| format!("{}: not a readable directory", d.display()))?;
                if entries.next().is_some() {
                    bail!(
                        "{} is not empty: the demo needs a fresh directory (remove it or pick another --dir)",
                        d.display()
                    );
                }
            }
            std::fs::create_dir_all(&d).with_context(|| format!("creating {}", d.display()))?;
            d
        }
        None => tempfile::Builder::new()
            .prefix("cairn-demo-")
            .tempdir()
            .context("creating a directory under the system temp dir (or give --dir)")?
            .keep(),
    };
    std::fs::canonicalize(&dir).with_context(|| format!("resolving {}", dir.display()))
}

/// `cairn-agent` next to this executable.
fn agent_binary() -> Result<PathBuf> {
    let exe = std::env::current_exe().context("finding this executable")?;
    let path = exe.with_file_name("cairn-agent");
    if !path.is_file() {
        bail!(
            "cairn-agent not found next to this cairn (looked for {}): build it with `cargo build --release --bins`",
            path.display()
        );
    }
    Ok(path)
}

/// Free TCP ports on 127.0.0.1 (all held until every one is picked, so
/// they differ).
fn free_ports(n: usize) -> Result<Vec<u16>> {
    let listeners: Vec<TcpListener> = (0..n)
        .map(|_| TcpListener::bind("127.0.0.1:0"))
        .collect::<std::io::Result<_>>()
        .context("finding free ports on 127.0.0.1")?;
    listeners
        .iter()
        .map(|l| Ok(l.local_addr()?.port()))
        .collect()
}

/// YAML double-quoted scalar (JSON strings are valid YAML).
fn q(s: impl AsRef<str>) -> String {
    serde_json::Value::String(s.as_ref().to_owned()).to_string()
}

fn qp(p: &Path) -> String {
    q(p.display().to_string())
}

/// One agent of the demo.
struct DemoAgent {
    id: String,
    config: PathBuf,
    data: PathBuf,
    target: PathBuf,
    log: PathBuf,
    http: SocketAddr,
    mesh: SocketAddr,
    fed_by_source: bool,
    child: Option<Child>,
    /// Its process id, once started.
    started_pid: Option<u32>,
    /// Exit status once it has exited.
    exited: Option<String>,
}

impl DemoAgent {
    fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    fn running(&self) -> bool {
        self.child.is_some()
    }
}

fn write_agent(
    layout: &Layout,
    index: usize,
    http: u16,
    mesh: u16,
    previous_mesh: Option<SocketAddr>,
) -> Result<DemoAgent> {
    let id = format!("demo-{}", index + 1);
    let dir = layout.agent_dir(&id);
    let cert = dir.join("cert");
    pki::issue_to_dir(
        &layout.ca,
        &PeerIdentity::Agent(
            cairn_core::AgentId::parse(&id).with_context(|| format!("demo agent id {id}"))?,
        ),
        &cert,
        crate::unix_now(),
        VALID_DAYS,
    )
    .with_context(|| format!("issuing the certificate of {id}"))?;
    let http: SocketAddr = SocketAddr::from(([127, 0, 0, 1], http));
    let mesh: SocketAddr = SocketAddr::from(([127, 0, 0, 1], mesh));
    let fed_by_source = index == 0;
    let data = dir.join("data");
    let target = dir.join("manifests");
    let sources = if fed_by_source {
        format!("\n  - {}", qp(&layout.repository))
    } else {
        " []".to_owned()
    };
    let peers = previous_mesh.map(|a| q(a.to_string())).unwrap_or_default();
    let text = format!(
        "# Written by `cairn demo`. Reference: docs/OPERATIONS.md.\n\
         agentId: {id}\n\
         dataDir: {data}\n\
         channel: {CHANNEL}\n\
         labels: {{demo: \"true\", position: \"{pos}\"}}\n\
         sources:{sources}\n\
         pollInterval: 1s\n\
         reconcileInterval: 10s\n\
         maxBackoff: 2s\n\
         requestTimeout: 10s\n\
         target:\n  manifestsDir: {target}\n\
         listen:\n  http: {http}\n\
         mesh:\n  listen: {mesh}\n  cert: {crt}\n  key: {key}\n  ca: {ca}\n  peers: [{peers}]\n  \
         antiEntropyInterval: 1s\n\
         # The demo's releases are signed with the development key, so its agents\n\
         # must run with the development root. Never set this in production.\n\
         insecureAllowDevelopmentRoot: true\n",
        data = qp(&data),
        pos = index + 1,
        target = qp(&target),
        http = q(http.to_string()),
        mesh = q(mesh.to_string()),
        crt = qp(&cert.join("agent.crt")),
        key = qp(&cert.join("agent.key")),
        ca = qp(&cert.join(pki::CA_CERT_FILE)),
    );
    let config = dir.join("config.yaml");
    std::fs::write(&config, text).with_context(|| format!("writing {}", config.display()))?;
    Ok(DemoAgent {
        log: dir.join("agent.log"),
        id,
        config,
        data,
        target,
        http,
        mesh,
        fed_by_source,
        child: None,
        started_pid: None,
        exited: None,
    })
}

fn spawn_agent(agent_bin: &Path, a: &mut DemoAgent) -> Result<()> {
    use std::os::unix::process::CommandExt;
    let log =
        std::fs::File::create(&a.log).with_context(|| format!("creating {}", a.log.display()))?;
    let child = Command::new(agent_bin)
        .args(["run", "--log-format", "json", "--config"])
        .arg(&a.config)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        // Its own process group: the terminal's Ctrl-C goes to the demo,
        // which stops the agents in order (and --keep-running survives).
        .process_group(0)
        .spawn()
        .with_context(|| format!("starting {} for {}", agent_bin.display(), a.id))?;
    a.started_pid = Some(child.id());
    a.child = Some(child);
    Ok(())
}

/// The running agents; stops them when dropped unless kept.
struct Fleet {
    agents: Vec<DemoAgent>,
    keep: bool,
}

impl Fleet {
    /// SIGTERM to every agent, then wait (SIGKILL after 10 s).
    fn stop(&mut self) {
        for a in &self.agents {
            if let Some(pid) = a.pid() {
                if let Ok(pid) = i32::try_from(pid) {
                    // SAFETY: signalling our own child process.
                    unsafe {
                        libc::kill(pid, libc::SIGTERM);
                    }
                }
            }
        }
        let end = Instant::now() + Duration::from_secs(10);
        for a in &mut self.agents {
            if let Some(mut c) = a.child.take() {
                loop {
                    match c.try_wait() {
                        Ok(Some(st)) => {
                            a.exited = Some(st.to_string());
                            break;
                        }
                        Ok(None) if Instant::now() < end => {
                            std::thread::sleep(Duration::from_millis(50))
                        }
                        _ => {
                            let _ = c.kill();
                            let _ = c.wait();
                            break;
                        }
                    }
                }
            }
        }
    }

    /// Notes agents that exited (with the tail of their log).
    fn check_exits(&mut self) -> Result<()> {
        for a in &mut self.agents {
            if let Some(c) = a.child.as_mut() {
                if let Ok(Some(st)) = c.try_wait() {
                    a.exited = Some(st.to_string());
                    a.child = None;
                    bail!(
                        "agent {} exited ({st}); the end of {}:\n{}",
                        a.id,
                        a.log.display(),
                        log_tail(&a.log, 12)
                    );
                }
            }
        }
        Ok(())
    }
}

impl Drop for Fleet {
    fn drop(&mut self) {
        if !self.keep {
            self.stop();
        }
    }
}

fn log_tail(path: &Path, n: usize) -> String {
    let text = std::fs::read(path)
        .map(|b| String::from_utf8_lossy(&b).into_owned())
        .unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..]
        .iter()
        .map(|l| format!("  {l}"))
        .collect::<Vec<_>>()
        .join("\n")
}

// ---------------------------------------------------------------------------
// Observing the agents.

/// What one agent shows, from its status file and `/metrics`.
#[derive(Clone, Debug, Default, PartialEq)]
struct Observed {
    sequence: u64,
    bundle: String,
    reconciled: Option<u64>,
    reconcile_ok: bool,
    files: usize,
    peer_bytes: u64,
    peer_objects: u64,
    peers: u64,
}

impl Observed {
    fn converged(&self, seq: u64, files: usize) -> bool {
        self.sequence == seq
            && self.reconcile_ok
            && self.reconciled == Some(seq)
            && self.files == files
    }
}

/// Largest status file or `/metrics` body read.
const MAX_OBSERVE_BYTES: u64 = 4 << 20;

fn observe(a: &DemoAgent) -> Observed {
    let mut o = Observed::default();
    let status = std::fs::File::open(a.data.join("status.json"))
        .ok()
        .and_then(|f| {
            let mut buf = Vec::new();
            f.take(MAX_OBSERVE_BYTES).read_to_end(&mut buf).ok()?;
            serde_json::from_slice::<serde_json::Value>(&buf).ok()
        });
    if let Some(s) = status {
        o.sequence = s["adopted"]["sequence"].as_u64().unwrap_or(0);
        o.bundle = s["adopted"]["bundle"].as_str().unwrap_or("").to_owned();
        o.reconciled = s["reconcile"]["sequence"].as_u64();
        o.reconcile_ok = s["reconcile"]["ok"].as_bool().unwrap_or(false);
    }
    o.files = count_files(&a.target);
    if let Some(m) = http_get(a.http, "/metrics") {
        o.peer_bytes = metric(&m, "cairn_mesh_object_bytes_fetched_total", "from=\"peer\"");
        o.peer_objects = metric(&m, "cairn_mesh_objects_fetched_total", "from=\"peer\"");
        o.peers = metric(&m, "cairn_mesh_peers_connected", "");
    }
    o
}

/// Files in a manifests directory (not the agent's hidden temporaries).
fn count_files(dir: &Path) -> usize {
    std::fs::read_dir(dir)
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .filter(|e| !e.file_name().to_string_lossy().starts_with('.'))
                .filter(|e| e.file_type().is_ok_and(|t| t.is_file()))
                .count()
        })
        .unwrap_or(0)
}

/// A plain HTTP/1.0 GET on 127.0.0.1 (no chunked encoding), bounded in
/// time and size. `None` on any failure.
fn http_get(addr: SocketAddr, path: &str) -> Option<String> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(1)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    s.set_write_timeout(Some(Duration::from_secs(2))).ok()?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").ok()?;
    let mut buf = Vec::new();
    s.take(MAX_OBSERVE_BYTES).read_to_end(&mut buf).ok()?;
    let text = String::from_utf8_lossy(&buf);
    let (head, body) = text.split_once("\r\n\r\n")?;
    if !head.starts_with("HTTP/1.") || !head.split_whitespace().nth(1)?.starts_with('2') {
        return None;
    }
    Some(body.to_owned())
}

/// Sum of the samples of `name` whose labels contain `filter`.
fn metric(text: &str, name: &str, filter: &str) -> u64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let rest = l.strip_prefix(name)?;
            if !(rest.starts_with('{') || rest.starts_with(' ')) || !rest.contains(filter) {
                return None;
            }
            rest.rsplit(' ').next()?.parse::<f64>().ok()
        })
        .map(|v| v.max(0.0) as u64)
        .sum()
}

// ---------------------------------------------------------------------------
// Showing progress.

fn human_bytes(n: u64) -> String {
    if n < 1024 {
        format!("{n} B")
    } else if n < 1024 * 1024 {
        format!("{:.1} KiB", n as f64 / 1024.0)
    } else {
        format!("{:.1} MiB", n as f64 / (1024.0 * 1024.0))
    }
}

fn short(id: &str) -> &str {
    id.get(..15).unwrap_or(id)
}

/// Progress for one phase: a bar per agent on a terminal, otherwise one
/// plain line whenever an agent's state changes.
struct Display {
    bars: Option<(MultiProgress, Vec<ProgressBar>)>,
    last: Vec<String>,
}

impl Display {
    fn new(agents: &[DemoAgent], files: usize, interactive: bool) -> Display {
        let bars = interactive.then(|| {
            let multi = MultiProgress::with_draw_target(ProgressDrawTarget::stderr());
            let style = ProgressStyle::with_template(
                "  {prefix:<8} [{bar:16.green/white}] {pos:>3}/{len} files  {wide_msg}",
            )
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> ");
            let bars = agents
                .iter()
                .map(|a| {
                    let b = multi.add(ProgressBar::new(files as u64));
                    b.set_style(style.clone());
                    b.set_prefix(a.id.clone());
                    b
                })
                .collect();
            (multi, bars)
        });
        Display {
            bars,
            last: vec![String::new(); agents.len()],
        }
    }

    fn update(&mut self, i: usize, a: &DemoAgent, o: &Observed, seq: u64, files: usize, base: u64) {
        let done = o.converged(seq, files);
        let from = if a.fed_by_source {
            "from the repository".to_owned()
        } else {
            format!(
                "{} from peers",
                human_bytes(o.peer_bytes.saturating_sub(base))
            )
        };
        let state = if done {
            "converged".to_owned()
        } else if o.sequence == seq {
            "adopted, reconciling".to_owned()
        } else if o.sequence == 0 {
            "waiting".to_owned()
        } else {
            format!("at {}", o.sequence)
        };
        let release = if o.sequence == 0 {
            "-".to_owned()
        } else {
            o.sequence.to_string()
        };
        let msg = format!("release {release}, {from}, {state}");
        match &self.bars {
            Some((_, bars)) => {
                if let Some(b) = bars.get(i) {
                    let pos = if o.sequence == seq {
                        o.files.min(files)
                    } else {
                        0
                    };
                    b.set_position(pos as u64);
                    b.set_message(msg);
                }
            }
            None => {
                let line = format!(
                    "  {:<8} {}/{} files  {msg}",
                    a.id,
                    if o.sequence == seq { o.files } else { 0 },
                    files
                );
                if self.last.get(i) != Some(&line) {
                    eprintln!("{line}");
                    if let Some(l) = self.last.get_mut(i) {
                        *l = line;
                    }
                }
            }
        }
    }

    fn finish(self) {
        if let Some((_, bars)) = self.bars {
            for b in bars {
                b.abandon();
            }
        }
    }
}

/// Waits until every agent has reconciled release `seq` into `files`
/// files, showing progress. Returns the last observations and the ids that
/// did not converge (empty on success).
fn wait_converged(
    fleet: &mut Fleet,
    seq: u64,
    files: usize,
    base: &[u64],
    timeout: Duration,
    interactive: bool,
) -> Result<(Vec<Observed>, Vec<String>)> {
    let mut display = Display::new(&fleet.agents, files, interactive);
    let end = Instant::now() + timeout;
    let mut obs: Vec<Observed>;
    let result = loop {
        obs = fleet.agents.iter().map(observe).collect();
        for (i, (a, o)) in fleet.agents.iter().zip(&obs).enumerate() {
            display.update(i, a, o, seq, files, base.get(i).copied().unwrap_or(0));
        }
        let pending: Vec<String> = fleet
            .agents
            .iter()
            .zip(&obs)
            .filter(|(_, o)| !o.converged(seq, files))
            .map(|(a, _)| a.id.clone())
            .collect();
        if pending.is_empty() {
            break Ok(Vec::new());
        }
        if let Err(e) = fleet.check_exits() {
            break Err(e);
        }
        if interrupted() {
            break Err(anyhow::anyhow!("interrupted by Ctrl-C"));
        }
        if Instant::now() >= end {
            break Ok(pending);
        }
        nap(Duration::from_millis(250));
    };
    display.finish();
    result.map(|pending| (obs, pending))
}

// ---------------------------------------------------------------------------
// The demo.

/// Everything the summary reports.
struct Outcome {
    releases: Vec<DemoRelease>,
    observed: Vec<Observed>,
    /// Peer bytes/objects each agent had fetched before release 2.
    base: Vec<(u64, u64)>,
    not_converged: Vec<String>,
    error: Option<String>,
}

pub(super) fn run(a: DemoArgs) -> Result<()> {
    // Before anything is written: a build for an organisation's root has
    // no development key (and its agents would reject the demo releases).
    dev_release_key()?;
    let agent_bin = agent_binary()?;
    let cairn_bin = std::env::current_exe().context("finding this executable")?;
    let layout = Layout::new(demo_dir(a.dir.clone())?);
    install_interrupt_handler();
    let interactive = std::io::stderr().is_terminal();
    let n = usize::from(a.agents);

    eprintln!(
        "cairn demo: the whole loop on one machine, in {}",
        layout.dir.display()
    );

    // 1. A Git repository of manifests.
    std::fs::create_dir_all(&layout.git)
        .with_context(|| format!("creating {}", layout.git.display()))?;
    git(&layout.git, COMMIT_DATES[0], &["init", "--quiet"])?;
    let commit1 = commit_revision(&layout.git, 1)?;
    eprintln!(
        "[1/6] Git repository of manifests: {} (commit {})",
        layout.git.display(),
        short(&commit1)
    );

    // 2. Bundle and release 1.
    let r1 = build_and_release(&layout, 1, &commit1)?;
    eprintln!(
        "[2/6] built bundle {} ({} objects, {}) and released it as `{CHANNEL}` sequence {}, signed with the development release key",
        short(&r1.manifest.id()),
        r1.manifest.entries.len(),
        human_bytes(r1.bytes),
        r1.sequence
    );
    eprintln!("      repository: {}", layout.repository.display());
    // The key as a file, so `cairn release` can be tried by hand.
    let key_file = layout.dir.join("keys").join("dev-release-1.key");
    std::fs::create_dir_all(layout.dir.join("keys"))?;
    cairn_keys::fs::write_atomic(&key_file, dev_release_key_bytes()?, Some(0o600))
        .with_context(|| format!("writing {}", key_file.display()))?;

    // 3. Mesh PKI.
    let now = crate::unix_now();
    pki::init_ca_dir(&layout.ca, "demo", now, VALID_DAYS).context("creating the mesh CA")?;
    pki::issue_to_dir(
        &layout.ca,
        &PeerIdentity::Operator("demo".into()),
        &layout.operator,
        now,
        VALID_DAYS,
    )
    .context("issuing the operator certificate")?;
    let ports = free_ports(2 * n)?;
    let mut agents = Vec::with_capacity(n);
    for i in 0..n {
        let prev = i
            .checked_sub(1)
            .map(|p: usize| SocketAddr::from(([127, 0, 0, 1], ports[2 * p + 1])));
        agents.push(write_agent(
            &layout,
            i,
            ports[2 * i],
            ports[2 * i + 1],
            prev,
        )?);
    }
    eprintln!(
        "[3/6] mesh CA {}, {n} agent certificate(s), an operator certificate",
        layout.ca.display()
    );

    // 4. Agents.
    let mut fleet = Fleet {
        agents,
        keep: a.keep_running,
    };
    for ag in &mut fleet.agents {
        spawn_agent(&agent_bin, ag)?;
    }
    let line: Vec<&str> = fleet.agents.iter().map(|x| x.id.as_str()).collect();
    eprintln!(
        "[4/6] started {n} agent(s) in a line: repository -> {} (each with a manifests-dir target)",
        line.join(" <-> ")
    );
    eprintln!(
        "      waiting for release 1 to reach every target (up to {:?}) ...",
        a.timeout
    );
    let files1 = r1.manifest.entries.len();
    let mut outcome = Outcome {
        releases: vec![r1],
        observed: Vec::new(),
        base: vec![(0, 0); n],
        not_converged: Vec::new(),
        error: None,
    };
    let result = (|| -> Result<()> {
        let (obs, pending) =
            wait_converged(&mut fleet, 1, files1, &vec![0; n], a.timeout, interactive)?;
        outcome.observed = obs;
        if !pending.is_empty() {
            outcome.not_converged = pending;
            return Ok(());
        }
        outcome.base = outcome
            .observed
            .iter()
            .map(|o| (o.peer_bytes, o.peer_objects))
            .collect();

        // 5. Change one ConfigMap, release 2.
        let commit2 = commit_revision(&layout.git, 2)?;
        let r2 = build_and_release(&layout, 2, &commit2)?;
        let d = diff(&outcome.releases[0].manifest, &r2.manifest);
        let changed: Vec<String> = d.changed.iter().map(|c| c.new.display_name()).collect();
        eprintln!(
            "[5/6] changed {} (commit {}), released as sequence {}: {} changed, {} added, {} removed, {} unchanged",
            changed.join(", "),
            short(&commit2),
            r2.sequence,
            d.changed.len(),
            d.added.len(),
            d.removed.len(),
            d.unchanged
        );
        let files2 = r2.manifest.entries.len();
        outcome.releases.push(r2);
        let base: Vec<u64> = outcome.base.iter().map(|b| b.0).collect();
        let (obs, pending) = wait_converged(&mut fleet, 2, files2, &base, a.timeout, interactive)?;
        outcome.observed = obs;
        outcome.not_converged = pending;
        Ok(())
    })();
    if let Err(e) = result {
        if outcome.observed.is_empty() {
            outcome.observed = fleet.agents.iter().map(observe).collect();
        }
        outcome.error = Some(super::error_chain(&e));
    }
    let converged =
        outcome.error.is_none() && outcome.not_converged.is_empty() && outcome.releases.len() == 2;
    if converged {
        report_delta(&fleet, &outcome);
    }
    print_where(&layout, &fleet, &cairn_bin, &agent_bin, &key_file, a.json);
    if converged && !fleet.keep && interactive && !a.json {
        eprintln!(
            "\nThe agents keep running so you can try the commands above; press Ctrl-C to stop them \
             (or use --keep-running to leave them in the background)."
        );
        while !interrupted() {
            if fleet.check_exits().is_err() {
                break;
            }
            nap(Duration::from_millis(250));
        }
    }
    if fleet.keep {
        print_pids(&fleet);
    } else {
        fleet.stop();
        eprintln!(
            "stopped {n} agent(s); everything stays in {}",
            layout.dir.display()
        );
    }
    if a.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&summary(&layout, &fleet, &outcome, converged))?
        );
    }
    if converged {
        return Ok(());
    }
    for id in &outcome.not_converged {
        if let Some((ag, ob)) = fleet
            .agents
            .iter()
            .zip(&outcome.observed)
            .find(|(ag, _)| &ag.id == id)
        {
            eprintln!(
                "{id}: adopted sequence {}, last reconcile {}, {} file(s) in {}; the end of {}:\n{}",
                ob.sequence,
                match (ob.reconciled, ob.reconcile_ok) {
                    (Some(s), true) => format!("ok at sequence {s}"),
                    (Some(s), false) => format!("FAILED at sequence {s}"),
                    (None, _) => "none".to_owned(),
                },
                ob.files,
                ag.target.display(),
                ag.log.display(),
                log_tail(&ag.log, 6)
            );
        }
    }
    let why = match (&outcome.error, outcome.not_converged.is_empty()) {
        (Some(e), _) => e.clone(),
        (None, false) => format!(
            "release {} did not reach {} within {:?} (raise --timeout, or read their agent.log)",
            outcome.releases.len(),
            outcome.not_converged.join(", "),
            a.timeout
        ),
        (None, true) => "the demo did not finish".to_owned(),
    };
    bail!("{why}")
}

fn report_delta(fleet: &Fleet, o: &Outcome) {
    let Some(r2) = o.releases.get(1) else { return };
    eprintln!("[6/6] release 2 is everywhere. What moved over the mesh for it:");
    for ((a, ob), (b_bytes, b_objects)) in fleet.agents.iter().zip(&o.observed).zip(&o.base) {
        if a.fed_by_source {
            eprintln!("      {:<8} read it from the repository", a.id);
        } else {
            eprintln!(
                "      {:<8} {} object(s), {} from peers (release 1: {})",
                a.id,
                ob.peer_objects.saturating_sub(*b_objects),
                human_bytes(ob.peer_bytes.saturating_sub(*b_bytes)),
                human_bytes(*b_bytes)
            );
        }
    }
    eprintln!(
        "      the full bundle is {} in {} objects: only the changed object and the new manifest moved",
        human_bytes(r2.bytes),
        r2.manifest.entries.len()
    );
}

/// A path as one shell word (single-quoted when it needs to be), for
/// commands the user copies.
fn sh(p: &Path) -> String {
    let t = p.display().to_string();
    if !t.is_empty()
        && t.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"/._-+:,=".contains(&b))
    {
        t
    } else {
        format!("'{}'", t.replace('\'', "'\\''"))
    }
}

fn print_where(
    layout: &Layout,
    fleet: &Fleet,
    cairn: &Path,
    agent: &Path,
    key: &Path,
    to_stderr: bool,
) {
    let first = fleet.agents.first();
    let last = fleet.agents.last();
    let mut s = String::new();
    s.push_str(&format!("\nEverything is in {}:\n", layout.dir.display()));
    s.push_str(&format!(
        "  git/         the manifests (Git)        {}\n",
        sh(&layout.git)
    ));
    s.push_str("  repository/  the signed bundle repository (agent 1's source)\n");
    s.push_str("  bundles/     the bundle files; mesh/ the CA and the operator certificate\n");
    s.push_str("  agents/ID/   config.yaml, data/ (store, status.json), manifests/ (the target), agent.log\n");
    s.push_str("\nInspect it:\n");
    if let Some(l) = last {
        s.push_str(&format!(
            "  {} fleet status --peer {} --cert {} --key {} --ca {}\n",
            sh(cairn),
            l.mesh,
            sh(&layout.operator.join("operator.crt")),
            sh(&layout.operator.join("operator.key")),
            sh(&layout.operator.join(pki::CA_CERT_FILE))
        ));
        s.push_str(&format!(
            "  {} status --config {}\n",
            sh(agent),
            sh(&l.config)
        ));
        s.push_str(&format!("  ls {}\n", sh(&l.target)));
        s.push_str(&format!(
            "  curl -s http://{}/metrics | grep cairn_mesh\n",
            l.http
        ));
    }
    s.push_str(&format!(
        "  {} verify --repo {} --channel {CHANNEL}\n",
        sh(cairn),
        sh(&layout.repository)
    ));
    if let Some(f) = first {
        s.push_str("\nRelease a change yourself (while the agents run):\n");
        s.push_str(&format!(
            "  cd {git} && sed -i 's/release 2/release 3/' apps/web/configmap.yaml && git -c user.name=demo -c user.email=demo@cairn.invalid commit -qam 'release 3'\n",
            git = sh(&layout.git)
        ));
        s.push_str(&format!(
            "  {c} bundle build --git {git} --source-name {SOURCE_NAME} --out {b}\n",
            c = sh(cairn),
            git = sh(&layout.git),
            b = sh(&layout.dir.join("bundles").join("3.bundle"))
        ));
        s.push_str(&format!(
            "  {c} release --repo {r} --bundle {b} --channel {CHANNEL} --key {k}\n",
            c = sh(cairn),
            r = sh(&layout.repository),
            b = sh(&layout.dir.join("bundles").join("3.bundle")),
            k = sh(key)
        ));
        s.push_str(&format!(
            "  (agent {} polls the repository every second; the others get it over the mesh)\n",
            f.id
        ));
    }
    if to_stderr {
        eprint!("{s}");
    } else {
        print!("{s}");
    }
}

fn print_pids(fleet: &Fleet) {
    let pids: Vec<String> = fleet
        .agents
        .iter()
        .filter_map(|a| a.pid().map(|p| format!("{} pid {p}", a.id)))
        .collect();
    let bare: Vec<String> = fleet
        .agents
        .iter()
        .filter_map(|a| a.pid().map(|p| p.to_string()))
        .collect();
    eprintln!("\nThe agents keep running: {}", pids.join(", "));
    eprintln!("Stop them with: kill {}", bare.join(" "));
}

/// The `--json` summary (format 1; fields are only added).
fn summary(layout: &Layout, fleet: &Fleet, o: &Outcome, converged: bool) -> serde_json::Value {
    let releases: Vec<serde_json::Value> = o
        .releases
        .iter()
        .map(|r| {
            serde_json::json!({
                "sequence": r.sequence,
                "release": r.release,
                "bundle": r.manifest.id(),
                "commit": r.commit,
                "objects": r.manifest.entries.len(),
                "bytes": r.bytes,
            })
        })
        .collect();
    let second = o.releases.len() == 2;
    let agents: Vec<serde_json::Value> = fleet
        .agents
        .iter()
        .enumerate()
        .map(|(i, a)| {
            let ob = o.observed.get(i).cloned().unwrap_or_default();
            let (bb, bo) = o.base.get(i).copied().unwrap_or((0, 0));
            let latest = o.releases.last();
            let ok = latest.is_some_and(|r| ob.converged(r.sequence, r.manifest.entries.len()));
            serde_json::json!({
                "id": a.id,
                "pid": a.started_pid,
                "running": a.running(),
                "exited": a.exited,
                "config": a.config,
                "data_dir": a.data,
                "target_dir": a.target,
                "log": a.log,
                "http": a.http.to_string(),
                "mesh": a.mesh.to_string(),
                "source": a.fed_by_source,
                "adopted_sequence": ob.sequence,
                "bundle": ob.bundle,
                "files_in_target": ob.files,
                "bytes_fetched_from_peers": ob.peer_bytes,
                "objects_fetched_from_peers": ob.peer_objects,
                "delta_bytes_fetched_from_peers": if second { Some(ob.peer_bytes.saturating_sub(bb)) } else { None },
                "delta_objects_fetched_from_peers": if second { Some(ob.peer_objects.saturating_sub(bo)) } else { None },
                "converged": ok,
            })
        })
        .collect();
    let delta = match (o.releases.first(), o.releases.get(1)) {
        (Some(r1), Some(r2)) => {
            let d = diff(&r1.manifest, &r2.manifest);
            let moved = fleet
                .agents
                .iter()
                .zip(&o.observed)
                .zip(&o.base)
                .filter(|((a, _), _)| !a.fed_by_source)
                .map(|((_, ob), (bb, _))| ob.peer_bytes.saturating_sub(*bb))
                .max()
                .unwrap_or(0);
            serde_json::json!({
                "changed_objects": d.changed.len(),
                "added_objects": d.added.len(),
                "removed_objects": d.removed.len(),
                "bytes": moved,
                "full_bytes": r2.bytes,
            })
        }
        _ => serde_json::Value::Null,
    };
    serde_json::json!({
        "format": SUMMARY_FORMAT,
        "converged": converged,
        "error": o.error,
        "not_converged": o.not_converged,
        "dir": layout.dir,
        "channel": CHANNEL,
        "repository": layout.repository,
        "operator": {
            "cert": layout.operator.join("operator.crt"),
            "key": layout.operator.join("operator.key"),
            "ca": layout.operator.join(pki::CA_CERT_FILE),
        },
        "releases": releases,
        "agents": agents,
        "delta": delta,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_demo_files_parse_and_revision_two_changes_one_configmap() {
        let parse = |rev| -> Vec<crate::manifests::ParsedObject> {
            demo_files(rev)
                .into_iter()
                .filter(|(p, _)| p.ends_with(".yaml"))
                .flat_map(|(p, t)| {
                    crate::manifests::parse_file(
                        &p,
                        t.as_bytes(),
                        Limits::default().max_object_bytes,
                    )
                    .unwrap_or_else(|e| panic!("{p}: {e}"))
                })
                .collect()
        };
        let (one, two) = (parse(1), parse(2));
        assert_eq!(one.len(), two.len());
        let kinds: std::collections::BTreeSet<&str> = one.iter().map(|o| o.kind.as_str()).collect();
        for k in [
            "Namespace",
            "CustomResourceDefinition",
            "Gadget",
            "Deployment",
            "Service",
            "ConfigMap",
            "ServiceAccount",
        ] {
            assert!(kinds.contains(k), "{k} missing");
        }
        let changed: Vec<&str> = one
            .iter()
            .zip(&two)
            .filter(|(a, b)| a.bytes != b.bytes)
            .map(|(a, _)| a.name.as_str())
            .collect();
        assert_eq!(changed, ["web-config"]);
    }

    #[test]
    fn printed_paths_are_one_shell_word() {
        assert_eq!(
            sh(Path::new("/tmp/cairn-demo-x1/git")),
            "/tmp/cairn-demo-x1/git"
        );
        assert_eq!(sh(Path::new("/tmp/my demo")), "'/tmp/my demo'");
        assert_eq!(sh(Path::new("/tmp/it's")), "'/tmp/it'\\''s'");
    }

    #[test]
    fn metrics_are_summed_by_label() {
        let text = "# HELP x\ncairn_mesh_object_bytes_fetched_total{from=\"peer\"} 1200\n\
                    cairn_mesh_object_bytes_fetched_total{from=\"source\"} 7\n\
                    cairn_mesh_peers_connected 2\ncairn_mesh_peers_connected_x 9\n";
        assert_eq!(
            metric(
                text,
                "cairn_mesh_object_bytes_fetched_total",
                "from=\"peer\""
            ),
            1200
        );
        assert_eq!(metric(text, "cairn_mesh_peers_connected", ""), 2);
        assert_eq!(metric(text, "cairn_missing", ""), 0);
    }

    #[test]
    fn the_embedded_development_key_is_a_release_key_of_the_development_root() {
        let root = cairn_keys::embedded::root().unwrap();
        match dev_release_key() {
            Ok(key) => assert!(root.root().release.key_ids.contains(&key.key_id())),
            Err(e) => {
                assert!(!cairn_keys::embedded::is_development());
                assert!(e.to_string().contains("does not contain that key"), "{e}");
            }
        }
    }
}
