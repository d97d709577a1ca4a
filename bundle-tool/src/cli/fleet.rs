//! `cairn fleet status`: the fleet as one agent sees it, read over the
//! mesh with an operator (or agent) certificate.

use crate::mesh::sync::RecordKeys;
use crate::mesh::tls::{self, CredentialPaths, Credentials, X509RecordKeys};
use crate::mesh::wire::{self, Hello, Message, SignedStatus, StatusRecord};
use crate::mesh::MeshLimits;
use anyhow::{bail, Context, Result};
use cairn_keys::text::escape_untrusted;
use clap::{Args, Subcommand};
use std::net::{TcpStream, ToSocketAddrs};
use std::path::PathBuf;
use std::time::Duration;

#[derive(Debug, Subcommand)]
pub(super) enum FleetCommand {
    /// Print the fleet as seen by one agent: per channel and release, how
    /// many agents adopted, wait for their wave, hold, failed, and whether
    /// the rollout breaker tripped; then one row per agent.
    Status(StatusArgs),
}

#[derive(Debug, Args)]
pub(super) struct StatusArgs {
    /// The agent to ask (`host:port` of its mesh listener).
    #[arg(long)]
    peer: String,
    /// Client certificate (from `cairn mesh issue --operator`).
    #[arg(long)]
    cert: PathBuf,
    /// Its private key.
    #[arg(long)]
    key: PathBuf,
    /// The fleet's mesh CA certificate.
    #[arg(long)]
    ca: PathBuf,
    /// Seconds to wait for connecting and for each answer.
    #[arg(long, default_value_t = 10)]
    timeout: u64,
    /// JSON output: `{"peer": ID, "releases": [{"channel", "sequence",
    /// "bundle", "adopted", "failed", "waiting", "held", "not_selected",
    /// "breaker_tripped"}], "agents": [{"agent_id", "channel", "labels",
    /// "sequence", "bundle", "health", "time_ms", "rollout",
    /// "values_digest"}]}` (`values_digest`: the digest of the site values
    /// the agent filled in, null for none or an older agent), agents
    /// sorted by id, releases by channel and sequence.
    #[arg(long)]
    json: bool,
}

pub(super) fn run(cmd: FleetCommand) -> Result<()> {
    match cmd {
        FleetCommand::Status(a) => status(a),
    }
}

/// Connects, says hello, asks for status and returns (peer identity,
/// records sorted by agent id, records dropped). Every record is verified
/// here too (certificate from the fleet CA naming the record's agent, the
/// agent's signature); those that fail are dropped and counted.
pub(super) fn fetch_status(
    peer: &str,
    paths: &CredentialPaths,
    timeout: Duration,
) -> Result<(String, Vec<StatusRecord>, usize)> {
    let creds = Credentials::load(paths).context("loading mesh credentials")?;
    let keys = X509RecordKeys::new(&creds)?;
    let config = tls::client_config(&creds)?;
    let addr = peer
        .to_socket_addrs()
        .with_context(|| format!("resolving {peer}"))?
        .next()
        .with_context(|| format!("{peer} resolves to no address"))?;
    let sock = TcpStream::connect_timeout(&addr, timeout)
        .with_context(|| format!("connecting to {peer}"))?;
    sock.set_read_timeout(Some(timeout))?;
    sock.set_write_timeout(Some(timeout))?;
    let conn = rustls::ClientConnection::new(config, tls::server_name())?;
    let mut stream = rustls::StreamOwned::new(conn, sock);
    let limits = MeshLimits::default();
    let hello = Message::Hello(Hello::new(None));
    wire::write_frame(&mut stream, &hello, &limits).with_context(|| {
        format!("TLS handshake with {peer} (is the certificate from the fleet CA?)")
    })?;
    let who = tls::peer_identity(stream.conn.peer_certificates())?.to_string();
    wire::write_frame(&mut stream, &Message::StatusRequest, &limits)?;
    // Bounded: the agent sends its hello, then the status; anything else
    // is skipped, at most a few frames.
    for _ in 0..16 {
        match wire::read_frame(&mut stream, &limits)
            .with_context(|| format!("reading from {peer}"))?
        {
            Message::Status(signed) => {
                let _ = wire::write_frame(&mut stream, &Message::Bye("done".into()), &limits);
                let total = signed.len();
                let now_ms = crate::unix_now().saturating_mul(1000);
                let mut records: Vec<StatusRecord> = signed
                    .iter()
                    .filter_map(|s| verified_record(&keys, s, &limits, now_ms))
                    .collect();
                records.sort_by(|a, b| a.agent_id.cmp(&b.agent_id));
                let dropped = total - records.len();
                return Ok((who, records, dropped));
            }
            Message::Bye(reason) => bail!(
                "{peer} closed the connection: {}",
                escape_untrusted(&reason)
            ),
            _ => continue,
        }
    }
    bail!("{peer} did not answer the status request")
}

