//! The deferred (pending / staged) release as a pure state machine.
//!
//! A newer verified release that the adoption gate defers (a local hold, a
//! rollout wave not open yet, the circuit breaker, a selector) waits here.
//! [`Deferred`] does no IO and reads no clock: the runtime passes `now`
//! (Unix milliseconds: wave openings and hold ends are wall-clock times),
//! feeds it what it observed (the hold file, fleet reports changing, an
//! adoption) and asks, quinn style, [`Deferred::poll_timeout`] when it next
//! needs to run and [`Deferred::poll`] what to do now. The runtime sleeps
//! until that time or until it is woken by an input — no polling loop.

use crate::hold::Hold;
use crate::pipeline::{self, Audience, Deferral};
use crate::status::{format_time, RolloutStatus};
use cairn_core::bundle::Manifest;
use cairn_core::release::Release;
use cairn_core::rollout::Decision;

use super::AdoptedHead;

/// How often the hold file is read again. A hold is placed by another
/// process writing a file, which nothing announces: this is the one
/// periodic read (status shows the hold within this time).
pub(super) const HOLD_RECHECK_MS: u64 = 1000;

/// A newer verified release not adopted now. When `manifest` is set it is
/// *staged*: its manifest and every object are in the store, verified, so
/// adoption needs no source and mesh peers can fetch it from this agent.
#[derive(Clone, Debug)]
pub(super) struct PendingState {
    pub(super) release: Release,
    pub(super) bytes: Vec<u8>,
    pub(super) address: String,
    pub(super) manifest: Option<Manifest>,
    pub(super) deferral: Deferral,
}

impl PendingState {
    pub(super) fn status(&self) -> RolloutStatus {
        let (wave, opens_at) = match &self.deferral {
            Deferral::Rollout(Decision::WaitForWave { wave, opens_at }) => {
                (Some(*wave), Some(*opens_at))
            }
            _ => (None, None),
        };
        RolloutStatus {
            sequence: self.release.sequence,
            bundle: self.release.bundle.to_string(),
            state: self.deferral.state().to_owned(),
            wave,
            opens_at,
            message: self.deferral.describe(format_time),
            staged: self.manifest.is_some(),
        }
    }

    pub(super) fn published(&self) -> AdoptedHead {
        AdoptedHead {
            channel: self.release.channel.to_string(),
            sequence: self.release.sequence,
            bundle: self.release.bundle.to_string(),
            release_address: self.address.clone(),
        }
    }

    fn staged(&self) -> bool {
        self.manifest.is_some()
    }
}

/// What [`Deferred::poll`] asks the runtime to do.
#[derive(Debug)]
pub(super) enum Step {
    /// Nothing now; sleep until [`Deferred::poll_timeout`].
    Idle,
    /// Read the hold file and call [`Deferred::hold_read`].
    ReadHold,
    /// The deferral changed (or the pending release was dropped): publish
    /// status and the relay head.
    Changed,
    /// The gate opened for this staged release: adopt it through the one
    /// adoption path, then call [`Deferred::adoption_done`].
    Adopt(Box<PendingState>),
}

/// The deferred-release state machine (see the module docs).
#[derive(Debug, Default)]
pub(super) struct Deferred {
    pending: Option<PendingState>,
    /// Sequence of the adopted release.
    adopted: Option<u64>,
    /// The hold as last read (active or not: its end is a wake-up).
    hold: Option<Hold>,
    /// When the hold file is next read; `None`: now.
    hold_due: Option<u64>,
    /// An input arrived that may change the gate's answer.
    dirty: bool,
    /// An adoption of the staged release is under way.
    adopting: bool,
    /// When the gate was last asked: deadlines up to here are spent.
    evaluated: u64,
}

impl Deferred {
    /// A machine with the adopted release's sequence and nothing pending.
    pub(super) fn new(adopted: Option<u64>) -> Self {
        Self {
            adopted,
            ..Self::default()
        }
    }

    /// The pending release, if any.
    pub(super) fn pending(&self) -> Option<&PendingState> {
        self.pending.as_ref()
    }

    /// The staged pending release when it is newer than the adopted one
    /// (what the mesh relays).
    pub(super) fn relayed(&self) -> Option<&PendingState> {
        self.pending
            .as_ref()
            .filter(|p| p.staged() && Some(p.release.sequence) > self.adopted)
    }

    /// The hold as last read, if active at `now_ms`.
    pub(super) fn hold(&self, now_ms: u64) -> Option<&Hold> {
        self.hold.as_ref().filter(|h| h.active(now_ms / 1000))
    }

