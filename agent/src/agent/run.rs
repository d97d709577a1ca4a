use super::*;
use crate::ingest::Item;

impl Agent {
    /// Syncs every configured source once, concurrently.
    pub async fn sync_all(&self) -> Vec<(String, std::result::Result<SyncOutcome, SyncError>)> {
        let futs = self.inner.sources.iter().map(|s| {
            let s = s.clone();
            let this = self.clone();
            async move { (s.name().to_owned(), this.sync_from(s.as_ref()).await) }
        });
        futures::future::join_all(futs).await
    }

    /// One sync of every source, one reconcile; `Ok` when the target
    /// matches the adopted release (`cairn-agent run --once`).
    pub async fn run_once(&self) -> Result<ApplyReport> {
        let result = self.sync_and_reconcile_once().await;
        // The process exits right after: write the final status.json here,
        // on every path (status writes elsewhere are fire-and-forget and
        // may not have run yet).
        self.publish_status_now().await;
        result
    }

    pub(super) async fn sync_and_reconcile_once(&self) -> Result<ApplyReport> {
        self.sync_all().await;
        let mut report = self.reconcile().await?;
        // A release still rolling out: run again when the target asks,
        // until it is healthy or its health timeout fails it (the same
        // schedule the reconcile loop keeps).
        while let Some(after) = report.requeue_after {
            tokio::time::sleep(after).await;
            report = self.reconcile().await?;
        }
        let failed = self.state().failed.clone();
        let h = self.adopted();
        if let (Some(f), Some(h)) = (&failed, &h) {
            if f.sequence == h.sequence {
                return Err(Error::NotInSync {
                    channel: self.inner.config.channel.clone(),
                    sequence: h.sequence,
                    detail: format!(
                        "the release failed its health checks ({}); the last-good release is enforced instead",
                        f.reason
                    ),
                });
            }
        }
        if !report.in_sync() {
            return Err(Error::NotInSync {
                channel: self.inner.config.channel.clone(),
                sequence: h.map(|h| h.sequence).unwrap_or(0),
                detail: report
                    .unhealthy
                    .iter()
                    .cloned()
                    .chain(report.conflicts.iter().cloned())
                    .collect::<Vec<_>>()
                    .join("; "),
            });
        }
        self.blocking(|s| s.flush()).await?;
        Ok(report)
    }

