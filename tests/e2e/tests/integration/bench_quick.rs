//! `bench --quick` (debug build) prints the full table with sane numbers.
//! No wall-clock figure is asserted, only that each was measured.

use serde_json::Value;
use std::process::Command;

const ROWS: &[&str] = &[
    "bundle build (93 objects) vs `git archive | sha256sum`",
    "bundle build --format 1 (93 objects) vs `git archive | sha256sum`",
    "bundle build (93 objects) vs `kubectl kustomize`",
    "kustomize directory in the large repository: bundle build vs `kubectl kustomize` on it",
    "verify (",
    "delta: one of 93 objects changed, bytes fetched",
    "chunking, fixed 64 entries",
    "chunking, fixed 256 entries",
    "chunking, content-defined (default)",
    "mesh: release reaches 3 agents (line)",
    "mesh: release reaches 3 agents (random)",
    "agent idle RSS after applying 93 objects",
    "agent peak RSS during sync of 93 objects (VmHWM)",
    "binary size `cairn-agent`",
    "binary size `cairn`",
];

fn num(v: &Value, key: &str) -> f64 {
    v[key]
        .as_f64()
        .unwrap_or_else(|| panic!("`{key}` missing from the JSON figures: {v}"))
}

#[test]
fn bench_quick_prints_every_row_with_sane_numbers() {
    let bench = env!("CARGO_BIN_EXE_bench");
    // The CLI and agent binaries of the same profile (tests/run builds them).
    let bin_dir = cairn_test_support::cargo_bin("cairn-agent")
        .parent()
        .expect("binary directory")
        .to_path_buf();
    let tmp = tempfile::tempdir().expect("tempdir");
    let json = tmp.path().join("figures.json");
    let out = Command::new(bench)
        .arg("--quick")
        .arg("--bin-dir")
        .arg(&bin_dir)
        .arg("--json")
        .arg(&json)
        .output()
        .expect("run bench");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "bench --quick failed:\n{stdout}\n{stderr}"
    );
    let table: Vec<&str> = stdout.lines().filter(|l| l.starts_with("| ")).collect();
    assert_eq!(
        table[0],
        "| figure | Cairn | baseline | ratio | target | met |"
    );
    for want in ROWS {
        let line = table
            .iter()
            .find(|l| l.starts_with(&format!("| {want}")))
            .unwrap_or_else(|| panic!("no row `{want}` in:\n{stdout}"));
        assert!(
            !line.contains("n/a"),
            "row `{want}` was not measured: {line}\n{stderr}"
        );
    }
    assert_eq!(table.len(), 1 + ROWS.len(), "{stdout}");

    let v: Value = serde_json::from_slice(&std::fs::read(&json).expect("figures JSON"))
        .expect("figures parse");
    assert_eq!(num(&v, "objects"), 93.0);
    for key in [
        "build_secs",
        "build_format1_secs",
        "git_archive_secs",
        "kustomize_secs",
        "verify_secs",
        "sha256sum_secs",
        "mesh_3_line_secs",
        "mesh_3_random_secs",
    ] {
        assert!(num(&v, key) > 0.0, "{key}: {v}");
    }
    let (full, delta) = (num(&v, "full_bytes"), num(&v, "delta_bytes"));
    let bundle = num(&v, "bundle_file_bytes");
    assert!(full > num(&v, "object_bytes"), "{v}");
    assert!(
        delta > 0.0 && delta < full / 2.0,
        "delta {delta} vs full {full}"
    );
    // Format 2: the manifest is a top document and its chunks.
    let chunks = num(&v, "chunks");
    assert!(chunks >= 1.0, "{v}");
    assert_eq!(
        num(&v, "full_requests"),
        96.0 + chunks,
        "roots, channel, top document, chunks, 93 objects"
    );
    // One changed object, the new top document and its one new chunk, the
    // channel and the root probe.
    assert_eq!(num(&v, "delta_new_chunks"), 1.0, "{v}");
    assert!(num(&v, "delta_requests") <= 6.0, "{v}");
    for key in ["mesh_3_line_bytes", "mesh_3_random_bytes"] {
        // Two agents fetch the bundle over the mesh, one from the server.
        assert!(num(&v, key) >= 2.0 * bundle, "{key}: {v}");
        assert!(num(&v, key) < 10.0 * bundle, "{key}: {v}");
    }
    let (idle, peak) = (num(&v, "idle_rss_bytes"), num(&v, "peak_rss_bytes"));
    assert!(idle > 1e6 && idle <= peak, "idle {idle}, peak {peak}");
    assert!(num(&v, "binary_bytes_cairn-agent") > 1e6);
}
