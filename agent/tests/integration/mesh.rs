//! The mesh with real processes and real TLS on 127.0.0.0/8: a line of
//! five agents, sneakernet into the middle, a foreign CA, malicious peers,
//! and "only changed objects move". (The partition test lives in
//! `mesh_partition.rs`.) Every test's fleet reserves its own
//! loopback block (`cairn_test_support::LoopbackBlock`).

use crate::support::*;
use cairn_bundle::bundle::read_bundle_file;
use cairn_bundle::limits::Limits;
use cairn_bundle::mesh::tls::{self, CredentialPaths, Credentials};
use cairn_bundle::mesh::wire::{self, Found, Head, Hello, Item, Message};
use cairn_bundle::mesh::MeshLimits;
use cairn_bundle::release::{Release, Rollout, RELEASE_FORMAT};
use cairn_bundle::repo::{channel_path, RepoDir};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

/// The shared [`Fleet`], with the mesh logged at debug level.
fn mesh_fleet(w: World) -> Fleet {
    let mut f = fleet(w, Vec::new());
    f.log_filter = "info,cairn_agent::mesh=debug".into();
    f
}

/// Sum of a metric's samples whose line contains every `filter`.
fn metric(text: &str, name: &str, filters: &[&str]) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| {
            l.starts_with(name)
                && (l[name.len()..].starts_with('{') || l[name.len()..].starts_with(' '))
        })
        .filter(|l| filters.iter().all(|f| l.contains(f)))
        .filter_map(|l| l.rsplit(' ').next().and_then(|v| v.parse::<f64>().ok()))
        .sum()
}

