//! Local holds: a site operator pauses adoption of new releases on one
//! cluster (a maintenance window) without touching the fleet's releases.
//!
//! The running agent holds the store's exclusive lock, so `cairn-agent
//! hold` and `cairn-agent release-hold` talk to it through a small file,
//! `<dataDir>/hold.json`, written atomically and read by the agent before
//! every adoption (and for status). While a hold is active, drift
//! correction of the adopted release continues; only moving to a newer
//! release waits. A hold with `until` ends by itself at that time.
//!
//! **Architecture invariant:** [`Hold`] and [`parse_until`] are pure; the
//! file functions are the only IO here.

use crate::Error;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// Largest hold file read back.
const MAX_HOLD_BYTES: u64 = 4096;

/// `<dataDir>/hold.json`.
pub fn hold_path(data_dir: &Path) -> PathBuf {
    data_dir.join("hold.json")
}

/// A local hold, as stored in `hold.json`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Hold {
    /// When it was placed, Unix seconds.
    pub since: u64,
    /// When it ends by itself, Unix seconds; `None`: until released.
    pub until: Option<u64>,
}

impl Hold {
    /// Whether the hold is in force at `now`.
    pub fn active(&self, now: u64) -> bool {
        self.until.is_none_or(|u| now < u)
    }

    /// Reads `<data_dir>/hold.json`: `Ok(None)` when there is none. A file
    /// that cannot be parsed, or that is not a small regular file, is an
    /// error (the agent then treats adoption as held, the safe side, and
    /// says so in its log). Blocking: async code calls it through
    /// `spawn_blocking`.
    pub fn read(data_dir: &Path) -> Result<Option<Hold>, Error> {
        let p = hold_path(data_dir);
        // Anyone who can write the data directory could leave a FIFO or a
        // link to /dev/zero here: read only a small regular file.
        let bytes = match crate::fsread::read_regular_file_capped(&p, MAX_HOLD_BYTES) {
            Ok(b) => b,
            Err(e) if e.is_not_found() => return Ok(None),
            Err(e) => {
                return Err(Error::Hold(format!(
                    "{e}; remove it with `cairn-agent release-hold`"
                )))
            }
        };
        serde_json::from_slice(&bytes).map(Some).map_err(|e| {
            Error::Hold(format!(
                "{}: unreadable hold file ({e}); remove it with `cairn-agent release-hold`",
                p.display()
            ))
        })
    }

    /// Writes `<data_dir>/hold.json` atomically.
    pub fn write(&self, data_dir: &Path) -> Result<(), Error> {
        let p = hold_path(data_dir);
        let json = serde_json::to_vec_pretty(self).map_err(|e| Error::Hold(e.to_string()))?;
        cairn_keys::fs::write_atomic(&p, &json, Some(0o644)).map_err(|source| Error::Io {
            what: format!("writing {}", p.display()),
            source,
        })
    }

    /// Removes `<data_dir>/hold.json`; returns whether there was one.
    pub fn remove(data_dir: &Path) -> Result<bool, Error> {
        let p = hold_path(data_dir);
        match std::fs::remove_file(&p) {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
            Err(source) => Err(Error::Io {
                what: format!("removing {}", p.display()),
                source,
            }),
        }
    }
}

impl cairn_core::pipeline::LocalHold for Hold {
    fn active(&self, now: u64) -> bool {
        Hold::active(self, now)
    }
    fn until(&self) -> Option<u64> {
        self.until
    }
}

/// Parses `--until`: an RFC 3339 time (`2026-12-01T06:00:00Z`,
/// `2026-12-01T08:00:00+02:00`, fractional seconds ignored) or a duration
/// from `now` (`2h`, `90m`, `1d`). Returns Unix seconds, which must lie in
/// the future.
pub fn parse_until(s: &str, now: u64) -> Result<u64, String> {
    let s = s.trim();
    let t = if s.contains('T') || s.contains('t') {
        parse_rfc3339(s)?
    } else {
        let d = cairn_core::duration::parse_duration(s).map_err(|e| {
            format!("`{s}`: {e}; give an RFC 3339 time such as 2026-12-01T06:00:00Z or a duration such as 2h")
        })?;
        now.saturating_add(d.as_secs())
    };
    if t <= now {
        return Err(format!("`{s}` is not in the future"));
    }
    Ok(t)
}

