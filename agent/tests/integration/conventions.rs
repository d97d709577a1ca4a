//! Small conventions of the `cairn-agent` binary, through real processes:
//! `/metrics` passes `promtool check metrics` (Debian's `prometheus`
//! package, installed by .ci/run), text logs carry no ANSI escapes unless
//! stderr is a terminal, and the binary generates shell completions and
//! man pages.

use crate::support::*;
use cairn_test_support::{containerfile_step, promtool_check};
use std::io::{Read, Write};
use std::process::{Command, Stdio};
use std::time::Duration;

/// GET `path` with an optional `Accept` header; returns (head, body).
fn get(addr: &str, path: &str, accept: Option<&str>) -> (String, String) {
    let mut s = std::net::TcpStream::connect(addr).expect("connect to agent");
    s.set_read_timeout(Some(Duration::from_secs(10))).ok();
    let accept = accept
        .map(|a| format!("Accept: {a}\r\n"))
        .unwrap_or_default();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: x\r\n{accept}Connection: close\r\n\r\n"
    )
    .expect("write");
    let mut buf = String::new();
    let _ = s.read_to_string(&mut buf);
    let (head, body) = buf.split_once("\r\n\r\n").expect("an HTTP response");
    (head.to_ascii_lowercase(), body.to_owned())
}

/// A running agent that adopted a release serves `/metrics` that
/// `promtool check metrics` accepts with no lint message; a Prometheus
/// server (which asks for OpenMetrics) gets OpenMetrics.
#[test]
fn metrics_of_a_running_agent_pass_promtool() {
    let w = World::new(2, 1, 1);
    let b1 = w.build("HEAD", "b1.bundle");
    w.release(&b1);
    let cfg = w.config("agent.yaml", &[w.repo.display().to_string()]);
    let mut agent = w.spawn(&cfg, "agent.log");
    let want = expected_files(&b1);
    wait_for(60, "release 1 adopted and applied", || {
        w.files() == want && w.status().is_some_and(|s| s.ready && s.listen.is_some())
    });
    let addr = w.status().and_then(|s| s.listen).expect("listen address");

    // What curl and promtool get: the Prometheus text format.
    let (head, text) = get(&addr, "/metrics", None);
    assert!(head.starts_with("http/1.1 200"), "{head}");
    assert!(
        head.contains("content-type: text/plain; version=0.0.4"),
        "{head}"
    );
    assert!(
        text.contains("cairn_adopted_sequence{channel=\"stable\"} 1\n"),
        "{text}"
    );
    assert!(text.contains("# HELP cairn_adoptions_total "), "{text}");
    assert!(text.contains("cairn_adoptions_total 1\n"), "{text}");
    let (code, said) = promtool_check(&text);
    assert_eq!(code, Some(0), "promtool: {said}\n{text}");
    assert!(said.is_empty(), "promtool lint: {said}\n{text}");

    // What a Prometheus server's scrape gets: OpenMetrics.
    let scrape = "application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1";
    let (head, open) = get(&addr, "/metrics", Some(scrape));
    assert!(
        head.contains("content-type: application/openmetrics-text; version=1.0.0"),
        "{head}"
    );
    assert!(open.ends_with("# EOF\n"), "{open}");
    assert!(open.contains("# TYPE cairn_adoptions counter\n"), "{open}");

    assert!(terminate(&mut agent).success());
}

/// Text logs written to a pipe (a file, journald) carry no ANSI escapes;
/// on a terminal they are coloured unless NO_COLOR is set.
#[test]
fn text_logs_have_no_ansi_escapes_off_a_terminal() {
    let w = World::new(1, 1, 1);
    let b1 = w.build("HEAD", "b1.bundle");
    w.release(&b1);
    let cfg = w.config("agent.yaml", &[w.repo.display().to_string()]);

    // stderr is a pipe.
    let out = Command::new(agent_bin())
        .args(["run", "--once", "--log-format", "text", "--config"])
        .arg(&cfg)
        .env("CAIRN_LOG", "info")
        .env_remove("NO_COLOR")
        .output()
        .expect("run agent");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(err.contains("starting cairn-agent"), "{err}");
    assert!(
        !err.contains("\x1b["),
        "ANSI escape in piped logs:\n{err:?}"
    );

    // stderr is a terminal (a pty from `script`, util-linux): coloured,
    // and plain again with NO_COLOR.
    let run_on_pty = |no_color: bool| {
        let cmd = format!(
            "'{}' run --once --log-format text --config '{}'",
            agent_bin().display(),
            cfg.display()
        );
        let mut c = Command::new("script");
        c.args(["-qefc", &cmd, "/dev/null"])
            .env("CAIRN_LOG", "info")
            .env_remove("NO_COLOR")
            .stdin(Stdio::null());
        if no_color {
            c.env("NO_COLOR", "1");
        }
        let out = c.output().expect("run `script` (util-linux)");
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(out.status.success(), "{text}");
        assert!(text.contains("starting cairn-agent"), "{text}");
        text
    };
    assert!(
        run_on_pty(false).contains("\x1b["),
        "no colour on a terminal"
    );
    let plain = run_on_pty(true);
    assert!(!plain.contains("\x1b["), "NO_COLOR ignored:\n{plain:?}");
}