    /// Records a deferred release, replacing an older or unstaged one (a
    /// newer pending release, or the same one already staged, is kept and
    /// only its deferral updated). Returns whether the pending release
    /// changed.
    pub(super) fn defer(
        &mut self,
        release: &Release,
        bytes: &[u8],
        manifest: Option<Manifest>,
        deferral: Deferral,
    ) -> bool {
        self.dirty = true;
        let keep = self.pending.as_ref().is_some_and(|p| {
            p.release.sequence > release.sequence
                || (p.bytes == bytes && p.staged() && manifest.is_none())
        });
        if keep {
            if let Some(p) = self.pending.as_mut().filter(|p| p.bytes == bytes) {
                p.deferral = deferral;
            }
            return false;
        }
        self.pending = Some(PendingState {
            address: cairn_keys::sha256_address(bytes),
            release: release.clone(),
            bytes: bytes.to_vec(),
            manifest,
            deferral,
        });
        true
    }

    /// A release was adopted: a pending one at or below it is done.
    pub(super) fn adopted(&mut self, sequence: u64) {
        self.adopted = Some(sequence);
        if self
            .pending
            .as_ref()
            .is_some_and(|p| p.release.sequence <= sequence)
        {
            self.pending = None;
        }
        self.dirty = true;
    }

    /// The hold file was read at `now_ms` (`None`: no hold). Returns
    /// whether the hold changed.
    pub(super) fn hold_read(&mut self, hold: Option<Hold>, now_ms: u64) -> bool {
        let changed = self.hold != hold;
        self.dirty |= changed;
        self.hold = hold;
        self.hold_due = Some(now_ms.saturating_add(HOLD_RECHECK_MS));
        changed
    }

    /// What gossip reports about releases changed (the breaker's inputs).
    pub(super) fn fleet_changed(&mut self) {
        self.dirty = true;
    }

    /// The adoption started by [`Step::Adopt`] finished; `rejected`: the
    /// staged release is no longer valid and is dropped.
    pub(super) fn adoption_done(&mut self, bytes: &[u8], rejected: bool) {
        self.adopting = false;
        if rejected && self.pending.as_ref().is_some_and(|p| p.bytes == bytes) {
            self.pending = None;
        }
    }

    /// When [`Deferred::poll`] next has something to do, Unix ms: now
    /// after an input, else the earliest of the next hold read, the
    /// pending release's wave opening and the hold's end.
    pub(super) fn poll_timeout(&self) -> Option<u64> {
        if self.dirty && !self.adopting {
            return Some(0);
        }
        let hold_end = self.hold.as_ref().and_then(|h| h.until);
        let wave = match self.pending.as_ref().map(|p| &p.deferral) {
            Some(Deferral::Rollout(Decision::WaitForWave { opens_at, .. })) => Some(*opens_at),
            _ => None,
        };
        let deadlines = [hold_end, wave]
            .into_iter()
            .flatten()
            .map(|secs| secs.saturating_mul(1000))
            .filter(|&ms| ms > self.evaluated);
        Some(deadlines.fold(self.hold_due.unwrap_or(0), u64::min))
    }

    /// Runs the machine at `now_ms`: asks for a hold read when one is due,
    /// then (when an input or a deadline calls for it) asks the adoption
    /// gate again about the pending release with `who`.
    pub(super) fn poll(&mut self, now_ms: u64, who: &Audience<'_>) -> Step {
        if self.hold_due.is_none_or(|t| now_ms >= t) {
            return Step::ReadHold;
        }
        let due = self.poll_timeout().is_some_and(|t| now_ms >= t);
        if !due || self.adopting {
            return Step::Idle;
        }
        self.dirty = false;
        self.evaluated = now_ms;
        let adopted = self.adopted;
        let Some(p) = self.pending.as_mut() else {
            return Step::Idle;
        };
        if adopted.is_some_and(|a| a >= p.release.sequence) {
            self.pending = None;
            return Step::Changed;
        }
        let now = now_ms / 1000;
        let hold = self.hold.as_ref().filter(|h| h.active(now));
        match pipeline::adoption_gate(&p.release, who, hold, now) {
            Some(d) if d != p.deferral => {
                p.deferral = d;
                Step::Changed
            }
            Some(_) => Step::Idle,
            // Not staged: the next poll of a source fetches it.
            None if !p.staged() => Step::Idle,
            None => {
                self.adopting = true;
                Step::Adopt(Box::new(p.clone()))
            }
        }
    }
}

#[cfg(test)]
mod tests;
