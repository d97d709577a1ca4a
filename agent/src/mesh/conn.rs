//! Mesh connections: TLS accept and dial, and the per-connection reader
//! and writer tasks. Every read has a deadline and every frame length is
//! checked before its body is allocated; a peer can stall only its own
//! tasks.
//!
//! Inbound connections are limited before any TLS work: at most
//! [`MAX_INBOUND_CONNECTIONS`] accepted connections at a time (handshaking
//! or established), at most [`MAX_HANDSHAKES`] handshakes in progress and
//! [`MAX_HANDSHAKES_PER_IP`] from one address, each with a deadline of
//! [`INBOUND_HANDSHAKE_TIMEOUT`]. A connection over a limit is closed at
//! once. Handshake failures are counted in a metric and logged at most
//! once per [`FAILURE_LOG_INTERVAL`] per kind, with the number suppressed,
//! so a flood cannot flood the log.

use super::MeshMetrics;
use cairn_core::Address;
use cairn_mesh::identity::PeerIdentity;
use cairn_mesh::sync::{ConnId, WireFailure};
use cairn_mesh::tls;
use cairn_mesh::wire::{self, BadWant, EntryFound, Found, Message, WireError, HEADER_BYTES};
use cairn_mesh::MeshLimits;
use std::collections::HashMap;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};
use tokio_rustls::TlsStream;

/// Connect + handshake deadline (outbound).
pub(super) const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Handshake deadline for an accepted connection: a real peer finishes in
/// milliseconds; a silent one gives its slot back quickly.
pub(super) const INBOUND_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
/// Accepted connections at a time, handshaking or established (a fleet
/// mesh has a handful of neighbours per agent).
pub(super) const MAX_INBOUND_CONNECTIONS: usize = 256;
/// Inbound TLS handshakes in progress at a time.
pub(super) const MAX_HANDSHAKES: usize = 64;
/// Inbound TLS handshakes in progress from one IP address, so one host
/// cannot take every handshake slot.
pub(super) const MAX_HANDSHAKES_PER_IP: usize = 8;
/// At most one log line per kind of inbound failure in this interval.
pub(super) const FAILURE_LOG_INTERVAL: Duration = Duration::from_secs(10);
/// Outgoing messages queued per connection; a peer that lets its queue
/// fill up is too slow and is disconnected.
pub(super) const SEND_QUEUE: usize = 256;

/// A TCP stream that holds its share of the inbound connection limit
/// for as long as it lives (outbound streams hold none).
pub(super) struct LimitedTcp {
    sock: TcpStream,
    _permit: Option<OwnedSemaphorePermit>,
}

impl AsyncRead for LimitedTcp {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().sock).poll_read(cx, buf)
    }
}

impl AsyncWrite for LimitedTcp {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().sock).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().sock).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.sock.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().sock).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().sock).poll_shutdown(cx)
    }
}

/// A mesh connection's stream.
pub(super) type MeshStream = TlsStream<LimitedTcp>;

/// Allows one log line per interval and counts the events it suppressed.
/// Pure: the caller passes the time.
#[derive(Debug, Default)]
pub(super) struct LogWindow {
    last: Option<Instant>,
    suppressed: u64,
}

impl LogWindow {
    /// Records one event at `now`: `Some(n)` if a line may be written
    /// (`n` events were suppressed since the last one), `None` if not.
    pub(super) fn note(&mut self, now: Instant, interval: Duration) -> Option<u64> {
        match self.last {
            Some(t) if now.saturating_duration_since(t) < interval => {
                self.suppressed += 1;
                None
            }
            _ => {
                self.last = Some(now);
                Some(std::mem::take(&mut self.suppressed))
            }
        }
    }
}

/// Rate-limited logging of inbound failures, one window per kind.
#[derive(Clone, Default)]
struct FailureLog {
    windows: Arc<Mutex<HashMap<&'static str, LogWindow>>>,
}