    /// Runs until `shutdown` resolves: one polling task per source (with
    /// backoff on failure), the reconcile loop, and the HTTP listener if
    /// configured.
    pub async fn run(&self, shutdown: impl std::future::Future<Output = ()>) -> Result<()> {
        let mut tasks = tokio::task::JoinSet::new();
        if let Some(addr) = self.inner.config.listen_http {
            let listener = tokio::net::TcpListener::bind(addr)
                .await
                .map_err(|source| Error::Io {
                    what: format!("listen.http {addr}"),
                    source,
                })?;
            let bound = listener.local_addr().map_err(|source| Error::Io {
                what: format!("listen.http {addr}"),
                source,
            })?;
            tracing::info!(address = %bound, "serving /healthz /readyz /metrics");
            self.set_listen(bound);
            let agent = self.clone();
            tasks.spawn(async move { crate::http::serve(listener, agent).await });
        }
        let mut image_link = None;
        if let Some(addr) = self.inner.config.listen_registry {
            let listener = tokio::net::TcpListener::bind(addr)
                .await
                .map_err(|source| Error::Io {
                    what: format!("listen.registry {addr}"),
                    source,
                })?;
            let bound = listener.local_addr().map_err(|source| Error::Io {
                what: format!("listen.registry {addr}"),
                source,
            })?;
            tracing::info!(address = %bound, "serving the image registry (/v2/)");
            let mut images = crate::images::Images::new(
                &self.inner.config.data_dir,
                self.inner.metrics.images.clone(),
            );
            if self.inner.config.mesh.is_some() {
                image_link = Some(images.link_mesh());
            }
            let agent = self.clone();
            tasks.spawn(images.clone().sync_loop(agent));
            tasks.spawn(images.serve(listener));
        }
        if let Some(mesh) = self.inner.config.mesh.clone() {
            let metrics = self.inner.metrics.mesh.clone();
            let mesh = crate::mesh::Mesh::bind(self.clone(), mesh, metrics)
                .await
                .map_err(|e| {
                    Error::Config(crate::config::ConfigError {
                        lines: vec![format!("mesh: {e}")],
                    })
                })?;
            let mesh = match image_link.take() {
                Some(link) => mesh.with_images(link),
                None => mesh,
            };
            tasks.spawn(mesh.run());
        }
        for source in self.inner.sources.iter().cloned() {
            let agent = self.clone();
            tasks.spawn(async move { agent.poll_source(source).await });
        }
        let agent = self.clone();
        tasks.spawn(async move { agent.reconcile_loop().await });
        let agent = self.clone();
        tasks.spawn(async move { agent.deferred_loop().await });
        let agent = self.clone();
        tasks.spawn(async move { agent.store_recovery_loop().await });
        tasks.spawn(self.inner.notifier.clone().run());
        if self.inner.sources.is_empty() {
            tracing::warn!("no sources configured: enforcing the stored state only");
        }
        shutdown.await;
        tracing::info!("shutting down");
        tasks.abort_all();
        // The last status and flush get a few seconds: a store stuck on a
        // failing disk must not keep the agent from stopping (everything
        // adopted is durable already; this only saves sync results).
        let last = async {
            self.publish_status_now().await;
            self.blocking(|s| s.flush()).await
        };
        match tokio::time::timeout(SHUTDOWN_GRACE, last).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::warn!(error = %e, "final store flush failed"),
            Err(_) => tracing::warn!(
                grace_s = SHUTDOWN_GRACE.as_secs(),
                "final store flush did not finish; stopping anyway"
            ),
        }
        Ok(())
    }

    /// Reopens the store after an IO error (a full disk, say) once it takes
    /// writes again, then picks up what is durable in it and wakes the
    /// sources, so no restart is needed.
    pub(super) async fn store_recovery_loop(&self) {
        let mut backoff = Backoff::new(Duration::from_secs(1), Duration::from_secs(10));
        loop {
            tokio::time::sleep(Duration::from_millis(500)).await;
            if self.inner.store.failure().is_none() {
                backoff.reset();
                continue;
            }
            match self.blocking(|s| s.recover()).await {
                Ok(()) => {
                    tracing::info!("store recovered: the data directory takes writes again");
                    backoff.reset();
                    self.reload_head().await;
                    self.inner.store_recovered.notify_waiters();
                    self.publish_status();
                }
                Err(e) => {
                    let d = backoff.next_delay();
                    tracing::warn!(error = %e, retry_ms = d.as_millis() as u64, "store still failing");
                    tokio::time::sleep(d).await;
                }
            }
        }
    }

    /// After a store recovery: the durable head is the truth. An adoption
    /// whose flush failed was never reported; if it reached the disk anyway
    /// it is picked up here (verified again), otherwise the old head stays.
    pub(super) async fn reload_head(&self) {
        let roots = self.state().chain.clone();
        let config = self.inner.config.clone();
        let store = self.inner.store.blocking().clone();
        let loaded = tokio::task::spawn_blocking(move || {
            load_head(&store, &roots, &config, &Limits::default(), unix_now())
        })
        .await;
        let head = match loaded {
            Ok(Ok(h)) => h,
            Ok(Err(e)) => {
                tracing::error!(error = %e, "stored head unreadable after store recovery");
                return;
            }
            Err(_) => return,
        };
        let Some(head) = head else { return };
        let changed = self
            .state()
            .head
            .as_ref()
            .is_none_or(|h| h.bytes != head.bytes);
        if !changed {
            return;
        }
        let published = head.published();
        tracing::info!(
            channel = %head.release.channel,
            sequence = head.release.sequence,
            "release adopted (found durable in the store after recovery)"
        );
        self.inner
            .metrics
            .adopted_sequence
            .get_or_create(&ChannelLabel {
                channel: head.release.channel.to_string(),
            })
            .set(head.release.sequence as i64);
        {
            let mut st = self.state();
            st.deferred.adopted(head.release.sequence);
            st.head = Some(head);
        }
        self.inner.deferred_wake.notify_one();
        self.inner.adopted_tx.send_replace(Some(published));
        self.publish_relay();
    }

    pub(super) async fn poll_source(&self, source: Arc<dyn Source>) {
        let cfg = &self.inner.config;
        let mut backoff = Backoff::new(
            Duration::from_secs(1).min(cfg.poll_interval),
            cfg.max_backoff,
        );
        loop {
            let synced = self.sync_from(source.as_ref()).await;
            release_freed_memory();
            let delay = match synced {
                Ok(_) => {
                    backoff.reset();
                    jitter(cfg.poll_interval, 0.1)
                }
                Err(SyncError::Source(_)) => {
                    let d = backoff.next_delay();
                    tracing::debug!(
                        source = source.name(),
                        delay_ms = d.as_millis() as u64,
                        "retrying after backoff"
                    );
                    d
                }
                Err(SyncError::Store(e)) => {
                    tracing::error!(error = %e, "store error during sync");
                    backoff.next_delay()
                }
            };
            tokio::select! {
                _ = tokio::time::sleep(delay) => {}
                _ = self.inner.store_recovered.notified() => backoff.reset(),
            }
        }
    }

    /// Reconciles, then sleeps until the reconciler's [`Action`] says to
    /// run again or an adoption wakes it.
    pub(super) async fn reconcile_loop(&self) {
        let mut rx = self.subscribe();
        let interval = self.inner.config.reconcile_interval;
        let mut failures = Backoff::new(Duration::from_secs(1).min(interval), interval);
        loop {
            let result = self.reconcile().await;
            let action = reconcile::next_action(&result, interval, &mut failures);
            drop(result);
            release_freed_memory();
            let wait = async {
                match action.requeue_after() {
                    Some(d) => tokio::time::sleep(d).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = wait => {}
                changed = rx.changed() => {
                    if changed.is_err() {
                        return;
                    }
                }
            }
        }
    }
}

