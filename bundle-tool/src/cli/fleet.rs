//! `cairn fleet status`: the fleet as one agent sees it, read over the
//! mesh with an operator (or agent) certificate.

use crate::mesh::tls::{self, CredentialPaths, Credentials};
use crate::mesh::wire::{self, Hello, Message, StatusRecord, PROTOCOL_VERSION};
use crate::mesh::MeshLimits;
use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};
use std::net::{TcpStream, ToSocketAddrs};
use std::path::PathBuf;
use std::time::Duration;

#[derive(Debug, Subcommand)]
pub enum FleetCommand {
    /// Print the fleet as seen by one agent: one row per agent (id,
    /// channel, sequence, bundle, health, last seen).
    Status(StatusArgs),
}

#[derive(Debug, Args)]
pub struct StatusArgs {
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
    /// JSON output: `{"peer": ID, "agents": [{"agent_id", "channel",
    /// "labels", "sequence", "bundle", "health", "time_ms"}]}`, agents
    /// sorted by id.
    #[arg(long)]
    json: bool,
}

pub fn run(cmd: FleetCommand) -> Result<()> {
    match cmd {
        FleetCommand::Status(a) => status(a),
    }
}

/// Connects, says hello, asks for status and returns (peer identity,
/// records sorted by agent id).
pub fn fetch_status(
    peer: &str,
    paths: &CredentialPaths,
    timeout: Duration,
) -> Result<(String, Vec<StatusRecord>)> {
    let creds = Credentials::load(paths).context("loading mesh credentials")?;
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
    let hello = Message::Hello(Hello {
        version: PROTOCOL_VERSION,
        listen: None,
    });
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
            Message::Status(mut records) => {
                let _ = wire::write_frame(&mut stream, &Message::Bye("done".into()), &limits);
                records.sort_by(|a, b| a.agent_id.cmp(&b.agent_id));
                return Ok((who, records));
            }
            Message::Bye(reason) => bail!("{peer} closed the connection: {reason}"),
            _ => continue,
        }
    }
    bail!("{peer} did not answer the status request")
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

fn status(a: StatusArgs) -> Result<()> {
    let paths = CredentialPaths {
        cert: a.cert,
        key: a.key,
        ca: a.ca,
    };
    let (who, records) = {
        let _guard = IgnoreSigpipe::new();
        fetch_status(&a.peer, &paths, Duration::from_secs(a.timeout.max(1)))?
    };
    let now_ms = crate::unix_now().saturating_mul(1000);
    if a.json {
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
                })
            })
            .collect();
        let out = serde_json::json!({ "peer": who, "agents": agents });
        println!("{}", serde_json::to_string_pretty(&out)?);
        return Ok(());
    }
    println!("fleet as seen by {who} ({} agents)", records.len());
    println!(
        "{:<24} {:<16} {:>8} {:<19} {:<10} LAST SEEN",
        "AGENT", "CHANNEL", "SEQUENCE", "BUNDLE", "HEALTH"
    );
    for r in &records {
        let bundle = if r.bundle.is_empty() {
            "-".to_owned()
        } else {
            r.bundle.chars().take(19).collect()
        };
        let seq = if r.sequence == 0 {
            "-".to_owned()
        } else {
            r.sequence.to_string()
        };
        let age = now_ms.saturating_sub(r.time) / 1000;
        println!(
            "{:<24} {:<16} {:>8} {:<19} {:<10} {}s ago",
            r.agent_id,
            if r.channel.is_empty() {
                "-"
            } else {
                &r.channel
            },
            seq,
            bundle,
            r.health,
            age
        );
    }
    Ok(())
}
