//! Helpers shared by the agent's end-to-end tests: fixture repositories,
//! the real `cairn` CLI and the agent's status. The generic helpers
//! (`ok`, `wait_for`, watched agent processes, `Fleet`, `AgentConfig`) are
//! `cairn-test-support`'s, re-exported here.

use cairn_bundle::bundle::read_bundle_file;
use cairn_bundle::limits::Limits;
use cairn_test_support::{make_manifest_repo, AgentConfig, FixtureOptions};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

pub(crate) use cairn_test_support::{
    assert_agents_alive, copy_dir, http_get, log_tail, mesh_ca_init, mesh_issue,
    mesh_issue_operator, ok, spawn_agent, spawn_watched, tail, terminate, wait_for, AgentProcess,
    LoopbackBlock, MeshConfig,
};

/// The agent binary under test.
pub(crate) fn agent_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_cairn-agent"))
}

/// The `cairn` CLI, built before the tests run (`cargo build --workspace
/// --bins`, as `tests/run` does); a test never builds it.
pub(crate) fn cairn_bin() -> PathBuf {
    cairn_test_support::cargo_bin("cairn")
}

/// The workspace root.
pub(crate) fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The development release key.
pub(crate) fn dev_key_path(name: &str) -> PathBuf {
    workspace()
        .join("keys/trust/dev")
        .join(format!("{name}.key"))
}

/// Loads a development key.
pub(crate) fn dev_key(name: &str) -> cairn_keys::KeyPair {
    cairn_keys::keyfile::read_private(&dev_key_path(name)).expect("dev key")
}

/// A scratch area with a fixture Git repository and a bundle repository.
pub(crate) struct World {
    pub tmp: tempfile::TempDir,
    pub git: PathBuf,
    pub repo: PathBuf,
    pub data: PathBuf,
    pub manifests: PathBuf,
}

impl World {
    /// A fixture repository with `apps` apps and `commits` commits.
    pub(crate) fn new(apps: usize, commits: usize, configmap_kb: usize) -> Self {
        let tmp = tempfile::tempdir().expect("tempdir");
        let git = tmp.path().join("git");
        make_manifest_repo(
            &git,
            &FixtureOptions {
                apps,
                configmap_kb,
                commits,
            },
        )
        .expect("fixture repo");
        let w = World {
            repo: tmp.path().join("repo"),
            data: tmp.path().join("data"),
            manifests: tmp.path().join("manifests"),
            git,
            tmp,
        };
        std::fs::create_dir_all(&w.repo).expect("repo dir");
        w
    }

    pub(crate) fn path(&self, name: &str) -> PathBuf {
        self.tmp.path().join(name)
    }

    /// `cairn bundle build --git <git> --ref <r> --out <name>`; returns the path.
    pub(crate) fn build(&self, git_ref: &str, name: &str) -> PathBuf {
        let out = self.path(name);
        ok(Command::new(cairn_bin())
            .arg("bundle")
            .arg("build")
            .arg("--git")
            .arg(&self.git)
            .arg("--ref")
            .arg(git_ref)
            .arg("--out")
            .arg(&out)
            .env("CAIRN_KUBECTL", "/nonexistent-kubectl"));
        out
    }

    /// `cairn release --repo <dir> --bundle <file> --channel <c> --key dev-release-1`.
    pub(crate) fn release_into(&self, repo: &Path, bundle: &Path, channel: &str) {
        ok(Command::new(cairn_bin())
            .arg("release")
            .arg("--repo")
            .arg(repo)
            .arg("--bundle")
            .arg(bundle)
            .arg("--channel")
            .arg(channel)
            .arg("--key")
            .arg(dev_key_path("dev-release-1")));
    }

    /// Releases into the main bundle repository on `stable`.
    pub(crate) fn release(&self, bundle: &Path) {
        self.release_into(&self.repo, bundle, "stable");
    }

