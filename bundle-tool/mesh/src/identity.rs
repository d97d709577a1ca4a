//! Peer identity: who is at the other end of a mesh connection. It is
//! taken from the peer's certificate (see the `pki` module, feature `tls`),
//! never from what the peer says on the wire; the protocol ([`crate::sync`],
//! [`crate::wire`]) only sees the result.

use cairn_core::ids::AgentId;

/// An operator name that is not acceptable (agent ids are
/// [`AgentId`]s, checked when one is made).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("identity `{0}`: use 1-128 characters of a-z, A-Z, 0-9, '.', '_' and '-'")]
pub struct BadIdentity(pub String);

/// Who is at the other end of a mesh connection, from its certificate.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum PeerIdentity {
    /// A fleet agent, by agent id.
    Agent(AgentId),
    /// An operator CLI (may only read status).
    Operator(String),
}

impl PeerIdentity {
    /// The id or name, without the kind.
    pub fn name(&self) -> &str {
        match self {
            PeerIdentity::Agent(id) => id.as_str(),
            PeerIdentity::Operator(s) => s,
        }
    }
}

impl std::fmt::Display for PeerIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PeerIdentity::Agent(s) => write!(f, "agent {s}"),
            PeerIdentity::Operator(s) => write!(f, "operator {s}"),
        }
    }
}

/// Operator names: 1-128 of `[A-Za-z0-9._-]` (they appear in URIs, metrics
/// labels and file names). Agent ids follow the stricter rule of
/// [`AgentId`] (not starting with `.` or `-`).
pub fn validate_identity(id: &str) -> Result<(), BadIdentity> {
    let ok = !id.is_empty()
        && id.len() <= 128
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(BadIdentity(id.to_owned()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identities() {
        assert!(validate_identity("edge-7.site_a").is_ok());
        assert_eq!(validate_identity(""), Err(BadIdentity(String::new())));
        assert!(validate_identity("a/b").is_err());
        assert!(validate_identity(&"a".repeat(129)).is_err());
        assert_eq!(
            PeerIdentity::Operator("ops".into()).to_string(),
            "operator ops"
        );
        assert_eq!(
            PeerIdentity::Agent(AgentId::parse("a1").unwrap()).name(),
            "a1"
        );
    }
}
