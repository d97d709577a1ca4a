//! Processes under test: the one `ok()`, agent processes that are watched
//! (a dead agent fails the test at once, with its log tail) and killed on
//! drop, the one `wait_for` with a deadline, SIGTERM with a deadline, and
//! a plain HTTP GET.

use std::cell::RefCell;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// Runs a command, panicking with its status, stdout and stderr unless it
/// succeeds; returns stdout. The one `ok()` of the test suites.
pub fn ok(cmd: &mut Command) -> String {
    crate::run_ok(cmd)
}

/// The last `n` lines of `s`.
pub fn tail(s: &str, n: usize) -> String {
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// The last `n` lines of the file at `log` (empty if unreadable).
pub fn log_tail(log: &Path, n: usize) -> String {
    tail(&std::fs::read_to_string(log).unwrap_or_default(), n)
}

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
        panic!(
            "agent {name} (pid {pid}) died ({how}) while waiting for: {what}\n\
             --- last 40 lines of {} ---\n{}",
            log.display(),
            log_tail(&log, 40)
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

/// Spawns `cmd` (an agent: `cairn-agent run ...`, possibly behind `ip
/// netns exec`) with stdout discarded and stderr in `log`, and watches it
/// under `name` (see [`watch_agent`]). Killed when the result is dropped.
pub fn spawn_watched(cmd: &mut Command, name: &str, log: &Path) -> AgentProcess {
    let f = std::fs::File::create(log)
        .unwrap_or_else(|e| panic!("create log file {}: {e}", log.display()));
    let child = cmd
        .stdout(Stdio::null())
        .stderr(f)
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {:?}: {e}", cmd.get_program()));
    watch_agent(&child, name, log);
    AgentProcess(child)
}

/// `<agent> run --log-format json --config <cfg>` with `CAIRN_LOG=<filter>`,
/// logs in `log`, watched as `name` (see [`spawn_watched`]).
pub fn spawn_agent(agent: &Path, cfg: &Path, filter: &str, name: &str, log: &Path) -> AgentProcess {
    spawn_watched(
        Command::new(agent)
            .args(["run", "--log-format", "json", "--config"])
            .arg(cfg)
            .env("CAIRN_LOG", filter),
        name,
        log,
    )
}

/// Polls `cond` every 100 ms until it holds, panicking after `secs` with
/// what it waited for, or at once if a watched agent dies.
pub fn wait_for(secs: u64, what: &str, cond: impl FnMut() -> bool) {
    wait_until(
        Duration::from_secs(secs),
        Duration::from_millis(100),
        what,
        cond,
        String::new,
    );
}

/// Polls `cond` every `every` until it holds. After `limit` it panics
/// with "timed out after ... waiting for: `what`" and what `report` says
/// (states, log tails); at once if a watched agent dies.
pub fn wait_until(
    limit: Duration,
    every: Duration,
    what: &str,
    mut cond: impl FnMut() -> bool,
    report: impl FnOnce() -> String,
) {
    let end = Instant::now() + limit;
    while Instant::now() < end {
        assert_agents_alive(what);
        if cond() {
            return;
        }
        std::thread::sleep(every);
    }
    panic!(
        "timed out after {}s waiting for: {what}\n{}",
        limit.as_secs(),
        report()
    );
}

/// Waits up to `secs` for `child` to exit; past that kills it and fails
/// the test, saying it was still running `what`.
pub fn exit_within(child: &mut Child, secs: u64, what: &str) -> ExitStatus {
    let end = Instant::now() + Duration::from_secs(secs);
    loop {
        match child.try_wait() {
            Ok(Some(st)) => return st,
            Ok(None) => {}
            Err(e) => panic!("waiting for pid {} ({what}): {e}", child.id()),
        }
        if Instant::now() > end {
            let _ = child.kill();
            let _ = child.wait();
            panic!("pid {} was still running after {secs}s: {what}", child.id());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Sends SIGTERM and waits for the process (up to 30 s).
pub fn terminate(child: &mut Child) -> ExitStatus {
    unwatch_agent(child.id());
    // SAFETY: signalling our own child.
    unsafe {
        libc::kill(child.id() as i32, libc::SIGTERM);
    }
    exit_within(child, 30, "the agent did not exit after SIGTERM")
}

/// `promtool check metrics` on `text` (a Prometheus text exposition):
/// its exit code and everything it said, trimmed. Panics naming the
/// package when promtool is not installed (Debian's `prometheus`; .ci/run
/// installs it).
pub fn promtool_check(text: &str) -> (Option<i32>, String) {
    use std::io::Write;
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool (Debian package prometheus) must be installed; .ci/run installs it");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(text.as_bytes())
        .expect("write to promtool");
    let out = child.wait_with_output().expect("promtool output");
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.code(), said.trim().to_owned())
}

/// The shell script of the Containerfile `RUN` step that follows the
/// comment line `marker` (its continuation lines joined, `RUN ` dropped),
/// and the marker's line index. Panics naming the marker when missing.
pub fn containerfile_step(text: &str, marker: &str) -> (usize, String) {
    let lines: Vec<&str> = text.lines().collect();
    let at = lines
        .iter()
        .position(|l| *l == marker)
        .unwrap_or_else(|| panic!("no marker comment `{marker}` in the Containerfile"));
    let mut script = String::new();
    for l in &lines[at + 1..] {
        script.push_str(l.strip_prefix("RUN ").unwrap_or(l));
        script.push('\n');
        if !l.ends_with('\\') {
            break;
        }
    }
    (at, script)
}

/// GET `http://<addr><path>` with a plain TCP client; returns (status, body).
pub fn http_get(addr: &str, path: &str) -> (u16, String) {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr)
        .unwrap_or_else(|e| panic!("connect to {addr} for GET {path}: {e}"));
    s.set_read_timeout(Some(Duration::from_secs(10))).ok();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    .unwrap_or_else(|e| panic!("write GET {path} to {addr}: {e}"));
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

/// Copies a directory tree.
pub fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap_or_else(|e| panic!("mkdir {}: {e}", to.display()));
    let rd = std::fs::read_dir(from).unwrap_or_else(|e| panic!("read {}: {e}", from.display()));
    for e in rd.flatten() {
        let p = e.path();
        let t = to.join(e.file_name());
        if p.is_dir() {
            copy_dir(&p, &t);
        } else {
            std::fs::copy(&p, &t)
                .unwrap_or_else(|e| panic!("copy {} to {}: {e}", p.display(), t.display()));
        }
    }
}
