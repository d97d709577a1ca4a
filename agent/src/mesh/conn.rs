//! Mesh connections: TLS accept and dial, and the per-connection reader
//! and writer tasks. Every read has a deadline and every frame length is
//! checked before its body is allocated; a peer can stall only its own
//! tasks.

use super::MeshMetrics;
use cairn_bundle::mesh::pki::PeerIdentity;
use cairn_bundle::mesh::sync::ConnId;
use cairn_bundle::mesh::tls;
use cairn_bundle::mesh::wire::{self, Message, WireError, HEADER_BYTES};
use cairn_bundle::mesh::MeshLimits;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio_rustls::TlsStream;

/// Connect + handshake deadline.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Outgoing messages queued per connection; a peer that lets its queue
/// fill up is too slow and is disconnected.
pub const SEND_QUEUE: usize = 256;

/// What connection tasks tell the driver.
pub enum Input {
    /// A TLS connection is up.
    Connected {
        /// The stream.
        stream: Box<TlsStream<TcpStream>>,
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
        /// Stable reason.
        reason: &'static str,
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
}

fn identity_of(
    certs: Option<&[rustls::pki_types::CertificateDer<'_>]>,
) -> Result<PeerIdentity, String> {
    tls::peer_identity(certs).map_err(|e| e.to_string())
}

/// Accepts connections until the task is aborted.
pub async fn accept_loop(
    listener: tokio::net::TcpListener,
    server: Arc<rustls::ServerConfig>,
    tx: mpsc::Sender<Input>,
    metrics: MeshMetrics,
) {
    let acceptor = tokio_rustls::TlsAcceptor::from(server);
    loop {
        let (sock, remote) = match listener.accept().await {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "mesh accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let acceptor = acceptor.clone();
        let tx = tx.clone();
        let metrics = metrics.clone();
        tokio::spawn(async move {
            let _ = sock.set_nodelay(true);
            let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(sock)).await {
                Ok(Ok(t)) => t,
                Ok(Err(e)) => {
                    metrics.handshake_failures.inc();
                    tracing::warn!(peer = %remote, error = %e, "mesh handshake refused");
                    return;
                }
                Err(_) => {
                    metrics.handshake_failures.inc();
                    tracing::warn!(peer = %remote, "mesh handshake timed out");
                    return;
                }
            };
            let identity = match identity_of(tls.get_ref().1.peer_certificates()) {
                Ok(i) => i,
                Err(e) => {
                    metrics.handshake_failures.inc();
                    tracing::warn!(peer = %remote, error = %e, "mesh peer without a Cairn identity");
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
pub fn dial(
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
pub struct ConnHandle {
    /// Outgoing messages.
    pub tx: mpsc::Sender<Message>,
    /// The reader task (aborted on close).
    pub reader: tokio::task::AbortHandle,
}

/// Starts the reader and writer tasks of a connection.
pub fn spawn_io(
    conn: ConnId,
    stream: TlsStream<TcpStream>,
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
                    reason: "idle",
                    detail: "no frame within the read deadline".into(),
                },
                Err(e) => Input::WireError {
                    conn,
                    reason: e.reason(),
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
                            reason: "io",
                            detail: e.to_string(),
                        })
                        .await;
                    return;
                }
                Err(_) => {
                    let _ = tx
                        .send(Input::WireError {
                            conn,
                            reason: "timeout",
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
pub async fn read_one<R: tokio::io::AsyncRead + Unpin>(
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
