//! Helpers shared by the agent's end-to-end tests: fixture repositories,
//! the real `cairn` CLI, agent processes and polling.

#![allow(dead_code)]

use cairn_bundle::bundle::read_bundle_file;
use cairn_bundle::limits::Limits;
use cairn_bundle::repo::RepoDir;
use cairn_test_support::{make_manifest_repo, FixtureOptions};
use std::cell::RefCell;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// An agent process the test expects to keep running.
struct Watched {
    pid: u32,
    name: String,
    log: PathBuf,
}

thread_local! {
    /// The agents this test started and has not stopped: every wait loop
    /// checks them, so a dead agent fails the test at once, with its log,
    /// instead of as a timeout much later.
    static WATCHED: RefCell<Vec<Watched>> = const { RefCell::new(Vec::new()) };
}

/// Registers a started agent: from now on [`assert_agents_alive`] (and so
/// every wait helper) fails if it exits before [`unwatch_agent`] or
/// [`terminate`].
pub fn watch_agent(child: &Child, name: &str, log: &Path) {
    WATCHED.with(|w| {
        let mut w = w.borrow_mut();
        w.retain(|x| x.pid != child.id());
        w.push(Watched {
            pid: child.id(),
            name: name.to_owned(),
            log: log.to_path_buf(),
        });
    });
}

/// Stops watching an agent the test is about to stop itself.
pub fn unwatch_agent(pid: u32) {
    WATCHED.with(|w| w.borrow_mut().retain(|x| x.pid != pid));
}

/// How a child exited, if it has, without reaping it (`waitid` with
/// `WNOWAIT`: the owner's `Child::wait` still works). `None` while it runs
/// or when it is no longer our child (already reaped by its owner).
fn exited(pid: u32) -> Option<String> {
    // SAFETY: an all-zero siginfo_t is valid; waitid only writes to it.
    let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
    // SAFETY: plain syscall with a valid out pointer.
    let r = unsafe {
        libc::waitid(
            libc::P_PID,
            pid as libc::id_t,
            &mut info,
            libc::WEXITED | libc::WNOHANG | libc::WNOWAIT,
        )
    };
    // SAFETY: reading fields waitid filled in for a SIGCHLD-style result.
    let (child, status) = unsafe { (info.si_pid(), info.si_status()) };
    if r != 0 || child == 0 {
        return None;
    }
    Some(match info.si_code {
        libc::CLD_EXITED => format!("exit code {status}"),
        _ => format!("killed by signal {status}"),
    })
}

/// Fails the test at once, naming the agent and showing its log tail, if
/// a watched agent has exited. `what` is what the test was waiting for.
pub fn assert_agents_alive(what: &str) {
    let dead = WATCHED.with(|w| {
        w.borrow()
            .iter()
            .find_map(|a| exited(a.pid).map(|how| (a.name.clone(), a.pid, a.log.clone(), how)))
    });
    if let Some((name, pid, log, how)) = dead {
        unwatch_agent(pid);
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        panic!(
            "agent {name} (pid {pid}) died ({how}) while waiting for: {what}\n\
             --- last 40 lines of {} ---\n{}",
            log.display(),
            tail(&text, 40)
        );
    }
}

/// A started agent process, killed when dropped (a failing test must not
/// leave agents behind holding ports and directories). Derefs to the
/// [`Child`].
pub struct AgentProcess(pub Child);

impl std::ops::Deref for AgentProcess {
    type Target = Child;
    fn deref(&self) -> &Child {
        &self.0
    }
}

impl std::ops::DerefMut for AgentProcess {
    fn deref_mut(&mut self) -> &mut Child {
        &mut self.0
    }
}

impl Drop for AgentProcess {
    fn drop(&mut self) {
        unwatch_agent(self.0.id());
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

/// The last `n` lines of `s`.
pub fn tail(s: &str, n: usize) -> String {
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// The agent binary under test.
pub fn agent_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_cairn-agent"))
}

/// The `cairn` CLI; built on first use if the workspace binaries are not.
pub fn cairn_bin() -> PathBuf {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        let found = std::panic::catch_unwind(|| cairn_test_support::cargo_bin("cairn"));
        if let Ok(p) = found {
            return p;
        }
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let st = Command::new(cargo)
            .args(["build", "-q", "-p", "cairn-bundle", "--bin", "cairn"])
            .current_dir(workspace())
            .status()
            .expect("run cargo build for cairn");
        assert!(st.success(), "building the cairn CLI failed");
        cairn_test_support::cargo_bin("cairn")
    })
    .clone()
}

/// The workspace root.
pub fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The development release key.
pub fn dev_key_path(name: &str) -> PathBuf {
    workspace()
        .join("keys/trust/dev")
        .join(format!("{name}.key"))
}

/// Loads a development key.
pub fn dev_key(name: &str) -> cairn_keys::KeyPair {
    cairn_keys::keyfile::read_private(&dev_key_path(name)).expect("dev key")
}

