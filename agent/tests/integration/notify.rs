//! Webhook notifications through real agent processes: a receiver started
//! by the test gets each event once and in order, events queued while it
//! was down arrive when it comes back, and events still queued when the
//! agent stops are delivered after a restart (the outbox is persistent);
//! in a small fleet on the Kubernetes target, a broken release's
//! healthFailed, rolledBack and breakerTripped events (and a hold's) are
//! queued while the receiver is down and each delivered once.

use crate::support::*;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

/// A tiny HTTP/1.1 webhook receiver on loopback: records (path, body) of
/// every POST and answers 200 with `Connection: close`.
struct Receiver {
    addr: SocketAddr,
    got: Arc<Mutex<Vec<(String, String)>>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Receiver {
    fn start(addr: &str, got: Arc<Mutex<Vec<(String, String)>>>) -> Receiver {
        let listener = TcpListener::bind(addr).expect("bind receiver");
        listener.set_nonblocking(true).expect("nonblocking");
        let addr = listener.local_addr().expect("addr");
        let stop = Arc::new(AtomicBool::new(false));
        let (g, s) = (got.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            while !s.load(Ordering::SeqCst) {
                match listener.accept() {
                    Ok((conn, _)) => {
                        conn.set_nonblocking(false).expect("blocking");
                        conn.set_read_timeout(Some(Duration::from_secs(5)))
                            .expect("timeout");
                        if let Some(req) = read_request(&conn) {
                            g.lock().unwrap().push(req);
                        }
                        let mut conn = conn;
                        let _ = conn.write_all(
                            b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\nconnection: close\r\n\r\n",
                        );
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(20)),
                }
            }
        });
        Receiver {
            addr,
            got,
            stop,
            thread: Some(thread),
        }
    }

    /// Stops accepting and closes the port (connections are refused).
    fn stop(mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            t.join().expect("receiver thread");
        }
    }

    fn bodies(&self, path: &str) -> Vec<serde_json::Value> {
        self.got
            .lock()
            .unwrap()
            .iter()
            .filter(|(p, _)| p == path)
            .map(|(_, b)| serde_json::from_str(b).expect("JSON body"))
            .collect()
    }
}

fn read_request(conn: &std::net::TcpStream) -> Option<(String, String)> {
    let mut r = BufReader::new(conn);
    let mut line = String::new();
    r.read_line(&mut line).ok()?;
    let mut parts = line.split_whitespace();
    let (method, path) = (parts.next()?.to_owned(), parts.next()?.to_owned());
    let mut len = 0usize;
    loop {
        let mut h = String::new();
        r.read_line(&mut h).ok()?;
        let h = h.trim_end();
        if h.is_empty() {
            break;
        }
        if let Some((k, v)) = h.split_once(':') {
            if k.eq_ignore_ascii_case("content-length") {
                len = v.trim().parse().ok()?;
            }
        }
    }
    assert_eq!(method, "POST", "{line}");
    assert!(len <= 1 << 16, "body of {len} bytes");
    let mut body = vec![0; len];
    r.read_exact(&mut body).ok()?;
    Some((path, String::from_utf8(body).ok()?))
}

fn metric(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("{name} ")))
        .and_then(|v| v.trim().parse().ok())
}

fn events(r: &Receiver) -> Vec<(String, Option<u64>)> {
    r.bodies("/hook/SECRET-TOKEN")
        .iter()
        .map(|v| {
            (
                v["event"].as_str().unwrap_or("").to_owned(),
                v["sequence"].as_u64(),
            )
        })
        .collect()
}