impl FailureLog {
    /// `Some(suppressed)` if a line about `kind` may be written now.
    fn allow(&self, kind: &'static str) -> Option<u64> {
        let mut w = self.windows.lock().unwrap_or_else(|p| p.into_inner());
        w.entry(kind)
            .or_default()
            .note(Instant::now(), FAILURE_LOG_INTERVAL)
    }
}

/// The inbound limits: the semaphores and the per-address counts.
#[derive(Clone)]
struct InboundLimits {
    connections: Arc<Semaphore>,
    handshakes: Arc<Semaphore>,
    per_ip: Arc<Mutex<HashMap<IpAddr, usize>>>,
}

/// One address's handshake slot; given back on drop.
struct IpSlot {
    ip: IpAddr,
    per_ip: Arc<Mutex<HashMap<IpAddr, usize>>>,
}

impl Drop for IpSlot {
    fn drop(&mut self) {
        let mut m = self.per_ip.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = m.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                m.remove(&self.ip);
            }
        }
    }
}

impl InboundLimits {
    fn new() -> Self {
        Self {
            connections: Arc::new(Semaphore::new(MAX_INBOUND_CONNECTIONS)),
            handshakes: Arc::new(Semaphore::new(MAX_HANDSHAKES)),
            per_ip: Arc::default(),
        }
    }

    /// The three permits a new connection needs, or which limit it hit.
    #[allow(clippy::type_complexity)]
    fn admit(
        &self,
        ip: IpAddr,
    ) -> Result<(OwnedSemaphorePermit, OwnedSemaphorePermit, IpSlot), &'static str> {
        let conn = Arc::clone(&self.connections)
            .try_acquire_owned()
            .map_err(|_| "connections")?;
        let hs = Arc::clone(&self.handshakes)
            .try_acquire_owned()
            .map_err(|_| "handshakes")?;
        let mut m = self.per_ip.lock().unwrap_or_else(|p| p.into_inner());
        let n = m.entry(ip).or_insert(0);
        if *n >= MAX_HANDSHAKES_PER_IP {
            return Err("handshakes from one address");
        }
        *n += 1;
        drop(m);
        Ok((
            conn,
            hs,
            IpSlot {
                ip,
                per_ip: Arc::clone(&self.per_ip),
            },
        ))
    }
}

/// What connection tasks tell the driver.
pub(super) enum Input {
    /// A TLS connection is up.
    Connected {
        /// The stream.
        stream: Box<MeshStream>,
        /// The peer, from its certificate.
        identity: PeerIdentity,
        /// The address we dialed (outbound only).
        dialed: Option<String>,
        /// The peer's IP.
        remote_ip: Option<String>,
    },
    /// A dial failed.
    DialFailed {
        /// The address.
        addr: String,
        /// Why.
        error: String,
    },
    /// A frame arrived.
    Message {
        /// The connection.
        conn: ConnId,
        /// The message.
        msg: Message,
    },
    /// Reading or writing failed.
    WireError {
        /// The connection.
        conn: ConnId,
        /// Why.
        reason: WireFailure,
        /// Detail.
        detail: String,
    },
    /// An adoption run finished.
    AdoptDone {
        /// The fetch.
        fetch: u64,
        /// Outcome for logs.
        outcome: String,
    },
    /// Items a peer asked for, read from the store on a blocking thread
    /// (a compact want is answered in several parts).
    Served {
        /// The connection.
        conn: ConnId,
        /// The request id.
        id: u64,
        /// What was found (plain items).
        found: Vec<Found>,
        /// Entries by index (a compact want).
        entries: Vec<EntryFound>,
        /// Nothing follows.
        last: bool,
    },
    /// A compact want named an entry past the bundle's end.
    ServeRefused {
        /// The connection.
        conn: ConnId,
        /// The request id.
        id: u64,
        /// Why.
        bad: BadWant,
        /// Detail for the log.
        detail: String,
    },
    /// A blob writer wrote a piece from a peer: the next may be asked.
    BlobWritten {
        /// The blob job.
        job: u64,
        /// The attempt.
        attempt: u64,
    },
    /// A blob writer finished: the blob is in place, or why not.
    BlobDone {
        /// The blob job.
        job: u64,
        /// The attempt.
        attempt: u64,
        /// Its size, or why it was not kept.
        result: Result<u64, super::driver::BlobFailure>,
    },
    /// The store's copy of a fetch's manifest was looked up (after the
    /// release verified).
    LocalManifest {
        /// The fetch.
        fetch: u64,
        /// The manifest bytes, if stored.
        manifest: Option<Vec<u8>>,
    },
    /// Which of the objects a fetch still wants the store holds.
    Present {
        /// The fetch.
        fetch: u64,
        /// Address and whether it is stored.
        present: Vec<(Address, bool)>,
    },
    /// The stored copies of the format 2 manifest chunks a fetch wants
    /// (`None`: not stored).
    LocalChunks {
        /// The fetch.
        fetch: u64,
        /// Address and the stored bytes, if any.
        chunks: Vec<(Address, Option<Vec<u8>>)>,
    },
    /// An object fetched from a peer was written to the store.
    Stored {
        /// The fetch.
        fetch: u64,
        /// The store error, if any.
        error: Option<String>,
    },
}

