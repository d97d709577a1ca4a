//! Running the `cairn` CLI under test (built by cargo for this test
//! binary). `ok` and the failure checks are `cairn-test-support`'s.

use std::path::Path;
use std::process::{Command, Output};

/// `cairn <args>`, not yet run.
pub(crate) fn cairn(args: &[&str]) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_cairn"));
    c.args(args);
    c
}

/// `cairn <args>`, which must succeed; its stdout.
pub(crate) fn ok(args: &[&str]) -> String {
    cairn_test_support::ok(&mut cairn(args))
}

/// `cairn <args>` in `cwd`, run to completion.
pub(crate) fn run_in(args: &[&str], cwd: &Path) -> Output {
    cairn_test_support::run(cairn(args).current_dir(cwd))
}

/// `cairn <args>` in `cwd`, which must succeed; its stdout.
pub(crate) fn ok_in(args: &[&str], cwd: &Path) -> String {
    cairn_test_support::ok(cairn(args).current_dir(cwd))
}

/// `cairn <args>` (in `cwd` if given), which must exit with `code`; its
/// stderr.
pub(crate) fn fails_code(args: &[&str], cwd: Option<&Path>, code: i32) -> String {
    let mut c = cairn(args);
    if let Some(d) = cwd {
        c.current_dir(d);
    }
    let out = cairn_test_support::run(&mut c);
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(code), "cairn {args:?}: {stderr}");
    stderr
}