/// Hands memory freed by a sync or reconcile (fetched objects, the desired
/// state, plans) back to the OS. glibc keeps freed heap pages in its
/// arenas, so without this the idle agent stays at its peak RSS (measured
/// with 9,000 objects: about 55 MiB before, 29 MiB after; see
/// docs/PERFORMANCE.md).
pub(super) fn release_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only returns unused pages of the allocator's own
    // arenas to the kernel; it frees nothing that is in use.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// A staged release as a [`Source`]: the envelope from memory, everything
/// else (manifest, objects) from the store, where staging put it verified.
pub(super) struct StagedRelease {
    pub(super) channel: String,
    pub(super) release: Vec<u8>,
    pub(super) store: StoreHandle,
}

impl Source for StagedRelease {
    fn name(&self) -> &str {
        "staged"
    }

    fn get<'a>(
        &'a self,
        item: &'a Item,
        limit: u64,
    ) -> crate::BoxFuture<'a, std::result::Result<Option<Vec<u8>>, SourceError>> {
        Box::pin(async move {
            let found = match item {
                Item::Release(c) if *c == self.channel => Some(self.release.clone()),
                Item::Manifest(a) | Item::Object(a) => {
                    let a = a.clone();
                    self.store
                        .call(move |s| s.get_object(&a))
                        .await
                        .ok()
                        .flatten()
                }
                _ => None,
            };
            Ok(found.filter(|b| b.len() as u64 <= limit))
        })
    }
}
