//! The README's quickstart is real: every ```sh block preceded by
//! `<!-- ci: run -->` is run, in order, as one bash script (`set -euo
//! pipefail`) from the workspace root, with the built binaries on PATH and a
//! private HOME and TMPDIR.
//!
//! Needs `cairn` and `cairn-agent` built (`cargo build --workspace --bins`)
//! and git. The quickstart uses 127.0.0.1 only.

use cairn_test_support::cargo_bin;
use std::io::Read;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const MARK: &str = "<!-- ci: run -->";

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .canonicalize()
        .expect("workspace root")
}

/// The marked blocks of a Markdown text, in order.
fn ci_blocks(markdown: &str) -> Vec<String> {
    let mut blocks = Vec::new();
    let mut lines = markdown.lines();
    while let Some(line) = lines.next() {
        if line.trim() != MARK {
            continue;
        }
        let fence = lines.next().unwrap_or_default();
        assert_eq!(fence.trim(), "```sh", "`{MARK}` must be followed by ```sh");
        let body: Vec<&str> = lines.by_ref().take_while(|l| l.trim() != "```").collect();
        blocks.push(body.join("\n"));
    }
    blocks
}

#[test]
fn the_blocks_are_found() {
    let md = "x\n<!-- ci: run -->\n```sh\necho a\necho b\n```\n```sh\nnot me\n```\n<!-- ci: run -->\n```sh\necho c\n```\n";
    assert_eq!(ci_blocks(md), ["echo a\necho b", "echo c"]);
}

#[test]
fn the_readme_quickstart_runs() {
    let root = workspace();
    let readme = std::fs::read_to_string(root.join("README.md")).unwrap();
    let blocks = ci_blocks(&readme);
    assert!(blocks.len() >= 5, "only {} marked blocks", blocks.len());
    let text = blocks.join("\n");
    for must in [
        "cairn keys generate",
        "cairn root init",
        "cairn bundle build",
        "cairn release",
        "cairn export",
        "cairn import",
        "cairn-agent run --config agent.yaml --once",
        "cairn-agent status",
        "cairn fleet status",
    ] {
        assert!(text.contains(must), "the quickstart lost `{must}`");
    }
    // The README says target/release; run whatever profile was built.
    let bin_dir = cargo_bin("cairn")
        .parent()
        .expect("binary folder")
        .to_path_buf();
    assert!(
        bin_dir.join("cairn-agent").is_file(),
        "cairn-agent is not next to {}",
        bin_dir.display()
    );
    let script = format!(
        "set -euo pipefail\n{}\n",
        text.replace("$PWD/target/release", &bin_dir.display().to_string())
    );

    let tmp = tempfile::tempdir().unwrap();
    let home = tmp.path().join("home");
    std::fs::create_dir_all(&home).unwrap();
    let log = tmp.path().join("script.log");
    let mut child = Command::new("bash")
        .arg("-c")
        .arg(&script)
        .current_dir(&root)
        .env("HOME", &home)
        .env("TMPDIR", tmp.path())
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .env_remove("CAIRN_CONFIG")
        .env_remove("CAIRN_TRUST_ROOT")
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&log).unwrap())
        .stderr(Stdio::piped())
        // Its own process group, so that whatever it started in the
        // background can be stopped with it.
        .process_group(0)
        .spawn()
        .expect("bash");
    let mut stderr = child.stderr.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stderr.read_to_string(&mut s);
        s
    });
    let end = Instant::now() + Duration::from_secs(300);
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break Some(st);
        }
        if Instant::now() > end {
            break None;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    // SAFETY: the script's own process group (bash and its background jobs).
    unsafe {
        libc::kill(-(child.id() as i32), libc::SIGKILL);
    }
    let _ = child.wait();
    let err = reader.join().unwrap_or_default();
    let out = std::fs::read_to_string(&log).unwrap_or_default();
    match status {
        Some(st) if st.success() => {}
        Some(st) => panic!("the quickstart failed ({st}):\n--- stdout\n{out}\n--- stderr\n{err}"),
        None => {
            panic!("the quickstart did not finish in 300s:\n--- stdout\n{out}\n--- stderr\n{err}")
        }
    }

    // What the reader is told to expect.
    assert!(out.contains("bundle  sha256:"), "bundle inspect:\n{out}");
    assert!(out.contains("channel  canary sequence 1"), "verify:\n{out}");
    assert!(out.contains("channel  stable sequence 1"), "verify:\n{out}");
    assert!(
        err.contains("channel canary: now at release 1"),
        "import:\n{err}"
    );
    assert!(
        out.contains("agent           edge-1"),
        "agent status:\n{out}"
    );
    assert!(out.contains("_cluster__Namespace__shop.yaml"), "ls:\n{out}");
    assert!(out.contains("shop__ConfigMap__web.yaml"), "ls:\n{out}");
    assert!(
        out.contains("fleet as seen by agent edge-1"),
        "fleet status:\n{out}"
    );
}
