//! `bench`: Cairn's performance figures side by side with their floors and
//! peers, as one markdown table on stdout (progress on stderr).
//!
//! ```text
//! cargo build --release --workspace --bins
//! target/release/bench                 # full size: 3000 apps (~9,000 objects), 5 runs
//! target/release/bench --quick         # small fixture, 1 run (CI)
//! ```
//!
//! Every timing row is the median of `--runs` runs; the baseline of a row is
//! measured in the same run, right after Cairn's command, on the same
//! (warm) files. The binaries (`cairn`, `cairn-agent`) are found next to
//! this one (`--bin-dir` overrides). Options:
//!
//! * `--quick`: 30 apps, 1 run, mesh of 3 agents.
//! * `--runs N`, `--apps N`, `--configmap-kb N`: fixture size and repeats.
//! * `--mesh 10,20`: mesh sizes (`--mesh none` skips the mesh rows).
//! * `--mesh-runs N`: runs per mesh row (default 1: a 20-agent run of the
//!   full fixture takes a while).
//! * `--kustomize-runs N` (default 1), `--kustomize-timeout SECS` (default
//!   1200): `kubectl kustomize` takes minutes on thousands of resources,
//!   so it has its own, shorter series; a render past the limit is stopped
//!   and reported as "> limit".
//! * `--json FILE`: also write the raw figures as JSON.
//! * `--rows LIST`: only these rows, comma-separated, from `build`,
//!   `kdir` (the Kustomize directory in the large repository), `verify`,
//!   `footprint`, `delta`, `mesh` (default: all). `cairn-agent` is only
//!   needed for `footprint`, `delta` and `mesh`.
//! * `--keep DIR`: work in DIR and keep it (fixtures, repositories, logs).
//!
//! Network: loopback only (a static file server on 127.0.0.1 and mesh
//! agents in a reserved `127.a.b.x` block, `LoopbackBlock`).
#![cfg_attr(test, allow(clippy::unwrap_used))]

use anyhow::{anyhow, bail, Context, Result};
use cairn_test_support::{make_manifest_repo, FixtureOptions, LoopbackBlock, StaticServer};
use serde_json::{json, Value};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Command-line options.
#[derive(Debug, Clone)]
struct Opts {
    quick: bool,
    runs: usize,
    mesh_runs: usize,
    apps: usize,
    configmap_kb: usize,
    mesh: Vec<usize>,
    bin_dir: PathBuf,
    key: PathBuf,
    json: Option<PathBuf>,
    keep: Option<PathBuf>,
    kustomize_runs: usize,
    kustomize_timeout: u64,
    rows: Vec<String>,
}

/// Every row group `--rows` accepts, in the order they run.
const ROW_GROUPS: [&str; 6] = ["build", "kdir", "verify", "footprint", "delta", "mesh"];

impl Opts {
    fn wants(&self, group: &str) -> bool {
        self.rows.iter().any(|r| r == group)
    }
}

fn usage() -> &'static str {
    "usage: bench [--quick] [--runs N] [--mesh-runs N] [--apps N] [--configmap-kb N] \
     [--mesh 10,20|none] [--kustomize-runs N] [--kustomize-timeout SECS] [--bin-dir DIR] \
     [--key FILE] [--json FILE] [--keep DIR] [--rows build,kdir,verify,footprint,delta,mesh]"
}

fn parse_args() -> Result<Opts> {
    let exe = std::env::current_exe().context("current_exe")?;
    let bin_dir = exe
        .parent()
        .map(Path::to_path_buf)
        .ok_or_else(|| anyhow!("no directory for {}", exe.display()))?;
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let mut o = Opts {
        quick: false,
        runs: 5,
        mesh_runs: 1,
        apps: 3000,
        configmap_kb: 1,
        mesh: vec![10, 20],
        bin_dir,
        key: workspace.join("keys/trust/dev/dev-release-1.key"),
        json: None,
        keep: None,
        kustomize_runs: 1,
        kustomize_timeout: 1200,
        rows: ROW_GROUPS.iter().map(|r| r.to_string()).collect(),
    };
    let mut explicit = Vec::new();
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut val = |name: &str| {
            args.next()
                .ok_or_else(|| anyhow!("{name} needs a value\n{}", usage()))
        };
        let num = |s: String, name: &str| -> Result<usize> {
            s.parse()
                .map_err(|_| anyhow!("{name}: `{s}` is not a number"))
        };
        match a.as_str() {
            "--quick" => o.quick = true,
            "--runs" => o.runs = num(val("--runs")?, "--runs")?.max(1),
            "--mesh-runs" => o.mesh_runs = num(val("--mesh-runs")?, "--mesh-runs")?.max(1),
            "--apps" => o.apps = num(val("--apps")?, "--apps")?.max(1),
            "--configmap-kb" => o.configmap_kb = num(val("--configmap-kb")?, "--configmap-kb")?,
            "--mesh" => {
                let v = val("--mesh")?;
                o.mesh = if v == "none" {
                    Vec::new()
                } else {
                    v.split(',')
                        .map(|s| num(s.trim().to_owned(), "--mesh"))
                        .collect::<Result<_>>()?
                };
            }
            "--bin-dir" => o.bin_dir = PathBuf::from(val("--bin-dir")?),
            "--key" => o.key = PathBuf::from(val("--key")?),
            "--json" => o.json = Some(PathBuf::from(val("--json")?)),
            "--keep" => o.keep = Some(PathBuf::from(val("--keep")?)),
            "--rows" => {
                let v = val("--rows")?;
                let mut rows = Vec::new();
                for r in v.split(',').map(str::trim).filter(|r| !r.is_empty()) {
                    if !ROW_GROUPS.contains(&r) {
                        bail!(
                            "--rows: unknown row `{r}` (one of {})",
                            ROW_GROUPS.join(", ")
                        );
                    }
                    rows.push(r.to_owned());
                }
                if rows.is_empty() {
                    bail!("--rows: give at least one of {}", ROW_GROUPS.join(", "));
                }
                o.rows = rows;
            }
            "--kustomize-runs" => {
                o.kustomize_runs = num(val("--kustomize-runs")?, "--kustomize-runs")?.max(1)
            }
            "--kustomize-timeout" => {
                o.kustomize_timeout =
                    num(val("--kustomize-timeout")?, "--kustomize-timeout")? as u64
            }
            "-h" | "--help" => {
                println!("{}", usage());
                std::process::exit(0);
            }
            other => bail!("unknown argument `{other}`\n{}", usage()),
        }
        explicit.push(a);
    }
    if o.quick {
        let set = |f: &str| explicit.iter().any(|a| a == f);
        if !set("--runs") {
            o.runs = 1;
        }
        if !set("--apps") {
            o.apps = 30;
        }
        if !set("--mesh") {
            o.mesh = vec![3];
        }
    }
    Ok(o)
}

