//! Agent configuration files ([`AgentConfig`]), the mesh PKI made with the
//! real `cairn` CLI ([`mesh_ca_init`], [`mesh_issue`]) and the one
//! [`Fleet`] of agent processes the mesh and rollout tests drive.

use crate::cargo_bin;
use crate::loopback::LoopbackBlock;
use crate::process::{ok, spawn_agent, tail, wait_until, AgentProcess};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

/// The `mesh:` section of an [`AgentConfig`].
#[derive(Clone, Debug)]
pub struct MeshConfig {
    /// `host:port` the agent listens on.
    pub listen: String,
    /// A `cairn mesh issue` output directory (`agent.crt`, `agent.key`, `ca.crt`).
    pub cert: PathBuf,
    /// Seed peers, `host:port`.
    pub seeds: Vec<String>,
}

/// An agent configuration file for tests: a development root (allowed),
/// channel `stable`, 1 s poll and reconcile intervals, 2 s maximum
/// backoff. The one place tests write agent configs.
#[derive(Clone, Debug)]
pub struct AgentConfig {
    /// `agentId`, if set.
    pub id: Option<String>,
    /// `dataDir`.
    pub data_dir: PathBuf,
    /// `labels`, as a YAML flow map (`{site: s1}`), if any.
    pub labels: Option<String>,
    /// `sources` (directories or URLs).
    pub sources: Vec<String>,
    /// `requestTimeout` (the agent's default when `None`).
    pub request_timeout: Option<String>,
    /// The `target:` section, a whole YAML block ending in a newline.
    pub target: String,
    /// YAML lines inserted after the target (ending in a newline).
    pub extra: String,
    /// `listen.http` as YAML (`127.0.0.1:0`, `"off"`).
    pub http: String,
    /// The `mesh:` section, if any.
    pub mesh: Option<MeshConfig>,
}

impl AgentConfig {
    /// A config with the given data directory and a manifests-directory
    /// target; `requestTimeout: 10s`, HTTP on 127.0.0.1:0, no sources.
    pub fn new(data_dir: &Path, manifests_dir: &Path) -> AgentConfig {
        AgentConfig {
            id: None,
            data_dir: data_dir.to_path_buf(),
            labels: None,
            sources: Vec::new(),
            request_timeout: Some("10s".into()),
            target: format!("target:\n  manifestsDir: {}\n", manifests_dir.display()),
            extra: String::new(),
            http: "127.0.0.1:0".into(),
            mesh: None,
        }
    }

    /// The YAML text.
    pub fn yaml(&self) -> String {
        let mut t = String::from("insecureAllowDevelopmentRoot: true\n");
        if let Some(id) = &self.id {
            t += &format!("agentId: {id}\n");
        }
        t += &format!("dataDir: {}\nchannel: stable\n", self.data_dir.display());
        if let Some(l) = &self.labels {
            t += &format!("labels: {l}\n");
        }
        if self.sources.is_empty() {
            t += "sources: []\n";
        } else {
            t += "sources:\n";
            for s in &self.sources {
                t += &format!("  - {s}\n");
            }
        }
        t += "pollInterval: 1s\nreconcileInterval: 1s\nmaxBackoff: 2s\n";
        if let Some(r) = &self.request_timeout {
            t += &format!("requestTimeout: {r}\n");
        }
        t += &self.target;
        t += &self.extra;
        t += &format!("listen:\n  http: {}\n", self.http);
        if let Some(m) = &self.mesh {
            let seeds: Vec<String> = m.seeds.iter().map(|s| format!("\"{s}\"")).collect();
            t += &format!(
                "mesh:\n  listen: {listen}\n  cert: {c}/agent.crt\n  key: {c}/agent.key\n  \
                 ca: {c}/ca.crt\n  peers: [{p}]\n  antiEntropyInterval: 1s\n",
                listen = m.listen,
                c = m.cert.display(),
                p = seeds.join(", "),
            );
        }
        t
    }

    /// Writes the YAML to `path` (creating its directory); returns `path`.
    pub fn write(&self, path: &Path) -> PathBuf {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).unwrap_or_else(|e| panic!("mkdir {}: {e}", dir.display()));
        }
        std::fs::write(path, self.yaml())
            .unwrap_or_else(|e| panic!("write config {}: {e}", path.display()));
        path.to_path_buf()
    }
}

/// `cairn mesh ca init --out <out>`: a fleet CA made with the CLI.
pub fn mesh_ca_init(out: &Path) -> PathBuf {
    ok(Command::new(cargo_bin("cairn"))
        .args(["mesh", "ca", "init", "--out"])
        .arg(out));
    out.to_path_buf()
}

/// `cairn mesh issue --ca <ca> --agent-id <id> --out <out>`: an agent's
/// certificate directory.
pub fn mesh_issue(ca: &Path, id: &str, out: &Path) -> PathBuf {
    ok(Command::new(cargo_bin("cairn"))
        .args(["mesh", "issue", "--ca"])
        .arg(ca)
        .args(["--agent-id", id, "--out"])
        .arg(out));
    out.to_path_buf()
}

/// `cairn mesh issue --ca <ca> --operator <name> --out <out>`: an operator
/// certificate directory (for `cairn fleet status`).
pub fn mesh_issue_operator(ca: &Path, name: &str, out: &Path) -> PathBuf {
    ok(Command::new(cargo_bin("cairn"))
        .args(["mesh", "issue", "--ca"])
        .arg(ca)
        .args(["--operator", name, "--out"])
        .arg(out));
    out.to_path_buf()
}

