//! `cairn-sim`: runs the deterministic fleet simulator and prints a
//! markdown table per fleet size.
//!
//! ```text
//! cairn-sim [--agents 100,1000,10000] [--seed N] [--loss P] [--churn MS:MS]
//!           [--partition FRACTION:MS] [--malicious N] [--status]
//!           [--objects N] [--object-bytes N] [--releases N] [--origins N]
//!           [--legacy SHARE] [--pause MS] [--settle MS]
//! ```
#![cfg_attr(test, allow(clippy::unwrap_used))]

use anyhow::{anyhow, bail, Context, Result};
use cairn_sim::{Churn, Partition, Sim, SimConfig};
use std::time::Instant;

/// Billions of small allocations in a large run: mimalloc instead of glibc
/// malloc (same results; see `docs/PERFORMANCE.md`, "Fleet simulator").
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn usage() -> &'static str {
    "usage: cairn-sim [--agents 100,1000,10000] [--seed N] [--loss P] [--churn EVERY_MS:DOWN_MS] \
     [--partition FRACTION:MS] [--malicious N] [--status] [--objects N] [--object-bytes N] \
     [--releases N] [--origins N] [--rollout SPEC] [--legacy SHARE] [--pause MS] [--settle MS]"
}

fn main() {
    if let Err(e) = real_main() {
        eprintln!("cairn-sim: {e:#}");
        std::process::exit(2);
    }
}

fn real_main() -> Result<()> {
    let mut sizes = vec![100usize, 1000, 10_000];
    let mut base = SimConfig::new(0, 1);
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut val = || {
            args.next()
                .ok_or_else(|| anyhow!("{a} needs a value\n{}", usage()))
        };
        match a.as_str() {
            "--agents" => {
                sizes = val()?
                    .split(',')
                    .map(|s| s.trim().parse().context("--agents"))
                    .collect::<Result<_>>()?
            }
            "--seed" => base.seed = val()?.parse().context("--seed")?,
            "--loss" => base.loss = val()?.parse().context("--loss")?,
            "--churn" => {
                let v = val()?;
                let (a, b) = v
                    .split_once(':')
                    .ok_or_else(|| anyhow!("--churn EVERY_MS:DOWN_MS"))?;
                base.churn = Some(Churn {
                    interval_ms: a.parse().context("--churn")?,
                    down_ms: b.parse().context("--churn")?,
                });
            }
            "--partition" => {
                let v = val()?;
                let (a, b) = v
                    .split_once(':')
                    .ok_or_else(|| anyhow!("--partition FRACTION:MS"))?;
                base.partition = Some(Partition {
                    fraction: a.parse().context("--partition")?,
                    at_release: 2,
                    duration_ms: b.parse().context("--partition")?,
                });
            }
            "--malicious" => base.malicious = val()?.parse().context("--malicious")?,
            "--status" => base.status_gossip = true,
            "--objects" => base.objects = val()?.parse().context("--objects")?,
            "--object-bytes" => base.object_bytes = val()?.parse().context("--object-bytes")?,
            "--releases" => base.releases = val()?.parse().context("--releases")?,
            "--origins" => base.origins = val()?.parse().context("--origins")?,
            "--rollout" => base.rollout = Some(val()?),
            "--legacy" => base.legacy_share = val()?.parse().context("--legacy")?,
            "--pause" => base.pause_ms = val()?.parse().context("--pause")?,
            "--settle" => base.settle_ms = val()?.parse().context("--settle")?,
            "-h" | "--help" => {
                println!("{}", usage());
                return Ok(());
            }
            other => bail!("unknown argument `{other}`\n{}", usage()),
        }
    }
    println!(
        "| agents | release | 50 % / 90 % / all hold it (simulated) | rounds | mesh bytes in per agent (mean / max) | ÷ new bytes | object bytes per agent | gossip bytes per agent (window / until next release) | want bytes per agent | bundle / new bytes | events | wall time | invariants |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|---|---|");
    let mut failed = false;
    let fmt_ms = |ms: Option<u64>| {
        ms.map_or("—".to_owned(), |ms| {
            format!("{:.1} s", ms as f64 / 1000.0)
        })
    };
    for n in sizes {
        let cfg = SimConfig {
            agents: n,
            ..base.clone()
        };
        let t = Instant::now();
        let r = Sim::new(cfg).run_without_teardown();
        let wall = t.elapsed().as_secs_f64();
        let inv = if r.violations.is_empty() {
            "ok".to_owned()
        } else {
            failed = true;
            format!("**{} violations**: {}", r.violations.len(), r.violations[0])
        };
        for rel in &r.releases {
            let times = format!(
                "{} / {} / {}",
                fmt_ms(rel.p50_ms),
                fmt_ms(rel.p90_ms),
                rel.converged_after_ms
                    .map_or("**not converged**".to_owned(), |ms| fmt_ms(Some(ms)))
            );
            println!(
                "| {n} | {} | {times} | {} | {:.1} KiB / {:.1} KiB | {:.3}× | {:.1} KiB | {:.1} / {:.1} KiB in {:.0} s | {:.2} KiB | {:.1} / {:.1} KiB | {} | {wall:.1} s | {inv} |",
                rel.sequence,
                rel.rounds,
                rel.bytes_in_mean / 1024.0,
                rel.bytes_in_max as f64 / 1024.0,
                rel.bytes_in_mean / (rel.new_bytes.max(1) as f64),
                rel.object_bytes_mean / 1024.0,
                rel.gossip_bytes_mean / 1024.0,
                rel.gossip_period_mean / 1024.0,
                rel.period_ms as f64 / 1000.0,
                rel.want_bytes_mean / 1024.0,
                rel.bundle_bytes as f64 / 1024.0,
                rel.new_bytes as f64 / 1024.0,
                r.events,
            );
        }
        for rel in &r.releases {
            let [st, dg, pl] = rel.gossip_period_split;
            eprintln!(
                "cairn-sim: {n} agents, release {}: gossip until the next release {:.1} KiB per agent: records {:.1}, digests {:.1}, pulls {:.1} KiB",
                rel.sequence,
                rel.gossip_period_mean / 1024.0,
                st / 1024.0,
                dg / 1024.0,
                pl / 1024.0
            );
        }
        eprintln!(
            "cairn-sim: {n} agents: {} events, {} messages ({} lost), {:.1} MiB sent, {} crashes, rejections {:?}, trace {:016x}, {wall:.1} s",
            r.events,
            r.messages,
            r.lost,
            r.bytes as f64 / (1024.0 * 1024.0),
            r.crashes,
            r.rejections,
            r.trace_hash
        );
    }
    if failed {
        bail!("invariant violations (see the table)");
    }
    Ok(())
}