/// Parses an RFC 3339 date-time into Unix seconds.
pub fn parse_rfc3339(s: &str) -> Result<u64, String> {
    let bad = || format!("`{s}`: expected an RFC 3339 time such as 2026-12-01T06:00:00Z");
    let b = s.as_bytes();
    if b.len() < 20 || b[4] != b'-' || b[7] != b'-' || !matches!(b[10], b'T' | b't') {
        return Err(bad());
    }
    if b[13] != b':' || b[16] != b':' {
        return Err(bad());
    }
    let num = |r: std::ops::Range<usize>| -> Result<i64, String> {
        let part = s.get(r).ok_or_else(bad)?;
        if !part.bytes().all(|c| c.is_ascii_digit()) {
            return Err(bad());
        }
        part.parse::<i64>().map_err(|_| bad())
    };
    let (y, mo, d) = (num(0..4)?, num(5..7)?, num(8..10)?);
    let (h, mi, sec) = (num(11..13)?, num(14..16)?, num(17..19)?);
    if !(1..=12).contains(&mo) || !(1..=31).contains(&d) || h > 23 || mi > 59 || sec > 60 {
        return Err(bad());
    }
    let mut rest = &s[19..];
    if let Some(frac) = rest.strip_prefix('.') {
        let digits = frac.bytes().take_while(u8::is_ascii_digit).count();
        if digits == 0 {
            return Err(bad());
        }
        rest = &frac[digits..];
    }
    let offset = match rest {
        "Z" | "z" => 0,
        _ => {
            let rb = rest.as_bytes();
            if rb.len() != 6 || !matches!(rb[0], b'+' | b'-') || rb[3] != b':' {
                return Err(bad());
            }
            let oh: i64 = rest[1..3].parse().map_err(|_| bad())?;
            let om: i64 = rest[4..6].parse().map_err(|_| bad())?;
            if oh > 23 || om > 59 {
                return Err(bad());
            }
            let o = oh * 3600 + om * 60;
            if rb[0] == b'-' {
                -o
            } else {
                o
            }
        }
    };
    // Days from civil (Howard Hinnant's algorithm).
    let y2 = if mo <= 2 { y - 1 } else { y };
    let era = y2.div_euclid(400);
    let yoe = y2 - era * 400;
    let mp = (mo + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    let t = days * 86_400 + h * 3600 + mi * 60 + sec - offset;
    u64::try_from(t).map_err(|_| bad())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_round_trips_with_format_time() {
        for t in [0u64, 951_782_400, 1_700_000_000, 1_796_104_800] {
            let s = crate::status::format_time(t);
            assert_eq!(parse_rfc3339(&s), Ok(t), "{s}");
        }
        assert_eq!(
            parse_rfc3339("2023-11-14T23:13:20+01:00"),
            Ok(1_700_000_000)
        );
        assert_eq!(parse_rfc3339("2023-11-14T22:13:20.5Z"), Ok(1_700_000_000));
        for bad in [
            "2023-11-14",
            "2023-13-14T00:00:00Z",
            "2023-11-14T00:00:00",
            "2023-11-14T00:00:00+0100",
            "20x3-11-14T00:00:00Z",
        ] {
            assert!(parse_rfc3339(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn until_accepts_times_and_durations_in_the_future() {
        let now = 1_700_000_000;
        assert_eq!(parse_until("2h", now), Ok(now + 7200));
        assert_eq!(parse_until("2023-11-15T00:00:00Z", now), Ok(1_700_006_400));
        assert!(parse_until("2020-01-01T00:00:00Z", now)
            .unwrap_err()
            .contains("not in the future"));
        assert!(parse_until("soon", now).unwrap_err().contains("RFC 3339"));
    }

    #[test]
    fn file_round_trip_and_expiry() {
        let d = tempfile::tempdir().unwrap();
        assert_eq!(Hold::read(d.path()).unwrap(), None);
        let h = Hold {
            since: 10,
            until: Some(20),
        };
        h.write(d.path()).unwrap();
        let back = Hold::read(d.path()).unwrap().unwrap();
        assert_eq!(back, h);
        assert!(back.active(19) && !back.active(20));
        assert!(Hold::default().active(u64::MAX));
        assert!(Hold::remove(d.path()).unwrap());
        assert!(!Hold::remove(d.path()).unwrap());
        std::fs::write(hold_path(d.path()), b"{").unwrap();
        assert!(matches!(Hold::read(d.path()), Err(Error::Hold(_))));
    }
}