/// `cairn-agent completions bash` is valid bash naming the subcommands;
/// `cairn-agent man DIR` writes roff pages `man` renders.
#[test]
fn completions_and_man_pages_list_the_subcommands() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let bash = ok(Command::new(agent_bin()).args(["completions", "bash"]));
    for sub in ["run", "status", "hold", "release-hold"] {
        assert!(bash.contains(sub), "{sub} missing:\n{bash}");
    }
    let script = tmp.path().join("cairn-agent.bash");
    std::fs::write(&script, &bash).expect("write completion");
    ok(Command::new("bash").arg("-n").arg(&script));
    for shell in ["zsh", "fish"] {
        let s = ok(Command::new(agent_bin()).args(["completions", shell]));
        assert!(s.contains("release-hold"), "{shell}:\n{s}");
    }

    let dir = tmp.path().join("man1");
    ok(Command::new(agent_bin()).arg("man").arg(&dir));
    let page = std::fs::read_to_string(dir.join("cairn-agent.1")).expect("cairn-agent.1");
    assert!(page.starts_with(".ie \\n(.g .ds Aq"), "{page}");
    assert!(page.contains(".TH cairn-agent 1"), "{page}");
    for sub in ["run", "status", "hold", "release-hold"] {
        assert!(
            page.contains(&format!("cairn\\-agent\\-{}", sub.replace('-', "\\-"))),
            "{sub} missing:\n{page}"
        );
        assert!(
            dir.join(format!("cairn-agent-{sub}.1")).is_file(),
            "no page for {sub}"
        );
    }
    // The hidden generators are not documented as subcommands.
    assert!(!dir.join("cairn-agent-completions.1").exists());
    let rendered = ok(Command::new("man")
        .args(["-l", "-P", "cat"])
        .arg(dir.join("cairn-agent-hold.1"))
        .env("MANWIDTH", "80"));
    assert!(rendered.contains("--until"), "{rendered}");
}

/// The Containerfile's generation step, run as written with `/out/`
/// pointing at a scratch directory and the agent under test as
/// `/out/cairn-agent` (no container engine in CI): it installs valid
/// completions and compressed man pages where the image ships them.
#[test]
fn the_containerfile_ships_completions_and_man_pages() {
    let text = std::fs::read_to_string(workspace().join("deploy/container/Containerfile"))
        .expect("Containerfile");
    let (_, script) = containerfile_step(&text, "# generate: completions and man pages");
    let tmp = tempfile::tempdir().expect("tempdir");
    let out = tmp.path().join("out");
    std::fs::create_dir_all(&out).expect("mkdir");
    std::fs::copy(agent_bin(), out.join("cairn-agent")).expect("copy agent");
    let script = script.replace("/out/", &format!("{}/", out.display()));
    ok(Command::new("sh").args(["-euc", &script]));
    let share = out.join("usr/share");
    let bash = share.join("bash-completion/completions/cairn-agent");
    ok(Command::new("bash").arg("-n").arg(&bash));
    assert!(std::fs::read_to_string(&bash)
        .expect("bash completion")
        .contains("release-hold"));
    for f in [
        "zsh/vendor-completions/_cairn-agent",
        "fish/vendor_completions.d/cairn-agent.fish",
        "man/man1/cairn-agent.1.gz",
        "man/man1/cairn-agent-run.1.gz",
        "man/man1/cairn-agent-release-hold.1.gz",
    ] {
        let len = std::fs::metadata(share.join(f))
            .map(|m| m.len())
            .unwrap_or(0);
        assert!(len > 0, "{f} missing or empty");
    }
    let rendered = ok(Command::new("man")
        .args(["-l", "-P", "cat"])
        .arg(share.join("man/man1/cairn-agent-run.1.gz"))
        .env("MANWIDTH", "80"));
    assert!(rendered.contains("--once"), "{rendered}");
}