#[test]
fn webhooks_get_every_event_once_in_order_across_outages_and_restarts() {
    let w = World::new(2, 2, 1);
    let b1 = w.build("HEAD~1", "b1.bundle");
    w.release(&b1);
    let got = Arc::new(Mutex::new(Vec::new()));
    let rx = Receiver::start("127.0.0.1:0", got.clone());
    let port = rx.addr.port();
    let mut c = w.agent_config(&[w.repo.display().to_string()]);
    c.id = Some("site-1".into());
    c.extra = format!(
        "notifications:\n  - url: http://127.0.0.1:{port}/hook/SECRET-TOKEN\n    format: json\n  - url: http://127.0.0.1:{port}/slack/SECRET-TOKEN\n    format: slack\n    events: [adopted]\n"
    );
    let cfg = c.write(&w.path("agent.yaml"));
    let mut agent = w.spawn(&cfg, "agent.log");

    // Online: the adoption arrives once, in both formats.
    wait_logged(&w, "agent.log", 60, "adopted 1 delivered", || {
        events(&rx) == [("adopted".into(), Some(1))] && rx.bodies("/slack/SECRET-TOKEN").len() == 1
    });
    let first = &rx.bodies("/hook/SECRET-TOKEN")[0];
    assert_eq!(first["agent"], "site-1");
    assert_eq!(first["channel"], "stable");
    let id1 = first["id"].as_str().unwrap().to_owned();
    assert!(id1.starts_with("site-1/") && id1.ends_with("/1"), "{id1}");
    let slack = &rx.bodies("/slack/SECRET-TOKEN")[0];
    let text = slack["text"].as_str().unwrap();
    assert!(
        text.starts_with("[cairn site-1] adopted: release 1 "),
        "{text}"
    );
    assert_eq!(slack.as_object().unwrap().len(), 1, "{slack}");

    // The receiver goes down; a release is adopted and a hold placed and
    // released meanwhile: all queued.
    rx.stop();
    w.release(&w.build("HEAD", "b2.bundle"));
    wait_for(60, "release 2 adopted", || sequence_in(&w.data) == 2);
    ok(Command::new(agent_bin())
        .args(["hold", "--data-dir"])
        .arg(&w.data));
    wait_for(30, "hold seen", || {
        w.status().is_some_and(|s| s.hold.is_some())
    });
    ok(Command::new(agent_bin())
        .args(["release-hold", "--data-dir"])
        .arg(&w.data));
    wait_for(30, "hold ended", || {
        w.status().is_some_and(|s| s.hold.is_none())
    });
    let addr = w.status().unwrap().listen.unwrap();
    wait_for(30, "3 events queued, deliveries failing", || {
        let m = http_get(&addr, "/metrics").1;
        metric(&m, "cairn_notifications_queued") == Some(3.0)
            && metric(&m, "cairn_notifications_failed_total").is_some_and(|n| n >= 1.0)
    });
    let m = http_get(&addr, "/metrics").1;
    assert_eq!(
        metric(&m, "cairn_notifications_sent_total"),
        Some(2.0),
        "{m}"
    );

    // The agent stops with them queued, and starts again: still queued.
    assert!(terminate(&mut agent).success());
    let mut agent = w.spawn(&cfg, "agent2.log");
    wait_for(30, "restarted agent listening", || {
        w.status()
            .is_some_and(|s| s.listen.as_ref().is_some_and(|l| *l != addr))
    });
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(events_len(&got), 1, "nothing delivered while down");

    // The receiver comes back on the same port: the history arrives, in
    // order, each event once.
    let rx = Receiver::start(&format!("127.0.0.1:{port}"), got.clone());
    wait_for(60, "queued events delivered", || events(&rx).len() >= 4);
    wait_for(30, "slack got adopted 2", || {
        rx.bodies("/slack/SECRET-TOKEN").len() >= 2
    });
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(
        events(&rx),
        [
            ("adopted".into(), Some(1)),
            ("adopted".into(), Some(2)),
            ("holdPlaced".into(), None),
            ("holdEnded".into(), None),
        ]
    );
    let ids: Vec<String> = rx
        .bodies("/hook/SECRET-TOKEN")
        .iter()
        .map(|v| v["id"].as_str().unwrap().to_owned())
        .collect();
    let epoch = id1.split('/').nth(1).unwrap();
    assert_eq!(
        ids,
        (1..=4)
            .map(|n| format!("site-1/{epoch}/{n}"))
            .collect::<Vec<_>>()
    );
    let slack: Vec<String> = rx
        .bodies("/slack/SECRET-TOKEN")
        .iter()
        .map(|v| v["text"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(slack.len(), 2, "{slack:?}");
    assert!(slack[1].contains("adopted: release 2 "), "{slack:?}");
    let addr = w.status().unwrap().listen.unwrap();
    wait_for(30, "outbox empty", || {
        metric(&http_get(&addr, "/metrics").1, "cairn_notifications_queued") == Some(0.0)
    });
    assert!(terminate(&mut agent).success());
    rx.stop();
    for log in ["agent.log", "agent2.log"] {
        let l = w.log(log);
        assert!(
            !l.contains("SECRET-TOKEN"),
            "webhook secret logged in {log}:\n{l}"
        );
    }
    assert!(w
        .log("agent.log")
        .contains("notification not delivered; retrying"));
}

fn events_len(got: &Arc<Mutex<Vec<(String, String)>>>) -> usize {
    got.lock()
        .unwrap()
        .iter()
        .filter(|(p, _)| p == "/hook/SECRET-TOKEN")
        .count()
}

/// [`wait_for`], with the agent's log printed on timeout.
fn wait_logged(w: &World, log: &str, secs: u64, what: &str, cond: impl FnMut() -> bool) {
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| wait_for(secs, what, cond)));
    if let Err(e) = r {
        eprintln!("{log}:\n{}", w.log(log));
        std::panic::resume_unwind(e);
    }
}