/// One row of the table.
struct Row {
    figure: String,
    cairn: String,
    baseline: String,
    ratio: String,
    target: String,
    met: String,
}

fn row(
    figure: &str,
    cairn: String,
    baseline: String,
    ratio: String,
    target: &str,
    met: Option<bool>,
) -> Row {
    Row {
        figure: figure.to_owned(),
        cairn,
        baseline,
        ratio,
        target: target.to_owned(),
        met: match met {
            Some(true) => "yes".into(),
            Some(false) => "**no**".into(),
            None => "—".into(),
        },
    }
}

/// A bundle file's manifest (objects verified and dropped).
fn read_manifest(path: &Path) -> Result<cairn_core::bundle::Manifest> {
    let file = std::fs::File::open(path)?;
    let limits = cairn_core::limits::Limits::default();
    cairn_core::bundle_file::read_bundle(
        &mut std::io::BufReader::new(file),
        path,
        &limits,
        |_, _| Ok(()),
    )
    .map_err(|e| anyhow!("{e}"))
}

/// Format 2 groupings compared on the fixture (in process, no IO): for one
/// object changed (commit 1 → 2), one added and one removed (commit 2 with
/// an entry more or less, in the middle), how many chunks and bytes (top
/// document plus new chunks) each grouping rewrites.
fn chunking_rows(
    m1: &cairn_core::bundle::Manifest,
    m2: &cairn_core::bundle::Manifest,
    rows: &mut Vec<Row>,
) {
    use cairn_core::bundle::{Chunker, Manifest};
    let mid = m2.entries.len() / 2;
    let mut removed = m2.clone();
    removed.entries.remove(mid);
    let mut added = m2.clone();
    let mut extra = m2.entries[mid].clone();
    extra.path.push_str("-added");
    extra.name.push_str("-added");
    added.entries.insert(mid + 1, extra);
    let cases: [(&str, &Manifest, &Manifest); 3] = [
        ("changed", m1, m2),
        ("added", m2, &added),
        ("removed", m2, &removed),
    ];
    for (label, chunker) in [
        ("fixed 64 entries", Chunker::Fixed { entries: 64 }),
        ("fixed 256 entries", Chunker::Fixed { entries: 256 }),
        ("content-defined (default)", Chunker::DEFAULT),
    ] {
        let mut parts = Vec::new();
        let mut chunks_total = 0;
        for (case, a, b) in cases {
            let (ea, eb) = (a.encode_with(&chunker), b.encode_with(&chunker));
            chunks_total = eb.chunks.len();
            let old: std::collections::BTreeSet<_> = ea.chunks.iter().map(|(a, _)| a).collect();
            let new: Vec<_> = eb.chunks.iter().filter(|(a, _)| !old.contains(a)).collect();
            let bytes = eb.top.len() + new.iter().map(|(_, b)| b.len()).sum::<usize>();
            parts.push(format!(
                "{case}: {} chunk(s), {}",
                new.len(),
                human_bytes(bytes as u64)
            ));
        }
        rows.push(row(
            &format!("chunking, {label}: rewritten per one-object edit"),
            parts.join("; "),
            format!("{chunks_total} chunks"),
            String::new(),
            "—",
            None,
        ));
    }
}

/// Bytes of the files under `dir` (allocated blocks, as `du` counts).
fn tree_bytes(dir: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let Ok(rd) = std::fs::read_dir(dir) else {
        return 0;
    };
    rd.flatten()
        .map(|e| match e.metadata() {
            Ok(m) if m.is_dir() => tree_bytes(&e.path()),
            Ok(m) => m.blocks() * 512,
            Err(_) => 0,
        })
        .sum()
}

fn median(mut v: Vec<f64>) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

fn secs(s: f64) -> String {
    if s < 1.0 {
        format!("{:.0} ms", s * 1000.0)
    } else {
        format!("{s:.2} s")
    }
}

fn mib(bytes: f64) -> String {
    format!("{:.1} MiB", bytes / (1024.0 * 1024.0))
}

fn human_bytes(b: u64) -> String {
    if b < 10 * 1024 {
        format!("{b} B")
    } else if b < 10 * 1024 * 1024 {
        format!("{:.1} KiB", b as f64 / 1024.0)
    } else {
        mib(b as f64)
    }
}

/// Runs `cmd`, failing with its stderr unless it succeeds; returns stdout.
fn run_ok(cmd: &mut Command) -> Result<String> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("cannot start {:?}", cmd.get_program()))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed ({}):\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Seconds `f` takes.
fn timed(f: impl FnOnce() -> Result<()>) -> Result<f64> {
    let t = Instant::now();
    f()?;
    Ok(t.elapsed().as_secs_f64())
}

fn progress(msg: &str) {
    eprintln!("bench: {msg}");
}

/// `git` without user or system configuration.
fn git(dir: &Path) -> Command {
    let mut c = Command::new("git");
    c.current_dir(dir)
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .env("GIT_CONFIG_GLOBAL", "/dev/null");
    c
}

/// `git archive HEAD <path> | sha256sum`: reading and hashing the tree.
fn git_archive_sha256(repo: &Path, path: &str) -> Result<()> {
    let mut archive = git(repo)
        .args(["archive", "HEAD", path])
        .stdout(Stdio::piped())
        .spawn()
        .context("git archive")?;
    let stdout = archive
        .stdout
        .take()
        .ok_or_else(|| anyhow!("git archive: no stdout"))?;
    let out = Command::new("sha256sum")
        .stdin(stdout)
        .output()
        .context("sha256sum")?;
    let st = archive.wait()?;
    if !st.success() || !out.status.success() {
        bail!("git archive | sha256sum failed");
    }
    Ok(())
}

