use super::*;

impl Agent {
    pub(super) fn record_rejection(&self, source: &str, rej: &Rejection) -> SyncOutcome {
        let reason = rej.reason();
        tracing::warn!(source, reason, stage = %rej.stage, error = %rej.error, "rejected");
        self.inner.metrics.reject(reason);
        let r = RejectionStatus {
            at: unix_now(),
            source: source.to_owned(),
            reason: reason.to_owned(),
            message: rej.to_string(),
        };
        let mut st = self.state();
        st.last_rejection = Some(r.clone());
        st.sources
            .entry(source.to_owned())
            .or_default()
            .last_rejection = Some(r);
        SyncOutcome::Rejected { reason }
    }

    /// Syncs from one source: follows new roots, reads the channel's
    /// release, fetches only objects the store lacks, verifies everything
    /// through [`crate::pipeline`] and adopts atomically. Rejections are
    /// logged, counted and recorded in status, and leave the adopted state
    /// untouched. The mesh calls this with a peer as the source.
    pub async fn sync_from(
        &self,
        source: &dyn Source,
    ) -> std::result::Result<SyncOutcome, SyncError> {
        let name = source.name().to_owned();
        let started = unix_now();
        let result = self.sync_inner(source).await;
        let m = &self.inner.metrics;
        let sync_json = {
            let mut st = self.state();
            let s = st.sources.entry(name.clone()).or_default();
            s.source = name.clone();
            s.last_attempt = started;
            match &result {
                Ok(o) => {
                    s.last_success = Some(unix_now());
                    s.error = None;
                    s.note = match o {
                        SyncOutcome::Deferred { sequence, why } => {
                            Some(format!("release {sequence}: {why}"))
                        }
                        _ => None,
                    };
                    s.ok = !matches!(o, SyncOutcome::Rejected { .. });
                    s.result = match o {
                        SyncOutcome::UpToDate => "up-to-date",
                        SyncOutcome::NoRelease => "no-release",
                        SyncOutcome::Adopted { .. } => "adopted",
                        SyncOutcome::Deferred { .. } => "deferred",
                        SyncOutcome::Rejected { .. } => "rejected",
                    }
                    .into();
                }
                // A store error is this agent's disk, not the source: every
                // store call in a sync comes after a successful read from the
                // source, so the source counts as reached (not offline). The
                // error itself is reported as the store's (status `store`,
                // `cairn_store_up`, `/readyz`).
                Err(SyncError::Store(e)) => {
                    s.ok = true;
                    s.note = Some(format!("not stored: {e}"));
                    s.result = "store-error".into();
                    s.error = None;
                    s.last_success = Some(unix_now());
                }
                Err(e) => {
                    s.ok = false;
                    s.note = None;
                    s.result = "error".into();
                    s.error = Some(e.to_string());
                    if let SyncError::Source(se) = e {
                        if !matches!(se, SourceError::Unavailable { .. }) {
                            s.last_success = Some(unix_now());
                        }
                    }
                }
            }
            let up = matches!(
                &result,
                Ok(_)
                    | Err(SyncError::Store(_))
                    | Err(SyncError::Source(
                        SourceError::TooLarge { .. } | SourceError::Invalid { .. }
                    ))
            );
            m.source_up
                .get_or_create(&SourceLabel {
                    source: name.clone(),
                })
                .set(i64::from(up));
            serde_json::to_vec(&*s).ok()
        };
        if let Some(json) = sync_json {
            let n = name.clone();
            let _ = self.blocking(move |s| s.set_sync_status(&n, &json)).await;
        }
        if let Err(SyncError::Source(e)) = &result {
            m.fetch_errors
                .get_or_create(&SourceErrorLabel {
                    source: name.clone(),
                    kind: e.kind().to_owned(),
                })
                .inc();
            tracing::warn!(source = %name, error = %e, "source fetch failed");
        }
        self.publish_status();
        result
    }

    /// The current root, the roots of its release epoch and the adopted
    /// release: what a [`Context`] borrows.
    pub(super) fn context_parts(&self) -> ContextParts {
        let st = self.state();
        (
            st.root.root.clone(),
            cairn_keys::root::release_epoch(&st.chain).to_vec(),
            st.head
                .as_ref()
                .map(|h| (h.release.sequence, h.bytes.clone())),
        )
    }