/// The receiver's JSON events grouped per agent: (event, sequence) in
/// arrival order.
fn events_of(r: &Receiver, agent: &str) -> Vec<(String, Option<u64>)> {
    r.bodies("/hook/SECRET-TOKEN")
        .iter()
        .filter(|v| v["agent"] == agent)
        .map(|v| {
            (
                v["event"].as_str().unwrap_or("").to_owned(),
                v["sequence"].as_u64(),
            )
        })
        .collect()
}

/// A small fleet against test API servers: a broken release fails its
/// health checks and rolls back on the agent of the first wave, which
/// trips the breaker on the other; a hold is placed and ended there. The
/// receiver is down for all of it: every event (adopted, healthFailed,
/// rolledBack, breakerTripped, holdPlaced, holdEnded) arrives once when it
/// comes back. In the nextest `fleets` group.
#[test]
fn a_broken_release_notifies_health_failed_rolled_back_and_breaker_tripped_once() {
    let w = World::new(2, 2, 1);
    let good = w.build("HEAD", "good.bundle");
    let dep =
        std::fs::read_to_string(w.git.join("clusters/edge/app-0001/deployment.yaml")).unwrap();
    let broken_dep = dep.replace(
        "registry.local/edge/app-0001:1.0.0",
        "registry.local/edge/app-0001:broken",
    );
    assert_ne!(dep, broken_dep);
    cairn_test_support::fixture::commit_files(
        &w.git,
        &[("clusters/edge/app-0001/deployment.yaml", &broken_dep)],
        "break app-0001",
        "2026-02-01T00:00:00Z",
    )
    .expect("commit");
    let broken = w.build("HEAD", "broken.bundle");
    let broken_id = cairn_bundle::bundle::read_bundle_file(
        &broken,
        &cairn_bundle::limits::Limits::default(),
        |_, _| Ok(()),
    )
    .expect("read bundle")
    .id()
    .to_string();
    // Agent 0 in the first half for this bundle, agent 1 in the second.
    let pick = |early: bool| {
        (0..200)
            .map(|n| format!("n-{n}"))
            .find(|id| {
                (cairn_bundle::rollout::bucket_ppm(
                    &cairn_core::AgentId::parse(id).unwrap(),
                    &broken_id,
                ) < 500_000)
                    == early
            })
            .expect("an id in each half")
    };
    let ids = vec![pick(true), pick(false)];

    let got = Arc::new(Mutex::new(Vec::new()));
    let rx = Receiver::start("127.0.0.1:0", got.clone());
    let port = rx.addr.port();
    let mut f = fleet(w, ids.clone());
    let mut apis = Vec::new();
    for i in 0..2 {
        let dir = f.dir(i, "api");
        let api = cairn_test_support::ApiServer::start(
            &dir,
            &[
                "--listen",
                "127.0.0.1:0",
                "--deployment-ready-delay-ms",
                "100",
            ],
        );
        api.create_namespace(&dir, "cairn-system");
        let target = format!(
            "target:\n  kubernetes:\n    kubeconfig: {}\n    namespace: cairn-system\n    healthTimeout: 3s\n",
            api.kubeconfig.display()
        );
        apis.push(api);
        let cfg = f.configure(i, &target);
        let mut yaml = std::fs::read_to_string(&cfg).unwrap();
        yaml.push_str(&format!(
            "notifications:\n  - url: http://127.0.0.1:{port}/hook/SECRET-TOKEN\n    format: json\n"
        ));
        std::fs::write(&cfg, yaml).unwrap();
        f.spawn(i, &cfg);
    }

    // The good release everywhere, delivered at once: the last-good.
    f.w.release(&good);
    f.wait(60, "the good release healthy everywhere, notified", |f| {
        (0..2).all(|i| {
            f.status(i)
                .is_some_and(|s| s.ready && s.last_good.is_some())
        }) && ids
            .iter()
            .all(|id| events_of(&rx, id) == [("adopted".to_owned(), Some(1))])
    });

    // The receiver goes down; the broken release goes out in two waves
    // with a breaker at one failure.
    rx.stop();
    let repo = f.w.repo.display().to_string();
    let key = dev_key_path("dev-release-1").display().to_string();
    f.cairn(&[
        "release",
        "--repo",
        &repo,
        "--bundle",
        &broken.display().to_string(),
        "--channel",
        "stable",
        "--key",
        &key,
        "--rollout",
        "50%:0s,100%:1h,max-failures=1",
    ]);
    f.wait(
        60,
        "agent 0 rolled back, agent 1 holds on the breaker",
        |f| {
            f.status(0)
                .is_some_and(|s| s.failed_release.as_ref().is_some_and(|r| r.sequence == 2))
                && f.pending_state(1) == Some((2, "breaker".into()))
        },
    );
    // A hold placed and ended on agent 1 meanwhile.
    let data1 = f.dir(1, "data");
    ok(Command::new(agent_bin())
        .args(["hold", "--data-dir"])
        .arg(&data1));
    f.wait(30, "hold seen", |f| {
        f.status(1).is_some_and(|s| s.hold.is_some())
    });
    ok(Command::new(agent_bin())
        .args(["release-hold", "--data-dir"])
        .arg(&data1));
    f.wait(30, "hold ended, the breaker holds again", |f| {
        f.status(1).is_some_and(|s| s.hold.is_none())
            && f.pending_state(1) == Some((2, "breaker".into()))
    });
    f.wait(30, "three events queued at each agent", |f| {
        (0..2).all(|i| metric(&f.metrics(i), "cairn_notifications_queued") == Some(3.0))
    });
    assert_eq!(events_len(&got), 2, "nothing delivered while down");

    // The receiver comes back on the same port: every queued event
    // arrives; once the outboxes are empty, each arrived exactly once.
    let rx = Receiver::start(&format!("127.0.0.1:{port}"), got.clone());
    f.wait(60, "outboxes empty", |f| {
        (0..2).all(|i| metric(&f.metrics(i), "cairn_notifications_queued") == Some(0.0))
    });
    assert_eq!(
        events_of(&rx, &ids[0]),
        [
            ("adopted".to_owned(), Some(1)),
            ("adopted".to_owned(), Some(2)),
            ("healthFailed".to_owned(), Some(2)),
            ("rolledBack".to_owned(), Some(1)),
        ]
    );
    assert_eq!(
        events_of(&rx, &ids[1]),
        [
            ("adopted".to_owned(), Some(1)),
            ("breakerTripped".to_owned(), Some(2)),
            ("holdPlaced".to_owned(), None),
            ("holdEnded".to_owned(), None),
        ]
    );
    let bodies = rx.bodies("/hook/SECRET-TOKEN");
    let message = |event: &str| {
        bodies
            .iter()
            .find(|v| v["event"] == event)
            .and_then(|v| v["message"].as_str())
            .unwrap_or_default()
            .to_owned()
    };
    assert!(
        message("healthFailed").starts_with("release 2 failed its health checks"),
        "{bodies:?}"
    );
    assert!(
        message("rolledBack").contains("rolled back from release 2 to the last-good release 1"),
        "{bodies:?}"
    );
    assert!(
        message("breakerTripped").starts_with("release 2 not adopted"),
        "{bodies:?}"
    );
    rx.stop();
    drop(apis);
}
