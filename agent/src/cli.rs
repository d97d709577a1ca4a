//! The `cairn-agent` command line: `run`, `status`, `hold` and
//! `release-hold` (and, hidden, for packagers: `completions SHELL` and
//! `man [DIR]`, see [`cairn_cli_docs`]).
//!
//! Errors print as `cairn-agent: ...` (one line each) with exit code 1;
//! usage errors exit 2.

use crate::config::{Config, LogFormat};
use crate::hold::Hold;
use crate::status::Status;
use crate::{Agent, Error};
use clap::{Parser, Subcommand, ValueEnum};
use std::path::PathBuf;

/// Exit code for a failed command.
pub const EXIT_FAILURE: i32 = 1;
/// Exit code for a usage error.
pub const EXIT_USAGE: i32 = 2;

/// The Cairn agent: pulls signed releases, verifies them against the
/// embedded trust root, keeps the last-good state and reconciles it.
#[derive(Debug, Parser)]
#[command(name = "cairn-agent", version, about, max_term_width = 100)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum LogFormatArg {
    Text,
    Json,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the agent (sync, verify, store, reconcile).
    Run {
        /// Configuration file (YAML); CAIRN_* environment variables override it.
        #[arg(long, env = "CAIRN_CONFIG")]
        config: Option<PathBuf>,
        /// One sync and one reconcile, then exit: 0 when the target matches
        /// the adopted release, 1 with the reason otherwise.
        #[arg(long)]
        once: bool,
        /// Log format (overrides `logFormat`).
        #[arg(long, value_enum)]
        log_format: Option<LogFormatArg>,
    },
    /// Show the agent's status (from <dataDir>/status.json, written by the
    /// agent after every sync and reconcile).
    Status {
        /// Configuration file, to find the data directory.
        #[arg(long, env = "CAIRN_CONFIG")]
        config: Option<PathBuf>,
        /// Data directory (overrides the configuration).
        #[arg(long)]
        data_dir: Option<PathBuf>,
        /// Print the status document as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Pause adoption of new releases on this cluster (a maintenance
    /// window): the running agent keeps enforcing and drift-correcting
    /// the adopted release. Writes <dataDir>/hold.json; shown in status
    /// and gossiped to the fleet.
    Hold {
        /// Configuration file, to find the data directory.
        #[arg(long, env = "CAIRN_CONFIG")]
        config: Option<PathBuf>,
        /// Data directory (overrides the configuration).
        #[arg(long)]
        data_dir: Option<PathBuf>,
        /// When the hold ends by itself: an RFC 3339 time
        /// (2026-12-01T06:00:00Z) or a duration from now (2h)
        /// [default: until `cairn-agent release-hold`].
        #[arg(long, value_name = "TIME")]
        until: Option<String>,
    },
    /// End a hold placed with `cairn-agent hold`: the agent adopts a newer
    /// release at its next check (within about a second) if its rollout
    /// wave is open.
    ReleaseHold {
        /// Configuration file, to find the data directory.
        #[arg(long, env = "CAIRN_CONFIG")]
        config: Option<PathBuf>,
        /// Data directory (overrides the configuration).
        #[arg(long)]
        data_dir: Option<PathBuf>,
    },
    /// Show what applying a bundle file would change on a live cluster:
    /// objects created, changed (field by field, from a server-side apply
    /// dry run) and pruned. Exit code 0: no changes, 1: changes, 2: error.
    Plan {
        /// The bundle file (`cairn bundle build --out FILE`).
        #[arg(long)]
        bundle: PathBuf,
        /// Kubeconfig of the cluster.
        #[arg(long)]
        kubeconfig: PathBuf,
        /// The agent's configuration: its store's inventory tells what
        /// would be pruned (without it nothing is reported as pruned).
        #[arg(long, env = "CAIRN_CONFIG")]
        config: Option<PathBuf>,
        /// Channel label the objects would carry.
        #[arg(long, default_value = "stable")]
        channel: String,
    },
    /// Print a shell completion script (for packagers; see
    /// docs/OPERATIONS.md).
    #[command(hide = true)]
    Completions(cairn_cli_docs::CompletionsArgs),
    /// Write man pages (for packagers; see docs/OPERATIONS.md).
    #[command(hide = true)]
    Man(cairn_cli_docs::ManArgs),
}