/// Every regular file under `dir`, sorted.
fn files_under(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).with_context(|| d.display().to_string())? {
            let e = e?;
            let ft = e.file_type()?;
            if ft.is_dir() {
                stack.push(e.path());
            } else if ft.is_file() {
                out.push(e.path());
            }
        }
    }
    out.sort();
    Ok(out)
}

/// `sha256sum` over `files` (in batches like `xargs`), output discarded.
fn sha256sum_files(files: &[PathBuf]) -> Result<()> {
    for chunk in files.chunks(2000) {
        let st = Command::new("sha256sum")
            .args(chunk)
            .stdout(Stdio::null())
            .status()
            .context("sha256sum")?;
        if !st.success() {
            bail!("sha256sum failed");
        }
    }
    Ok(())
}

/// The benchmark's shared state: binaries, fixture, repositories.
struct Bench {
    o: Opts,
    work: PathBuf,
    _tmp: Option<tempfile::TempDir>,
    cairn: PathBuf,
    agent: PathBuf,
    git: PathBuf,
    b1: PathBuf,
    b2: PathBuf,
    objects: u64,
    object_bytes: u64,
    results: serde_json::Map<String, Value>,
}

impl Bench {
    fn new(o: Opts) -> Result<Self> {
        let (work, tmp) = match &o.keep {
            Some(d) => {
                std::fs::create_dir_all(d)?;
                if std::fs::read_dir(d)?.next().is_some() {
                    bail!("--keep {}: directory is not empty", d.display());
                }
                (d.clone(), None)
            }
            None => {
                let t = tempfile::Builder::new().prefix("cairn-bench").tempdir()?;
                (t.path().to_path_buf(), Some(t))
            }
        };
        let exe = |n: &str| -> Result<PathBuf> {
            let p = o.bin_dir.join(n);
            if p.is_file() {
                Ok(p)
            } else {
                bail!(
                    "{} not found: build the binaries first (cargo build --release --workspace --bins)",
                    p.display()
                )
            }
        };
        let cairn = exe("cairn")?;
        let agent = if ["footprint", "delta", "mesh"].iter().any(|g| o.wants(g)) {
            exe("cairn-agent")?
        } else {
            o.bin_dir.join("cairn-agent")
        };
        if !o.key.is_file() {
            bail!("release key {} not found (--key FILE)", o.key.display());
        }
        Ok(Bench {
            cairn,
            agent,
            git: work.join("git"),
            b1: work.join("b1.bundle"),
            b2: work.join("b2.bundle"),
            objects: 0,
            object_bytes: 0,
            results: serde_json::Map::new(),
            work,
            _tmp: tmp,
            o,
        })
    }

    fn path(&self, name: &str) -> PathBuf {
        self.work.join(name)
    }

    fn record(&mut self, key: &str, v: Value) {
        self.results.insert(key.to_owned(), v);
    }

    fn build(&self, git_ref: &str, out: &Path) -> Result<()> {
        self.build_format(git_ref, out, None)
    }

    /// `cairn bundle build`, in the default format or `--format F`.
    fn build_format(&self, git_ref: &str, out: &Path, format: Option<u32>) -> Result<()> {
        let _ = std::fs::remove_file(out);
        let mut cmd = Command::new(&self.cairn);
        cmd.args(["bundle", "build", "--git"]).arg(&self.git).args([
            "--ref",
            git_ref,
            "--path",
            "clusters/edge",
            "--source-name",
            "bench",
        ]);
        if let Some(f) = format {
            cmd.arg("--format").arg(f.to_string());
        }
        run_ok(cmd.arg("--out").arg(out))?;
        Ok(())
    }

    fn release(&self, repo: &Path, bundle: &Path) -> Result<()> {
        std::fs::create_dir_all(repo)?;
        run_ok(
            Command::new(&self.cairn)
                .arg("release")
                .arg("--repo")
                .arg(repo)
                .arg("--bundle")
                .arg(bundle)
                .args(["--channel", "stable", "--key"])
                .arg(&self.o.key),
        )?;
        Ok(())
    }

    fn fixture(&mut self) -> Result<()> {
        progress(&format!(
            "fixture: {} apps, {} KiB ConfigMaps, 2 commits",
            self.o.apps, self.o.configmap_kb
        ));
        make_manifest_repo(
            &self.git,
            &FixtureOptions {
                apps: self.o.apps,
                configmap_kb: self.o.configmap_kb.max(1),
                commits: 2,
            },
        )?;
        // A freshly committed repository holds loose objects (one zlib
        // file each); a clone, which is what a release engineer builds
        // from, is packed. Reading 9,000 loose objects costs `git archive`
        // (the build row's floor) 2–3× what a pack does, which flatters
        // every ratio against it, so the fixture is packed first.
        run_ok(git(&self.git).args(["repack", "-a", "-d", "-q"]))
            .context("git repack of the fixture")?;
        self.build("HEAD~1", &self.b1.clone())?;
        self.build("HEAD", &self.b2.clone())?;
        let inspect = run_ok(
            Command::new(&self.cairn)
                .args(["bundle", "inspect", "--json"])
                .arg(&self.b1),
        )?;
        let v: Value = serde_json::from_str(&inspect).context("bundle inspect --json")?;
        self.objects = v["objects"].as_u64().unwrap_or(0);
        self.object_bytes = v["bytes"].as_u64().unwrap_or(0);
        let size = std::fs::metadata(&self.b1)?.len();
        self.record("objects", json!(self.objects));
        self.record("object_bytes", json!(self.object_bytes));
        self.record("bundle_file_bytes", json!(size));
        Ok(())
    }

