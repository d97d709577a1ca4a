//! Small conventions of the `cairn` binary, run as a process: shell
//! completions and man pages for every subcommand, and no ANSI escapes on
//! stderr unless it is a terminal.

use cairn_test_support::{make_manifest_repo, FixtureOptions};
use std::process::{Command, Output, Stdio};

fn cairn(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_cairn"))
        .args(args)
        .env_remove("NO_COLOR")
        .output()
        .expect("run cairn")
}

fn ok(args: &[&str]) -> String {
    let out = cairn(args);
    assert!(
        out.status.success(),
        "cairn {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("utf-8 output")
}

/// The visible top-level subcommands.
const SUBCOMMANDS: &[&str] = &[
    "keys", "root", "bundle", "release", "promote", "verify", "export", "import", "mesh", "diff",
    "fleet", "demo",
];

#[test]
fn bash_completion_is_valid_bash_and_completes_subcommands() {
    let bash = ok(&["completions", "bash"]);
    let tmp = tempfile::tempdir().expect("tempdir");
    let file = tmp.path().join("cairn.bash");
    std::fs::write(&file, &bash).expect("write");
    let n = Command::new("bash")
        .arg("-n")
        .arg(&file)
        .output()
        .expect("bash");
    assert!(
        n.status.success(),
        "bash -n: {}",
        String::from_utf8_lossy(&n.stderr)
    );
    // Ask the completion function itself what follows `cairn `, and what
    // follows `cairn bundle `.
    let ask = |words: &str, cword: usize| {
        let script = format!(
            "source '{}'; COMP_WORDS=({words}); COMP_CWORD={cword}; COMP_LINE='{words}'; \
             COMP_POINT=${{#COMP_LINE}}; _cairn cairn '' ''; printf '%s\\n' \"${{COMPREPLY[@]}}\"",
            file.display()
        );
        let out = Command::new("bash")
            .args(["--norc", "--noprofile", "-c", &script])
            .stdin(Stdio::null())
            .output()
            .expect("bash");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(str::to_owned)
            .collect::<Vec<_>>()
    };
    let top = ask("cairn ''", 1);
    for sub in SUBCOMMANDS {
        assert!(top.iter().any(|w| w == sub), "{sub} not completed: {top:?}");
    }
    let bundle = ask("cairn bundle ''", 2);
    for sub in ["build", "inspect", "diff"] {
        assert!(bundle.iter().any(|w| w == sub), "{sub}: {bundle:?}");
    }
    for shell in ["zsh", "fish"] {
        let s = ok(&["completions", shell]);
        assert!(s.contains("promote"), "{shell}:\n{s}");
    }
    let bad = cairn(&["completions", "tcsh"]);
    assert_eq!(bad.status.code(), Some(2));
}

#[test]
fn man_pages_cover_every_subcommand_and_render() {
    let top = ok(&["man"]);
    assert!(top.contains(".TH cairn 1"), "{top}");
    for sub in SUBCOMMANDS {
        assert!(top.contains(&format!("cairn\\-{sub}(1)")), "{sub}:\n{top}");
    }
    assert!(
        !top.contains("completions"),
        "hidden subcommand listed:\n{top}"
    );

    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().join("man/man1");
    let out = cairn(&["man", dir.to_str().expect("utf-8 path")]);
    assert!(out.status.success());
    let mut pages: Vec<String> = std::fs::read_dir(&dir)
        .expect("man dir")
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    pages.sort();
    for p in [
        "cairn.1",
        "cairn-bundle-build.1",
        "cairn-keys-generate.1",
        "cairn-release.1",
    ] {
        assert!(pages.iter().any(|x| x == p), "{p} missing: {pages:?}");
    }
    assert!(!pages
        .iter()
        .any(|p| p.contains("completions") || p.starts_with("cairn-man")));
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(
        said.contains(&format!("wrote {} man page(s)", pages.len())),
        "{said}"
    );
    let rendered = Command::new("man")
        .args(["-l", "-P", "cat"])
        .arg(dir.join("cairn-bundle-build.1"))
        .env("MANWIDTH", "80")
        .output()
        .expect("man -l");
    let text = String::from_utf8_lossy(&rendered.stdout);
    assert!(rendered.status.success(), "{text}");
    assert!(text.contains("--git"), "{text}");

    // A directory that cannot be created: a clear error, exit 1.
    let file = tmp.path().join("a-file");
    std::fs::write(&file, b"x").expect("write");
    let bad = cairn(&["man", file.join("sub").to_str().expect("utf-8")]);
    assert_eq!(bad.status.code(), Some(1));
    let err = String::from_utf8_lossy(&bad.stderr);
    assert!(err.contains("writing man pages into"), "{err}");
}

#[test]
fn stderr_has_no_ansi_escapes_off_a_terminal() {
    // A usage error (clap colours those on a terminal) and a bundle build
    // (progress output) with stderr on a pipe.
    let usage = cairn(&["bundle", "build", "--no-such-flag"]);
    assert_eq!(usage.status.code(), Some(2));
    let err = String::from_utf8_lossy(&usage.stderr);
    assert!(err.contains("--no-such-flag"), "{err}");
    assert!(!err.contains("\x1b["), "{err:?}");

    let tmp = tempfile::tempdir().expect("tempdir");
    let git = tmp.path().join("git");
    make_manifest_repo(
        &git,
        &FixtureOptions {
            apps: 2,
            configmap_kb: 1,
            commits: 1,
        },
    )
    .expect("fixture");
    let out = Command::new(env!("CARGO_BIN_EXE_cairn"))
        .arg("bundle")
        .arg("build")
        .arg("--git")
        .arg(&git)
        .args(["--ref", "HEAD", "--out"])
        .arg(tmp.path().join("b.bundle"))
        .env("CAIRN_KUBECTL", "/nonexistent-kubectl")
        .output()
        .expect("cairn bundle build");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(!err.contains("\x1b["), "{err:?}");

    // On a terminal (a pty from `script`, util-linux) the same usage error
    // is coloured: the check above can fail.
    let cmd = format!(
        "'{}' bundle build --no-such-flag",
        env!("CARGO_BIN_EXE_cairn")
    );
    let tty = Command::new("script")
        .args(["-qec", &cmd, "/dev/null"])
        .env_remove("NO_COLOR")
        .stdin(Stdio::null())
        .output()
        .expect("script");
    let text = String::from_utf8_lossy(&tty.stdout);
    assert!(text.contains("no-such-flag"), "{text}");
    assert!(text.contains("\x1b["), "{text:?}");
}
