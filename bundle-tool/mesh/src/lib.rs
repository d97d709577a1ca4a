//! The hub-less mesh: identity, transport security, wire format and the
//! sync protocol, shared by the agent (server and client), the `cairn`
//! CLI (PKI and `fleet status`) and the fleet simulator.
//!
//! * [`identity`]: who a peer is ([`identity::PeerIdentity`]).
//! * `pki` (feature `tls`): fleet CA, agent and operator certificates;
//!   identity from a certificate.
//! * `tls` (feature `tls`): rustls configurations (TLS 1.3 only, ring,
//!   mutual auth).
//! * [`wire`]: messages and length-prefixed CBOR frames with hard limits.
//! * [`sync`]: the sync protocol as a sans-IO state machine.
//!
//! **Architecture invariant:** [`wire`] and [`sync`] do no IO, read no
//! clock and draw no thread randomness: time and a seed are passed in, so
//! the same code runs in the agent, in unit tests on a virtual clock and in
//! the fleet simulator. Sockets and TLS streams live in the agent's
//! `mesh` module; [`sync`] never sees them.
#![cfg_attr(test, allow(clippy::unwrap_used))]

pub mod identity;
#[cfg(feature = "tls")]
pub mod pki;
pub mod sync;
#[cfg(any(test, feature = "testing"))]
pub mod testing;
#[cfg(feature = "tls")]
pub mod tls;
pub mod wire;

/// Every limit the mesh applies, in one place. Defaults suit fleets of
/// thousands of agents and bundles of up to [`cairn_core::limits::Limits`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MeshLimits {
    /// Largest frame body in bytes (default 4 MiB: one object of the
    /// largest allowed size plus framing). Checked before allocation.
    pub max_frame_bytes: u32,
    /// Most items in one `Want` (default 256).
    pub max_items_per_want: usize,
    /// Ranges in one compact want ([`wire::Item::Entries`], protocol
    /// version 3; default 1024).
    pub max_ranges_per_want: usize,
    /// Objects one compact want may name (default 4096): a full release
    /// of 9,003 objects takes three wants.
    pub max_objects_per_want: usize,
    /// Object bytes we send for one want over all its `Data` frames
    /// (default 6 MiB: two frames; with 8 wants in flight at most 48 MiB
    /// queue for a peer that does not read); what is left out the peer
    /// asks for again.
    pub max_want_reply_bytes: usize,
    /// Want requests we keep in flight to one peer (default 4): the fetch
    /// window.
    pub max_outstanding_wants: usize,
    /// Want requests a peer may have in flight with us (default 8); more is
    /// a protocol violation.
    pub max_inbound_wants: usize,
    /// Bytes of object data we put in one `Data` reply (default 3 MiB);
    /// items beyond it are left out and asked for again.
    pub max_reply_bytes: usize,
    /// Largest byte range of an image blob asked for or served in one
    /// [`wire::Item::Blob`] (protocol version 4; default 1 MiB): a layer
    /// of gigabytes moves in pieces, one in flight per blob.
    pub max_blob_piece: u32,
    /// Heads in one message (default 64).
    pub max_heads: usize,
    /// Status records kept (default 4096: at most one per agent) and sent
    /// in one message.
    pub max_status_records: usize,
    /// Largest encoded status record (default 4 KiB).
    pub max_record_bytes: usize,
    /// Largest certificate carried with a status record (default 2 KiB;
    /// `cairn mesh issue` makes about 600 bytes).
    pub max_cert_bytes: usize,
    /// Largest status record signature (default 160 bytes).
    pub max_signature_bytes: usize,
    /// Entries in the peer table (default 256).
    pub max_peer_table: usize,
    /// Connections we try to keep open (default 8).
    pub target_connections: usize,
    /// Most connections at once, in and out (default 64).
    pub max_connections: usize,
    /// Labels on one status record (default 32).
    pub max_labels: usize,
    /// Longest string field in a message (default 256 bytes).
    pub max_string: usize,
}

impl Default for MeshLimits {
    fn default() -> Self {
        Self {
            max_frame_bytes: 4 << 20,
            max_items_per_want: 256,
            max_ranges_per_want: 1024,
            max_objects_per_want: 4096,
            max_want_reply_bytes: 6 << 20,
            max_outstanding_wants: 4,
            max_inbound_wants: 8,
            max_reply_bytes: 3 << 20,
            max_blob_piece: 1 << 20,
            max_heads: 64,
            max_status_records: 4096,
            max_record_bytes: 4096,
            max_cert_bytes: 2048,
            max_signature_bytes: 160,
            max_peer_table: 256,
            target_connections: 8,
            max_connections: 64,
            max_labels: 32,
            max_string: 256,
        }
    }
}