    pub(super) async fn sync_inner(&self, source: &dyn Source) -> std::result::Result<SyncOutcome, SyncError> {
        let name = source.name();
        let limits = &self.inner.limits;
        let channel = self.inner.config.channel.clone();
        let mut root_rejected = None;

        // 1. Roots: follow roots/<v+1> until the source has no more.
        loop {
            let current = self.state().root.clone();
            let next = current.root.version + 1;
            let Some(bytes) = source
                .get(&root_path(next), cairn_keys::root::MAX_ROOT_BYTES as u64)
                .await?
            else {
                break;
            };
            match pipeline::check_root(&current, &bytes) {
                Ok(vr) => {
                    self.blocking(move |s| s.put_root(next, &bytes)).await?;
                    tracing::info!(source = name, version = next, "trust root rotated");
                    self.inner.metrics.root_version.set(gauge(next));
                    let mut st = self.state();
                    if vr.root.starts_release_epoch(&st.chain) {
                        tracing::warn!(
                            source = name,
                            version = next,
                            "trust root v{next} replaces the release keys: a new release epoch starts; the adopted release stays enforced until one signed by the new release keys arrives, whatever its sequence"
                        );
                    }
                    st.chain.push(vr.root.clone());
                    st.root = vr;
                }
                Err(rej) => {
                    root_rejected = Some(self.record_rejection(name, &rej));
                    break;
                }
            }
        }

        // 2. The channel's release.
        let Some(release_bytes) = source
            .get(&channel_path(&channel), limits.max_release_bytes)
            .await?
        else {
            return Ok(root_rejected.unwrap_or(SyncOutcome::NoRelease));
        };
        let (root, epoch, adopted) = self.context_parts();
        let ctx = Context {
            root: &root,
            epoch: &epoch,
            channel: &channel,
            adopted: adopted.as_ref().map(|(s, b)| AdoptedRef {
                sequence: *s,
                bytes: b,
            }),
            now: unix_now(),
            limits,
        };
        let mut ingest = match Ingest::start(&ctx, &release_bytes) {
            Ok(Start::UpToDate) => return Ok(root_rejected.unwrap_or(SyncOutcome::UpToDate)),
            Ok(Start::Candidate(i)) => *i,
            Err(rej) => return Ok(self.record_rejection(name, &rej)),
        };
        let sequence = ingest.release().release.sequence;
        let now = unix_now();
        let hold = self.current_hold(now).await;
        let deferral = pipeline::adoption_gate(
            &ingest.release().release,
            &self.audience(&ingest.release().release.bundle),
            hold.as_ref(),
            now,
        );
        if let Some(d) = &deferral {
            let why = d.describe(format_time);
            // Stage (download and verify ahead) unless the release is not
            // for this agent at all and no mesh peer could want it from us.
            let stage = !matches!(d, Deferral::Rollout(Decision::NotSelected { .. }))
                || self.inner.config.mesh.is_some();
            let known = self
                .state()
                .pending
                .as_ref()
                .is_some_and(|p| p.bytes == ingest.release().bytes && p.manifest.is_some());
            if !known {
                tracing::info!(source = name, sequence, %why, stage, "newer release not adopted now");
            }
            if !stage {
                self.set_pending(ingest.release(), None, d.clone());
                return Ok(SyncOutcome::Deferred { sequence, why });
            }
        } else {
            tracing::info!(source = name, channel = %channel, sequence, "new release found; fetching");
        }

        // 3. The bundle manifest (from the store if present).
        if let Want::Manifest { address, limit } = ingest.want() {
            let stored = {
                let a = address.clone();
                self.blocking(move |s| match s.bundle(&a)? {
                    Some(b) => Ok(Some(b)),
                    None => Ok(s.get_object(&a).ok().flatten()),
                })
                .await?
            };
            let bytes = match stored {
                Some(b) => Some(b),
                None => match object_path(&address) {
                    Some(p) => source.get(&p, limit).await?,
                    None => None,
                },
            };
            let Some(bytes) = bytes else {
                let rej = Rejection::new(
                    Stage::Manifest,
                    cairn_bundle::Error::ObjectMissing {
                        address,
                        what: "bundle manifest".into(),
                    },
                );
                return Ok(self.record_rejection(name, &rej));
            };
            if let Err(rej) = ingest.handle_manifest(&bytes) {
                return Ok(self.record_rejection(name, &rej));
            }
        }

        // 4. Only the objects the store lacks, a few at a time.
        if let Want::Objects(list) = ingest.want() {
            let mut to_fetch = Vec::new();
            let present = {
                let addrs: Vec<String> = list.iter().map(|(a, _)| a.clone()).collect();
                self.blocking(move |s| {
                    addrs
                        .iter()
                        .map(|a| s.has_object(a))
                        .collect::<std::result::Result<Vec<bool>, StoreError>>()
                })
                .await?
            };
            for ((address, size), present) in list.into_iter().zip(present) {
                if present {
                    ingest.mark_present(&address);
                } else {
                    to_fetch.push((address, size));
                }
            }
            let fetched = to_fetch.len();
            let mut stream = futures::stream::iter(to_fetch)
                .map(|(address, size)| async move {
                    let r = match object_path(&address) {
                        Some(p) => source.get(&p, size).await,
                        None => Ok(None),
                    };
                    (address, r)
                })
                .buffer_unordered(FETCH_CONCURRENCY);
            while let Some((address, r)) = stream.next().await {
                let Some(bytes) = r? else {
                    let what = ingest
                        .manifest()
                        .and_then(|m| m.entries.iter().find(|e| e.object == address))
                        .map(|e| e.display_name())
                        .unwrap_or_default();
                    let rej = Rejection::new(
                        Stage::Object,
                        cairn_bundle::Error::ObjectMissing { address, what },
                    );
                    return Ok(self.record_rejection(name, &rej));
                };
                if let Err(rej) = ingest.handle_object(&address, &bytes) {
                    return Ok(self.record_rejection(name, &rej));
                }
                self.blocking(move |s| s.put_object(&address, &bytes))
                    .await?;
            }
            tracing::debug!(source = name, fetched, "objects fetched");
        }

        // A deferred release is staged: its manifest goes into the object
        // store too (mesh peers fetch it by address), then it waits.
        if let Some(d) = deferral {
            if let Some(m) = ingest.manifest_bytes() {
                let (a, m) = (ingest.release().release.bundle.clone(), m.to_vec());
                self.blocking(move |s| s.put_object(&a, &m)).await?;
            }
            let why = d.describe(format_time);
            self.set_pending(ingest.release(), ingest.manifest().cloned(), d);
            return Ok(SyncOutcome::Deferred { sequence, why });
        }

        // 5. Commit: re-check against the head at this moment, then switch.
        let _guard = self.inner.adopt_lock.lock().await;
        let candidate_bytes = ingest.release().bytes.clone();
        let (root, epoch, adopted) = self.context_parts();
        let ctx = Context {
            root: &root,
            epoch: &epoch,
            channel: &channel,
            adopted: adopted.as_ref().map(|(s, b)| AdoptedRef {
                sequence: *s,
                bytes: b,
            }),
            now: unix_now(),
            limits,
        };
        let adoption = match ingest.finish(&ctx) {
            Ok(a) => a,
            Err(_) if adopted.as_ref().is_some_and(|(_, b)| *b == candidate_bytes) => {
                // Another source adopted this very release meanwhile.
                return Ok(SyncOutcome::UpToDate);
            }
            Err(rej) => return Ok(self.record_rejection(name, &rej)),
        };
        let rel = &adoption.release.release;
        {
            // Durable before anything is reported, logged or acted on.
            let (c, r, b, m) = (
                channel.clone(),
                adoption.release.bytes.clone(),
                rel.bundle.clone(),
                adoption.manifest_bytes.clone(),
            );
            self.blocking(move |s| s.adopt(&c, &r, &b, &m)).await?;
        }
        let head = HeadState {
            address: cairn_keys::sha256_address(&adoption.release.bytes),
            release: rel.clone(),
            bytes: adoption.release.bytes.clone(),
            manifest: Arc::new(adoption.manifest.clone()),
        };
        let published = head.published();
        {
            let mut st = self.state();
            st.head = Some(head);
            if st
                .pending
                .as_ref()
                .is_some_and(|p| p.release.sequence <= rel.sequence)
            {
                st.pending = None;
            }
        }
        let m = &self.inner.metrics;
        m.adoptions.inc();
        m.adopted_sequence
            .get_or_create(&ChannelLabel {
                channel: channel.clone(),
            })
            .set(gauge(rel.sequence));
        tracing::info!(
            source = name,
            channel = %channel,
            sequence = rel.sequence,
            bundle = %rel.bundle,
            objects = adoption.manifest.entries.len(),
            "release adopted"
        );
        self.inner.adopted_tx.send_replace(Some(published));
        self.publish_relay();
        Ok(SyncOutcome::Adopted {
            sequence: rel.sequence,
        })
    }
}
