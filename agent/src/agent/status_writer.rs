//! The status file writer: one dedicated thread that writes
//! `<dataDir>/status.json` (atomically, with fsync), newest document
//! wins. Callers never wait on the disk: [`StatusWriter::publish`] puts
//! the document in a one-slot mailbox and returns; async callers that
//! need the file written wait for its generation on a watch channel, not
//! on a lock.

use crate::status::Status;
use std::path::PathBuf;
use std::sync::mpsc::{sync_channel, SyncSender, TrySendError};
use std::sync::{Arc, Mutex};
use tokio::sync::watch;

/// Handle to the writer thread (cheap to share; the thread ends when the
/// last handle is dropped).
#[derive(Debug)]
pub(super) struct StatusWriter {
    /// The newest document not yet written, and its generation.
    slot: Arc<Mutex<Option<(u64, Status)>>>,
    /// Generation of the newest document handed over.
    published: Mutex<u64>,
    /// Wakes the thread (capacity one: a pending wake-up covers every
    /// document published before the thread looks at the slot).
    wake: SyncSender<()>,
    /// The generation last written (or given up on).
    written: watch::Receiver<u64>,
}

impl StatusWriter {
    /// Starts the writer thread for `data_dir`.
    pub(super) fn start(data_dir: PathBuf) -> std::io::Result<Self> {
        let slot: Arc<Mutex<Option<(u64, Status)>>> = Arc::new(Mutex::new(None));
        let (wake, woken) = sync_channel::<()>(1);
        let (done, written) = watch::channel(0u64);
        let thread_slot = slot.clone();
        std::thread::Builder::new()
            .name("cairn-status".into())
            .spawn(move || {
                while woken.recv().is_ok() {
                    let staged = thread_slot.lock().unwrap_or_else(|p| p.into_inner()).take();
                    let Some((generation, status)) = staged else {
                        continue;
                    };
                    // Status writes need no free space (see `Status::write`),
                    // so a full data directory is reported, not left stale.
                    if let Err(e) = status.write(&data_dir) {
                        tracing::warn!(error = %e, "cannot write the status file");
                    }
                    done.send_replace(generation);
                }
            })?;
        Ok(Self {
            slot,
            published: Mutex::new(0),
            wake,
            written,
        })
    }

    /// Hands `status` to the writer; returns its generation.
    pub(super) fn publish(&self, status: Status) -> u64 {
        let generation = {
            let mut p = self.published.lock().unwrap_or_else(|p| p.into_inner());
            *p += 1;
            *self.slot.lock().unwrap_or_else(|p| p.into_inner()) = Some((*p, status));
            *p
        };
        match self.wake.try_send(()) {
            Ok(()) | Err(TrySendError::Full(())) => {}
            Err(TrySendError::Disconnected(())) => {
                tracing::warn!("the status writer thread has stopped");
            }
        }
        generation
    }

    /// Waits until generation `generation` (or a newer one) is written.
    pub(super) async fn written(&self, generation: u64) {
        let mut rx = self.written.clone();
        let _ = rx.wait_for(|w| *w >= generation).await;
    }
}