/// The record if its certificate names its agent and that agent signed it.
fn verified_record(
    keys: &X509RecordKeys,
    s: &SignedStatus,
    limits: &MeshLimits,
    now_ms: u64,
) -> Option<StatusRecord> {
    let r = s.decode_record(limits).ok()?;
    let author = keys
        .verify(
            &s.cert,
            &SignedStatus::signed_message(&s.record),
            &s.sig,
            now_ms,
        )
        .ok()?;
    (author == r.agent_id).then_some(r)
}

/// A peer that closes the connection (e.g. refusing our certificate after
/// the TLS 1.3 handshake) must give an error, not kill the process with
/// SIGPIPE: ignored while talking to the peer, restored for stdout.
struct IgnoreSigpipe;

impl IgnoreSigpipe {
    fn new() -> Self {
        #[cfg(unix)]
        // SAFETY: changing a signal disposition; the CLI is single-threaded.
        unsafe {
            libc::signal(libc::SIGPIPE, libc::SIG_IGN);
        }
        IgnoreSigpipe
    }
}

impl Drop for IgnoreSigpipe {
    fn drop(&mut self) {
        #[cfg(unix)]
        // SAFETY: as above, back to the default set at start-up.
        unsafe {
            libc::signal(libc::SIGPIPE, libc::SIG_DFL);
        }
    }
}

/// One release's rollout across the agents that report about it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(super) struct ReleaseSummary {
    /// Channel.
    pub channel: String,
    /// Highest sequence seen carrying the bundle on that channel.
    pub sequence: u64,
    /// Bundle id.
    pub bundle: String,
    /// Agents enforcing it (healthy, progressing or degraded).
    pub adopted: u32,
    /// Agents that adopted it and report it failed (rolled back).
    pub failed: u32,
    /// Agents holding it, waiting for their wave to open.
    pub waiting: u32,
    /// Agents holding it under a local hold.
    pub held: u32,
    /// Agents holding it whose labels the selector does not match.
    pub not_selected: u32,
    /// Agents holding it because the breaker tripped.
    pub breaker: u32,
}