#[test]
fn a_release_crosses_a_line_of_five_and_sneakernet_enters_the_middle() {
    let w = World::new(3, 2, 1);
    let b1 = w.build("HEAD~1", "b1.bundle");
    let b2 = w.build("HEAD", "b2.bundle");
    w.release(&b1);
    let mut f = mesh_fleet(w);
    let sneaker = f.w.path("usb");
    std::fs::create_dir_all(&sneaker).unwrap();
    for i in 0..5 {
        let cert = f.issue(&f.ca.clone(), i);
        let sources = match i {
            0 => vec![f.w.repo.clone()],
            2 => vec![sneaker.clone()],
            _ => vec![],
        };
        let seeds = if i < 4 { vec![f.addr(i + 1)] } else { vec![] };
        let cfg = f.config(i, &sources, &seeds, &cert);
        f.spawn(i, &cfg);
    }
    f.wait_sequence(&[0, 1, 2, 3, 4], 1, 90);
    let want = expected_files(&b1);
    wait_for(30, "agent 4 writes release 1's files", || {
        std::fs::read_dir(f.dir(4, "manifests")).is_ok_and(|rd| {
            rd.flatten()
                .filter(|e| !e.file_name().to_string_lossy().starts_with('.'))
                .count()
                == want.len()
        })
    });

    // The release engineer signs release 2 in a copy of the repository and
    // exports it; the origin disappears; the archive is imported into
    // agent 2's source directory (a USB stick).
    let laptop = f.w.path("laptop-repo");
    copy_dir(&f.w.repo, &laptop);
    f.w.release_into(&laptop, &b2, "stable");
    let archive = f.w.path("release-2.tar");
    ok(Command::new(cairn_bin())
        .args(["export", "--channel", "stable", "--repo"])
        .arg(&laptop)
        .arg("--out")
        .arg(&archive));
    std::fs::remove_dir_all(&f.w.repo).unwrap();
    ok(Command::new(cairn_bin())
        .arg("import")
        .arg(&archive)
        .arg("--repo")
        .arg(&sneaker));
    f.wait_sequence(&[0, 1, 2, 3, 4], 2, 90);
    for i in 0..5 {
        let m = f.metrics(i);
        assert!(
            metric(&m, "cairn_mesh_peers_connected", &[]) >= 1.0,
            "agent {i}"
        );
        if i != 0 && i != 2 {
            assert!(
                metric(&m, "cairn_mesh_objects_fetched_total", &["from=\"peer\""]) > 0.0,
                "agent {i}"
            );
        }
        assert_eq!(
            metric(&m, "cairn_mesh_rejections_total", &[]),
            0.0,
            "agent {i}: {m}"
        );
    }

    // The whole fleet, as agent 4 sees it, through an operator certificate.
    let op = f.w.path("operator");
    mesh_issue_operator(&f.ca, "ops", &op);
    let mut last = serde_json::Value::Null;
    wait_for(30, "fleet status shows five agents at sequence 2", || {
        last = fleet_status_json(&f, 4, &op);
        let agents = last["agents"].as_array().cloned().unwrap_or_default();
        agents.len() == 5 && agents.iter().all(|a| a["sequence"] == 2)
    });
    assert_eq!(last["peer"], "agent a4");
    let ids: Vec<&str> = last["agents"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["agent_id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["a0", "a1", "a2", "a3", "a4"]);
    // The table form.
    let table = ok(Command::new(cairn_bin())
        .args(["fleet", "status", "--peer", &f.addr(4), "--cert"])
        .arg(op.join("operator.crt"))
        .arg("--key")
        .arg(op.join("operator.key"))
        .arg("--ca")
        .arg(op.join("ca.crt")));
    assert!(
        table.contains("AGENT") && table.contains("a2") && table.contains("stable"),
        "{table}"
    );
}

#[test]
fn an_agent_with_a_certificate_from_another_ca_is_refused() {
    let w = World::new(2, 1, 1);
    let b1 = w.build("HEAD", "b1.bundle");
    w.release(&b1);
    let mut f = mesh_fleet(w);
    let other_ca = f.w.path("other-ca");
    mesh_ca_init(&other_ca);
    let c0 = f.issue(&f.ca.clone(), 0);
    let c1 = f.issue(&other_ca, 1);
    let cfg0 = f.config(0, &[f.w.repo.clone()], &[], &c0);
    // The intruder trusts the fleet CA too, so only its own certificate is wrong.
    std::fs::copy(f.ca.join("ca.crt"), c1.join("ca.crt")).unwrap();
    let cfg1 = f.config(1, &[], &[f.addr(0)], &c1);
    f.spawn(0, &cfg0);
    f.spawn(1, &cfg1);
    f.wait_sequence(&[0], 1, 60);
    wait_for(30, "agent 0 refused a handshake", || {
        metric(&f.metrics(0), "cairn_mesh_handshake_failures_total", &[]) >= 1.0
    });
    std::thread::sleep(Duration::from_secs(3));
    assert_agents_alive("the intruder to get nothing");
    assert_eq!(f.sequence(1), 0, "the intruder got nothing");
    assert_eq!(
        metric(&f.metrics(0), "cairn_mesh_peers_connected", &[]),
        0.0
    );
    assert!(f.log(0).contains("mesh handshake refused"), "{}", f.log(0));
    // An operator certificate from the other CA cannot read the fleet either.
    let op = f.w.path("bad-operator");
    ok(Command::new(cairn_bin())
        .args(["mesh", "issue", "--operator", "--ca"])
        .arg(&other_ca)
        .arg("--out")
        .arg(&op));
    std::fs::copy(f.ca.join("ca.crt"), op.join("fleet-ca.crt")).unwrap();
    let out = Command::new(cairn_bin())
        .args(["fleet", "status", "--peer", &f.addr(0), "--cert"])
        .arg(op.join("operator.crt"))
        .arg("--key")
        .arg(op.join("operator.key"))
        .arg("--ca")
        .arg(op.join("fleet-ca.crt"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.starts_with("cairn: "), "{:?} {err}", out.status);
}

#[test]
fn only_the_changed_object_moves_over_the_mesh() {
    // 34 apps x 3 objects = 102 objects; consecutive commits differ by one.
    let w = World::new(34, 2, 4);
    let b1 = w.build("HEAD~1", "b1.bundle");
    let b2 = w.build("HEAD", "b2.bundle");
    w.release(&b1);
    let mut f = mesh_fleet(w);
    let c0 = f.issue(&f.ca.clone(), 0);
    let c1 = f.issue(&f.ca.clone(), 1);
    let cfg0 = f.config(0, &[f.w.repo.clone()], &[], &c0);
    let cfg1 = f.config(1, &[], &[f.addr(0)], &c1);
    f.spawn(0, &cfg0);
    f.spawn(1, &cfg1);
    f.wait_sequence(&[0, 1], 1, 60);
    let before = f.metrics(1);
    let bytes0 = metric(
        &before,
        "cairn_mesh_object_bytes_fetched_total",
        &["from=\"peer\""],
    );
    let count0 = metric(
        &before,
        "cairn_mesh_objects_fetched_total",
        &["from=\"peer\""],
    );
    let frames_in0 = metric(&before, "cairn_mesh_bytes_total", &["direction=\"in\""]);

    let objects = |b: &Path| {
        let mut v = BTreeMap::new();
        let m = read_bundle_file(b, &Limits::default(), |e, bytes| {
            v.insert(e.object.clone(), bytes.len());
            Ok(())
        })
        .unwrap();
        (m, v)
    };
    let (m1, o1) = objects(&b1);
    let (m2, o2) = objects(&b2);
    assert!(m1.entries.len() >= 100);
    // Format 2: the manifest is a top document and chunks.
    let (e1, e2) = (m1.encode_all(), m2.encode_all());
    assert_eq!(
        count0 as usize,
        o1.len() + 1 + e1.chunks.len(),
        "first release: every object and the manifest (top document and chunks)"
    );
    let new_chunks: Vec<usize> = e2
        .chunks
        .iter()
        .filter(|(a, _)| !e1.chunks.iter().any(|(b, _)| a == b))
        .map(|(_, b)| b.len())
        .collect();
    assert_eq!(new_chunks.len(), 1, "one object changed: one chunk");
    let changed: Vec<usize> = o2
        .iter()
        .filter(|(a, _)| !o1.contains_key(*a))
        .map(|(_, s)| *s)
        .collect();
    assert_eq!(changed.len(), 1, "the fixture changes one object");
    let full: usize = o2.values().sum::<usize>() + e2.len() as usize;

    f.w.release(&b2);
    f.wait_sequence(&[0, 1], 2, 60);
    let after = f.metrics(1);
    let moved = metric(
        &after,
        "cairn_mesh_object_bytes_fetched_total",
        &["from=\"peer\""],
    ) - bytes0;
    let count = metric(
        &after,
        "cairn_mesh_objects_fetched_total",
        &["from=\"peer\""],
    ) - count0;
    let frames_in = metric(&after, "cairn_mesh_bytes_total", &["direction=\"in\""]) - frames_in0;
    assert_eq!(
        count, 3.0,
        "the new top document, its one new chunk and the one changed object"
    );
    assert_eq!(moved as usize, e2.top.len() + new_chunks[0] + changed[0]);
    // All traffic in (gossip included) stays far below the full bundle.
    assert!(
        (frames_in as usize) < full / 2,
        "{frames_in} bytes in, bundle is {full}"
    );
}

// ----- a fake malicious peer -------------------------------------------

#[derive(Clone, Copy, Debug, PartialEq)]
enum Evil {
    /// Advertises a newer head, serves a valid release, tampers objects.
    Tamper,
    /// Advertises sequence 9, serves release 1.
    Rollback,
    /// Advertises a newer head, serves a validly signed but expired release.
    Expired,
    /// Sends a frame header announcing 1 GiB.
    Oversized,
    /// Sends bytes that are not CBOR.
    Garbage,
}

struct EvilPeer {
    behaviour: Evil,
    creds: CredentialPaths,
    addr: String,
    head: Head,
    release: Vec<u8>,
    repo: RepoDir,
}

async fn run_evil(p: EvilPeer) {
    let creds = Credentials::load(&p.creds).unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(tls::server_config(&creds).unwrap());
    let listener = tokio::net::TcpListener::bind(&p.addr).await.unwrap();
    let p = std::sync::Arc::new(p);
    loop {
        let Ok((sock, _)) = listener.accept().await else {
            continue;
        };
        let acceptor = acceptor.clone();
        let p = p.clone();
        tokio::spawn(async move {
            let Ok(Ok(mut s)) =
                tokio::time::timeout(Duration::from_secs(10), acceptor.accept(sock)).await
            else {
                return;
            };
            let _ = serve_evil(&p, &mut s).await;
        });
    }
}

async fn send<S: tokio::io::AsyncWrite + Unpin>(s: &mut S, m: &Message) -> std::io::Result<()> {
    use tokio::io::AsyncWriteExt;
    let f = wire::encode_frame(m, MeshLimits::default().max_frame_bytes).unwrap();
    s.write_all(&f).await?;
    s.flush().await
}

async fn recv<S: tokio::io::AsyncRead + Unpin>(s: &mut S) -> Option<Message> {
    use tokio::io::AsyncReadExt;
    let lim = MeshLimits::default();
    let mut h = [0u8; 4];
    tokio::time::timeout(Duration::from_secs(30), s.read_exact(&mut h))
        .await
        .ok()?
        .ok()?;
    let n = wire::body_len(h, lim.max_frame_bytes).ok()?;
    let mut b = vec![0u8; n];
    s.read_exact(&mut b).await.ok()?;
    wire::decode_body(&b, &lim).ok()
}

async fn serve_evil<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin>(
    p: &EvilPeer,
    s: &mut S,
) -> std::io::Result<()> {
    use tokio::io::AsyncWriteExt;
    send(s, &Message::Hello(Hello::speaking(2, 2, None))).await?;
    match p.behaviour {
        Evil::Oversized => {
            s.write_all(&(1u32 << 30).to_be_bytes()).await?;
            s.write_all(&[0u8; 1024]).await?;
            s.flush().await?;
        }
        Evil::Garbage => {
            s.write_all(&8u32.to_be_bytes()).await?;
            s.write_all(b"\xff\xfe\x00garbg").await?;
            s.flush().await?;
        }
        _ => send(s, &Message::Heads(vec![p.head.clone()])).await?,
    }
    while let Some(m) = recv(s).await {
        let Message::Want { id, items } = m else {
            continue;
        };
        let items = items
            .into_iter()
            .map(|item| {
                let bytes = match &item {
                    Item::Release(_) => Some(p.release.clone()),
                    Item::Root(_) | Item::Entries(_) | Item::Blob(_) => None,
                    Item::Object(a) => p.repo.get_object(a, 1 << 24).ok().flatten().map(|mut b| {
                        let is_manifest = a == &p.head.bundle;
                        if p.behaviour == Evil::Tamper && !is_manifest {
                            b[0] ^= 0x20;
                        }
                        b
                    }),
                };
                Found { item, bytes }
            })
            .collect();
        let (more, entries) = (false, Vec::new());
        send(
            s,
            &Message::Data {
                id,
                items,
                more,
                entries,
            },
        )
        .await?;
    }
    Ok(())
}

#[test]
fn malicious_peers_are_cut_off_and_nothing_bad_is_stored() {
    let w = World::new(3, 3, 1);
    let b1 = w.build("HEAD~2", "b1.bundle");
    let b2 = w.build("HEAD~1", "b2.bundle");
    let b3 = w.build("HEAD", "b3.bundle");
    w.release(&b1);
    let release1 = std::fs::read(w.repo.join(channel_path("stable"))).unwrap();
    w.release(&b2);
    // The evil peers' repository: bundle 3 released properly (sequence 3).
    let evil_repo = w.path("evil-repo");
    copy_dir(&w.repo, &evil_repo);
    w.release_into(&evil_repo, &b3, "stable");
    let release3 = std::fs::read(evil_repo.join(channel_path("stable"))).unwrap();
    let b3_id = read_bundle_file(&b3, &Limits::default(), |_, _| Ok(()))
        .unwrap()
        .id();
    let now = cairn_bundle::unix_now();
    let expired = Release {
        format: RELEASE_FORMAT,
        channel: "stable".parse().unwrap(),
        sequence: 3,
        bundle: b3_id.clone(),
        created: now - 1000,
        expires: now - 10,
        rollout: Rollout::default(),
        selector: BTreeMap::new(),
    }
    .sign(&[&dev_key("dev-release-1")])
    .encode();

    let mut f = mesh_fleet(w);
    let c0 = f.issue(&f.ca.clone(), 0);
    let evils = [
        Evil::Tamper,
        Evil::Rollback,
        Evil::Expired,
        Evil::Oversized,
        Evil::Garbage,
    ];
    let rt = tokio::runtime::Runtime::new().unwrap();
    let mut seeds = Vec::new();
    for (k, e) in evils.iter().enumerate() {
        let i = 10 + k;
        let cert = f.issue(&f.ca.clone(), i);
        let (seq, release) = match e {
            Evil::Rollback => (9, release1.clone()),
            Evil::Expired => (3, expired.clone()),
            _ => (3, release3.clone()),
        };
        let addr = f.addr(i);
        seeds.push(addr.clone());
        rt.spawn(run_evil(EvilPeer {
            behaviour: *e,
            creds: CredentialPaths {
                cert: cert.join("agent.crt"),
                key: cert.join("agent.key"),
                ca: cert.join("ca.crt"),
            },
            addr,
            head: Head {
                channel: "stable".into(),
                sequence: seq,
                bundle: b3_id.to_string(),
                root_version: 1,
            },
            release,
            repo: RepoDir::new(&evil_repo),
        }));
    }
    let cfg0 = f.config(0, &[f.w.repo.clone()], &seeds, &c0);
    f.spawn(0, &cfg0);
    f.wait_sequence(&[0], 2, 60);
    let expect = [
        ("a10", "object_hash_mismatch"),
        ("a11", "rollback"),
        ("a12", "expired"),
        ("a13", "oversized_frame"),
        ("a14", "garbage"),
    ];
    let mut m = String::new();
    wait_for(60, "every malicious peer cut off", || {
        m = f.metrics(0);
        expect.iter().all(|(peer, reason)| {
            metric(
                &m,
                "cairn_mesh_rejections_total",
                &[&format!("peer=\"{peer}\""), &format!("reason=\"{reason}\"")],
            ) >= 1.0
        })
    });
    // Still on release 2, its files untouched, nothing of bundle 3 adopted.
    assert_eq!(f.sequence(0), 2);
    let read_files = || -> BTreeMap<String, Vec<u8>> {
        std::fs::read_dir(f.dir(0, "manifests"))
            .unwrap()
            .flatten()
            .filter(|e| !e.file_name().to_string_lossy().starts_with('.'))
            .map(|e| {
                (
                    e.file_name().to_string_lossy().into_owned(),
                    std::fs::read(e.path()).unwrap(),
                )
            })
            .collect()
    };
    let want = expected_files(&b2);
    wait_for(30, "release 2's files in the manifests directory", || {
        read_files() == want
    });

    let log = f.log(0);
    assert!(log.contains("mesh peer cut off"), "{log}");
    // The agent's own view: no tampered object made it into the store.
    // (The store is locked while the agent runs: stop it first.)
    let mut child = f.children.remove(0);
    terminate(&mut child);
    let store = cairn_agent::store::Store::open(&f.dir(0, "data")).unwrap();
    for (addr, _) in store_objects(&b3) {
        // Every object present is intact (the store checks on read).
        if let Ok(Some(b)) = store.get_object(&addr) {
            assert_eq!(cairn_keys::sha256_address(&b), addr);
        } else {
            assert!(matches!(store.get_object(&addr), Ok(None)), "{addr}");
        }
    }
    drop(rt);
}

fn store_objects(b: &Path) -> Vec<(String, usize)> {
    let mut v = Vec::new();
    read_bundle_file(b, &Limits::default(), |e, bytes| {
        v.push((e.object.to_string(), bytes.len()));
        Ok(())
    })
    .unwrap();
    v
}

/// One attacker connection: a TLS client with a valid fleet certificate
/// that says hello, sends `frames` (already encoded) and waits until the
/// agent closes the connection (it cuts the attacker off) or 5 s pass.
async fn attack(addr: String, creds: CredentialPaths, frames: Vec<Vec<u8>>) {
    use tokio::io::AsyncWriteExt;
    let c = Credentials::load(&creds).unwrap();
    let connector = tokio_rustls::TlsConnector::from(tls::client_config(&c).unwrap());
    let sock = tokio::net::TcpStream::connect(&addr).await.unwrap();
    let mut s = connector.connect(tls::server_name(), sock).await.unwrap();
    let hello = Message::Hello(Hello::speaking(2, 2, None));
    send(&mut s, &hello).await.unwrap();
    for f in frames {
        // The agent may cut us off half-way: that is the point.
        if s.write_all(&f).await.is_err() {
            break;
        }
    }
    let _ = s.flush().await;
    let _ = tokio::time::timeout(Duration::from_secs(5), async {
        while recv(&mut s).await.is_some() {}
    })
    .await;
}

/// Issue 13 §4 with real processes: three agents and attackers holding
/// valid fleet certificates. One forges "failed" records for every agent
/// (and for agents that do not exist) for the bundle about to be released
/// with `max-failures=1`; one floods 4,096 records dated an hour ahead,
/// each naming an address of ours to dial; one sends a protocol-1 `Peers`
/// list of 500 of our addresses. The breaker does not trip (every agent
/// adopts), `cairn fleet status` shows exactly the real agents, nobody
/// dials our addresses, and every agent still answers /healthz.
#[test]
fn forged_gossip_cannot_trip_the_breaker_evict_records_or_redirect_dials() {
    use cairn_bundle::mesh::sync::RecordKeys;
    use cairn_bundle::mesh::tls::X509RecordKeys;
    use cairn_bundle::mesh::wire::{PeerInfo, SignedStatus, StatusRecord};
    use std::sync::atomic::{AtomicUsize, Ordering};

    let w = World::new(3, 2, 1);
    let b1 = w.build("HEAD~1", "b1.bundle");
    let b2 = w.build("HEAD", "b2.bundle");
    let b2_id = read_bundle_file(&b2, &Limits::default(), |_, _| Ok(()))
        .unwrap()
        .id();
    w.release(&b1);
    let mut f = mesh_fleet(w);
    let ca = f.ca.clone();
    let certs: Vec<PathBuf> = (0..3).map(|i| f.issue(&ca, i)).collect();
    let addrs: Vec<String> = (0..3).map(|i| f.addr(i)).collect();
    let seeds = |i: usize| -> Vec<String> {
        if i == 0 {
            vec![]
        } else {
            vec![addrs[i - 1].clone()]
        }
    };
    for (i, cert) in certs.iter().enumerate() {
        let sources = if i == 0 {
            vec![f.w.repo.clone()]
        } else {
            vec![]
        };
        let cfg = f.config(i, &sources, &seeds(i), cert);
        f.spawn(i, &cfg);
    }
    f.wait_sequence(&[0, 1, 2], 1, 90);

    // A listener of ours behind every address the attackers name: any
    // connection to it is a dial the attack caused.
    let trap = std::net::TcpListener::bind("0.0.0.0:0").unwrap();
    let port = trap.local_addr().unwrap().port();
    trap.set_nonblocking(true).unwrap();
    let dials = std::sync::Arc::new(AtomicUsize::new(0));
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let trap_thread = {
        let (dials, stop) = (dials.clone(), stop.clone());
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                match trap.accept() {
                    Ok(_) => {
                        dials.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(20)),
                }
            }
        })
    };
    let trap_addr = |i: usize| format!("127.1.{}.{}:{port}", i / 250, i % 250 + 1);

    // Attackers: fleet members a7, a8, a9 (valid certificates).
    let attacker = |i: usize| -> (CredentialPaths, X509RecordKeys) {
        let dir = f.issue(&ca, i);
        let paths = CredentialPaths {
            cert: dir.join("agent.crt"),
            key: dir.join("agent.key"),
            ca: dir.join("ca.crt"),
        };
        let keys = X509RecordKeys::new(&Credentials::load(&paths).unwrap()).unwrap();
        (paths, keys)
    };
    let (a7, _) = attacker(7);
    let (a8, k8) = attacker(8);
    let (a9, k9) = attacker(9);
    let now_ms = cairn_bundle::unix_now() * 1000;
    let record = |id: &str, time: u64, listen: Option<String>| StatusRecord {
        agent_id: cairn_core::AgentId::parse(id).unwrap(),
        channel: "stable".into(),
        labels: BTreeMap::new(),
        sequence: 2,
        bundle: b2_id.to_string(),
        health: "failed".into(),
        time,
        rollout: None,
        listen,
        values_digest: None,
    };
    let sign = |k: &X509RecordKeys, r: &StatusRecord| {
        let bytes = cairn_keys::codec::encode(r);
        let (cert, sig) = k.sign(&SignedStatus::signed_message(&bytes)).unwrap();
        SignedStatus {
            record: bytes,
            cert,
            sig,
        }
    };
    let frame = |m: &Message| wire::encode_frame(m, MeshLimits::default().max_frame_bytes).unwrap();
    // a9: "failed" for the three agents and three made-up ones, signed
    // with a9's key; and one carrying a0's own certificate.
    let mut forged: Vec<SignedStatus> = ["a0", "a1", "a2", "x1", "x2", "x3"]
        .iter()
        .map(|id| sign(&k9, &record(id, now_ms, Some(trap_addr(0)))))
        .collect();
    let a0_cert = tls::Credentials::load(&CredentialPaths {
        cert: certs[0].join("agent.crt"),
        key: certs[0].join("agent.key"),
        ca: certs[0].join("ca.crt"),
    })
    .unwrap()
    .chain[0]
        .to_vec();
    let mut with_victim_cert = sign(&k9, &record("a0", now_ms, None));
    with_victim_cert.cert = a0_cert;
    forged.insert(0, with_victim_cert);
    let forge_frames = vec![frame(&Message::status(forged))];
    // a8: 4,096 records dated an hour ahead, each with an address to dial.
    let flood: Vec<SignedStatus> = (0..4096)
        .map(|i| {
            sign(
                &k8,
                &record(
                    &format!("f{i}"),
                    now_ms + 3_600_000,
                    Some(trap_addr(i % 500)),
                ),
            )
        })
        .collect();
    let flood_frames = flood
        .chunks(1024)
        .map(|c| frame(&Message::status(c.to_vec())))
        .collect();
    // a7: protocol 1's unsigned peer exchange, 500 addresses of ours.
    #[derive(serde::Serialize)]
    enum V1 {
        Peers(Vec<PeerInfo>),
    }
    let peers_frames = (0..500)
        .map(|i| PeerInfo {
            agent_id: Some(cairn_core::AgentId::parse(&format!("p{i}")).unwrap()),
            addr: trap_addr(i),
        })
        .collect::<Vec<_>>()
        .chunks(32)
        .map(|c| {
            let body = cairn_keys::codec::encode(&V1::Peers(c.to_vec()));
            let mut f = (body.len() as u32).to_be_bytes().to_vec();
            f.extend_from_slice(&body);
            f
        })
        .collect::<Vec<_>>();
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let mut tasks = Vec::new();
        for i in 0..3 {
            for (who, frames) in [
                (&a9, &forge_frames),
                (&a8, &flood_frames),
                (&a7, &peers_frames),
            ] {
                tasks.push(tokio::spawn(attack(f.addr(i), who.clone(), frames.clone())));
            }
        }
        for t in tasks {
            t.await.unwrap();
        }
    });
    // Forgers and the protocol-1 peer list are cut off; the flood dated
    // ahead is dropped before any signature check.
    for i in 0..3 {
        wait_for(60, &format!("agent {i} refused every attack"), || {
            let m = f.metrics(i);
            let cut = |peer: &str, reason: &str| {
                metric(
                    &m,
                    "cairn_mesh_rejections_total",
                    &[&format!("peer=\"{peer}\""), &format!("reason=\"{reason}\"")],
                ) >= 1.0
            };
            let dropped = |reason: &str| metric(&m, "cairn_mesh_status_dropped_total", &[reason]);
            cut("a9", "forged_status")
                && cut("a7", "garbage")
                && dropped("reason=\"forged\"") >= 1.0
                && dropped("reason=\"future\"") >= 4096.0
        });
    }

    // The release the forged records call failed, with a breaker at one
    // failure: it must roll on to every agent.
    ok(Command::new(cairn_bin())
        .arg("release")
        .arg("--repo")
        .arg(&f.w.repo)
        .arg("--bundle")
        .arg(&b2)
        .args([
            "--channel",
            "stable",
            "--rollout",
            "100%:0s,max-failures=1",
            "--key",
        ])
        .arg(dev_key_path("dev-release-1")));
    f.wait_sequence(&[0, 1, 2], 2, 90);

    // Real records, and only those, as the operator sees them.
    let op = f.w.path("operator");
    mesh_issue_operator(&ca, "ops", &op);
    let mut st = serde_json::Value::Null;
    wait_for(
        60,
        "fleet status with the three agents on release 2",
        || {
            st = fleet_status_json(&f, 2, &op);
            st["agents"]
                .as_array()
                .is_some_and(|a| a.len() == 3 && a.iter().all(|r| r["sequence"] == 2))
        },
    );
    let ids: Vec<&str> = st["agents"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["agent_id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["a0", "a1", "a2"], "{st:#}");
    for r in st["agents"].as_array().unwrap() {
        assert_ne!(r["health"], "failed", "{st:#}");
    }
    let rel2 = st["releases"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["sequence"] == 2)
        .expect("release 2 in fleet status");
    assert_eq!(rel2["breaker_tripped"], false, "{st:#}");
    assert_eq!(rel2["failed"], 0, "{st:#}");

    // Several dial rounds later, nobody has dialed an attacker's address.
    std::thread::sleep(Duration::from_secs(3));
    stop.store(true, Ordering::Relaxed);
    trap_thread.join().unwrap();
    assert_eq!(
        dials.load(Ordering::Relaxed),
        0,
        "agents dialed our addresses"
    );
    for i in 0..3 {
        let addr = f.status(i).and_then(|s| s.listen).expect("HTTP address");
        assert_eq!(http_get(&addr, "/healthz").0, 200, "agent {i}");
    }
    drop(rt);
}

#[test]
fn with_a_status_sample_of_one_an_agent_keeps_its_own_record_and_the_lowest_ranked_other() {
    // Four agents in a line, each configured to keep one other agent's
    // healthy record (`mesh.statusSample: 1`): every agent converges on
    // the same sampled agent, the one whose id has the lowest rank, and
    // relays nothing else. (The default, 64, holds a fleet this small
    // whole: the line test above shows all five.)
    let w = World::new(2, 1, 1);
    let b1 = w.build("HEAD", "b1.bundle");
    w.release(&b1);
    let mut f = mesh_fleet(w);
    for i in 0..4 {
        let cert = f.issue(&f.ca.clone(), i);
        let sources = if i == 0 {
            vec![f.w.repo.clone()]
        } else {
            vec![]
        };
        let seeds = if i < 3 { vec![f.addr(i + 1)] } else { vec![] };
        let cfg = f.config(i, &sources, &seeds, &cert);
        let mut text = std::fs::read_to_string(&cfg).unwrap();
        assert!(text.ends_with("antiEntropyInterval: 1s\n"), "{text}");
        text.push_str("  statusSample: 1\n");
        std::fs::write(&cfg, text).unwrap();
        f.spawn(i, &cfg);
    }
    f.wait_sequence(&[0, 1, 2, 3], 1, 90);
    let rank = |i: usize| {
        cairn_bundle::rollout::status_sample_rank(
            &cairn_bundle::ids::AgentId::parse(&f.id(i)).unwrap(),
        )
    };
    let op = f.w.path("operator");
    mesh_issue_operator(&f.ca, "ops", &op);
    for peer in [0, 3] {
        let lowest_other = (0..4)
            .filter(|i| *i != peer)
            .min_by_key(|i| rank(*i))
            .unwrap();
        let mut want = vec![f.id(peer), f.id(lowest_other)];
        want.sort();
        let mut last = serde_json::Value::Null;
        wait_for(
            30,
            "agent's table holds itself and the sampled agent at sequence 1",
            || {
                last = fleet_status_json(&f, peer, &op);
                let agents = last["agents"].as_array().cloned().unwrap_or_default();
                let ids: Vec<String> = agents
                    .iter()
                    .map(|a| a["agent_id"].as_str().unwrap_or_default().to_owned())
                    .collect();
                ids == want && agents.iter().all(|a| a["sequence"] == 1)
            },
        );
        // It stays that way: nobody relays the two records left out.
        std::thread::sleep(Duration::from_secs(3));
        let agents = fleet_status_json(&f, peer, &op)["agents"]
            .as_array()
            .unwrap()
            .len();
        assert_eq!(agents, 2, "agent {peer}: {last}");
    }
}
