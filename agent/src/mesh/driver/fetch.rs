//! A release fetched from a peer, through the one ingest pipeline: the
//! release is verified (root chain, signatures, channel, sequence, expiry)
//! before any object is asked for; the manifest and every object are
//! checked by the [`Ingest`] as they arrive and written to the store on a
//! blocking thread; objects the store already holds are not fetched
//! again; a complete fetch is adopted through [`Agent::sync_from`] over a
//! [`StagedSource`], the path every source takes.

use super::*;
use cairn_core::Address;

impl Driver {
    /// Checks a fetched release with the pipeline (root chain, signatures,
    /// channel, sequence, expiry) before any object is requested.
    pub(super) fn verify_release(
        &mut self,
        fetch: FetchId,
        peer: cairn_core::AgentId,
        channel: &str,
        release: Vec<u8>,
        roots: Vec<(u64, Vec<u8>)>,
        now: Millis,
    ) {
        let mut root = self.agent.root();
        let mut chain = self.agent.root_chain();
        let mut kept = BTreeMap::new();
        for (v, bytes) in roots {
            if v != root.root().version + 1 {
                continue;
            }
            match pipeline::check_root(&root, &bytes) {
                Ok(next) => {
                    chain.push(next.root().clone());
                    root = next;
                    kept.insert(v, bytes);
                }
                Err(rej) => {
                    return self.ep.release_rejected(
                        fetch,
                        VerifyFailure::of(&rej),
                        &rej.to_string(),
                        now,
                    );
                }
            }
        }
        // The agent's snapshot with the peer's newer roots, if any.
        let mut snapshot = self.agent.snapshot();
        snapshot.root = root.root().clone();
        snapshot.epoch = cairn_keys::root::release_epoch(&chain).to_vec();
        match Ingest::start(&snapshot.context(channel, &self.limits), &release) {
            Err(rej) => self.rejected(fetch, &peer, "release", &rej, now),
            Ok(Start::UpToDate) => self.ep.fetch_abandon(fetch, now),
            Ok(Start::Candidate(ingest)) => {
                let state = FetchState {
                    peer,
                    roots: kept,
                    release,
                    ingest: *ingest,
                    manifest: None,
                    adopting: false,
                    writes: 0,
                    idle_waiting: false,
                    checking: false,
                };
                // The manifest may be stored already (a staged release):
                // looked up on a blocking thread, the verdict given when
                // the answer comes back.
                let bundle = state.ingest.release().release().bundle.clone();
                self.fetches.insert(fetch, state);
                let (store, tx) = (self.agent.store().clone(), self.tx.clone());
                tokio::spawn(async move {
                    let manifest = store
                        .call(move |s| match s.bundle(&bundle)? {
                            Some(m) => Ok(Some(m)),
                            None => Ok(s.get_object(&bundle).ok().flatten()),
                        })
                        .await
                        .ok()
                        .flatten();
                    let _ = tx.send(Input::LocalManifest { fetch, manifest }).await;
                });
            }
        }
    }

    /// The store's copy of the manifest (if any) for a verified release:
    /// the fetch moves on to the manifest or the objects.
    pub(super) fn local_manifest(
        &mut self,
        fetch: FetchId,
        manifest: Option<Vec<u8>>,
        now: Millis,
    ) {
        let Some(state) = self.fetches.get_mut(&fetch) else {
            return;
        };
        let bundle = state.ingest.release().release().bundle.as_address().clone();
        let want = match manifest {
            Some(m) => match state.ingest.handle_manifest(&m) {
                Ok(()) => {
                    state.manifest = Some(m);
                    Vec::new()
                }
                Err(_) => vec![bundle],
            },
            None => vec![bundle],
        };
        self.ep.release_verified(fetch, now);
        self.ep.fetch_want(fetch, want, now);
    }

    /// An object whose hash matched: the manifest, or an entry checked by
    /// the pipeline against it, then stored.
    pub(super) fn object(&mut self, fetch: FetchId, address: Address, bytes: Vec<u8>, now: Millis) {
        let Some(f) = self.fetches.get_mut(&fetch) else {
            return;
        };
        let from = crate::mesh::FromLabel {
            from: "peer".into(),
        };
        self.metrics.objects_fetched.get_or_create(&from).inc();
        self.metrics
            .object_bytes_fetched
            .get_or_create(&from)
            .inc_by(bytes.len() as u64);
        let result = if f.manifest.is_none()
            && address == *f.ingest.release().release().bundle.as_address()
        {
            f.ingest.handle_manifest(&bytes).map(|()| {
                f.manifest = Some(bytes);
            })
        } else {
            f.ingest.handle_object(&address, &bytes).map(|()| {
                // Written on a blocking thread; adoption waits for it.
                f.writes += 1;
                let (store, tx) = (self.agent.store().clone(), self.tx.clone());
                tokio::spawn(async move {
                    let error = store
                        .call(move |s| s.put_object(&address, &bytes))
                        .await
                        .err()
                        .map(|e| e.to_string());
                    let _ = tx.send(Input::Stored { fetch, error }).await;
                });
            })
        };
        if let Err(rej) = result {
            let peer = f.peer.clone();
            self.rejected(fetch, &peer, "object", &rej, now);
        }
    }

    /// The pipeline refused what a peer sent for `fetch` (`what`: release,
    /// object, bundle): logged and counted, the fetch dropped, and the
    /// endpoint told (the peer is cut off unless it is not its fault).
    fn rejected(
        &mut self,
        fetch: FetchId,
        peer: &cairn_core::AgentId,
        what: &str,
        rej: &pipeline::Rejection,
        now: Millis,
    ) {
        tracing::warn!(%peer, reason = rej.reason(), error = %rej, "{what} from mesh peer rejected");
        self.agent.metrics().reject(rej.reason());
        self.fetches.remove(&fetch);
        self.ep
            .release_rejected(fetch, VerifyFailure::of(rej), &rej.to_string(), now);
    }