fn identity_of(
    certs: Option<&[rustls::pki_types::CertificateDer<'_>]>,
) -> Result<PeerIdentity, String> {
    tls::peer_identity(certs).map_err(|e| e.to_string())
}

/// Accepts connections until the task is aborted, within the inbound
/// limits (see the module documentation).
pub(super) async fn accept_loop(
    listener: tokio::net::TcpListener,
    server: Arc<rustls::ServerConfig>,
    tx: mpsc::Sender<Input>,
    metrics: MeshMetrics,
) {
    let acceptor = tokio_rustls::TlsAcceptor::from(server);
    let limits = InboundLimits::new();
    let log = FailureLog::default();
    loop {
        let (sock, remote) = match listener.accept().await {
            Ok(s) => s,
            Err(e) => {
                // E.g. out of file descriptors: wait for some to close.
                if let Some(suppressed) = log.allow("accept") {
                    tracing::warn!(error = %e, suppressed, "mesh accept failed");
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let (conn_permit, handshake_permit, ip_slot) = match limits.admit(remote.ip()) {
            Ok(p) => p,
            Err(limit) => {
                // Closed before any TLS work; the peer may try again.
                drop(sock);
                metrics.connections_refused.inc();
                if let Some(suppressed) = log.allow("limit") {
                    tracing::warn!(
                        peer = %remote,
                        limit,
                        suppressed,
                        "mesh connection refused: too many {limit}"
                    );
                }
                continue;
            }
        };
        let acceptor = acceptor.clone();
        let tx = tx.clone();
        let metrics = metrics.clone();
        let log = log.clone();
        tokio::spawn(async move {
            let _ = sock.set_nodelay(true);
            let sock = LimitedTcp {
                sock,
                _permit: Some(conn_permit),
            };
            let handshake =
                tokio::time::timeout(INBOUND_HANDSHAKE_TIMEOUT, acceptor.accept(sock)).await;
            drop((handshake_permit, ip_slot));
            let tls = match handshake {
                Ok(Ok(t)) => t,
                Ok(Err(e)) => {
                    metrics.handshake_failures.inc();
                    if let Some(suppressed) = log.allow("refused") {
                        tracing::warn!(peer = %remote, error = %e, suppressed, "mesh handshake refused");
                    }
                    return;
                }
                Err(_) => {
                    metrics.handshake_failures.inc();
                    if let Some(suppressed) = log.allow("timeout") {
                        tracing::warn!(peer = %remote, suppressed, "mesh handshake timed out");
                    }
                    return;
                }
            };
            let identity = match identity_of(tls.get_ref().1.peer_certificates()) {
                Ok(i) => i,
                Err(e) => {
                    metrics.handshake_failures.inc();
                    if let Some(suppressed) = log.allow("identity") {
                        tracing::warn!(peer = %remote, error = %e, suppressed, "mesh peer without a Cairn identity");
                    }
                    return;
                }
            };
            let _ = tx
                .send(Input::Connected {
                    stream: Box::new(TlsStream::Server(tls)),
                    identity,
                    dialed: None,
                    remote_ip: Some(remote.ip().to_string()),
                })
                .await;
        });
    }
}

/// Dials `addr` and reports the outcome to the driver.
pub(super) fn dial(
    addr: String,
    client: Arc<rustls::ClientConfig>,
    tx: mpsc::Sender<Input>,
    metrics: MeshMetrics,
) {
    tokio::spawn(async move {
        let connector = tokio_rustls::TlsConnector::from(client);
        let result = tokio::time::timeout(HANDSHAKE_TIMEOUT, async {
            let sock = TcpStream::connect(&addr).await.map_err(|e| e.to_string())?;
            let _ = sock.set_nodelay(true);
            let remote = sock.peer_addr().map(|a| a.ip().to_string()).ok();
            let sock = LimitedTcp {
                sock,
                _permit: None,
            };
            let tls = connector
                .connect(tls::server_name(), sock)
                .await
                .map_err(|e| {
                    metrics.handshake_failures.inc();
                    format!("TLS: {e}")
                })?;
            let identity = identity_of(tls.get_ref().1.peer_certificates())?;
            Ok::<_, String>((tls, identity, remote))
        })
        .await
        .unwrap_or_else(|_| Err("timed out".into()));
        let input = match result {
            Ok((tls, identity, remote_ip)) => Input::Connected {
                stream: Box::new(TlsStream::Client(tls)),
                identity,
                dialed: Some(addr),
                remote_ip,
            },
            Err(error) => Input::DialFailed { addr, error },
        };
        let _ = tx.send(input).await;
    });
}

/// The handles the driver keeps for one connection.
pub(super) struct ConnHandle {
    /// Outgoing messages.
    pub tx: mpsc::Sender<Message>,
    /// The reader task (aborted on close).
    pub reader: tokio::task::AbortHandle,
}

/// Starts the reader and writer tasks of a connection.
pub(super) fn spawn_io(
    conn: ConnId,
    stream: MeshStream,
    limits: MeshLimits,
    read_timeout: Duration,
    tx: mpsc::Sender<Input>,
    metrics: MeshMetrics,
) -> ConnHandle {
    let (mut rd, mut wr) = tokio::io::split(stream);
    let (out_tx, mut out_rx) = mpsc::channel::<Message>(SEND_QUEUE);
    let reader_tx = tx.clone();
    let reader_limits = limits.clone();
    let reader_metrics = metrics.clone();
    let reader = tokio::spawn(async move {
        loop {
            let r = read_one(&mut rd, &reader_limits, read_timeout).await;
            let input = match r {
                Ok(Some((msg, bytes))) => {
                    reader_metrics.frame("in", bytes);
                    Input::Message { conn, msg }
                }
                Ok(None) => Input::WireError {
                    conn,
                    reason: WireFailure::Idle,
                    detail: "no frame within the read deadline".into(),
                },
                Err(e) => Input::WireError {
                    conn,
                    reason: WireFailure::of(&e),
                    detail: e.to_string(),
                },
            };
            let stop = matches!(input, Input::WireError { .. });
            if reader_tx.send(input).await.is_err() || stop {
                return;
            }
        }
    });
    let writer_limits = limits;
    tokio::spawn(async move {
        while let Some(msg) = out_rx.recv().await {
            let frame = match wire::encode_frame(&msg, writer_limits.max_frame_bytes) {
                Ok(f) => f,
                Err(e) => {
                    tracing::error!(error = %e, kind = msg.kind(), "mesh message too large to send");
                    continue;
                }
            };
            let write = tokio::time::timeout(read_timeout, async {
                wr.write_all(&frame).await?;
                wr.flush().await
            })
            .await;
            match write {
                Ok(Ok(())) => metrics.frame("out", frame.len()),
                Ok(Err(e)) => {
                    let _ = tx
                        .send(Input::WireError {
                            conn,
                            reason: WireFailure::Io,
                            detail: e.to_string(),
                        })
                        .await;
                    return;
                }
                Err(_) => {
                    let _ = tx
                        .send(Input::WireError {
                            conn,
                            reason: WireFailure::Timeout,
                            detail: "write timed out".into(),
                        })
                        .await;
                    return;
                }
            }
        }
        // The driver dropped the sender: close politely.
        let _ = tokio::time::timeout(Duration::from_secs(2), wr.shutdown()).await;
    });
    ConnHandle {
        tx: out_tx,
        reader: reader.abort_handle(),
    }
}

/// Reads one frame: the header (with the idle deadline; `None` when it
/// passes), then the body (with the same deadline, a timeout there is an
/// error), the length checked before allocation.
pub(super) async fn read_one<R: tokio::io::AsyncRead + Unpin>(
    rd: &mut R,
    limits: &MeshLimits,
    deadline: Duration,
) -> Result<Option<(Message, usize)>, WireError> {
    let mut header = [0u8; HEADER_BYTES];
    match tokio::time::timeout(deadline, rd.read_exact(&mut header)).await {
        // Silence between frames: the peer is gone or cut off by the
        // network, not provably misbehaving (it sends keepalives).
        Err(_) => return Ok(None),
        Ok(Err(e)) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
            return Err(WireError::Closed)
        }
        Ok(Err(e)) => return Err(e.into()),
        Ok(Ok(_)) => {}
    }
    let len = wire::body_len(header, limits.max_frame_bytes)?;
    let mut body = vec![0u8; len];
    match tokio::time::timeout(deadline, rd.read_exact(&mut body)).await {
        Err(_) => {
            return Err(WireError::Io(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "frame body not received within the read deadline",
            )))
        }
        Ok(Err(e)) => return Err(e.into()),
        Ok(Ok(_)) => {}
    }
    let msg = wire::decode_body(&body, limits)?;
    Ok(Some((msg, HEADER_BYTES + len)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_window_allows_one_line_per_interval_and_counts_the_rest() {
        let mut w = LogWindow::default();
        let t0 = Instant::now();
        let i = Duration::from_secs(10);
        assert_eq!(w.note(t0, i), Some(0));
        for k in 1..=5 {
            assert_eq!(w.note(t0 + Duration::from_secs(k), i), None);
        }
        assert_eq!(w.note(t0 + Duration::from_secs(10), i), Some(5));
        assert_eq!(w.note(t0 + Duration::from_secs(11), i), None);
        assert_eq!(w.note(t0 + Duration::from_secs(25), i), Some(1));
    }

    #[test]
    fn inbound_limits_cap_handshakes_per_address_and_give_slots_back() {
        let l = InboundLimits::new();
        let a: IpAddr = "127.0.0.9".parse().unwrap();
        let b: IpAddr = "127.0.0.10".parse().unwrap();
        let held: Vec<_> = (0..MAX_HANDSHAKES_PER_IP)
            .map(|_| l.admit(a).unwrap())
            .collect();
        assert_eq!(l.admit(a).err(), Some("handshakes from one address"));
        let other = l.admit(b).unwrap();
        drop(held);
        assert!(l.admit(a).is_ok());
        drop(other);
        assert!(l.per_ip.lock().unwrap().is_empty());
    }
}
