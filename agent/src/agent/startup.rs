use super::*;
use crate::ingest::Item;
use cairn_core::AgentId;

impl Agent {
    /// Checks every object of the adopted release; re-fetches missing or
    /// corrupt ones from the sources; fails if any stays missing.
    pub(super) async fn repair_objects(&self) -> Result<()> {
        let Some(head) = self.state().head.clone() else {
            return Ok(());
        };
        let (release, limits) = (head.release.clone(), self.inner.limits.clone());
        // One entry at a time from the stored manifest; no body is kept.
        let missing = self
            .blocking(move |store| {
                let Some(manifest) = stored_manifest(store, &release, &limits)? else {
                    return Ok(None);
                };
                let mut missing = Vec::new();
                for e in manifest.entries {
                    match store.get_object(&e.object) {
                        Ok(Some(_)) => {}
                        Ok(None) => missing.push(e),
                        Err(StoreError::Corrupt { reason, .. }) => {
                            tracing::warn!(object = %e.object, %reason, "corrupt object in the store; re-fetching");
                            store.remove_object(&e.object)?;
                            missing.push(e);
                        }
                        Err(other) => return Err(other),
                    }
                }
                Ok(Some(missing))
            })
            .await?
            .ok_or_else(|| Error::CorruptState {
                dir: self.inner.config.data_dir.clone(),
                detail: format!(
                    "the manifest of adopted bundle {} is missing or unreadable",
                    head.release.bundle
                ),
            })?;
        if missing.is_empty() {
            return Ok(());
        }
        let mut still = Vec::new();
        for e in &missing {
            if !self.fetch_object_anywhere(&e.object, e.size).await {
                still.push(e.display_name());
            }
        }
        self.blocking(|s| s.flush()).await?;
        if still.is_empty() {
            tracing::info!(
                count = missing.len(),
                "re-fetched missing objects of the adopted release"
            );
            return Ok(());
        }
        Err(Error::CorruptState {
            dir: self.inner.config.data_dir.clone(),
            detail: format!(
                "{} object(s) of adopted release {} are missing or corrupt and no source could provide them (first: {})",
                still.len(),
                head.release.sequence,
                still[0]
            ),
        })
    }

    /// Tries each source for an object, verifying it; stores it on success.
    pub(super) async fn fetch_object_anywhere(&self, address: &str, size: u64) -> bool {
        let item = Item::Object(address.to_owned());
        for s in self.inner.sources.iter() {
            match s.get(&item, size).await {
                Ok(Some(bytes)) => {
                    if pipeline::check_object_bytes(address, size, &bytes).is_ok() {
                        let a = address.to_owned();
                        if self
                            .blocking(move |s| s.put_object(&a, &bytes))
                            .await
                            .is_ok()
                        {
                            return true;
                        }
                    }
                }
                Ok(None) => {}
                Err(e) => tracing::debug!(source = s.name(), error = %e, "object fetch failed"),
            }
        }
        false
    }
}

/// What [`Agent::open`] reads from the store, verified.
pub(super) struct LoadedState {
    pub(super) agent_id: AgentId,
    pub(super) chain: RootChain,
    pub(super) head: Option<HeadState>,
    pub(super) last_good: Option<ReleaseStatus>,
    pub(super) failed: Option<FailedRelease>,
}

/// Reads and verifies the stored state (blocking: call from a blocking
/// thread): agent id, root chain, adopted head, last-good, failed release.
pub(super) fn load_stored(
    store: &Store,
    config: &Config,
    embedded: VerifiedRoot,
    now: u64,
) -> Result<LoadedState> {
    let data_dir = &config.data_dir;
    let corrupt = |detail: String| Error::CorruptState {
        dir: data_dir.clone(),
        detail,
    };
    let stored = match store.agent_id()? {
        None => None,
        Some(s) => Some(
            AgentId::parse_owned(s).map_err(|e| corrupt(format!("the stored agent id: {e}")))?,
        ),
    };
    let agent_id = match (&config.agent_id, stored) {
        (Some(c), Some(s)) if *c == s => s,
        (Some(c), _) => {
            store.set_agent_id(c)?;
            c.clone()
        }
        (None, Some(s)) => s,
        (None, None) => {
            // A new data directory: if the target says which agent
            // manages it (its ownership record), this is that agent.
            let recorded = target::recorded_agent_id(&config.target);
            if let Some(id) = &recorded {
                tracing::info!(agent_id = %id, "agent id taken from the target's ownership record");
            }
            let id = recorded.unwrap_or_else(generate_agent_id);
            store.set_agent_id(&id)?;
            id
        }
    };
    let stored_roots = store.roots()?;
    let rest: Vec<&[u8]> = stored_roots
        .iter()
        .filter(|(v, _)| *v > embedded.root().version)
        .map(|(_, b)| b.as_slice())
        .collect();
    let chain = RootChain::follow(embedded, rest, now)
        .map_err(|e| corrupt(format!("stored root chain: {e}")))?;
    let limits = Limits::default();
    let head = load_head(store, &chain.roots, config, &limits, now)?;
    let last_good = match store.last_good(&config.channel)? {
        None => None,
        Some(bytes) => {
            let (_, rel) = Release::decode_envelope(&bytes, limits.max_release_bytes)
                .map_err(|e| corrupt(format!("last-good release: {e}")))?;
            let m = store.bundle(&rel.bundle)?.and_then(|b| {
                Manifest::load(&b, Some(&rel.bundle), &limits, store.chunk_reader()).ok()
            });
            m.map(|m| {
                let summary = ManifestSummary::of(&m);
                release_status(&rel, &cairn_keys::sha256_address(&bytes), &summary, now)
            })
        }
    };
    // A failed release stays failed (not retried) while it is the head.
    let failed = store
        .failed_release(&config.channel)?
        .and_then(|b| serde_json::from_slice::<FailedRelease>(&b).ok())
        .filter(|f| {
            head.as_ref()
                .is_some_and(|h| h.release.sequence == f.sequence)
        });
    Ok(LoadedState {
        agent_id,
        chain,
        head,
        last_good,
        failed,
    })
}

/// The stored head of the configured channel, re-verified against `root`
/// (blocking).
pub(super) fn load_head(
    store: &Store,
    roots: &[cairn_keys::Root],
    config: &Config,
    limits: &Limits,
    now: u64,
) -> Result<Option<HeadState>> {
    let corrupt = |detail: String| Error::CorruptState {
        dir: config.data_dir.clone(),
        detail,
    };
    let Some(bytes) = store.head(&config.channel)? else {
        return Ok(None);
    };
    let (_, rel) = Release::decode_envelope(&bytes, limits.max_release_bytes).map_err(|e| {
        corrupt(format!(
            "adopted release of channel `{}`: {e}",
            config.channel
        ))
    })?;
    let manifest_bytes = store.bundle(&rel.bundle)?.ok_or_else(|| {
        corrupt(format!(
            "bundle manifest {} of the adopted release is missing",
            rel.bundle
        ))
    })?;
    let (verified, manifest) = pipeline::reverify_adopted(
        roots,
        &config.channel,
        limits,
        now,
        &bytes,
        &manifest_bytes,
        store.chunk_reader(),
    )
    .map_err(|r| {
        corrupt(format!(
            "adopted release of channel `{}`: {r}",
            config.channel
        ))
    })?;
    Ok(Some(HeadState {
        address: cairn_keys::sha256_address(&bytes),
        release: verified.release().clone(),
        bytes,
        summary: ManifestSummary::of(&manifest),
    }))
}

pub(super) fn generate_agent_id() -> AgentId {
    use rand::Rng;
    AgentId::generated(rand::rng().random())
}