    /// Everything asked for arrived: ask for the missing entries, or adopt.
    pub(super) fn idle(&mut self, fetch: FetchId, now: Millis) {
        let Some(f) = self.fetches.get_mut(&fetch) else {
            return;
        };
        if f.adopting {
            return;
        }
        if f.writes > 0 || f.checking {
            f.idle_waiting = true;
            return;
        }
        match f.ingest.want() {
            Want::Manifest { .. } => {
                self.fetches.remove(&fetch);
                self.ep.fetch_abandon(fetch, now);
            }
            Want::Objects(list) => {
                // Which of them the store holds: asked on a blocking
                // thread, answered as an input.
                f.checking = true;
                self.look_up(
                    list,
                    |s, a| s.has_object(a).unwrap_or(false),
                    move |present| Input::Present { fetch, present },
                );
            }
            Want::Chunks(list) => {
                // Format 2: the chunks the store holds (unchanged since
                // the last release) are read on a blocking thread and fed
                // to the ingest; the rest are asked of the peer.
                f.checking = true;
                self.look_up(
                    list,
                    |s, a| s.get_object(a).ok().flatten(),
                    move |chunks| Input::LocalChunks { fetch, chunks },
                );
            }
            Want::Complete => self.adopt(fetch),
        }
    }

    /// Looks each wanted address up in the store (`look`) on a blocking
    /// thread; the answer comes back as the input `answer` makes of it.
    fn look_up<T: Send + 'static>(
        &self,
        wanted: Vec<(Address, u64)>,
        look: fn(&crate::store::Store, &Address) -> T,
        answer: impl FnOnce(Vec<(Address, T)>) -> Input + Send + 'static,
    ) {
        let (store, tx) = (self.agent.store().clone(), self.tx.clone());
        tokio::spawn(async move {
            let found = store
                .call(move |s| {
                    Ok(wanted
                        .into_iter()
                        .map(|(a, _)| {
                            let t = look(s, &a);
                            (a, t)
                        })
                        .collect())
                })
                .await
                .unwrap_or_default();
            let _ = tx.send(answer(found)).await;
        });
    }

    /// The store's copies of the wanted chunks: each is checked by the
    /// ingest; the missing ones are asked of the peer.
    pub(super) fn local_chunks(
        &mut self,
        fetch: FetchId,
        chunks: Vec<(Address, Option<Vec<u8>>)>,
        now: Millis,
    ) {
        let Some(f) = self.fetches.get_mut(&fetch) else {
            return;
        };
        f.checking = false;
        f.idle_waiting = false;
        let mut missing = Vec::new();
        for (address, bytes) in chunks {
            let Some(bytes) = bytes else {
                missing.push(address);
                continue;
            };
            match f.ingest.handle_object(&address, &bytes) {
                Ok(()) => {}
                Err(rej) if !matches!(f.ingest.want(), Want::Chunks(_)) => {
                    // The chunks are fine, the manifest they make is not.
                    let peer = f.peer.clone();
                    return self.rejected(fetch, &peer, "bundle", &rej, now);
                }
                Err(_) => missing.push(address),
            }
        }
        if !missing.is_empty() {
            self.ep.fetch_want(fetch, missing, now);
        } else {
            self.idle(fetch, now);
        }
    }

    /// The store's answer for the objects a fetch wants: ask the peer for
    /// the missing ones, or adopt.
    pub(super) fn present(&mut self, fetch: FetchId, present: Vec<(Address, bool)>, now: Millis) {
        let Some(f) = self.fetches.get_mut(&fetch) else {
            return;
        };
        f.checking = false;
        f.idle_waiting = false;
        let mut missing = std::collections::BTreeSet::new();
        for (address, held) in present {
            if held {
                f.ingest.mark_present(&address);
            } else {
                missing.insert(address);
            }
        }
        if !missing.is_empty() {
            // By index in the verified manifest's entry order: a version 3
            // peer is asked with run-length ranges.
            let mut entries = Vec::with_capacity(missing.len());
            if let Some(m) = f.ingest.manifest() {
                for (k, e) in m.entries.iter().enumerate() {
                    if let Ok(k) = u32::try_from(k) {
                        if missing.remove(e.object.as_str()) {
                            entries.push((k, e.object.clone()));
                        }
                    }
                }
            }
            self.ep.fetch_want_entries(fetch, entries, now);
            if !missing.is_empty() {
                self.ep
                    .fetch_want(fetch, missing.into_iter().collect(), now);
            }
        } else if matches!(f.ingest.want(), Want::Complete) {
            self.adopt(fetch);
        } else {
            self.idle(fetch, now);
        }
    }

    /// Runs [`Agent::sync_from`] over what was fetched: the one adoption
    /// path, re-verifying everything.
    fn adopt(&mut self, fetch: FetchId) {
        let Some(f) = self.fetches.get_mut(&fetch) else {
            return;
        };
        f.adopting = true;
        let release = &f.ingest.release().release();
        let staged = StagedSource {
            name: format!("peer:{}", f.peer),
            roots: f.roots.clone(),
            channel: release.channel.to_string(),
            release: f.release.clone(),
            manifest_address: release.bundle.to_string(),
            manifest: f.manifest.clone().unwrap_or_default(),
            store: self.agent.store().clone(),
        };
        let agent = self.agent.clone();
        let tx = self.tx.clone();
        tokio::spawn(async move {
            let outcome = agent.sync_from(&staged).await;
            let _ = tx
                .send(Input::AdoptDone {
                    fetch,
                    outcome: format!("{outcome:?}"),
                })
                .await;
        });
    }
}
