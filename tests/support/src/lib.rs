//! Test support for Cairn's end-to-end tests.
//!
//! * [`fixture`]: deterministic Git repositories of Kubernetes manifests
//!   ([`make_manifest_repo`], [`add_kustomize_overlay`]).
//! * [`cargo_bin`], [`run`], [`run_ok`]: find and run the workspace binaries.
//! * [`StaticServer`]: a tiny static HTTP file server with fault injection.
//! * [`process`]: the one [`ok`], [`wait_for`] / [`wait_until`] with a
//!   deadline, watched agent processes ([`AgentProcess`],
//!   [`assert_agents_alive`], log tails on failure), [`terminate`],
//!   [`http_get`].
//! * [`ApiServer`]: the test Kubernetes API server as a process, and kubectl.
//! * [`fleet`]: the one agent config writer ([`AgentConfig`]), the mesh
//!   PKI through the CLI, and the one [`Fleet`] of meshed agents.
//! * [`loopback`]: [`LoopbackBlock`], a `127.a.b.0/24` block reserved
//!   across processes for agents that must know each other's addresses.
//! * [`registry::Registry`]: a real OCI registry (TLS, htpasswd) on loopback.
//!
//! Nothing here depends on files outside the workspace.
#![cfg_attr(test, allow(clippy::unwrap_used))]

mod apiserver;
pub mod fixture;
pub mod fleet;
pub mod loopback;
pub mod process;
pub mod registry;
mod server;
mod token;

pub use apiserver::ApiServer;
pub use fixture::{add_kustomize_overlay, commit_files, make_manifest_repo, FixtureOptions};
pub use fleet::{mesh_ca_init, mesh_issue, mesh_issue_operator, AgentConfig, Fleet, MeshConfig};
pub use loopback::LoopbackBlock;
pub use process::{
    assert_agents_alive, containerfile_step, copy_dir, exit_within, http_get, log_tail, ok,
    promtool_check, spawn_agent, spawn_watched, tail, terminate, unwatch_agent, wait_for,
    wait_until, watch_agent, AgentProcess,
};
pub use server::{Fault, StaticServer};

use std::path::PathBuf;
use std::process::{Command, Output};

/// The path of a workspace binary (`target/<profile>/<name>`), found next
/// to the running test executable (`target/<profile>/deps/<test>`).
///
/// Panics with a clear message if the binary has not been built. Inside the
/// binary's own package, prefer `env!("CARGO_BIN_EXE_<name>")`.
pub fn cargo_bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().unwrap_or_else(|e| panic!("current_exe: {e}"));
    let mut dirs = Vec::new();
    // target/<profile>/deps/<test> -> target/<profile>, then the other profile.
    if let Some(profile_dir) = exe.parent().and_then(|d| d.parent()) {
        dirs.push(profile_dir.to_path_buf());
        if let Some(target) = profile_dir.parent() {
            for p in ["debug", "release"] {
                dirs.push(target.join(p));
            }
        }
    }
    let file = format!("{name}{}", std::env::consts::EXE_SUFFIX);
    for d in &dirs {
        let p = d.join(&file);
        if p.is_file() {
            return p;
        }
    }
    panic!(
        "binary `{name}` not found in {:?}: run `cargo build --workspace --bins` first",
        dirs
    );
}

/// Runs `cmd` to completion, capturing stdout and stderr. Panics if it
/// cannot be started.
pub fn run(cmd: &mut Command) -> Output {
    cmd.output()
        .unwrap_or_else(|e| panic!("cannot start {:?}: {e}", cmd.get_program()))
}

/// Runs `cmd` and panics with its output unless it succeeds. Returns
/// stdout as a string.
pub fn run_ok(cmd: &mut Command) -> String {
    let out = run(cmd);
    if !out.status.success() {
        panic!(
            "{:?} failed ({}):\nstdout: {}\nstderr: {}",
            cmd,
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Runs `cmd` and returns its exit code (-1 when killed by a signal),
/// stdout and stderr: for commands whose exit code is the result (`cairn
/// diff`, `cairn-agent plan`: 0 no changes, 1 changes, 2 error).
pub fn run_code(cmd: &mut Command) -> (i32, String, String) {
    let out = run(cmd);
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Runs `cmd`, panics if it succeeds, and returns its stderr (the error
/// text to assert on).
pub fn run_err(cmd: &mut Command) -> String {
    let out = run(cmd);
    if out.status.success() {
        panic!(
            "{:?} succeeded but was expected to fail:\nstdout: {}\nstderr: {}",
            cmd,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    String::from_utf8_lossy(&out.stderr).into_owned()
}