    /// This world's agent config (not written): its data and manifests
    /// directories, `labels: {region: eu}`, the given sources.
    pub(crate) fn agent_config(&self, sources: &[String]) -> AgentConfig {
        let mut c = AgentConfig::new(&self.data, &self.manifests);
        c.labels = Some("{region: eu}".into());
        c.sources = sources.to_vec();
        c
    }

    /// Writes an agent config with the given sources; returns its path.
    pub(crate) fn config(&self, name: &str, sources: &[String]) -> PathBuf {
        self.agent_config(sources).write(&self.path(name))
    }

    /// `cairn-agent run --config <cfg> --once`.
    pub(crate) fn once(&self, cfg: &Path) -> Output {
        Command::new(agent_bin())
            .args(["run", "--once", "--config"])
            .arg(cfg)
            .env("CAIRN_LOG", "info")
            .output()
            .expect("run agent")
    }

    /// `--once`, asserting success; returns stderr (logs).
    pub(crate) fn once_ok(&self, cfg: &Path) -> String {
        let out = self.once(cfg);
        let err = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(
            out.status.success(),
            "agent --once failed ({}):\n{err}",
            out.status
        );
        err
    }

    /// Starts a long-running agent with logs in `<name>.log`; it is
    /// watched (see [`watch_agent`]) until [`terminate`]d, and killed
    /// when dropped.
    pub(crate) fn spawn(&self, cfg: &Path, log: &str) -> AgentProcess {
        spawn_agent(&agent_bin(), cfg, "info", log, &self.path(log))
    }

    pub(crate) fn log(&self, name: &str) -> String {
        std::fs::read_to_string(self.path(name)).unwrap_or_default()
    }

    /// The status document, if written yet.
    pub(crate) fn status(&self) -> Option<cairn_agent::status::Status> {
        cairn_agent::status::Status::read(&self.data).ok()
    }

    /// Files in the manifests directory (name → bytes), hidden files skipped.
    pub(crate) fn files(&self) -> BTreeMap<String, Vec<u8>> {
        let mut out = BTreeMap::new();
        let Ok(rd) = std::fs::read_dir(&self.manifests) else {
            return out;
        };
        for e in rd.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if !name.starts_with('.') {
                out.insert(name, std::fs::read(e.path()).unwrap_or_default());
            }
        }
        out
    }
}

/// The files a bundle should produce (name → bytes).
pub(crate) fn expected_files(bundle: &Path) -> BTreeMap<String, Vec<u8>> {
    let mut objs = Vec::new();
    let m = read_bundle_file(bundle, &Limits::default(), |e, b| {
        objs.push((e.clone(), b));
        Ok(())
    })
    .expect("read bundle");
    assert_eq!(objs.len(), m.entries.len());
    let names = cairn_agent::target::plan::file_names(&m.entries);
    names
        .into_iter()
        .zip(m.entries.iter())
        .map(|(n, e)| {
            let b = objs
                .iter()
                .find(|(x, _)| x.object == e.object)
                .map(|(_, b)| b.clone())
                .unwrap_or_default();
            (n, b)
        })
        .collect()
}

/// The agent's status document in `data`, if written yet.
pub(crate) fn status_in(data: &Path) -> Option<cairn_agent::status::Status> {
    cairn_agent::status::Status::read(data).ok()
}

/// The sequence of the release adopted in `data` (0 for none yet).
pub(crate) fn sequence_in(data: &Path) -> u64 {
    status_in(data)
        .and_then(|s| s.adopted.map(|a| a.sequence))
        .unwrap_or(0)
}

/// The one fleet of meshed agent processes (`cairn_test_support::Fleet`)
/// over a [`World`].
pub(crate) type Fleet = cairn_test_support::Fleet<World>;

