//! Webhook notifications through real agent processes: a receiver started
//! by the test gets each event once and in order, events queued while it
//! was down arrive when it comes back, and events still queued when the
//! agent stops are delivered after a restart (the outbox is persistent).

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
