//! `cairn mesh`: the fleet's mesh PKI (see docs/MESH.md).

use crate::mesh::pki::{self, PeerIdentity};
use anyhow::{Context, Result};
use clap::{ArgGroup, Subcommand};
use std::path::PathBuf;

#[derive(Debug, Subcommand)]
pub(super) enum MeshCommand {
    /// Manage the fleet's mesh certificate authority.
    #[command(subcommand)]
    Ca(CaCommand),
    /// Issue an agent certificate (`--agent-id`) or an operator client
    /// certificate (`--operator`) from the mesh CA: writes agent.crt +
    /// agent.key (or operator.crt + operator.key) and ca.crt into --out.
    #[command(group(ArgGroup::new("who").required(true).args(["agent_id", "operator"])))]
    Issue {
        /// The CA directory (from `cairn mesh ca init`).
        #[arg(long)]
        ca: PathBuf,
        /// The agent id; it becomes the URI name `cairn-agent://ID`, the
        /// identity peers see.
        #[arg(long)]
        agent_id: Option<String>,
        /// Issue an operator (client-only) certificate, for `cairn fleet
        /// status`; the optional value names the operator.
        #[arg(long, num_args = 0..=1, default_missing_value = "operator")]
        operator: Option<String>,
        /// Output directory (created if missing; existing files are not
        /// overwritten).
        #[arg(long)]
        out: PathBuf,
        /// Validity in days.
        #[arg(long, default_value_t = 825)]
        days: u32,
    },
}

#[derive(Debug, Subcommand)]
pub(super) enum CaCommand {
    /// Create a new mesh CA: DIR/ca.crt and DIR/ca.key (mode 0600). Keep
    /// ca.key offline; agents only need ca.crt.
    Init {
        /// Output directory.
        #[arg(long)]
        out: PathBuf,
        /// A name for the fleet, shown in the CA's subject.
        #[arg(long, default_value = "fleet")]
        name: String,
        /// Validity in days.
        #[arg(long, default_value_t = 3650)]
        days: u32,
    },
}

pub(super) fn run(cmd: MeshCommand) -> Result<()> {
    let now = crate::unix_now();
    match cmd {
        MeshCommand::Ca(CaCommand::Init { out, name, days }) => {
            let cert = pki::init_ca_dir(&out, &name, now, days).context("creating the mesh CA")?;
            eprintln!(
                "wrote {} and {}",
                cert.display(),
                out.join(pki::CA_KEY_FILE).display()
            );
            println!("{}", cert.display());
        }
        MeshCommand::Issue {
            ca,
            agent_id,
            operator,
            out,
            days,
        } => {
            let identity = match (agent_id, operator) {
                (Some(id), _) => PeerIdentity::Agent(
                    cairn_core::AgentId::parse_owned(id)
                        .map_err(|e| anyhow::anyhow!("--agent-id: {e}"))?,
                ),
                (None, Some(name)) => PeerIdentity::Operator(name),
                (None, None) => anyhow::bail!("give --agent-id ID or --operator"),
            };
            let paths = pki::issue_to_dir(&ca, &identity, &out, now, days)
                .with_context(|| format!("issuing a certificate for {identity}"))?;
            for p in &paths {
                eprintln!("wrote {}", p.display());
            }
            println!("{identity}");
        }
    }
    Ok(())
}
