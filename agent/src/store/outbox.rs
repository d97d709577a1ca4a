//! The notification outbox: events waiting for delivery to webhooks, in
//! the `outbox` tree.
//!
//! | key | value |
//! |---|---|
//! | `e` + number (u64, big-endian) | the event (JSON, at most [`INLINE_MAX`] bytes) |
//! | `n` | the next event number (u64, big-endian; numbers are never reused) |
//! | `r/epoch` | 8 random hex digits, made once: part of every event id, so a wiped data dir never repeats an id |
//! | `c/<sink>` | the number of the last event delivered to (or skipped for) that sink |
//! | `m/<marker>` | the last state notified for a marker (hold, breaker) |
//!
//! Events are numbered in order and always form one contiguous range:
//! [`Store::outbox_ack`] removes the events every configured sink has
//! passed, and [`Store::outbox_push`] drops the oldest past its cap. Each
//! push is durable when it returns (one flush), before anything delivers
//! it.

use super::*;

/// Serialises outbox writes (read the counter, write the batch) within the
/// process.
static OUTBOX_LOCK: Mutex<()> = Mutex::new(());

fn lock() -> MutexGuard<'static, ()> {
    OUTBOX_LOCK.lock().unwrap_or_else(|p| p.into_inner())
}

fn event_key(n: u64) -> [u8; 9] {
    let mut k = [0u8; 9];
    k[0] = b'e';
    k[1..].copy_from_slice(&n.to_be_bytes());
    k
}

fn be_u64(v: &[u8]) -> Option<u64> {
    <[u8; 8]>::try_from(v).ok().map(u64::from_be_bytes)
}

fn cursor_key(sink: &str) -> Vec<u8> {
    format!("c/{sink}").into_bytes()
}

fn marker_key(name: &str) -> Vec<u8> {
    format!("m/{name}").into_bytes()
}

/// What [`Store::outbox_push`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Pushed {
    /// The new event's number.
    pub number: u64,
    /// Older undelivered events dropped to stay within the cap.
    pub dropped: u64,
    /// Events in the outbox now.
    pub queued: u64,
}

impl Store {
    fn outbox_range(&self, tree: &sled::Tree) -> StoreResult<(u64, u64)> {
        let next = match tree.get(b"n").map_err(|e| self.db_err(e))? {
            Some(v) => {
                be_u64(&v).ok_or_else(|| self.corrupt("outbox: bad event counter".into()))?
            }
            None => 1,
        };
        let first = match tree.scan_prefix(b"e").next() {
            Some(r) => {
                let (k, _) = r.map_err(|e| self.db_err(e))?;
                be_u64(&k[1..]).ok_or_else(|| self.corrupt("outbox: bad event key".into()))?
            }
            None => next,
        };
        Ok((first, next))
    }

    /// Appends an event, dropping the oldest ones past `cap`, and flushes.
    /// With a `marker` (`name`, `state`) nothing is appended when the
    /// marker already holds `state` (`Ok(None)`; an absent marker holds
    /// `0`), and the marker is set in
    /// the same atomic batch as the event: a restart neither repeats nor
    /// loses the notification.
    pub fn outbox_push(
        &self,
        event: &[u8],
        cap: u64,
        marker: Option<(&str, &[u8])>,
    ) -> StoreResult<Option<Pushed>> {
        if event.len() > INLINE_MAX || event.starts_with(POINTER_MAGIC) {
            return Err(StoreError::Db {
                dir: self.inner.dir.clone(),
                reason: format!(
                    "outbox: event of {} bytes is larger than {INLINE_MAX}",
                    event.len()
                ),
            });
        }
        {
            let _g = lock();
            let tree = self.tree(T::Outbox)?;
            if let Some((name, state)) = marker {
                let cur = tree.get(marker_key(name)).map_err(|e| self.db_err(e))?;
                // An absent marker reads as `0` (e.g. "no hold").
                if cur.as_deref().unwrap_or(b"0") == state {
                    return Ok(None);
                }
            }
            let (mut first, next) = self.outbox_range(&tree)?;
            let mut batch = sled::Batch::default();
            batch.insert(&event_key(next), event);
            batch.insert(b"n", &(next + 1).to_be_bytes());
            if let Some((name, state)) = marker {
                batch.insert(marker_key(name), state);
            }
            let cap = cap.max(1);
            let mut dropped = 0;
            while next + 1 - first > cap {
                batch.remove(&event_key(first));
                first += 1;
                dropped += 1;
            }
            tree.apply_batch(batch).map_err(|e| self.db_err(e))?;
            drop(_g);
            self.flush()?;
            Ok(Some(Pushed {
                number: next,
                dropped,
                queued: next + 1 - first,
            }))
        }
    }