/// Groups status records by channel and bundle: adopted releases and
/// pending (deferred) ones. Pure.
pub(super) fn summarize(records: &[StatusRecord]) -> Vec<ReleaseSummary> {
    use std::collections::BTreeMap;
    let mut by: BTreeMap<(String, String), ReleaseSummary> = BTreeMap::new();
    for r in records {
        if !r.bundle.is_empty() {
            let e = by
                .entry((r.channel.clone(), r.bundle.clone()))
                .or_insert_with(|| ReleaseSummary {
                    channel: r.channel.clone(),
                    bundle: r.bundle.clone(),
                    ..Default::default()
                });
            e.sequence = e.sequence.max(r.sequence);
            if r.health == "failed" {
                e.failed += 1;
            } else {
                e.adopted += 1;
            }
        }
        if let Some(ro) = r
            .rollout
            .as_ref()
            .filter(|ro| !ro.pending_bundle.is_empty())
        {
            let e = by
                .entry((r.channel.clone(), ro.pending_bundle.clone()))
                .or_insert_with(|| ReleaseSummary {
                    channel: r.channel.clone(),
                    bundle: ro.pending_bundle.clone(),
                    ..Default::default()
                });
            e.sequence = e.sequence.max(ro.pending_sequence);
            match ro.state.as_str() {
                "waiting" => e.waiting += 1,
                "held" => e.held += 1,
                "breaker" => e.breaker += 1,
                "not-selected" => e.not_selected += 1,
                _ => {}
            }
        }
    }
    let mut out: Vec<ReleaseSummary> = by.into_values().collect();
    out.sort_by(|a, b| (&a.channel, a.sequence).cmp(&(&b.channel, b.sequence)));
    out
}

fn status(a: StatusArgs) -> Result<()> {
    let paths = CredentialPaths {
        cert: a.cert,
        key: a.key,
        ca: a.ca,
    };
    let (who, records, dropped) = {
        let _guard = IgnoreSigpipe::new();
        fetch_status(&a.peer, &paths, Duration::from_secs(a.timeout.max(1)))?
    };
    if dropped > 0 {
        eprintln!(
            "warning: {dropped} status record(s) from {who} dropped: not signed by the agent they describe"
        );
    }
    let now_ms = crate::unix_now().saturating_mul(1000);
    let releases = summarize(&records);
    if a.json {
        let releases: Vec<serde_json::Value> = releases
            .iter()
            .map(|s| {
                serde_json::json!({
                    "channel": s.channel,
                    "sequence": s.sequence,
                    "bundle": s.bundle,
                    "adopted": s.adopted,
                    "failed": s.failed,
                    "waiting": s.waiting,
                    "held": s.held,
                    "not_selected": s.not_selected,
                    "breaker_tripped": s.breaker > 0,
                })
            })
            .collect();
        let agents: Vec<serde_json::Value> = records
            .iter()
            .map(|r| {
                serde_json::json!({
                    "agent_id": r.agent_id,
                    "channel": r.channel,
                    "labels": r.labels,
                    "sequence": r.sequence,
                    "bundle": r.bundle,
                    "health": r.health,
                    "time_ms": r.time,
                    "values_digest": r.values_digest,
                    "rollout": r.rollout.as_ref().map(|ro| serde_json::json!({
                        "pending_sequence": ro.pending_sequence,
                        "pending_bundle": ro.pending_bundle,
                        "state": ro.state,
                        "wave": ro.wave,
                        "opens_at": ro.opens_at,
                        "held": ro.held,
                        "held_until": ro.held_until,
                    })),
                })
            })
            .collect();
        let out = serde_json::json!({ "peer": who, "releases": releases, "agents": agents });
        println!("{}", serde_json::to_string_pretty(&out)?);
        return Ok(());
    }
    // Everything below comes from gossip: escaped before the terminal.
    let esc = |s: &str| escape_untrusted(s);
    println!("fleet as seen by {who} ({} agents)", records.len());
    println!(
        "{:<16} {:>8} {:<19} {:>7} {:>7} {:>7} {:>6} {:>8} BREAKER",
        "CHANNEL", "SEQUENCE", "BUNDLE", "ADOPTED", "WAITING", "HELD", "FAILED", "NOT-SEL"
    );
    for s in &releases {
        println!(
            "{:<16} {:>8} {:<19} {:>7} {:>7} {:>7} {:>6} {:>8} {}",
            if s.channel.is_empty() {
                "-".to_owned()
            } else {
                esc(&s.channel)
            },
            s.sequence,
            esc(&s.bundle.chars().take(19).collect::<String>()),
            s.adopted,
            s.waiting,
            s.held,
            s.failed,
            s.not_selected,
            if s.breaker > 0 {
                format!("TRIPPED ({} holding)", s.breaker)
            } else {
                "ok".to_owned()
            }
        );
    }
    println!();
    println!(
        "{:<24} {:<16} {:>8} {:<19} {:<11} {:<19} {:<40} LAST SEEN",
        "AGENT", "CHANNEL", "SEQUENCE", "BUNDLE", "HEALTH", "VALUES", "ROLLOUT"
    );
    for r in &records {
        let bundle = if r.bundle.is_empty() {
            "-".to_owned()
        } else {
            esc(&r.bundle.chars().take(19).collect::<String>())
        };
        let seq = if r.sequence == 0 {
            "-".to_owned()
        } else {
            r.sequence.to_string()
        };
        let age = now_ms.saturating_sub(r.time) / 1000;
        let rollout = esc(&rollout_cell(r));
        // The values digest, cut like the bundle id (`sha256:` + 12 hex).
        let values = r.values_digest.as_deref().map_or("-".to_owned(), |d| {
            esc(&d.chars().take(19).collect::<String>())
        });
        println!(
            "{:<24} {:<16} {:>8} {:<19} {:<11} {:<19} {:<40} {}s ago",
            esc(&r.agent_id),
            if r.channel.is_empty() {
                "-".to_owned()
            } else {
                esc(&r.channel)
            },
            seq,
            bundle,
            esc(&r.health),
            values,
            rollout,
            age
        );
    }
    Ok(())
}

