//! A network partition between two groups of agents, in network namespaces
//! this test creates itself: the groups diverge while cut apart and
//! converge when the link comes back.
//!
//! Two namespaces joined by one veth pair, created *inside* the namespaces
//! (`ip -n A link add ... peer ... netns B`), addresses in 10.211.0.0/24
//! only there: no interface or route of the host is touched, and no
//! traffic leaves the namespaces. Needs root and `ip`; otherwise the test
//! says why and passes without running.

use crate::support::*;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

fn can_run() -> Result<(), String> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Err("not running as root".into());
    }
    match Command::new("ip").arg("-V").output() {
        Ok(o) if o.status.success() => Ok(()),
        _ => Err("the `ip` command (iproute2) is missing".into()),
    }
}

/// The namespaces and agents; everything is removed on drop.
struct Net {
    a: String,
    b: String,
    veth_a: String,
    children: Vec<AgentProcess>,
}

impl Drop for Net {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
        // Deleting a namespace deletes its end of the veth pair, and with
        // it the other end.
        for ns in [&self.a, &self.b] {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
    }
}

fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().expect("run ip");
    assert!(
        out.status.success(),
        "ip {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

impl Net {
    fn new() -> Net {
        let tag = std::process::id() % 100_000;
        let net = Net {
            a: format!("cairn-pa-{tag}"),
            b: format!("cairn-pb-{tag}"),
            veth_a: format!("cpa{tag}"),
            children: Vec::new(),
        };
        let veth_b = format!("cpb{tag}");
        ip(&["netns", "add", &net.a]);
        ip(&["netns", "add", &net.b]);
        ip(&[
            "-n",
            &net.a,
            "link",
            "add",
            &net.veth_a,
            "type",
            "veth",
            "peer",
            "name",
            &veth_b,
            "netns",
            &net.b,
        ]);
        ip(&[
            "-n",
            &net.a,
            "addr",
            "add",
            "10.211.0.1/24",
            "dev",
            &net.veth_a,
        ]);
        ip(&["-n", &net.b, "addr", "add", "10.211.0.2/24", "dev", &veth_b]);
        for (ns, dev) in [(&net.a, &net.veth_a), (&net.b, &veth_b)] {
            ip(&["-n", ns, "link", "set", "lo", "up"]);
            ip(&["-n", ns, "link", "set", dev, "up"]);
        }
        net
    }

    fn link(&self, up: bool) {
        ip(&[
            "-n",
            &self.a,
            "link",
            "set",
            &self.veth_a,
            if up { "up" } else { "down" },
        ]);
    }
}

struct Agent {
    ns: String,
    addr: String,
    dir: PathBuf,
}

fn sequence(dir: &Path) -> u64 {
    sequence_in(&dir.join("data"))
}

fn wait_seq(agents: &[&Agent], seq: u64, secs: u64) {
    cairn_test_support::wait_until(
        Duration::from_secs(secs),
        Duration::from_millis(200),
        &format!("sequence {seq}"),
        || agents.iter().all(|a| sequence(&a.dir) == seq),
        || {
            let seqs: Vec<u64> = agents.iter().map(|a| sequence(&a.dir)).collect();
            let logs: String = agents
                .iter()
                .map(|a| {
                    format!(
                        "--- {} ---\n{}\n",
                        a.addr,
                        log_tail(&a.dir.join("agent.log"), 30)
                    )
                })
                .collect();
            format!("{seqs:?}\n{logs}")
        },
    );
}

#[test]
fn partitioned_groups_diverge_then_converge() {
    if let Err(why) = can_run() {
        eprintln!("SKIPPED partitioned_groups_diverge_then_converge: {why} (needs root and iproute2 to create network namespaces)");
        return;
    }
    let w = World::new(3, 2, 1);
    let b1 = w.build("HEAD~1", "b1.bundle");
    let b2 = w.build("HEAD", "b2.bundle");
    w.release(&b1);
    let ca = mesh_ca_init(&w.path("mesh-ca"));
    let mut net = Net::new();
    // Group A: a0 (has the repository), a1. Group B: a2, a3.
    let agents: Vec<Agent> = (0..4)
        .map(|i| Agent {
            ns: if i < 2 { net.a.clone() } else { net.b.clone() },
            addr: format!("10.211.0.{}:{}", if i < 2 { 1 } else { 2 }, 7441 + (i % 2)),
            dir: w.path(&format!("agent{i}")),
        })
        .collect();
    let seeds = [vec![1, 2], vec![0], vec![3, 0], vec![2, 1]];
    for (i, a) in agents.iter().enumerate() {
        let cert = mesh_issue(&ca, &format!("a{i}"), &a.dir.join("cert"));
        let mut c =
            cairn_test_support::AgentConfig::new(&a.dir.join("data"), &a.dir.join("manifests"));
        c.id = Some(format!("a{i}"));
        if i == 0 {
            c.sources = vec![w.repo.display().to_string()];
        }
        c.request_timeout = None;
        c.http = "\"off\"".into();
        c.mesh = Some(MeshConfig {
            listen: a.addr.clone(),
            cert,
            seeds: seeds[i].iter().map(|j| agents[*j].addr.clone()).collect(),
        });
        let cfg = c.write(&a.dir.join("config.yaml"));
        // `ip netns exec` execs the agent: the child is the agent.
        let child = spawn_watched(
            Command::new("ip")
                .args(["netns", "exec", &a.ns])
                .arg(agent_bin())
                .args(["run", "--log-format", "json", "--config"])
                .arg(&cfg)
                .env("CAIRN_LOG", "info"),
            &format!("a{i} ({})", a.addr),
            &a.dir.join("agent.log"),
        );
        net.children.push(child);
    }
    let all: Vec<&Agent> = agents.iter().collect();
    wait_seq(&all, 1, 90);

    // Cut the groups apart; release 2 reaches group A only.
    net.link(false);
    w.release(&b2);
    wait_seq(&all[..2], 2, 60);
    std::thread::sleep(Duration::from_secs(5));
    assert_agents_alive("group B to stay at release 1 while cut off");
    assert_eq!(
        (sequence(&agents[2].dir), sequence(&agents[3].dir)),
        (1, 1),
        "group B must not see release 2 while cut off"
    );

    // The link comes back: group B converges.
    net.link(true);
    wait_seq(&all, 2, 90);
}
