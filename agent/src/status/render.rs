//! `cairn-agent status` as text: [`Status::render`] and the time formats
//! it uses.

use super::*;

impl Status {
    /// Human-readable rendering, relative to `now`.
    pub fn render(&self, now: u64) -> String {
        let mut o = String::new();
        // Values may quote what a source or peer served (rejection
        // messages, source errors): no control sequences reach the terminal.
        let mut line = |k: &str, v: String| {
            o.push_str(&format!(
                "{k:<15} {}\n",
                cairn_keys::text::escape_untrusted(&v)
            ))
        };
        line("agent", format!("{} (pid {})", self.agent_id, self.pid));
        line("channel", self.channel.clone());
        let rel = |r: &Option<ReleaseStatus>| match r {
            None => "none".to_owned(),
            Some(r) => format!(
                "sequence {}, bundle {}, commit {}, {} objects, expires {}{}",
                r.sequence,
                short(&r.bundle),
                r.source_commit.get(..12).unwrap_or(&r.source_commit),
                r.objects,
                format_time(r.expires),
                if r.expired {
                    " (EXPIRED: still enforced, no newer release)"
                } else {
                    ""
                }
            ),
        };
        line("adopted", rel(&self.adopted));
        line("last-good", rel(&self.last_good));
        line(
            "root",
            format!(
                "v{}, expires {}{}",
                self.root.version,
                format_time(self.root.expires),
                if self.root.expired { " (EXPIRED)" } else { "" }
            ),
        );
        if !self.root.origin.is_empty() {
            line("trust root", self.root.describe_origin());
        }
        if let Some(r) = &self.rollout {
            line(
                "pending",
                format!(
                    "release {} (bundle {}): {}",
                    r.sequence,
                    short(&r.bundle),
                    r.message
                ),
            );
        }
        if let Some(h) = &self.hold {
            line(
                "hold",
                match h.until {
                    Some(t) => format!(
                        "new releases held until {} (placed {})",
                        format_time(t),
                        format_time(h.since)
                    ),
                    None => format!(
                        "new releases held until `cairn-agent release-hold` (placed {})",
                        format_time(h.since)
                    ),
                },
            );
        }
        if let Some(f) = &self.failed_release {
            line(
                "failed",
                format!(
                    "release {} failed its health checks at {}: {} (rolled back)",
                    f.sequence,
                    format_time(f.at),
                    f.reason
                ),
            );
        }
        line("target", self.target.clone());
        line(
            "store",
            match &self.store.error {
                None => "ok".into(),
                Some(e) => format!("ERROR: {e} (retrying by itself)"),
            },
        );
        line(
            "offline",
            if self.offline {
                "yes".into()
            } else {
                "no".into()
            },
        );
        line(
            "ready",
            format!(
                "{} ({})",
                if self.ready { "yes" } else { "no" },
                self.ready_reason
            ),
        );
        match &self.reconcile {
            None => line("reconcile", "not yet".into()),
            Some(r) => {
                let what = match (&r.report, &r.error) {
                    (_, Some(e)) => format!("error: {e}"),
                    (Some(rep), None) => format!(
                        "{} created, {} updated, {} deleted, {} drift corrected, {} unchanged{}",
                        rep.created,
                        rep.updated,
                        rep.deleted,
                        rep.drift_corrected,
                        rep.unchanged,
                        if rep.conflicts.is_empty() {
                            String::new()
                        } else {
                            format!(", conflicts: {}", rep.conflicts.join(" "))
                        }
                    ),
                    (None, None) => String::new(),
                };
                line(
                    "reconcile",
                    format!(
                        "{} {} ({}): {what}",
                        if r.ok { "ok" } else { "FAILED" },
                        format_time(r.at),
                        ago(now, r.at)
                    ),
                )
            }
        }
        // Site rendering (docs/SITES.md): the values in use, objects not
        // applied here, or why nothing could be rendered.
        if let Some(site) = self.reconcile.as_ref().and_then(|r| r.site.as_ref()) {
            if let Some(d) = &site.values_digest {
                line("values", d.clone());
            }
            for e in &site.object_errors {
                line("not applied", e.clone());
            }
            if let Some(e) = &site.error {
                line("site values", format!("ERROR: {e}"));
            }
        }
        if let Some(r) = &self.last_rejection {
            line(
                "last rejection",
                format!(
                    "{} from {} at {}: {}",
                    r.reason,
                    r.source,
                    format_time(r.at),
                    r.message
                ),
            );
        }
        o.push_str("sources:\n");
        if self.sources.is_empty() {
            o.push_str("  (none)\n");
        }
        for s in &self.sources {
            let error = s
                .error
                .as_ref()
                .map(|e| format!(": {}", cairn_keys::text::escape_untrusted(e)))
                .unwrap_or_default();
            o.push_str(&format!(
                "  {}  {}  {} ({}){error}\n",
                s.source,
                if s.ok { "ok" } else { "ERROR" },
                s.result,
                ago(now, s.last_attempt),
            ));
        }
        o.push_str(&format!(
            "updated         {} ({})\n",
            format_time(self.updated),
            ago(now, self.updated)
        ));
        o
    }
}

fn short(addr: &str) -> &str {
    addr.get(..19).unwrap_or(addr)
}

fn ago(now: u64, t: u64) -> String {
    if t == 0 {
        return "never".into();
    }
    let d = now.saturating_sub(t);
    format!(
        "{} ago",
        cairn_core::duration::format_duration(std::time::Duration::from_secs(d))
    )
}

/// Unix seconds as `YYYY-MM-DDTHH:MM:SSZ` (UTC).
pub fn format_time(t: u64) -> String {
    let days = (t / 86_400) as i64;
    let secs = t % 86_400;
    // Civil from days (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = if m <= 2 { y + 1 } else { y };
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        secs / 3600,
        (secs % 3600) / 60,
        secs % 60
    )
}