/// The data directory from `--data-dir`, the configuration, or the
/// environment / default.
fn data_dir(data_dir: Option<PathBuf>, config: Option<PathBuf>) -> Result<PathBuf, Error> {
    Ok(match (data_dir, config) {
        (Some(d), _) => d,
        (None, Some(c)) => Config::load(Some(&c))?.data_dir,
        (None, None) => std::env::var_os("CAIRN_DATA_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from(crate::config::DEFAULT_DATA_DIR)),
    })
}

/// At most two glibc malloc arenas, before any thread starts. Every thread
/// that allocates (tokio's blocking pool runs each store call on one;
/// there are 25–40 after a sync) otherwise gets an arena of its own, up
/// to 8 per core, each keeping freed memory: measured with 9,003 objects,
/// 7.4 MiB less idle RSS (docs/PERFORMANCE.md, "Memory"). Same as
/// `MALLOC_ARENA_MAX=2`, which still overrides it.
fn limit_malloc_arenas() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    if std::env::var_os("MALLOC_ARENA_MAX").is_none() {
        // SAFETY: mallopt only sets an allocator parameter; called before
        // the runtime's threads exist.
        unsafe {
            libc::mallopt(libc::M_ARENA_MAX, 2);
        }
    }
}

/// The most blocking threads the agent's runtime keeps (tokio's default is
/// 512). Blocking work is bounded by its callers already (store calls:
/// [`crate::store::STORE_THREADS`]; a directory source: the fetch
/// concurrency; one target apply), so this only caps the total; excess
/// work waits in tokio's queue. No blocking task waits for another one,
/// so a full pool cannot deadlock.
const BLOCKING_THREADS: usize = 16;

/// How long an idle blocking thread stays (tokio's default is 10 s):
/// threads a sync needed end soon after it instead of keeping their stacks
/// while the agent idles (docs/PERFORMANCE.md, "Memory").
const BLOCKING_KEEP_ALIVE: std::time::Duration = std::time::Duration::from_secs(2);

/// Runs the CLI with the process arguments and returns the exit code.
pub fn main() -> i32 {
    ignore_sigpipe();
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            let code = if e.use_stderr() { EXIT_USAGE } else { 0 };
            let _ = e.print();
            return code;
        }
    };
    match dispatch(cli) {
        Ok(code) => code,
        // The reader of our output went away (`cairn-agent status | head`):
        // end quietly, as Unix tools do.
        Err(Error::Io { what, source })
            if what == WRITING_STDOUT && source.kind() == std::io::ErrorKind::BrokenPipe =>
        {
            0
        }
        Err(e) => {
            use std::io::Write;
            let mut err = std::io::stderr().lock();
            // Errors may quote what a source served before it was
            // verified: no control sequences reach the terminal.
            for line in e.to_string().lines() {
                // Nothing to do if stderr is gone too.
                let _ = writeln!(
                    err,
                    "cairn-agent: {}",
                    cairn_keys::text::escape_untrusted(line)
                );
            }
            EXIT_FAILURE
        }
    }
}