    /// Bundle build vs `git archive | sha256sum` and vs `kubectl kustomize`.
    fn build_rows(&mut self, rows: &mut Vec<Row>) -> Result<()> {
        // A checkout with a kustomization listing every file, for kubectl.
        let checkout = self.path("checkout");
        std::fs::create_dir_all(&checkout)?;
        let tar = self.path("tree.tar");
        run_ok(
            git(&self.git)
                .args(["archive", "-o"])
                .arg(&tar)
                .args(["HEAD", "clusters/edge"]),
        )?;
        run_ok(
            Command::new("tar")
                .arg("-xf")
                .arg(&tar)
                .arg("-C")
                .arg(&checkout),
        )?;
        let edge = checkout.join("clusters/edge");
        let mut resources = String::from(
            "apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\nresources:\n",
        );
        for f in files_under(&edge)? {
            if let Ok(rel) = f.strip_prefix(&edge) {
                resources.push_str(&format!("  - {}\n", rel.display()));
            }
        }
        std::fs::write(edge.join("kustomization.yaml"), resources)?;
        let kubectl = Command::new("kubectl")
            .args(["version", "--client"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .map(|s| s.success())
            .unwrap_or(false);

        let out = self.path("bench.bundle");
        let render = self.path("kustomize.out");
        let limit = Duration::from_secs(self.o.kustomize_timeout);
        // Seconds kubectl kustomize takes, or None if it passed the limit.
        let kustomize = || -> Result<Option<f64>> {
            let t = Instant::now();
            let mut child = Command::new("kubectl")
                .arg("kustomize")
                .arg(&edge)
                .stdout(std::fs::File::create(&render)?)
                .stderr(Stdio::null())
                .spawn()?;
            loop {
                if let Some(st) = child.try_wait()? {
                    if !st.success() {
                        bail!("kubectl kustomize failed ({st})");
                    }
                    break;
                }
                if t.elapsed() > limit {
                    let _ = child.kill();
                    let _ = child.wait();
                    return Ok(None);
                }
                std::thread::sleep(Duration::from_millis(5));
            }
            let secs = t.elapsed().as_secs_f64();
            if std::fs::metadata(&render)?.len() == 0 {
                bail!("kubectl kustomize printed nothing");
            }
            Ok(Some(secs))
        };
        // Warm-up (page cache; kubectl's first start only in quick mode,
        // where one render is short).
        let out1 = self.path("bench-format1.bundle");
        self.build("HEAD", &out)?;
        self.build_format("HEAD", &out1, Some(1))?;
        git_archive_sha256(&self.git, "clusters/edge")?;
        if kubectl && self.o.quick {
            kustomize()?;
        }
        // Format 2 (the default), format 1 and the floor, one after the
        // other in each run, so that load from elsewhere falls on all three.
        let (mut c, mut c1, mut a) = (Vec::new(), Vec::new(), Vec::new());
        for r in 0..self.o.runs {
            progress(&format!("build run {}/{}", r + 1, self.o.runs));
            c.push(timed(|| self.build("HEAD", &out))?);
            c1.push(timed(|| self.build_format("HEAD", &out1, Some(1)))?);
            a.push(timed(|| git_archive_sha256(&self.git, "clusters/edge"))?);
        }
        // kubectl kustomize is slow on thousands of resources: its own,
        // shorter series.
        let mut k = Vec::new();
        let mut timed_out = false;
        if kubectl {
            let runs = self.o.kustomize_runs.min(self.o.runs);
            for r in 0..runs {
                progress(&format!("kubectl kustomize run {}/{runs}", r + 1));
                match kustomize()? {
                    Some(t) => k.push(t),
                    None => {
                        timed_out = true;
                        break;
                    }
                }
            }
        }
        let (c, c1, a) = (median(c), median(c1), median(a));
        let n = self.objects;
        rows.push(row(
            &format!("bundle build ({n} objects) vs `git archive | sha256sum`"),
            secs(c),
            secs(a),
            format!("{:.2}×", c / a),
            "≤ 2.6× (issue 17)",
            Some(c <= 2.6 * a),
        ));
        rows.push(row(
            &format!("bundle build --format 1 ({n} objects) vs `git archive | sha256sum`"),
            secs(c1),
            secs(a),
            format!("{:.2}× (format 2: {:.2}× of format 1)", c1 / a, c / c1),
            "—",
            None,
        ));
        self.record("build_secs", json!(c));
        self.record("build_format1_secs", json!(c1));
        self.record("git_archive_secs", json!(a));
        let figure = format!("bundle build ({n} objects) vs `kubectl kustomize`");
        if !kubectl {
            rows.push(row(
                &figure,
                secs(c),
                "n/a (kubectl not found)".into(),
                "—".into(),
                "< 1×",
                None,
            ));
        } else if timed_out {
            let l = limit.as_secs_f64();
            rows.push(row(
                &figure,
                secs(c),
                format!("> {} (stopped)", secs(l)),
                format!("< {:.3}×", c / l),
                "< 1×",
                Some(c < l),
            ));
            self.record("kustomize_secs", json!(format!("> {l}")));
        } else {
            let k = median(k);
            rows.push(row(
                &figure,
                secs(c),
                secs(k),
                format!("{:.2}×", c / k),
                "< 1×",
                Some(c < k),
            ));
            self.record("kustomize_secs", json!(k));
        }
        Ok(())
    }

    /// A small Kustomize directory inside the large fixture repository:
    /// `cairn bundle build --path DIR` (export of what the kustomization
    /// references, then `kubectl kustomize`) vs `kubectl kustomize DIR` on
    /// a checkout. The export must not cost more than copying the
    /// directory, whatever the size of the rest of the repository.
    fn kustomize_dir_rows(&mut self, rows: &mut Vec<Row>) -> Result<()> {
        let figure = "kustomize directory in the large repository: bundle build vs `kubectl kustomize` on it";
        let kubectl = Command::new("kubectl")
            .args(["version", "--client"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        if !kubectl {
            rows.push(row(
                figure,
                "—".into(),
                "n/a (kubectl not found)".into(),
                "—".into(),
                "≤ 1.2×",
                None,
            ));
            return Ok(());
        }
        let clone = self.path("kdir-repo");
        let _ = std::fs::remove_dir_all(&clone);
        run_ok(
            git(&self.work)
                .args(["clone", "-q", "--local"])
                .arg(&self.git)
                .arg(&clone),
        )?;
        let kdir = clone.join("apps/podinfo");
        std::fs::create_dir_all(&kdir)?;
        std::fs::write(
            kdir.join("kustomization.yaml"),
            "apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\nnamespace: podinfo\n\
             resources:\n  - deployment.yaml\n  - service.yaml\n\
             configMapGenerator:\n  - name: settings\n    literals: [mode=edge]\n\
             patches:\n  - path: replicas.yaml\n",
        )?;
        std::fs::write(
            kdir.join("deployment.yaml"),
            concat!(
                "apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: podinfo}\nspec:\n",
                "  replicas: 1\n",
                "  selector: {matchLabels: {app: podinfo}}\n",
                "  template:\n",
                "    metadata: {labels: {app: podinfo}}\n",
                "    spec:\n",
                "      containers:\n",
                "      - {name: podinfo, image: ghcr.io/stefanprodan/podinfo:6.5.0}\n",
            ),
        )?;
        std::fs::write(
            kdir.join("service.yaml"),
            "apiVersion: v1\nkind: Service\nmetadata: {name: podinfo}\nspec:\n  selector: {app: podinfo}\n  ports: [{port: 9898}]\n",
        )?;
        std::fs::write(
            kdir.join("replicas.yaml"),
            "apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: podinfo}\nspec: {replicas: 2}\n",
        )?;
        run_ok(git(&clone).args(["add", "-A"]))?;
        run_ok(git(&clone).args([
            "-c",
            "gc.auto=0",
            "-c",
            "user.name=bench",
            "-c",
            "user.email=bench@example.invalid",
            "commit",
            "-q",
            "-m",
            "podinfo",
        ]))?;
        let out = self.path("kdir.bundle");
        let build = || -> Result<()> {
            let _ = std::fs::remove_file(&out);
            run_ok(
                Command::new(&self.cairn)
                    .args(["bundle", "build", "--git"])
                    .arg(&clone)
                    .args(["--path", "apps/podinfo", "--out"])
                    .arg(&out),
            )
            .map(|_| ())
        };
        let render = || -> Result<()> {
            run_ok(Command::new("kubectl").arg("kustomize").arg(&kdir)).map(|_| ())
        };
        // Packed, as a clone from a server is (and as `git commit`'s
        // automatic gc would leave it, in the background, during the runs).
        run_ok(git(&clone).args(["repack", "-adq"]))?;
        build()?;
        render()?;
        let (mut c, mut k) = (Vec::new(), Vec::new());
        for r in 0..self.o.runs {
            progress(&format!(
                "kustomize directory run {}/{}",
                r + 1,
                self.o.runs
            ));
            c.push(timed(build)?);
            k.push(timed(render)?);
        }
        let (c, k) = (median(c), median(k));
        rows.push(row(
            figure,
            secs(c),
            secs(k),
            format!("{:.2}×", c / k),
            "≤ 1.2×",
            Some(c <= 1.2 * k),
        ));
        self.record("kustomize_dir_build_secs", json!(c));
        self.record("kustomize_dir_kubectl_secs", json!(k));
        Ok(())
    }

    /// `cairn verify` vs `sha256sum` over the same object files.
    fn verify_rows(&mut self, repo: &Path, rows: &mut Vec<Row>) -> Result<()> {
        let files = files_under(&repo.join("objects"))?;
        let verify = || -> Result<()> {
            run_ok(
                Command::new(&self.cairn)
                    .args(["verify", "--repo"])
                    .arg(repo)
                    .args(["--channel", "stable"]),
            )
            .map(|_| ())
        };
        verify()?;
        sha256sum_files(&files)?;
        let (mut v, mut s) = (Vec::new(), Vec::new());
        for r in 0..self.o.runs {
            progress(&format!("verify run {}/{}", r + 1, self.o.runs));
            v.push(timed(verify)?);
            s.push(timed(|| sha256sum_files(&files))?);
        }
        let (v, s) = (median(v), median(s));
        rows.push(row(
            &format!("verify ({} object files) vs `sha256sum`", files.len()),
            secs(v),
            secs(s),
            format!("{:.2}×", v / s),
            "≤ 1.0× (issue 17)",
            Some(v <= s),
        ));
        self.record("verify_secs", json!(v));
        self.record("sha256sum_secs", json!(s));
        Ok(())
    }

    /// Writes `<dir>/config.yaml` for agent `id` (dir relative to the work
    /// directory); returns its path.
    fn agent_config(
        &self,
        dir: &str,
        id: &str,
        sources: &[String],
        extra: &str,
    ) -> Result<PathBuf> {
        let name = id;
        let dir = self.path(dir);
        std::fs::create_dir_all(&dir)?;
        let src: String = sources.iter().map(|s| format!("\n  - {s}")).collect();
        let text = format!(
            "insecureAllowDevelopmentRoot: true\nagentId: {name}\ndataDir: {data}\nchannel: stable\nsources:{src}\npollInterval: 1s\n\
             reconcileInterval: 60s\nmaxBackoff: 1s\nrequestTimeout: 30s\ntarget:\n  manifestsDir: {man}\n\
             listen:\n  http: 127.0.0.1:0\n{extra}",
            data = dir.join("data").display(),
            src = if src.is_empty() { " []".to_owned() } else { src },
            man = dir.join("manifests").display(),
        );
        let p = dir.join("config.yaml");
        std::fs::write(&p, text)?;
        Ok(p)
    }

    fn once(&self, cfg: &Path) -> Result<()> {
        run_ok(
            Command::new(&self.agent)
                .args(["run", "--once", "--config"])
                .arg(cfg)
                .env("CAIRN_LOG", "warn"),
        )
        .map(|_| ())
    }

    /// Bytes an agent downloads for commit 2 after commit 1, vs the first
    /// (full) download; real bytes counted by the file server.
    fn delta_rows(&mut self, repo: &Path, rows: &mut Vec<Row>) -> Result<()> {
        progress("delta: full sync, then the one-object update");
        let server = StaticServer::start(repo)?;
        let cfg = self.agent_config("delta-agent", "delta-agent", &[server.url()], "")?;
        server.reset_counters();
        self.once(&cfg)?;
        let full = server.bytes_sent();
        let full_requests = server.requests();
        self.release(repo, &self.b2.clone())?;
        server.reset_counters();
        self.once(&cfg)?;
        let delta = server.bytes_sent();
        let delta_requests = server.requests();
        let bundle_size = std::fs::metadata(&self.b2)?.len();
        // Where the delta goes: the new top document (format 2; format 1:
        // the whole manifest) and the new manifest chunks.
        let inspect = run_ok(
            Command::new(&self.cairn)
                .args(["bundle", "inspect", "--json"])
                .arg(&self.b2),
        )?;
        let id = serde_json::from_str::<Value>(&inspect)?["id"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        let hex = id.strip_prefix("sha256:").unwrap_or(&id);
        let manifest = std::fs::metadata(
            repo.join("objects/sha256")
                .join(hex.get(..2).unwrap_or(""))
                .join(hex),
        )
        .map(|m| m.len())
        .unwrap_or(0);
        let pct = 100.0 * delta as f64 / full.max(1) as f64;
        let (m1, m2) = (read_manifest(&self.b1)?, read_manifest(&self.b2)?);
        let (e1, e2) = (m1.encode_all(), m2.encode_all());
        let old: std::collections::BTreeSet<_> = e1.chunks.iter().map(|(a, _)| a).collect();
        let new_chunks: Vec<_> = e2.chunks.iter().filter(|(a, _)| !old.contains(a)).collect();
        let chunk_bytes: usize = new_chunks.iter().map(|(_, b)| b.len()).sum();
        rows.push(row(
            &format!(
                "delta: one of {} objects changed, bytes fetched",
                self.objects
            ),
            format!(
                "{} ({delta_requests} requests; of which the new top document {} and {} new chunk(s) of {} in {})",
                human_bytes(delta),
                human_bytes(manifest),
                new_chunks.len(),
                e2.chunks.len(),
                human_bytes(chunk_bytes as u64)
            ),
            format!(
                "{} full fetch ({full_requests} requests); bundle file {}",
                human_bytes(full),
                human_bytes(bundle_size)
            ),
            format!("{pct:.3} %"),
            "≤ 1 %",
            Some(pct <= 1.0),
        ));
        chunking_rows(&m1, &m2, rows);
        self.record("chunks", json!(e2.chunks.len()));
        self.record("delta_new_chunks", json!(new_chunks.len()));
        self.record("delta_new_chunk_bytes", json!(chunk_bytes));
        self.record("delta_bytes", json!(delta));
        self.record("delta_manifest_bytes", json!(manifest));
        self.record("full_bytes", json!(full));
        self.record("delta_requests", json!(delta_requests));
        self.record("full_requests", json!(full_requests));
        self.record("bundle2_file_bytes", json!(bundle_size));
        Ok(())
    }

    /// Idle and peak RSS of a running agent that applied the bundle, and
    /// binary sizes.
    fn footprint_rows(&mut self, repo: &Path, rows: &mut Vec<Row>) -> Result<()> {
        let server = StaticServer::start(repo)?;
        let runs = self.o.runs.min(3);
        let (mut idle, mut peak) = (Vec::new(), Vec::new());
        let (mut sync, mut disk) = (Vec::new(), Vec::new());
        for r in 0..runs {
            progress(&format!("footprint run {}/{runs}", r + 1));
            let cfg =
                self.agent_config(&format!("rss-agent-{r}"), "rss-agent", &[server.url()], "")?;
            let data = self.path(&format!("rss-agent-{r}/data"));
            let mut child = Command::new(&self.agent)
                .args(["run", "--config"])
                .arg(&cfg)
                .env("CAIRN_LOG", "warn")
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()?;
            let started = Instant::now();
            let res = (|| -> Result<(u64, u64, f64, u64)> {
                wait_until(
                    Duration::from_secs(300),
                    "the agent to apply the bundle",
                    || {
                        Ok(read_status(&data).is_some_and(|s| {
                            s["ready"] == json!(true)
                                && s["lastGood"]["sequence"].as_u64().is_some()
                        }))
                    },
                )?;
                let took = started.elapsed().as_secs_f64();
                // Idle: let the post-adoption work and allocator settle.
                std::thread::sleep(Duration::from_secs(3));
                let st = std::fs::read_to_string(format!("/proc/{}/status", child.id()))?;
                Ok((
                    proc_kib(&st, "VmRSS")? * 1024,
                    proc_kib(&st, "VmHWM")? * 1024,
                    took,
                    tree_bytes(&data),
                ))
            })();
            let _ = child.kill();
            let _ = child.wait();
            let (i, p, t, b) = res?;
            idle.push(i as f64);
            peak.push(p as f64);
            sync.push(t);
            disk.push(b as f64);
        }
        let (sync, disk) = (median(sync), median(disk));
        self.record("sync_seconds", json!(sync));
        self.record("data_dir_bytes", json!(disk));
        progress(&format!(
            "footprint: start to applied {sync:.1} s, data dir {} (median)",
            mib(disk)
        ));
        let (idle, peak) = (median(idle), median(peak));
        let n = self.objects;
        rows.push(row(
            &format!("agent idle RSS after applying {n} objects"),
            mib(idle),
            "—".into(),
            "—".into(),
            "≤ 16 MiB",
            Some(idle <= 16.0 * 1024.0 * 1024.0),
        ));
        rows.push(row(
            &format!("agent peak RSS during sync of {n} objects (VmHWM)"),
            mib(peak),
            "—".into(),
            "—".into(),
            "≤ 32 MiB",
            Some(peak <= 32.0 * 1024.0 * 1024.0),
        ));
        self.record("idle_rss_bytes", json!(idle));
        self.record("peak_rss_bytes", json!(peak));
        for (name, path) in [
            ("cairn-agent", self.agent.clone()),
            ("cairn", self.cairn.clone()),
        ] {
            let size = std::fs::metadata(&path)?.len();
            rows.push(row(
                &format!("binary size `{name}` ({})", profile_of(&path)),
                mib(size as f64),
                "—".into(),
                "—".into(),
                "≤ 20 MiB",
                Some(size <= 20 << 20),
            ));
            self.record(&format!("binary_bytes_{name}"), json!(size));
        }
        Ok(())
    }

    /// A release reaching `n` agent processes through the mesh.
    fn mesh_rows(&mut self, staged: &Path, rows: &mut Vec<Row>) -> Result<()> {
        if self.o.mesh.is_empty() {
            return Ok(());
        }
        let ca = self.path("mesh-ca");
        if let Err(e) = run_ok(
            Command::new(&self.cairn)
                .args(["mesh", "ca", "init", "--out"])
                .arg(&ca),
        ) {
            for &n in &self.o.mesh.clone() {
                for topo in ["line", "random"] {
                    rows.push(row(
                        &format!("mesh: release reaches {n} agents ({topo})"),
                        "n/a (mesh not ready)".into(),
                        "—".into(),
                        "—".into(),
                        "—",
                        None,
                    ));
                }
            }
            progress(&format!("mesh not ready: {e:#}"));
            return Ok(());
        }
        let bundle_bytes = std::fs::metadata(&self.b1)?.len();
        let mut block = 100 + (std::process::id() % 100) as u8;
        let mut failure: Option<anyhow::Error> = None;
        for &n in &self.o.mesh.clone() {
            for topo in [Topology::Line, Topology::Random] {
                let (mut times, mut bytes) = (Vec::new(), Vec::new());
                for r in 0..self.o.mesh_runs {
                    progress(&format!(
                        "mesh: {n} agents, {}, run {}/{}",
                        topo.name(),
                        r + 1,
                        self.o.mesh_runs
                    ));
                    block = block.wrapping_add(1).max(100);
                    match self.mesh_run(&ca, staged, n, topo, block, r) {
                        Ok(m) => {
                            times.push(m.secs);
                            bytes.push(m.bytes as f64);
                        }
                        Err(e) => {
                            progress(&format!("mesh run failed: {e:#}"));
                            failure = Some(e);
                            break;
                        }
                    }
                }
                if let Some(e) = failure.take() {
                    let first = format!("{e}");
                    rows.push(row(
                        &format!("mesh: release reaches {n} agents ({})", topo.name()),
                        format!(
                            "n/a (mesh not ready: {})",
                            first.lines().next().unwrap_or("")
                        ),
                        "—".into(),
                        "—".into(),
                        "—",
                        None,
                    ));
                    continue;
                }
                let (t, b) = (median(times), median(bytes));
                let base = bundle_bytes as f64 * n as f64;
                rows.push(row(
                    &format!("mesh: release reaches {n} agents ({})", topo.name()),
                    format!("{}, {} total", secs(t), human_bytes(b as u64)),
                    format!("bundle × {n} = {}", human_bytes(base as u64)),
                    format!("{:.2}× bytes", b / base),
                    "—",
                    None,
                ));
                self.record(&format!("mesh_{n}_{}_secs", topo.name()), json!(t));
                self.record(&format!("mesh_{n}_{}_bytes", topo.name()), json!(b));
            }
        }
        Ok(())
    }

    fn mesh_run(
        &self,
        ca: &Path,
        staged: &Path,
        n: usize,
        topo: Topology,
        block: u8,
        run: usize,
    ) -> Result<MeshRun> {
        let name = format!("mesh-{n}-{}-{run}", topo.name());
        let base = self.path(&name);
        // Agent 0's source: an HTTP server over an empty folder, into which
        // the released repository is renamed at t0.
        let src = base.join("src");
        std::fs::create_dir_all(&src)?;
        let server = StaticServer::start(&src)?;
        // A loopback block of this process's own (reserved across
        // processes, docs/TESTING.md "Addresses"); it outlives the fleet.
        let lb = LoopbackBlock::reserve();
        let addrs: Vec<String> = (0..n).map(|i| lb.mesh_addr(i)).collect();
        let seeds = topo.seeds(n, block as u64 * 7919 + n as u64);
        let mut fleet = Fleet(Vec::new());
        let mut data = Vec::new();
        for i in 0..n {
            let id = format!("{name}-a{i}");
            let cert = base.join(format!("cert-{i}"));
            run_ok(
                Command::new(&self.cairn)
                    .args(["mesh", "issue", "--ca"])
                    .arg(ca)
                    .args(["--agent-id", &id, "--out"])
                    .arg(&cert),
            )?;
            let peers: Vec<String> = seeds[i]
                .iter()
                .map(|&j| format!("\"{}\"", addrs[j]))
                .collect();
            let mesh = format!(
                "mesh:\n  listen: {listen}\n  cert: {c}/agent.crt\n  key: {c}/agent.key\n  ca: {c}/ca.crt\n  \
                 peers: [{peers}]\n  antiEntropyInterval: 1s\n",
                listen = addrs[i],
                c = cert.display(),
                peers = peers.join(", "),
            );
            let sources = if i == 0 {
                vec![server.url()]
            } else {
                Vec::new()
            };
            let cfg = self.agent_config(&format!("{name}/{id}"), &id, &sources, &mesh)?;
            let log = std::fs::File::create(base.join(format!("{id}.log")))?;
            fleet.0.push(
                Command::new(&self.agent)
                    .args(["run", "--log-format", "json", "--config"])
                    .arg(&cfg)
                    .env("CAIRN_LOG", "warn")
                    .stdout(Stdio::null())
                    .stderr(log)
                    .spawn()?,
            );
            data.push(self.path(&format!("{name}/{id}/data")));
        }
        // Wait for every agent to be up, then for the mesh to form.
        wait_until(Duration::from_secs(60), "mesh agents to start", || {
            fleet.check_alive(&base)?;
            Ok(data.iter().all(|d| read_status(d).is_some()))
        })?;
        std::thread::sleep(Duration::from_millis(if self.o.quick {
            2000
        } else {
            4000
        }));
        let listens: Vec<String> = data
            .iter()
            .map(|d| {
                read_status(d)
                    .and_then(|s| s["listen"].as_str().map(str::to_owned))
                    .ok_or_else(|| anyhow!("{}: no HTTP address in status", d.display()))
            })
            .collect::<Result<_>>()?;
        let before = mesh_bytes_in(&listens)?;
        // t0: the release appears at agent 0's source.
        std::fs::remove_dir(&src)?;
        copy_dir(staged, &src)?;
        let t0 = Instant::now();
        let seq = |d: &PathBuf| read_status(d).and_then(|s| s["adopted"]["sequence"].as_u64());
        wait_until(
            Duration::from_secs(600),
            "every mesh agent to adopt the release",
            || {
                fleet.check_alive(&base)?;
                Ok(data.iter().all(|d| seq(d) == Some(1)))
            },
        )?;
        let secs = t0.elapsed().as_secs_f64();
        let after = mesh_bytes_in(&listens)?;
        drop(fleet);
        Ok(MeshRun {
            secs,
            bytes: after.saturating_sub(before) + server.bytes_sent(),
        })
    }
}

/// Child processes killed on drop.
struct Fleet(Vec<Child>);

impl Fleet {
    /// Fails (with the end of its log) if an agent has exited.
    fn check_alive(&mut self, logs: &Path) -> Result<()> {
        for (i, c) in self.0.iter_mut().enumerate() {
            if let Some(st) = c.try_wait()? {
                let log = files_under(logs)?
                    .into_iter()
                    .find(|p| p.to_string_lossy().ends_with(&format!("-a{i}.log")))
                    .and_then(|p| std::fs::read_to_string(p).ok())
                    .unwrap_or_default();
                let tail: String = log.lines().rev().take(3).collect::<Vec<_>>().join(" / ");
                bail!("mesh agent {i} exited ({st}): {tail}");
            }
        }
        Ok(())
    }
}

impl Drop for Fleet {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

struct MeshRun {
    secs: f64,
    bytes: u64,
}

#[derive(Clone, Copy, Debug)]
enum Topology {
    /// Agent i knows only agent i-1 (agent 0 has the source).
    Line,
    /// Agent i knows a random earlier agent and one random other.
    Random,
}

impl Topology {
    fn name(self) -> &'static str {
        match self {
            Topology::Line => "line",
            Topology::Random => "random",
        }
    }

    /// Configured peers of each agent.
    fn seeds(self, n: usize, seed: u64) -> Vec<Vec<usize>> {
        let mut x = seed | 1;
        let mut next = |m: usize| {
            // xorshift64*
            x ^= x >> 12;
            x ^= x << 25;
            x ^= x >> 27;
            (x.wrapping_mul(0x2545_F491_4F6C_DD1D) % m as u64) as usize
        };
        (0..n)
            .map(|i| match self {
                _ if i == 0 => Vec::new(),
                Topology::Line => vec![i - 1],
                Topology::Random => {
                    let a = next(i);
                    let b = next(n);
                    if b != a && b != i {
                        vec![a, b]
                    } else {
                        vec![a]
                    }
                }
            })
            .collect()
    }
}

/// Sum of `cairn_mesh_bytes_total{direction="in"}` over agents.
fn mesh_bytes_in(listens: &[String]) -> Result<u64> {
    let mut total = 0u64;
    for l in listens {
        let text = http_get(l, "/metrics")?;
        for line in text.lines() {
            if line.starts_with("cairn_mesh_bytes_total{") && line.contains("direction=\"in\"") {
                if let Some(v) = line.rsplit(' ').next().and_then(|v| v.parse::<f64>().ok()) {
                    total += v as u64;
                }
            }
        }
    }
    Ok(total)
}

fn http_get(addr: &str, path: &str) -> Result<String> {
    use std::io::Write;
    let mut c = std::net::TcpStream::connect(addr).with_context(|| format!("connect {addr}"))?;
    c.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(
        c,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )?;
    let mut buf = Vec::new();
    c.read_to_end(&mut buf)?;
    let text = String::from_utf8_lossy(&buf).into_owned();
    Ok(text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default())
}

fn copy_dir(from: &Path, to: &Path) -> Result<()> {
    let st = Command::new("cp").arg("-a").arg(from).arg(to).status()?;
    if !st.success() {
        bail!("cp -a {} {} failed", from.display(), to.display());
    }
    Ok(())
}

fn read_status(data: &Path) -> Option<Value> {
    let bytes = std::fs::read(data.join("status.json")).ok()?;
    serde_json::from_slice(&bytes).ok()
}

fn wait_until(limit: Duration, what: &str, mut cond: impl FnMut() -> Result<bool>) -> Result<()> {
    let end = Instant::now() + limit;
    while Instant::now() < end {
        if cond()? {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(25));
    }
    bail!("timed out after {limit:?} waiting for {what}")
}

/// A `/proc/PID/status` field in KiB.
fn proc_kib(status: &str, field: &str) -> Result<u64> {
    status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .ok_or_else(|| anyhow!("{field} missing from /proc status"))
}

fn profile_of(path: &Path) -> &'static str {
    if path.components().any(|c| c.as_os_str() == "release") {
        "release, stripped"
    } else {
        "debug build"
    }
}

fn main() {
    if let Err(e) = real_main() {
        eprintln!("bench: {e:#}");
        std::process::exit(1);
    }
}

fn real_main() -> Result<()> {
    let o = parse_args()?;
    let mut b = Bench::new(o)?;
    let started = Instant::now();
    b.fixture()?;
    let mut rows = Vec::new();
    if b.o.wants("build") {
        b.build_rows(&mut rows)?;
    }
    if b.o.wants("kdir") {
        b.kustomize_dir_rows(&mut rows)?;
    }
    if ["verify", "footprint", "delta", "mesh"]
        .iter()
        .any(|g| b.o.wants(g))
    {
        // The released repository (commit 1).
        let repo = b.path("repo");
        progress("release of commit 1");
        b.release(&repo, &b.b1.clone())?;
        if b.o.wants("verify") {
            b.verify_rows(&repo, &mut rows)?;
        }
        // A copy of the commit-1 repository for the mesh runs.
        let staged = b.path("staged-repo");
        copy_dir(&repo, &staged)?;
        if b.o.wants("footprint") {
            b.footprint_rows(&repo, &mut rows)?;
        }
        if b.o.wants("delta") {
            b.delta_rows(&repo, &mut rows)?;
        }
        if b.o.wants("mesh") {
            b.mesh_rows(&staged, &mut rows)?;
        }
    }

    let o = &b.o;
    println!(
        "Cairn benchmark: {} objects ({} apps, {} KiB ConfigMaps; {} of object bytes), \
         {} run(s) per row (median){}, {} cores, binaries from {}\n",
        b.objects,
        o.apps,
        o.configmap_kb.max(1),
        human_bytes(b.object_bytes),
        o.runs,
        if o.mesh.is_empty() {
            String::new()
        } else {
            format!(", {} per mesh row", o.mesh_runs)
        },
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        o.bin_dir.display(),
    );
    println!("| figure | Cairn | baseline | ratio | target | met |");
    println!("|---|---|---|---|---|---|");
    for r in &rows {
        println!(
            "| {} | {} | {} | {} | {} | {} |",
            r.figure, r.cairn, r.baseline, r.ratio, r.target, r.met
        );
    }
    progress(&format!("done in {:.1} s", started.elapsed().as_secs_f64()));
    if let Some(p) = &b.o.json {
        b.results.insert(
            "rows".into(),
            json!(rows.iter().map(|r| r.figure.clone()).collect::<Vec<_>>()),
        );
        std::fs::write(
            p,
            serde_json::to_vec_pretty(&Value::Object(b.results.clone()))?,
        )?;
    }
    Ok(())
}