/// One test's fleet of agent processes meshed over TLS in a loopback block
/// of its own ([`LoopbackBlock::reserve`], `127.a.b.x`, free across processes):
/// a fleet CA, and per agent `<root>/agent<i>/{cert,data,manifests,
/// config.yaml,agent.log}`. `w` is the test's own scratch world (the
/// agent tests' `World`). Agents are killed when the fleet is dropped.
pub struct Fleet<W> {
    /// The test's scratch world.
    pub w: W,
    /// The directory agents live under.
    pub root: PathBuf,
    /// The loopback block: agent i listens on `127.a.b.<i+1>:7440`.
    pub block: LoopbackBlock,
    /// The fleet CA directory.
    pub ca: PathBuf,
    /// Agent ids by index (`a<i>` past the end).
    pub ids: Vec<String>,
    /// The `CAIRN_LOG` filter agents start with.
    pub log_filter: String,
    /// The running agents, in start order.
    pub children: Vec<AgentProcess>,
}

impl<W> Fleet<W> {
    /// A fleet under `root` with a new CA (`<root>/mesh-ca`) and a newly
    /// reserved loopback block.
    pub fn new(w: W, root: &Path, ids: Vec<String>) -> Fleet<W> {
        Fleet {
            ca: mesh_ca_init(&root.join("mesh-ca")),
            w,
            root: root.to_path_buf(),
            block: LoopbackBlock::reserve(),
            ids,
            log_filter: "info".into(),
            children: Vec::new(),
        }
    }

    /// Agent i's id.
    pub fn id(&self, i: usize) -> String {
        self.ids.get(i).cloned().unwrap_or_else(|| format!("a{i}"))
    }

    /// `<root>/agent<i>/<what>`.
    pub fn dir(&self, i: usize, what: &str) -> PathBuf {
        self.root.join(format!("agent{i}/{what}"))
    }

    /// Agent i's mesh address, `127.a.b.<i+1>:7440`.
    pub fn addr(&self, i: usize) -> String {
        self.block.mesh_addr(i)
    }

    /// Issues agent i's certificate from `ca` into `agent<i>/cert`.
    pub fn issue(&self, ca: &Path, i: usize) -> PathBuf {
        mesh_issue(ca, &self.id(i), &self.dir(i, "cert"))
    }

    /// Agent i's config (not written): its data and manifests directories,
    /// `labels: {site: s<i>}`, its mesh address, `cert` and `seeds`.
    pub fn agent_config(
        &self,
        i: usize,
        sources: &[String],
        seeds: &[String],
        cert: &Path,
    ) -> AgentConfig {
        let mut c = AgentConfig::new(&self.dir(i, "data"), &self.dir(i, "manifests"));
        c.id = Some(self.id(i));
        c.labels = Some(format!("{{site: s{i}}}"));
        c.sources = sources.to_vec();
        c.mesh = Some(MeshConfig {
            listen: self.addr(i),
            cert: cert.to_path_buf(),
            seeds: seeds.to_vec(),
        });
        c
    }

    /// Writes agent i's config (sources, mesh seeds, cert dir) to
    /// `agent<i>/config.yaml`.
    pub fn config(&self, i: usize, sources: &[PathBuf], seeds: &[String], cert: &Path) -> PathBuf {
        let sources: Vec<String> = sources.iter().map(|s| s.display().to_string()).collect();
        self.agent_config(i, &sources, seeds, cert)
            .write(&self.dir(i, "config.yaml"))
    }

    /// A line: issues agent i's certificate from the fleet CA and writes
    /// its config with `source` only for agent 0, agent i-1 as its seed
    /// and the given `target:` section.
    pub fn configure_line(&self, i: usize, source: &Path, target: &str) -> PathBuf {
        let cert = self.issue(&self.ca, i);
        std::fs::create_dir_all(self.dir(i, "data"))
            .unwrap_or_else(|e| panic!("mkdir agent{i}/data: {e}"));
        let sources = if i == 0 {
            vec![source.display().to_string()]
        } else {
            Vec::new()
        };
        let seeds = if i == 0 {
            Vec::new()
        } else {
            vec![self.addr(i - 1)]
        };
        let mut c = self.agent_config(i, &sources, &seeds, &cert);
        c.target = target.to_owned();
        c.write(&self.dir(i, "config.yaml"))
    }

    /// Starts agent i with `cfg`, logs in `agent<i>/agent.log`, watched.
    pub fn spawn(&mut self, i: usize, cfg: &Path) {
        let child = spawn_agent(
            &cargo_bin("cairn-agent"),
            cfg,
            &self.log_filter,
            &self.id(i),
            &self.dir(i, "agent.log"),
        );
        self.children.push(child);
    }

    /// Agent i's log so far.
    pub fn log(&self, i: usize) -> String {
        std::fs::read_to_string(self.dir(i, "agent.log")).unwrap_or_default()
    }

    /// The last `n` lines of each listed agent's log, headed by its id.
    pub fn log_tails(&self, agents: &[usize], n: usize) -> String {
        agents
            .iter()
            .map(|&i| format!("--- {} ---\n{}\n", self.id(i), tail(&self.log(i), n)))
            .collect()
    }

    /// Polls `cond` every 200 ms for `secs`; on timeout panics with
    /// `report` and every agent's log tail; at once if an agent dies.
    pub fn wait_until(
        &self,
        secs: u64,
        what: &str,
        mut cond: impl FnMut(&Self) -> bool,
        report: impl FnOnce(&Self) -> String,
    ) {
        wait_until(
            Duration::from_secs(secs),
            Duration::from_millis(200),
            what,
            || cond(self),
            || {
                let all: Vec<usize> = (0..self.children.len().max(self.ids.len())).collect();
                format!("{}\n{}", report(self), self.log_tails(&all, 30))
            },
        );
    }
}