fn dispatch(cli: Cli) -> Result<i32, Error> {
    match cli.command {
        Command::Run {
            config,
            once,
            log_format,
        } => {
            let cfg = Config::load(config.as_deref())?;
            // Before anything is opened: no store, no listener, no target.
            cfg.check_trust_root(cairn_keys::embedded::ORIGIN)?;
            let format = match log_format {
                Some(LogFormatArg::Json) => LogFormat::Json,
                Some(LogFormatArg::Text) => LogFormat::Text,
                None => cfg.log_format,
            };
            init_logging(format);
            // One crypto provider for rustls (reqwest, kube, mesh): ring.
            let _ = rustls::crypto::ring::default_provider().install_default();
            limit_malloc_arenas();
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .max_blocking_threads(BLOCKING_THREADS)
                .thread_keep_alive(BLOCKING_KEEP_ALIVE)
                .enable_all()
                .build()
                .map_err(|source| Error::Io {
                    what: "starting the runtime".into(),
                    source,
                })?;
            let r = rt.block_on(run(cfg, once));
            // Do not wait for blocking work still running (a store call
            // stuck on a failing disk): SIGTERM must stop the agent.
            rt.shutdown_timeout(std::time::Duration::from_secs(1));
            r
        }
        Command::Status {
            config,
            data_dir,
            json,
        } => {
            let dir = self::data_dir(data_dir, config)?;
            let s = Status::read(&dir)?;
            if json {
                let text =
                    serde_json::to_string_pretty(&s).map_err(|e| Error::Status(e.to_string()))?;
                out(&format!("{text}\n"))?;
            } else {
                out(&s.render(crate::unix_now()))?;
            }
            Ok(0)
        }
        Command::Hold {
            config,
            data_dir,
            until,
        } => {
            let dir = self::data_dir(data_dir, config)?;
            if !dir.is_dir() {
                return Err(Error::Hold(format!(
                    "{}: no such data directory; pass the agent's --config or --data-dir",
                    dir.display()
                )));
            }
            let now = crate::unix_now();
            let until = until
                .map(|u| crate::hold::parse_until(&u, now))
                .transpose()
                .map_err(Error::Hold)?;
            Hold { since: now, until }.write(&dir)?;
            out(&match until {
                Some(t) => format!(
                    "holding new releases until {} ({})\n",
                    crate::status::format_time(t),
                    crate::hold::hold_path(&dir).display()
                ),
                None => format!(
                    "holding new releases until `cairn-agent release-hold` ({})\n",
                    crate::hold::hold_path(&dir).display()
                ),
            })?;
            Ok(0)
        }
        Command::Plan {
            bundle,
            kubeconfig,
            config,
            channel,
        } => Ok(
            match plan_command(&bundle, &kubeconfig, config.as_deref(), &channel) {
                Ok(text) if text.is_empty() => 0,
                Ok(text) => {
                    out(&text)?;
                    1
                }
                Err(e) => {
                    use std::io::Write;
                    let mut err = std::io::stderr().lock();
                    for line in e.lines() {
                        let _ = writeln!(
                            err,
                            "cairn-agent: {}",
                            cairn_keys::text::escape_untrusted(line)
                        );
                    }
                    2
                }
            },
        ),
        Command::Completions(a) => {
            use clap::CommandFactory;
            let mut text = Vec::new();
            cairn_cli_docs::completions(Cli::command(), a.shell, &mut text).map_err(|source| {
                Error::Io {
                    what: "generating the completion script".into(),
                    source,
                }
            })?;
            out(&String::from_utf8_lossy(&text))?;
            Ok(0)
        }
        Command::Man(a) => {
            use clap::CommandFactory;
            let mut text = Vec::new();
            cairn_cli_docs::man_pages(Cli::command(), a.dir.as_deref(), &mut text).map_err(
                |source| Error::Io {
                    what: match &a.dir {
                        Some(d) => format!("writing man pages into {}", d.display()),
                        None => "generating the man page".into(),
                    },
                    source,
                },
            )?;
            out(&String::from_utf8_lossy(&text))?;
            Ok(0)
        }
        Command::ReleaseHold { config, data_dir } => {
            let dir = self::data_dir(data_dir, config)?;
            if Hold::remove(&dir)? {
                out("hold released; new releases are adopted again as their waves open\n")?;
            } else {
                out(&format!("no hold in {}\n", dir.display()))?;
            }
            Ok(0)
        }
    }
}