/// Runs a command, panicking with its output unless it succeeds.
pub fn ok(cmd: &mut Command) -> String {
    let out = cmd.output().expect("start command");
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}):\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A scratch area with a fixture Git repository and a bundle repository.
pub struct World {
    pub tmp: tempfile::TempDir,
    pub git: PathBuf,
    pub repo: PathBuf,
    pub data: PathBuf,
    pub manifests: PathBuf,
}

impl World {
    /// A fixture repository with `apps` apps and `commits` commits.
    pub fn new(apps: usize, commits: usize, configmap_kb: usize) -> Self {
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

    pub fn path(&self, name: &str) -> PathBuf {
        self.tmp.path().join(name)
    }

    /// `cairn bundle build --git <git> --ref <r> --out <name>`; returns the path.
    pub fn build(&self, git_ref: &str, name: &str) -> PathBuf {
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
    pub fn release_into(&self, repo: &Path, bundle: &Path, channel: &str) {
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
    pub fn release(&self, bundle: &Path) {
        self.release_into(&self.repo, bundle, "stable");
    }

    /// Writes an agent config with the given sources; returns its path.
    pub fn config(&self, name: &str, sources: &[String]) -> PathBuf {
        let p = self.path(name);
        let src: String = sources.iter().map(|s| format!("  - {s}\n")).collect();
        let text = format!(
            "insecureAllowDevelopmentRoot: true\ndataDir: {}\nchannel: stable\nlabels: {{region: eu}}\nsources:\n{}pollInterval: 1s\n\
             reconcileInterval: 1s\nmaxBackoff: 2s\nrequestTimeout: 10s\ntarget:\n  manifestsDir: {}\n\
             listen:\n  http: 127.0.0.1:0\n",
            self.data.display(),
            if src.is_empty() { "  []\n".to_owned() } else { src },
            self.manifests.display()
        );
        let text = text.replace("sources:\n  []\n", "sources: []\n");
        std::fs::write(&p, text).expect("write config");
        p
    }

    /// `cairn-agent run --config <cfg> --once`.
    pub fn once(&self, cfg: &Path) -> Output {
        Command::new(agent_bin())
            .args(["run", "--once", "--config"])
            .arg(cfg)
            .env("CAIRN_LOG", "info")
            .output()
            .expect("run agent")
    }

    /// `--once`, asserting success; returns stderr (logs).
    pub fn once_ok(&self, cfg: &Path) -> String {
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
    pub fn spawn(&self, cfg: &Path, log: &str) -> AgentProcess {
        let f = std::fs::File::create(self.path(log)).expect("log file");
        let child = Command::new(agent_bin())
            .args(["run", "--log-format", "json", "--config"])
            .arg(cfg)
            .env("CAIRN_LOG", "info")
            .stdout(Stdio::null())
            .stderr(f)
            .spawn()
            .expect("spawn agent");
        watch_agent(&child, log, &self.path(log));
        AgentProcess(child)
    }

    pub fn log(&self, name: &str) -> String {
        std::fs::read_to_string(self.path(name)).unwrap_or_default()
    }

    /// The status document, if written yet.
    pub fn status(&self) -> Option<cairn_agent::status::Status> {
        cairn_agent::status::Status::read(&self.data).ok()
    }

    /// Files in the manifests directory (name → bytes), hidden files skipped.
    pub fn files(&self) -> BTreeMap<String, Vec<u8>> {
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
pub fn expected_files(bundle: &Path) -> BTreeMap<String, Vec<u8>> {
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

/// Polls `cond` every 100 ms until it holds, panicking after `secs`, or
/// at once if a watched agent dies.
pub fn wait_for(secs: u64, what: &str, mut cond: impl FnMut() -> bool) {
    let end = Instant::now() + Duration::from_secs(secs);
    while Instant::now() < end {
        assert_agents_alive(what);
        if cond() {
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("timed out after {secs}s waiting for: {what}");
}

/// Copies a directory tree.
pub fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).expect("mkdir");
    for e in std::fs::read_dir(from).expect("read_dir").flatten() {
        let p = e.path();
        let t = to.join(e.file_name());
        if p.is_dir() {
            copy_dir(&p, &t);
        } else {
            std::fs::copy(&p, &t).expect("copy");
        }
    }
}

/// Opens a bundle repository directory.
pub fn repo(dir: &Path) -> RepoDir {
    RepoDir::new(dir)
}

/// GET `http://<addr><path>` with a plain TCP client; returns (status, body).
pub fn http_get(addr: &str, path: &str) -> (u16, String) {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).expect("connect to agent");
    s.set_read_timeout(Some(Duration::from_secs(10))).ok();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    .expect("write");
    let mut buf = String::new();
    let _ = s.read_to_string(&mut buf);
    let status = buf
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = buf
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    (status, body)
}

/// Sends SIGTERM and waits for the process (up to 30 s).
pub fn terminate(child: &mut Child) -> std::process::ExitStatus {
    unwatch_agent(child.id());
    // SAFETY: signalling our own child.
    unsafe {
        libc::kill(child.id() as i32, libc::SIGTERM);
    }
    let end = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(Some(st)) = child.try_wait() {
            return st;
        }
        if Instant::now() > end {
            let _ = child.kill();
            panic!("agent did not exit after SIGTERM");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}