    /// The state last notified for `marker`, if any.
    pub fn outbox_marker(&self, marker: &str) -> StoreResult<Option<Vec<u8>>> {
        let v = self
            .tree(T::Outbox)?
            .get(marker_key(marker))
            .map_err(|e| self.db_err(e))?;
        Ok(v.map(|v| v.to_vec()))
    }

    /// This outbox's random epoch (8 hex digits), made on first use.
    pub fn outbox_epoch(&self) -> StoreResult<String> {
        let _g = lock();
        let tree = self.tree(T::Outbox)?;
        if let Some(v) = tree.get(b"r/epoch").map_err(|e| self.db_err(e))? {
            return Ok(String::from_utf8_lossy(&v).into_owned());
        }
        let epoch = format!("{:08x}", rand::random::<u32>());
        tree.insert(b"r/epoch", epoch.as_bytes())
            .map_err(|e| self.db_err(e))?;
        drop(_g);
        self.flush()?;
        Ok(epoch)
    }

    /// Up to `limit` events after `sink`'s cursor, oldest first, as
    /// (number, event).
    pub fn outbox_pending(&self, sink: &str, limit: usize) -> StoreResult<Vec<(u64, Vec<u8>)>> {
        let tree = self.tree(T::Outbox)?;
        let after = match tree.get(cursor_key(sink)).map_err(|e| self.db_err(e))? {
            Some(v) => be_u64(&v).unwrap_or(0),
            None => 0,
        };
        let start = event_key(after.saturating_add(1));
        let mut out = Vec::new();
        for r in tree.range(start..).take(limit) {
            let (k, v) = r.map_err(|e| self.db_err(e))?;
            if k.first() != Some(&b'e') {
                break;
            }
            let n = be_u64(&k[1..]).ok_or_else(|| self.corrupt("outbox: bad event key".into()))?;
            out.push((n, v.to_vec()));
        }
        Ok(out)
    }

    /// Records that `sink` is done with every event up to `number`, then
    /// removes the events every sink in `sinks` is done with. Not flushed
    /// (delivery is at least once: a crash before the next flush repeats
    /// the event). Returns the events left.
    pub fn outbox_ack(&self, sink: &str, number: u64, sinks: &[String]) -> StoreResult<u64> {
        let _g = lock();
        let tree = self.tree(T::Outbox)?;
        tree.insert(cursor_key(sink), &number.to_be_bytes())
            .map_err(|e| self.db_err(e))?;
        let mut done = u64::MAX;
        for s in sinks {
            let c = tree
                .get(cursor_key(s))
                .map_err(|e| self.db_err(e))?
                .and_then(|v| be_u64(&v))
                .unwrap_or(0);
            done = done.min(c);
        }
        let (mut first, next) = self.outbox_range(&tree)?;
        let mut batch = sled::Batch::default();
        while first <= done && first < next {
            batch.remove(&event_key(first));
            first += 1;
        }
        tree.apply_batch(batch).map_err(|e| self.db_err(e))?;
        Ok(next - first)
    }