/// `cairn-agent plan`: the rendered changes, empty when there are none.
fn plan_command(
    bundle: &std::path::Path,
    kubeconfig: &std::path::Path,
    config: Option<&std::path::Path>,
    channel: &str,
) -> Result<String, String> {
    use crate::kubernetes;
    let limits = cairn_core::limits::Limits::default();
    // (object bytes, address) in entry order, read with core's one
    // bundle-file parser (limits checked before anything is allocated).
    let file = std::fs::File::open(bundle).map_err(|e| format!("{}: {e}", bundle.display()))?;
    let mut objects: Vec<(Vec<u8>, String)> = Vec::new();
    cairn_core::bundle_file::read_bundle(
        &mut std::io::BufReader::new(file),
        bundle,
        &limits,
        |e, bytes| {
            objects.push((bytes, e.object.to_string()));
            Ok(())
        },
    )
    .map_err(|e| e.to_string())?;
    let raw: Vec<(&[u8], &str)> = objects
        .iter()
        .map(|(b, a)| (b.as_slice(), a.as_str()))
        .collect();
    // Objects that are not Kubernetes objects fail here, before connecting.
    cairn_plan::diff::desired_objects(&cairn_plan::diff::split_site_documents(&raw).0, channel)
        .map_err(|e| format!("{}: {e}", bundle.display()))?;
    let previous = match config {
        None => Vec::new(),
        Some(c) => {
            let cfg = Config::load(Some(c)).map_err(|e| e.to_string())?;
            let key = match &cfg.target {
                crate::config::TargetConfig::Kubernetes(k) => {
                    kubernetes::inventory_key(k.kubeconfig.as_deref())
                }
                _ => return Err(format!("{}: the target is not kubernetes", c.display())),
            };
            let store = crate::store::Store::open(&cfg.data_dir).map_err(|e| e.to_string())?;
            match store.inventory(&key).map_err(|e| e.to_string())? {
                None => Vec::new(),
                Some(b) => kubernetes::decode_inventory(&b)
                    .map_err(|e| format!("inventory in {}: {e}", cfg.data_dir.display()))?,
            }
        }
    };
    let _ = rustls::crypto::ring::default_provider().install_default();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("starting the runtime: {e}"))?;
    let report = rt.block_on(async {
        let mut cluster = kubernetes::cluster::Cluster::connect(Some(kubeconfig)).await?;
        cairn_plan::diff::plan_bundle(&mut cluster, &raw, channel, &previous, true).await
    })?;
    Ok(report.render())
}

async fn run(cfg: Config, once: bool) -> Result<i32, Error> {
    if cairn_keys::embedded::is_development() {
        tracing::warn!(
            root_origin = cairn_keys::embedded::ORIGIN,
            "INSECURE: running with the DEVELOPMENT trust root because insecureAllowDevelopmentRoot is set; \
             its private keys are public and anyone can sign releases this agent adopts. \
             Never deploy this binary; rebuild with CAIRN_TRUST_ROOT=/path/to/root.v1"
        );
    }
    tracing::info!(
        channel = %cfg.channel,
        data_dir = %cfg.data_dir.display(),
        sources = cfg.sources.len(),
        root_origin = cairn_keys::embedded::ORIGIN,
        "starting cairn-agent"
    );
    let agent = Agent::open(cfg).await?;
    tracing::info!(agent_id = %agent.agent_id(), "store verified");
    if once {
        let r = agent.run_once().await?;
        tracing::info!(
            created = r.created,
            updated = r.updated,
            deleted = r.deleted,
            drift_corrected = r.drift_corrected,
            unchanged = r.unchanged,
            "target matches the adopted release"
        );
        return Ok(0);
    }
    agent.run(shutdown_signal()).await?;
    Ok(0)
}

async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

fn init_logging(format: LogFormat) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_env("CAIRN_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    let b = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(stderr_is_color_terminal())
        .with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Json => b.json().flatten_event(true).try_init(),
        LogFormat::Text => b.try_init(),
    };
}

/// Colours in text logs only on a terminal: a pipe, a file or journald
/// gets plain text. `NO_COLOR` (any non-empty value) turns them off
/// everywhere (<https://no-color.org>).
fn stderr_is_color_terminal() -> bool {
    use std::io::IsTerminal;
    std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty())
}

/// What [`out`] reports a failed write as.
const WRITING_STDOUT: &str = "writing to stdout";

/// Writes command output to stdout. A closed stdout is an `Io` error of
/// kind `BrokenPipe` (which [`main`] turns into a quiet exit), never a
/// panic or a signal.
fn out(text: &str) -> Result<(), Error> {
    use std::io::Write;
    let mut o = std::io::stdout().lock();
    o.write_all(text.as_bytes())
        .and_then(|()| o.flush())
        .map_err(|source| Error::Io {
            what: WRITING_STDOUT.into(),
            source,
        })
}

/// Writes to a closed socket or pipe must be errors, never signals: a
/// mesh peer or HTTP client that resets its connection while rustls or
/// hyper writes to it (with `writev`, which has no `MSG_NOSIGNAL`) would
/// otherwise kill the whole agent with SIGPIPE. The Rust runtime already
/// ignores SIGPIPE; this makes it explicit and independent of how the
/// process was started. Child processes get the default back (the
/// standard library resets it before `exec`).
fn ignore_sigpipe() {
    #[cfg(unix)]
    // SAFETY: setting a signal disposition at start-up, before any
    // threads exist.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_IGN);
    }
}