/// A fleet in a loopback block of its own (`127.a.b.x`, reserved across
/// processes) under the world's scratch directory, with a new CA. Agent
/// ids are `ids`, then `a<i>`.
pub(crate) fn fleet(w: World, ids: Vec<String>) -> Fleet {
    let root = w.tmp.path().to_path_buf();
    cairn_test_support::Fleet::new(w, &root, ids)
}

/// What the agent tests do with a fleet: read its agents' status, wait
/// for states, configure a line, run the CLI.
pub(crate) trait AgentFleet {
    /// Agent i's status document, if written yet.
    fn status(&self, i: usize) -> Option<cairn_agent::status::Status>;
    /// Agent i's adopted sequence (0 for none).
    fn sequence(&self, i: usize) -> u64;
    /// Agent i's pending rollout (sequence, state), if any.
    fn pending_state(&self, i: usize) -> Option<(u64, String)>;
    /// Every agent's id, sequence and pending rollout, one per line.
    fn states(&self) -> String;
    /// Waits until every listed agent is at `seq`.
    fn wait_sequence(&self, agents: &[usize], seq: u64, secs: u64);
    /// Agent i's `/metrics`.
    fn metrics(&self, i: usize) -> String;
    /// Waits until `cond` holds; on timeout shows every agent's state
    /// and log tail.
    fn wait(&self, secs: u64, what: &str, cond: impl FnMut(&Fleet) -> bool);
    /// A line over the world's bundle repository (source of agent 0
    /// only): issues agent i's certificate, writes its config with the
    /// given `target:` section.
    fn configure(&self, i: usize, target: &str) -> PathBuf;
    /// `cairn <args>`, which must succeed; its stdout.
    fn cairn(&self, args: &[&str]) -> String;
}

impl AgentFleet for Fleet {
    fn status(&self, i: usize) -> Option<cairn_agent::status::Status> {
        status_in(&self.dir(i, "data"))
    }

    fn sequence(&self, i: usize) -> u64 {
        sequence_in(&self.dir(i, "data"))
    }

    fn pending_state(&self, i: usize) -> Option<(u64, String)> {
        self.status(i)
            .and_then(|s| s.rollout)
            .map(|r| (r.sequence, r.state))
    }

    fn states(&self) -> String {
        (0..self.children.len().max(self.ids.len()))
            .map(|i| {
                format!(
                    "{}: seq {} pending {:?}\n",
                    self.id(i),
                    self.sequence(i),
                    self.pending_state(i)
                )
            })
            .collect()
    }

    fn wait_sequence(&self, agents: &[usize], seq: u64, secs: u64) {
        let what = format!("agents {agents:?} at sequence {seq}");
        self.wait(secs, &what, |f| {
            agents.iter().all(|&i| f.sequence(i) == seq)
        });
    }

    fn wait(&self, secs: u64, what: &str, cond: impl FnMut(&Fleet) -> bool) {
        self.wait_until(secs, what, cond, |f| f.states());
    }

    fn configure(&self, i: usize, target: &str) -> PathBuf {
        self.configure_line(i, &self.w.repo, target)
    }

    fn cairn(&self, args: &[&str]) -> String {
        ok(Command::new(cairn_bin()).args(args))
    }

    fn metrics(&self, i: usize) -> String {
        let addr = self
            .status(i)
            .and_then(|s| s.listen)
            .expect("agent HTTP address");
        http_get(&addr, "/metrics").1
    }
}

/// `cairn fleet status --json` asked of fleet agent `peer` with the
/// operator certificate in `op`, parsed.
pub(crate) fn fleet_status_json(f: &Fleet, peer: usize, op: &Path) -> serde_json::Value {
    let out = ok(Command::new(cairn_bin())
        .args([
            "fleet",
            "status",
            "--json",
            "--peer",
            &f.addr(peer),
            "--cert",
        ])
        .arg(op.join("operator.crt"))
        .arg("--key")
        .arg(op.join("operator.key"))
        .arg("--ca")
        .arg(op.join("ca.crt")));
    serde_json::from_str(&out).expect("fleet status JSON")
}