    /// Events in the outbox.
    pub fn outbox_len(&self) -> StoreResult<u64> {
        let tree = self.tree(T::Outbox)?;
        let (first, next) = self.outbox_range(&tree)?;
        Ok(next - first)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn events(s: &Store, sink: &str) -> Vec<(u64, String)> {
        s.outbox_pending(sink, 100)
            .unwrap()
            .into_iter()
            .map(|(n, v)| (n, String::from_utf8(v).unwrap()))
            .collect()
    }

    #[test]
    fn order_ack_and_cap() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(dir.path()).unwrap();
        for i in 0..3 {
            let p = s
                .outbox_push(format!("ev{i}").as_bytes(), 10, None)
                .unwrap();
            assert_eq!(p.map(|p| (p.number, p.dropped)), Some((i + 1, 0)));
        }
        assert_eq!(
            events(&s, "a"),
            vec![(1, "ev0".into()), (2, "ev1".into()), (3, "ev2".into())]
        );
        let sinks = vec!["a".to_string(), "b".to_string()];
        // Sink a is done with 1 and 2; b still needs them: nothing removed.
        assert_eq!(s.outbox_ack("a", 2, &sinks).unwrap(), 3);
        assert_eq!(events(&s, "a"), vec![(3, "ev2".into())]);
        assert_eq!(events(&s, "b").len(), 3);
        // b catches up to 1: event 1 goes.
        assert_eq!(s.outbox_ack("b", 1, &sinks).unwrap(), 2);
        assert_eq!(events(&s, "b"), vec![(2, "ev1".into()), (3, "ev2".into())]);
        // Cap 3: pushing 2 more drops the oldest (2), numbers keep going.
        s.outbox_push(b"ev3", 3, None).unwrap();
        let p = s.outbox_push(b"ev4", 3, None).unwrap().unwrap();
        assert_eq!((p.number, p.dropped, p.queued), (5, 1, 3));
        assert_eq!(
            events(&s, "b"),
            vec![(3, "ev2".into()), (4, "ev3".into()), (5, "ev4".into())]
        );
        assert_eq!(s.outbox_len().unwrap(), 3);
        // Everything acknowledged by both: empty, numbering continues.
        s.outbox_ack("a", 5, &sinks).unwrap();
        assert_eq!(s.outbox_ack("b", 5, &sinks).unwrap(), 0);
        assert_eq!(s.outbox_len().unwrap(), 0);
        let p = s.outbox_push(b"ev5", 3, None).unwrap().unwrap();
        assert_eq!(p.number, 6);
        assert!(s.outbox_push(&vec![b'x'; INLINE_MAX + 1], 3, None).is_err());
    }

    #[test]
    fn survives_reopen_and_markers_dedupe() {
        let dir = tempfile::tempdir().unwrap();
        let epoch;
        {
            let s = Store::open(dir.path()).unwrap();
            epoch = s.outbox_epoch().unwrap();
            assert!(s
                .outbox_push(b"ended", 10, Some(("hold", b"0")))
                .unwrap()
                .is_none());
            assert!(s
                .outbox_push(b"placed", 10, Some(("hold", b"1")))
                .unwrap()
                .is_some());
            assert!(s
                .outbox_push(b"placed", 10, Some(("hold", b"1")))
                .unwrap()
                .is_none());
            s.outbox_push(b"other", 10, None).unwrap();
        }
        let s = Store::open(dir.path()).unwrap();
        assert_eq!(s.outbox_epoch().unwrap(), epoch);
        assert_eq!(s.outbox_marker("hold").unwrap().as_deref(), Some(&b"1"[..]));
        assert_eq!(
            events(&s, "a"),
            vec![(1, "placed".into()), (2, "other".into())]
        );
        assert!(s
            .outbox_push(b"ended", 10, Some(("hold", b"0")))
            .unwrap()
            .is_some());
        assert_eq!(s.outbox_len().unwrap(), 3);
    }
}
