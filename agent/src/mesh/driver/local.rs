//! Our side of the mesh: our head, trust and status record into the
//! endpoint, the fleet reports out of it, the peer table saved.

use super::*;

impl Driver {
    /// Our head and status into the endpoint (after every adoption).
    pub(super) fn refresh_local(&mut self) {
        let now = self.now();
        let root_version = self.agent.root().root().version;
        self.refresh_trust();
        if let Some(h) = self.agent.relay_head() {
            self.ep.set_head(
                Head {
                    channel: h.channel,
                    sequence: h.sequence,
                    bundle: h.bundle,
                    root_version,
                },
                now,
            );
        }
        self.refresh_status();
    }

    /// Our root version and whether our head still sets a rollback floor
    /// (a root from a source may have replaced the release keys).
    pub(super) fn refresh_trust(&mut self) {
        self.ep.set_root_version(self.agent.root().root().version);
        let channel = self.agent.config().channel.clone();
        self.ep
            .set_floor_unbound(&channel, self.agent.floor_unbound());
    }

    pub(super) fn refresh_status(&mut self) {
        let st = self.agent.status();
        let rolled_back = st.failed_release.as_ref().is_some_and(|f| {
            st.adopted
                .as_ref()
                .is_some_and(|a| a.sequence == f.sequence)
        });
        let health = if rolled_back {
            // The adopted release failed its health checks and the target
            // went back to the last-good one: counts for the breaker.
            "failed"
        } else if st.ready {
            "healthy"
        } else if st.reconcile.as_ref().is_some_and(|r| !r.ok) {
            "degraded"
        } else if st.adopted.is_some() {
            "progressing"
        } else {
            "unknown"
        };
        let limits = &self.ep.config().limits;
        let labels = st
            .labels
            .iter()
            .take(limits.max_labels)
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        let rollout = (st.rollout.is_some() || st.hold.is_some()).then(|| {
            let mut r = RolloutRecord::default();
            if let Some(p) = &st.rollout {
                r.pending_sequence = p.sequence;
                r.pending_bundle = p.bundle.clone();
                r.state = p.state.clone();
                r.wave = p.wave.map_or(0, |w| w as u32);
                r.opens_at = p.opens_at.unwrap_or(0);
            }
            if let Some(h) = &st.hold {
                r.held = true;
                r.held_until = h.until.unwrap_or(0);
            }
            r
        });
        let record = StatusRecord {
            agent_id: st.agent_id.clone(),
            channel: st.channel.clone(),
            labels,
            sequence: st.adopted.as_ref().map_or(0, |a| a.sequence),
            bundle: st
                .adopted
                .as_ref()
                .map(|a| a.bundle.clone())
                .unwrap_or_default(),
            health: health.into(),
            time: 0,
            rollout,
            listen: None,
            values_digest: st
                .reconcile
                .as_ref()
                .and_then(|r| r.site.as_ref())
                .and_then(|s| s.values_digest.clone()),
        };
        self.ep.set_local_status(record, wall());
        self.update_fleet_reports();
    }

    /// The rollout breaker's inputs from the gossiped status view, per
    /// bundle adopted on our channel (`Endpoint::fleet_reports`: failure
    /// reports exactly, adopters from the status sample). The view holds
    /// only records signed by the agent they describe and younger than
    /// the TTL.
    pub(super) fn update_fleet_reports(&self) {
        let channel = &self.agent.config().channel;
        let reports = self.ep.fleet_reports(channel, wall());
        self.agent.replace_fleet_reports(reports);
    }

    /// Saves the peer table (on a blocking thread; nothing waits for it).
    pub(super) fn persist_peers(&self) {
        let records: Vec<(String, Vec<u8>)> = self
            .ep
            .peer_table()
            .filter(|e| e.last_connected > 0 && !e.is_self)
            .map(|e| {
                let rec = PeerInfo {
                    agent_id: e.agent_id.clone(),
                    addr: e.addr.clone(),
                };
                (e.addr.clone(), codec::encode(&rec))
            })
            .collect();
        let store = self.agent.store().clone();
        tokio::spawn(async move {
            let _ = store
                .call(move |s| {
                    for (addr, rec) in &records {
                        s.put_peer(addr, rec)?;
                    }
                    Ok(())
                })
                .await;
        });
    }
}
