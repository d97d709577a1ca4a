//! Helpers for tests and the fleet simulator (feature `testing`).

use crate::sync::{RecordKeys, RecordRejection};
use cairn_core::AgentId;
use cairn_keys::sha256_address;

/// Status record keys without X.509: the "certificate" is the agent id,
/// the "signature" a SHA-256 keyed with a fleet secret every member
/// shares. The endpoint's checks (the certificate names the record's
/// agent, the signature covers the record) are the real ones; only the
/// cryptography is cheaper (the real keys are tested in `tls.rs` and
/// through the agent). Whoever lacks the secret cannot sign. A
/// certificate `expired:<id>` is refused as stale.
#[derive(Debug, Clone)]
pub struct SharedSecretKeys {
    /// The agent id (the "certificate").
    pub id: String,
    /// The fleet secret.
    pub secret: &'static [u8],
}

impl SharedSecretKeys {
    /// The signature of `message` by agent `id` under `secret`.
    pub fn signature(secret: &[u8], id: &str, message: &[u8]) -> Vec<u8> {
        let mut m = secret.to_vec();
        m.extend_from_slice(id.as_bytes());
        m.push(0);
        m.extend_from_slice(message);
        sha256_address(&m).into_bytes()
    }
}

impl RecordKeys for SharedSecretKeys {
    fn sign(&self, message: &[u8]) -> Result<(Vec<u8>, Vec<u8>), String> {
        Ok((
            self.id.as_bytes().to_vec(),
            Self::signature(self.secret, &self.id, message),
        ))
    }

    fn verify(
        &self,
        cert: &[u8],
        message: &[u8],
        signature: &[u8],
        _now_ms: u64,
    ) -> Result<AgentId, RecordRejection> {
        let id = std::str::from_utf8(cert)
            .map_err(|_| RecordRejection::Forged("certificate is not an agent id".into()))?;
        if let Some(id) = id.strip_prefix("expired:") {
            return Err(RecordRejection::Stale(format!("{id}: certificate expired")));
        }
        if Self::signature(self.secret, id, message) == signature {
            AgentId::parse(id).map_err(|e| RecordRejection::Forged(format!("certificate: {e}")))
        } else {
            Err(RecordRejection::Forged("bad signature".into()))
        }
    }
}