/// `waiting for wave 2 of release 5`, `held until ...`, `-`.
fn rollout_cell(r: &StatusRecord) -> String {
    let Some(ro) = &r.rollout else {
        return "-".into();
    };
    let mut parts = Vec::new();
    if ro.pending_sequence > 0 {
        parts.push(match ro.state.as_str() {
            "waiting" => format!("{} {}: wave {}", ro.state, ro.pending_sequence, ro.wave),
            s => format!("{s} {}", ro.pending_sequence),
        });
    }
    if ro.held {
        parts.push(if ro.held_until == 0 {
            "hold".into()
        } else {
            format!("hold until {}", ro.held_until)
        });
    }
    if parts.is_empty() {
        "-".into()
    } else {
        parts.join(", ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mesh::wire::RolloutRecord;

    fn rec(id: &str, bundle: &str, health: &str, pending: Option<(&str, &str)>) -> StatusRecord {
        StatusRecord {
            agent_id: cairn_core::AgentId::parse(id).unwrap(),
            channel: "stable".into(),
            labels: Default::default(),
            sequence: u64::from(!bundle.is_empty()),
            bundle: bundle.into(),
            health: health.into(),
            time: 0,
            listen: None,
            values_digest: None,
            rollout: pending.map(|(b, state)| RolloutRecord {
                pending_sequence: 2,
                pending_bundle: b.into(),
                state: state.into(),
                ..Default::default()
            }),
        }
    }

    #[test]
    fn summary_counts_per_release() {
        let a = cairn_keys::sha256_address(b"a");
        let b = cairn_keys::sha256_address(b"b");
        let s = summarize(&[
            rec("x1", &a, "healthy", None),
            rec("x2", &a, "healthy", Some((&b, "waiting"))),
            rec("x3", &b, "failed", None),
            rec("x4", &a, "healthy", Some((&b, "breaker"))),
            rec("x5", "", "unknown", Some((&b, "held"))),
        ]);
        assert_eq!(s.len(), 2);
        let (ra, rb) = (&s[0], &s[1]);
        assert_eq!(
            (ra.bundle.as_str(), ra.adopted, ra.failed),
            (a.as_str(), 3, 0)
        );
        assert_eq!(rb.bundle, b);
        assert_eq!(
            (rb.adopted, rb.failed, rb.waiting, rb.breaker, rb.held),
            (0, 1, 1, 1, 1)
        );
        assert_eq!(rb.sequence, 2);
    }
}
