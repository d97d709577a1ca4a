//! In-memory tests: N endpoints on a virtual clock, every message passed
//! through real frame encoding and decoding, with a toy release format
//! (the real verification pipeline is exercised by the agent's tests).

use super::*;
use crate::wire::{decode_body, encode_frame};
use cairn_keys::{codec, sha256_address};

/// A well-formed address (object, blob, or the string of one).
fn address(s: &str) -> Address {
    Address::parse(s).unwrap()
}

const LATENCY: u64 = 5;

use crate::testing::SharedSecretKeys;

const FLEET_SECRET: &[u8] = b"sync tests fleet secret";

/// An agent id the tests know is valid.
fn aid(s: &str) -> AgentId {
    AgentId::parse(s).unwrap()
}

/// Test record keys (see [`SharedSecretKeys`]).
fn test_keys(id: &str) -> SharedSecretKeys {
    SharedSecretKeys {
        id: id.to_owned(),
        secret: FLEET_SECRET,
    }
}

fn test_signature(id: &str, message: &[u8]) -> Vec<u8> {
    SharedSecretKeys::signature(FLEET_SECRET, id, message)
}

fn new_ep(c: SyncConfig) -> Endpoint {
    let keys = Box::new(test_keys(&c.agent_id));
    Endpoint::new(c, 1, keys)
}

/// `r` signed by `author` (a fleet member, or an attacker signing a
/// record about someone else).
fn signed_by(author: &str, r: &StatusRecord) -> SignedStatus {
    let record = codec::encode(r);
    let (cert, sig) = test_keys(author)
        .sign(&SignedStatus::signed_message(&record))
        .unwrap();
    SignedStatus { record, cert, sig }
}

fn record(id: &str, health: &str, time: u64) -> StatusRecord {
    StatusRecord {
        agent_id: aid(id),
        channel: "stable".into(),
        labels: BTreeMap::new(),
        sequence: 1,
        bundle: sha256_address(b"bundle"),
        health: health.into(),
        time,
        rollout: None,
        listen: None,
        values_digest: None,
    }
}

/// Agent ids in `ep`'s status view at `now`.
fn status_ids(ep: &Endpoint, now: u64) -> Vec<String> {
    ep.status(UnixMillis(now))
        .map(|r| r.agent_id.to_string())
        .collect()
}

/// Adopters and failures of `bundle` on channel `stable`: the breaker
/// inputs the agent and the simulator take from the endpoint.
fn breaker_inputs(ep: &Endpoint, bundle: &str, now: u64) -> (u64, u64) {
    let r = ep
        .fleet_reports("stable", UnixMillis(now))
        .get(bundle)
        .copied()
        .unwrap_or_default();
    (u64::from(r.adopted), u64::from(r.failed))
}

/// Toy release: (channel, sequence, manifest address, valid).
type ToyRelease = (String, u64, String, bool);

fn toy_release(channel: &str, seq: u64, manifest: &str, valid: bool) -> Vec<u8> {
    codec::encode(&(channel.to_owned(), seq, manifest.to_owned(), valid))
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Behaviour {
    Honest,
    /// Flips a byte of every object it serves.
    Tamper,
    /// Answers compact wants as "bundle not held".
    LacksBundle,
    /// Asks compact wants for indices past the bundle's end.
    PastTheEnd,
    /// Never answers wants.
    Silent,
}

struct Node {
    id: String,
    addr: String,
    ep: Endpoint,
    objects: BTreeMap<String, Vec<u8>>,
    releases: BTreeMap<String, Vec<u8>>,
    /// fetch -> (head, manifest address).
    pending: BTreeMap<FetchId, (Head, String)>,
    behaviour: Behaviour,
    /// Toy release epochs: sequences signed by release keys this node's
    /// root has replaced (refused as `signature_threshold`).
    distrusted: BTreeSet<u64>,
    rejections: Vec<(String, String)>,
    object_bytes_in: usize,
    objects_in: usize,
}

impl Node {
    fn seq(&self, channel: &str) -> u64 {
        self.ep.heads().get(channel).map_or(0, |h| h.sequence)
    }

    /// Asks the endpoint for what a fetch lacks: the manifest by address,
    /// then the missing entries by index.
    fn want_missing(&mut self, fetch: FetchId, manifest: &str, now: u64) {
        match self.objects.get(manifest) {
            None => self
                .ep
                .fetch_want(fetch, vec![address(manifest)], Millis(now)),
            Some(m) => {
                let entries: Vec<String> = codec::decode("toy manifest", m, 1 << 20).unwrap();
                let shift = if self.behaviour == Behaviour::PastTheEnd {
                    entries.len() as u32
                } else {
                    0
                };
                let missing = entries
                    .into_iter()
                    .enumerate()
                    .filter(|(_, a)| !self.objects.contains_key(a))
                    .map(|(i, a)| (i as u32 + shift, address(&a)))
                    .collect();
                self.ep.fetch_want_entries(fetch, missing, Millis(now));
            }
        }
    }

    /// The entries of a toy bundle this node holds.
    fn bundle_entries(&self, bundle: &str) -> Option<Vec<String>> {
        if self.behaviour == Behaviour::LacksBundle {
            return None;
        }
        let m = self.objects.get(bundle)?;
        codec::decode("toy manifest", m, 1 << 20).ok()
    }

    fn missing(&self, manifest: &str) -> Vec<String> {
        match self.objects.get(manifest) {
            None => vec![manifest.to_owned()],
            Some(m) => {
                let entries: Vec<String> = codec::decode("toy manifest", m, 1 << 20).unwrap();
                entries
                    .into_iter()
                    .filter(|a| !self.objects.contains_key(a))
                    .collect()
            }
        }
    }
}

enum Wire {
    Msg(usize, ConnId, Vec<u8>),
    Closed(usize, ConnId),
}

struct Sim {
    nodes: Vec<Node>,
    now: u64,
    links: BTreeMap<(usize, ConnId), (usize, ConnId)>,
    queue: Vec<(u64, Wire)>,
    blocked: BTreeSet<(usize, usize)>,
    /// Per node: its wants in flight, and the most seen at once.
    open_wants: BTreeMap<usize, BTreeSet<u64>>,
    max_open_wants: BTreeMap<usize, usize>,
    /// Every message delivered: (receiver, message).
    delivered: Vec<(usize, Message)>,
}

fn cfg(i: usize, seeds: Vec<usize>) -> SyncConfig {
    let mut c = SyncConfig::new(aid(&format!("a{i}")), vec!["stable".into()]);
    c.listen = Some(addr(i));
    c.seeds = seeds.into_iter().map(addr).collect();
    c.rng_seed = i as u64;
    c
}

fn addr(i: usize) -> String {
    format!("127.0.0.{}:7440", i + 1)
}

impl Sim {
    fn new(configs: Vec<SyncConfig>) -> Self {
        let nodes = configs
            .into_iter()
            .enumerate()
            .map(|(i, c)| Node {
                id: c.agent_id.to_string(),
                addr: addr(i),
                ep: new_ep(c),
                objects: BTreeMap::new(),
                releases: BTreeMap::new(),
                pending: BTreeMap::new(),
                behaviour: Behaviour::Honest,
                distrusted: BTreeSet::new(),
                rejections: Vec::new(),
                object_bytes_in: 0,
                objects_in: 0,
            })
            .collect();
        Sim {
            nodes,
            now: 1_000_000,
            links: BTreeMap::new(),
            queue: Vec::new(),
            blocked: BTreeSet::new(),
            open_wants: BTreeMap::new(),
            max_open_wants: BTreeMap::new(),
            delivered: Vec::new(),
        }
    }

    fn line(n: usize) -> Self {
        Sim::new(
            (0..n)
                .map(|i| cfg(i, if i + 1 < n { vec![i + 1] } else { vec![] }))
                .collect(),
        )
    }

    /// Node `i` adopts a release from a "source": objects stored, head set.
    fn publish(&mut self, i: usize, seq: u64, objects: &[Vec<u8>], valid: bool) -> String {
        let addrs: Vec<String> = objects.iter().map(|o| sha256_address(o)).collect();
        let manifest = codec::encode(&addrs);
        let maddr = sha256_address(&manifest);
        let n = &mut self.nodes[i];
        for (a, o) in addrs.iter().zip(objects) {
            n.objects.insert(a.clone(), o.clone());
        }
        n.objects.insert(maddr.clone(), manifest);
        n.releases
            .insert("stable".into(), toy_release("stable", seq, &maddr, valid));
        let head = Head {
            channel: "stable".into(),
            sequence: seq,
            bundle: maddr.clone(),
            root_version: 1,
        };
        n.ep.set_head(head, Millis(self.now));
        maddr
    }

    fn blocked(&self, a: usize, b: usize) -> bool {
        self.blocked.contains(&(a.min(b), a.max(b)))
    }

    fn partition(&mut self, group_a: &[usize], group_b: &[usize]) {
        for &a in group_a {
            for &b in group_b {
                self.blocked.insert((a.min(b), a.max(b)));
            }
        }
        let cut: Vec<((usize, ConnId), (usize, ConnId))> = self
            .links
            .iter()
            .filter(|((a, _), (b, _))| self.blocked(*a, *b))
            .map(|(k, v)| (*k, *v))
            .collect();
        for (x, y) in cut {
            self.links.remove(&x);
            self.links.remove(&y);
            self.nodes[x.0].ep.disconnected(x.1, Millis(self.now));
            self.nodes[y.0].ep.disconnected(y.1, Millis(self.now));
        }
    }

    fn heal(&mut self) {
        self.blocked.clear();
    }

    /// Drives every node's actions until none are left at this instant.
    fn settle(&mut self) {
        loop {
            let mut progressed = false;
            for i in 0..self.nodes.len() {
                while let Some(a) = self.nodes[i].ep.poll_action() {
                    progressed = true;
                    self.act(i, a);
                }
            }
            // Deliver due messages.
            let now = self.now;
            let due: Vec<(u64, Wire)> = {
                let (due, rest): (Vec<_>, Vec<_>) =
                    self.queue.drain(..).partition(|(t, _)| *t <= now);
                self.queue = rest;
                due
            };
            for (_, w) in due {
                progressed = true;
                match w {
                    Wire::Msg(to, conn, frame) => {
                        let lim = self.nodes[to].ep.config().limits.clone();
                        let msg = decode_body(&frame[4..], &lim).unwrap();
                        if let Message::Data { id, more, .. } = &msg {
                            if !more {
                                self.open_wants.entry(to).or_default().remove(id);
                            }
                        }
                        self.delivered.push((to, msg.clone()));
                        self.nodes[to]
                            .ep
                            .handle_message(conn, msg, Millis(now), UnixMillis(now));
                    }
                    Wire::Closed(to, conn) => self.nodes[to].ep.disconnected(conn, Millis(now)),
                }
            }
            if !progressed {
                return;
            }
        }
    }

    fn act(&mut self, i: usize, a: Action) {
        let now = self.now;
        match a {
            Action::Send { conn, message } => {
                if let Message::Want { id, items } = &message {
                    let limits = &self.nodes[i].ep.config().limits;
                    assert!(items.len() <= limits.max_items_per_want);
                    let named: usize = items
                        .iter()
                        .map(|it| match it {
                            Item::Entries(e) => e.check(limits).unwrap(),
                            _ => 0,
                        })
                        .sum();
                    assert!(named <= limits.max_objects_per_want);
                    let open = self.open_wants.entry(i).or_default();
                    open.insert(*id);
                    let n = open.len();
                    let m = self.max_open_wants.entry(i).or_default();
                    *m = (*m).max(n);
                }
                let frame =
                    encode_frame(&message, self.nodes[i].ep.config().limits.max_frame_bytes)
                        .unwrap();
                if let Some(&(j, cj)) = self.links.get(&(i, conn)) {
                    self.queue.push((now + LATENCY, Wire::Msg(j, cj, frame)));
                }
            }
            Action::Close { conn, .. } => {
                if let Some((j, cj)) = self.links.remove(&(i, conn)) {
                    self.links.remove(&(j, cj));
                    self.queue.push((now + LATENCY, Wire::Closed(j, cj)));
                }
            }
            Action::Dial { addr } => {
                let target = self.nodes.iter().position(|n| n.addr == addr);
                match target {
                    Some(j) if !self.blocked(i, j) => {
                        let (idi, idj) = (self.nodes[i].id.clone(), self.nodes[j].id.clone());
                        let ipi = self.nodes[i].addr.split(':').next().map(str::to_owned);
                        let ipj = self.nodes[j].addr.split(':').next().map(str::to_owned);
                        let ci = self.nodes[i].ep.connected(
                            PeerIdentity::Agent(aid(&idj)),
                            Some(addr),
                            ipj,
                            Millis(now),
                        );
                        let cj = self.nodes[j].ep.connected(
                            PeerIdentity::Agent(aid(&idi)),
                            None,
                            ipi,
                            Millis(now),
                        );
                        self.links.insert((i, ci), (j, cj));
                        self.links.insert((j, cj), (i, ci));
                    }
                    _ => self.nodes[i].ep.dial_failed(&addr, Millis(now)),
                }
            }
            Action::Event(e) => self.event(i, e),
        }
    }

    fn event(&mut self, i: usize, e: Event) {
        let now = self.now;
        let n = &mut self.nodes[i];
        match e {
            Event::Serve { conn, id, items } => {
                if n.behaviour == Behaviour::Silent {
                    return;
                }
                let object = |n: &Node, a: &str| {
                    n.objects.get(a).cloned().map(|mut b| {
                        if n.behaviour == Behaviour::Tamper {
                            b[0] ^= 1;
                        }
                        b
                    })
                };
                let mut found = Vec::new();
                let mut answered = Vec::new();
                for item in items {
                    let bytes = match &item {
                        Item::Root(v) if *v <= n.ep.root_version => {
                            Some(format!("toy root {v}").into_bytes())
                        }
                        Item::Root(_) => None,
                        Item::Release(c) => n.releases.get(c.as_str()).cloned(),
                        Item::Object(a) => object(n, a),
                        Item::Blob(_) => None,
                        Item::Entries(e) => {
                            let Some(entries) = n.bundle_entries(&e.bundle) else {
                                found.push(Found { item, bytes: None });
                                continue;
                            };
                            match e.indices(entries.len()) {
                                Ok(ix) => {
                                    for k in ix {
                                        let bytes = object(n, &entries[k]);
                                        answered.push(EntryFound(k as u32, bytes));
                                    }
                                }
                                Err(bad) => {
                                    return n.ep.serve_refused(conn, id, bad, "toy", Millis(now))
                                }
                            }
                            continue;
                        }
                    };
                    found.push(Found { item, bytes });
                }
                n.ep.serve_part(conn, id, found, answered, true, Millis(now));
            }
            Event::VerifyRelease {
                fetch,
                release,
                head,
                roots,
                ..
            } => {
                let (channel, seq, manifest, valid): ToyRelease =
                    codec::decode("toy release", &release, 1 << 16).unwrap();
                // Toy rotation: every newer root replaces the release keys
                // that signed our head, so our floor stops binding.
                if let Some((v, _)) = roots.last() {
                    let ours = n.seq(&channel);
                    n.distrusted.insert(ours);
                    n.ep.set_root_version(*v);
                    n.ep.set_floor_unbound(&channel, true);
                }
                if !valid || n.distrusted.contains(&seq) {
                    return n.ep.release_rejected(
                        fetch,
                        VerifyFailure::Invalid("signature_threshold"),
                        "toy",
                        Millis(now),
                    );
                }
                if seq <= n.seq(&channel) && !n.ep.unbound_floors.contains(&channel) {
                    return n.ep.release_rejected(
                        fetch,
                        VerifyFailure::Rollback,
                        "toy",
                        Millis(now),
                    );
                }
                let head = Head {
                    sequence: seq,
                    bundle: manifest.clone(),
                    ..head
                };
                n.pending.insert(fetch, (head, manifest.clone()));
                n.releases.insert(format!("pending-{fetch}"), release);
                n.ep.release_verified(fetch, Millis(now));
                n.want_missing(fetch, &manifest, now);
            }
            Event::Object { address, bytes, .. } => {
                assert_eq!(
                    sha256_address(&bytes),
                    address,
                    "endpoint passed a bad object"
                );
                n.object_bytes_in += bytes.len();
                n.objects_in += 1;
                n.objects.insert(address.into_string(), bytes);
            }
            Event::FetchIdle { fetch } => {
                let Some((head, manifest)) = n.pending.get(&fetch).cloned() else {
                    return;
                };
                if !n.missing(&manifest).is_empty() {
                    return n.want_missing(fetch, &manifest, now);
                }
                n.pending.remove(&fetch);
                if let Some(r) = n.releases.remove(&format!("pending-{fetch}")) {
                    n.releases.insert(head.channel.clone(), r);
                }
                n.ep.set_head(head, Millis(now));
                n.ep.fetch_complete(fetch, Millis(now));
            }
            Event::FetchFailed { fetch, .. } => {
                n.pending.remove(&fetch);
                n.releases.remove(&format!("pending-{fetch}"));
            }
            Event::Rejected { peer, reason, .. } => n
                .rejections
                .push((peer.name().to_owned(), reason.to_string())),
            Event::PeerUp { .. }
            | Event::PeerDown { .. }
            | Event::StatusChanged
            | Event::StatusDropped { .. }
            | Event::BlobPiece { .. } => {}
        }
    }

    /// Runs the virtual clock for `ms`, jumping to the next wake-up.
    fn run(&mut self, ms: u64) {
        let end = self.now + ms;
        let mut steps = 0;
        while self.now <= end {
            steps += 1;
            assert!(steps < 1_000_000, "simulation does not settle");
            let now = self.now;
            for n in &mut self.nodes {
                if n.ep.poll_timeout().is_some_and(|t| t.as_u64() <= now) {
                    n.ep.handle_timeout(Millis(now), UnixMillis(now));
                }
            }
            self.settle();
            let next_timer = self
                .nodes
                .iter()
                .filter_map(|n| n.ep.poll_timeout().map(Millis::as_u64))
                .min();
            let next_msg = self.queue.iter().map(|(t, _)| *t).min();
            let next = [next_timer, next_msg]
                .into_iter()
                .flatten()
                .min()
                .unwrap_or(end + 1);
            self.now = next.max(self.now + 1);
        }
    }

    fn converged(&self, seq: u64) -> bool {
        self.nodes.iter().all(|n| n.seq("stable") == seq)
    }

    /// Node `i` restarts: its connections break, its endpoint starts
    /// afresh (its store is kept).
    fn restart(&mut self, i: usize) {
        let now = self.now;
        let mine: Vec<((usize, ConnId), (usize, ConnId))> = self
            .links
            .iter()
            .filter(|((a, _), _)| *a == i)
            .map(|(k, v)| (*k, *v))
            .collect();
        for (x, y) in mine {
            self.links.remove(&x);
            self.links.remove(&y);
            self.queue.push((now + LATENCY, Wire::Closed(y.0, y.1)));
        }
        let config = self.nodes[i].ep.config().clone();
        self.nodes[i].ep = new_ep(config);
        self.nodes[i].pending.clear();
    }

    /// Wants node `i` sent, in order.
    fn wants_from(&self, i: usize) -> Vec<Vec<Item>> {
        // Wants are delivered to the peer; find those whose sender is `i`
        // by the link they arrived on (a line of two: the other node).
        self.delivered
            .iter()
            .filter(|(to, _)| *to != i)
            .filter_map(|(_, m)| match m {
                Message::Want { items, .. } => Some(items.clone()),
                _ => None,
            })
            .collect()
    }

    /// How often node `to` received the record of `agent` dated `time`.
    fn record_copies(&self, to: usize, agent: &str, time: u64) -> usize {
        self.delivered
            .iter()
            .filter(|(t, _)| *t == to)
            .filter_map(|(_, m)| match m {
                Message::Status(rs) => Some(rs),
                _ => None,
            })
            .flatten()
            .filter(|s| {
                let r: StatusRecord = codec::decode("record", &s.record, 1 << 16).unwrap();
                r.agent_id == agent && r.time == time
            })
            .count()
    }
}

fn objects(n: usize, tag: &str) -> Vec<Vec<u8>> {
    (0..n)
        .map(|i| format!("{tag}-object-{i}-{}", "x".repeat(200)).into_bytes())
        .collect()
}

#[test]
fn a_release_travels_down_a_line_of_five() {
    let mut sim = Sim::line(5);
    sim.run(3_000);
    sim.publish(0, 1, &objects(10, "v1"), true);
    sim.run(60_000);
    assert!(
        sim.converged(1),
        "{:?}",
        sim.nodes
            .iter()
            .map(|n| n.seq("stable"))
            .collect::<Vec<_>>()
    );
    for n in &sim.nodes {
        assert_eq!(n.objects.len(), 11, "{}", n.id);
        assert!(n.rejections.is_empty(), "{}: {:?}", n.id, n.rejections);
    }
    // A second release entering in the middle reaches both ends.
    sim.publish(2, 2, &objects(10, "v2"), true);
    sim.run(60_000);
    assert!(sim.converged(2));
}

#[test]
fn push_is_faster_than_anti_entropy() {
    let mut sim = Sim::line(3);
    sim.run(3_000);
    sim.publish(0, 1, &objects(3, "v1"), true);
    // Well under one anti-entropy period per hop.
    sim.run(1_000);
    assert!(sim.converged(1));
}

#[test]
fn only_missing_objects_move() {
    let mut sim = Sim::line(2);
    sim.run(2_000);
    let mut objs = objects(100, "v1");
    sim.publish(0, 1, &objs, true);
    sim.run(30_000);
    assert!(sim.converged(1));
    let (bytes0, n0) = (sim.nodes[1].object_bytes_in, sim.nodes[1].objects_in);
    assert_eq!(n0, 101);
    objs[42] = b"changed object".to_vec();
    let manifest = sim.publish(0, 2, &objs, true);
    sim.run(30_000);
    assert!(sim.converged(2));
    let moved = sim.nodes[1].object_bytes_in - bytes0;
    let expected = sim.nodes[0].objects[&manifest].len() + b"changed object".len();
    assert_eq!(sim.nodes[1].objects_in - n0, 2);
    assert_eq!(moved, expected);
}

#[test]
fn objects_move_in_bounded_batches() {
    let mut c0 = cfg(0, vec![1]);
    c0.limits.max_items_per_want = 7;
    c0.limits.max_objects_per_want = 7;
    c0.limits.max_outstanding_wants = 2;
    let mut c1 = cfg(1, vec![]);
    c1.limits.max_items_per_want = 7;
    let mut sim = Sim::new(vec![c0, c1]);
    sim.run(2_000);
    sim.publish(1, 1, &objects(50, "v1"), true);
    sim.run(30_000);
    assert!(sim.converged(1));
    assert_eq!(sim.max_open_wants[&0], 2);
}

#[test]
fn a_tampered_object_cuts_the_peer_off_and_nothing_bad_is_stored() {
    let mut sim = Sim::line(2);
    sim.nodes[1].behaviour = Behaviour::Tamper;
    sim.run(2_000);
    sim.publish(1, 1, &objects(5, "v1"), true);
    sim.run(10_000);
    assert_eq!(sim.nodes[0].seq("stable"), 0);
    assert!(sim.nodes[0].objects.is_empty());
    assert_eq!(
        sim.nodes[0].rejections[0],
        ("a1".to_string(), "object_hash_mismatch".to_string())
    );
    assert!(sim.nodes[0].ep.is_banned("a1", Millis(sim.now)));
}

#[test]
fn a_rejected_release_cuts_the_peer_off() {
    let mut sim = Sim::line(2);
    sim.run(2_000);
    sim.publish(1, 1, &objects(5, "v1"), false);
    sim.run(10_000);
    assert_eq!(sim.nodes[0].seq("stable"), 0);
    assert_eq!(sim.nodes[0].rejections[0].1, "signature_threshold");
    // No object was even asked for.
    assert_eq!(sim.nodes[0].objects_in, 0);
}

#[test]
fn a_rolled_back_head_is_refused() {
    let mut sim = Sim::line(2);
    sim.run(2_000);
    sim.publish(0, 5, &objects(2, "v5"), true);
    // The peer advertises sequence 9 but serves a release with sequence 3.
    let m = sim.publish(1, 9, &objects(2, "v9"), true);
    sim.nodes[1]
        .releases
        .insert("stable".into(), toy_release("stable", 3, &m, true));
    sim.run(10_000);
    assert_eq!(sim.nodes[0].seq("stable"), 5);
    assert!(sim.nodes[0]
        .rejections
        .iter()
        .any(|(p, r)| p == "a1" && r == "rollback"));
}

#[test]
fn a_new_epoch_head_with_a_lower_sequence_is_fetched_and_nobody_is_banned() {
    let mut sim = Sim::line(3);
    sim.run(2_000);
    // A stolen key's release at the top reaches everyone.
    sim.publish(0, u64::MAX, &objects(2, "max"), true);
    sim.run(10_000);
    assert!(sim.converged(u64::MAX));
    // Node 2 follows root v2 (new release keys) from its own source and
    // adopts the new epoch's release 1 there.
    let n2 = &mut sim.nodes[2];
    n2.distrusted.insert(u64::MAX);
    n2.ep.set_root_version(2);
    n2.ep.set_floor_unbound("stable", true);
    sim.publish(2, 1, &objects(2, "epoch2"), true);
    sim.run(30_000);
    // Node 1 (still on root v1, floor bound) fetches the lower head because
    // it comes with a newer root, then node 0 from node 1; node 2 refuses
    // the old maximum its peers still advertised without banning them.
    for n in &sim.nodes {
        assert_eq!(n.seq("stable"), 1, "{}", n.id);
        assert!(n.rejections.is_empty(), "{}: {:?}", n.id, n.rejections);
        for other in ["a0", "a1", "a2"] {
            assert!(
                !n.ep.is_banned(other, Millis(sim.now)),
                "{} banned {other}",
                n.id
            );
        }
    }
    // Inside the new epoch a rolled-back head is still refused.
    let m = sim.publish(0, 7, &objects(2, "v7"), true);
    sim.nodes[0]
        .releases
        .insert("stable".into(), toy_release("stable", 1, &m, true));
    sim.nodes[1].ep.set_floor_unbound("stable", false);
    sim.run(10_000);
    assert_eq!(sim.nodes[1].seq("stable"), 1);
    assert!(sim.nodes[1]
        .rejections
        .iter()
        .any(|(p, r)| p == "a0" && r == "rollback"));
}

#[test]
fn a_silent_peer_times_out_and_another_serves() {
    // Node 0 knows a silent peer (1) and an honest one (2), both with v1.
    let mut sim = Sim::new(vec![cfg(0, vec![1, 2]), cfg(1, vec![]), cfg(2, vec![])]);
    sim.nodes[1].behaviour = Behaviour::Silent;
    sim.run(2_000);
    let objs = objects(5, "v1");
    // Only the silent peer has the head at first.
    sim.publish(1, 1, &objs, true);
    sim.run(20_000);
    assert_eq!(sim.nodes[0].seq("stable"), 0);
    assert_eq!(
        sim.nodes[0].rejections,
        vec![("a1".to_string(), "timeout".to_string())]
    );
    sim.publish(2, 1, &objs, true);
    sim.run(30_000);
    assert_eq!(sim.nodes[0].seq("stable"), 1);
    // Node 2 may also have tried the silent peer; nobody blamed anyone else.
    for n in &sim.nodes {
        assert!(
            n.rejections
                .iter()
                .all(|(p, r)| p == "a1" && r == "timeout"),
            "{:?}",
            n.rejections
        );
    }
}

#[test]
fn partitioned_groups_diverge_then_converge() {
    let all: Vec<usize> = (0..6).collect();
    let mut sim = Sim::new(
        (0..6)
            .map(|i| cfg(i, all.iter().copied().filter(|j| *j != i).collect()))
            .collect(),
    );
    sim.run(3_000);
    sim.partition(&[0, 1, 2], &[3, 4, 5]);
    sim.publish(0, 1, &objects(4, "left"), true);
    sim.run(20_000);
    assert_eq!(
        (0..6)
            .map(|i| sim.nodes[i].seq("stable"))
            .collect::<Vec<_>>(),
        vec![1, 1, 1, 0, 0, 0]
    );
    sim.publish(4, 2, &objects(4, "right"), true);
    sim.run(20_000);
    assert_eq!(
        (0..6)
            .map(|i| sim.nodes[i].seq("stable"))
            .collect::<Vec<_>>(),
        vec![1, 1, 1, 2, 2, 2]
    );
    sim.heal();
    sim.run(60_000);
    assert!(sim.converged(2));
}

#[test]
fn status_gossip_spreads_and_newest_wins() {
    let mut sim = Sim::line(5);
    for i in 0..5 {
        let r = StatusRecord {
            agent_id: aid("set-by-the-endpoint"),
            channel: "stable".into(),
            labels: BTreeMap::new(),
            sequence: 0,
            bundle: String::new(),
            health: "healthy".into(),
            time: 0,
            rollout: None,
            listen: None,
            values_digest: None,
        };
        let now = sim.now;
        sim.nodes[i].ep.set_local_status(r, UnixMillis(now));
    }
    sim.run(60_000);
    let now = sim.now;
    for n in &sim.nodes {
        assert_eq!(n.ep.status(UnixMillis(now)).count(), 5, "{}", n.id);
    }
    let mut r = sim.nodes[4]
        .ep
        .status(UnixMillis(now))
        .find(|r| r.agent_id == "a4")
        .unwrap()
        .clone();
    r.health = "failed".into();
    sim.nodes[4].ep.set_local_status(r, UnixMillis(now));
    sim.run(60_000);
    let now = sim.now;
    let a4 = sim.nodes[0]
        .ep
        .status(UnixMillis(now))
        .find(|r| r.agent_id == "a4");
    assert_eq!(a4.unwrap().health, "failed");
}

#[test]
fn status_records_from_the_future_or_about_us_are_ignored() {
    let mut ep = new_ep(cfg(0, vec![]));
    let now = 1_000_000;
    let c = hello(&mut ep, "a1", now);
    ep.handle_message(
        c,
        Message::status(vec![
            signed_by("a0", &record("a0", "failed", now)),
            signed_by("a9", &record("a9", "failed", now + 3_600_000)),
            signed_by("a2", &record("a2", "healthy", now)),
        ]),
        Millis(now),
        UnixMillis(now),
    );
    assert_eq!(status_ids(&ep, now), vec!["a2"]);
    assert!(drain_rejections(&mut ep).is_empty());
}

#[test]
fn forged_status_records_are_refused_and_cut_the_peer_off() {
    let now = 1_000_000;
    let bundle = sha256_address(b"bundle");
    for (what, forged) in [
        // A fleet member's own key, a record about another agent.
        (
            "id mismatch",
            signed_by("evil", &record("a2", "failed", now)),
        ),
        // The victim's "certificate", the attacker's signature.
        ("bad signature", {
            let mut s = signed_by("a2", &record("a2", "failed", now));
            s.sig = test_signature("evil", &SignedStatus::signed_message(&s.record));
            s
        }),
        // A genuine record altered after signing.
        ("altered", {
            let mut s = signed_by("a2", &record("a2", "healthy", now));
            s.record = codec::encode(&record("a2", "failed", now));
            s
        }),
    ] {
        let mut ep = new_ep(cfg(0, vec![]));
        // a2's real record first.
        let honest = hello(&mut ep, "a3", now);
        ep.handle_message(
            honest,
            Message::status(vec![signed_by("a2", &record("a2", "healthy", now - 10))]),
            Millis(now),
            UnixMillis(now),
        );
        let c = hello(&mut ep, "evil", now);
        ep.handle_message(
            c,
            Message::status(vec![forged]),
            Millis(now),
            UnixMillis(now),
        );
        let mut rejected = Vec::new();
        let mut dropped = Vec::new();
        while let Some(a) = ep.poll_action() {
            match a {
                Action::Event(Event::Rejected { reason, peer, .. }) => {
                    rejected.push((reason.to_string(), peer))
                }
                Action::Event(Event::StatusDropped { reason, count, .. }) => {
                    dropped.push((reason.label(), count))
                }
                _ => {}
            }
        }
        assert_eq!(
            rejected,
            vec![(
                "forged_status".to_owned(),
                PeerIdentity::Agent(cairn_core::AgentId::parse("evil").unwrap())
            )],
            "{what}"
        );
        if what != "altered" {
            assert_eq!(dropped, vec![("forged", 1)], "{what}");
        }
        assert!(ep.is_banned("evil", Millis(now)), "{what}");
        // a2's own record stands, and the breaker sees no failure.
        let a2 = ep
            .status(UnixMillis(now))
            .find(|r| r.agent_id == "a2")
            .unwrap();
        assert_eq!(a2.health, "healthy", "{what}");
        assert_eq!(breaker_inputs(&ep, &bundle, now), (1, 0), "{what}");
    }
}

#[test]
fn breaker_inputs_count_only_verified_records() {
    let now = 1_000_000;
    let bundle = sha256_address(b"bundle");
    let mut ep = new_ep(cfg(0, vec![]));
    let c = hello(&mut ep, "a1", now);
    // Three genuine adopters, one of them failed.
    ep.handle_message(
        c,
        Message::status(vec![
            signed_by("a1", &record("a1", "healthy", now)),
            signed_by("a2", &record("a2", "failed", now)),
            signed_by("a3", &record("a3", "healthy", now)),
        ]),
        Millis(now),
        UnixMillis(now),
    );
    assert_eq!(breaker_inputs(&ep, &bundle, now), (3, 1));
    // A fleet member forges three "failed" records for agents that do not
    // exist and one for a3: none counts.
    let e = hello(&mut ep, "evil", now);
    let forged = ["x1", "x2", "x3", "a3"]
        .iter()
        .map(|id| signed_by("evil", &record(id, "failed", now + 1)))
        .collect::<Vec<_>>();
    ep.handle_message(e, Message::status(forged), Millis(now), UnixMillis(now));
    assert_eq!(breaker_inputs(&ep, &bundle, now), (3, 1));
}

#[test]
fn expired_status_records_are_dropped_and_not_relayed() {
    let mut c = cfg(0, vec![]);
    c.status_ttl_ms = 60_000;
    let ttl = c.status_ttl_ms;
    let mut ep = new_ep(c);
    let now = 1_000_000;
    let conn = hello(&mut ep, "a1", now);
    ep.handle_message(
        conn,
        Message::status(vec![
            signed_by("a2", &record("a2", "failed", now - 1_000)),
            // Already older than the TTL on arrival.
            signed_by("a3", &record("a3", "failed", now - ttl - 1)),
        ]),
        Millis(now),
        UnixMillis(now),
    );
    assert_eq!(status_ids(&ep, now), vec!["a2"]);
    let later = now + ttl;
    ep.handle_timeout(Millis(later), UnixMillis(later));
    // Our own record is kept fresh; a2's aged out of the view...
    assert_eq!(status_ids(&ep, later), vec!["a0"]);
    // ...and is not relayed to anyone.
    while ep.poll_action().is_some() {}
    ep.handle_message(
        conn,
        Message::StatusRequest,
        Millis(later),
        UnixMillis(later),
    );
    let mut relayed = Vec::new();
    while let Some(a) = ep.poll_action() {
        if let Action::Send {
            message: Message::Status(rs),
            ..
        } = a
        {
            relayed.extend(
                rs.iter()
                    .map(|s| s.decode_record(&MeshLimits::default()).unwrap().agent_id),
            );
        }
    }
    assert_eq!(relayed, vec!["a0"]);
    // An older copy relayed by a slow peer does not bring it back.
    ep.handle_message(
        conn,
        Message::status(vec![signed_by("a2", &record("a2", "failed", now - 1_000))]),
        Millis(later),
        UnixMillis(later),
    );
    assert_eq!(status_ids(&ep, later), vec!["a0"]);
}

#[test]
fn a_flood_cannot_evict_real_records() {
    let mut c = cfg(0, vec![]);
    c.limits.max_status_records = 4;
    c.status_ttl_ms = 60_000;
    let mut ep = new_ep(c);
    let now = 1_000_000;
    let conn = hello(&mut ep, "a1", now);
    while ep.poll_action().is_some() {}
    ep.handle_timeout(Millis(now), UnixMillis(now));
    ep.handle_message(
        conn,
        Message::status(vec![
            signed_by("a1", &record("a1", "healthy", now - 30_000)),
            signed_by("a2", &record("a2", "healthy", now - 20_000)),
            signed_by("a3", &record("a3", "failed", now - 10_000)),
        ]),
        Millis(now),
        UnixMillis(now),
    );
    let real = vec!["a0", "a1", "a2", "a3"];
    assert_eq!(status_ids(&ep, now), real);
    // 4,096 records dated in the future: forged (about other agents, by
    // the sender's key), beyond the skew, or genuine members' records
    // that find the table full of live records.
    let flood: Vec<SignedStatus> = (0..4096)
        .map(|i| {
            let id = format!("f{i}");
            match i % 3 {
                0 => signed_by("a1", &record(&id, "failed", now + 60_000)),
                1 => signed_by(&id, &record(&id, "failed", now + 3_600_000)),
                _ => signed_by(&id, &record(&id, "failed", now + 1_000)),
            }
        })
        .collect();
    let (forged, genuine): (Vec<_>, Vec<_>) =
        flood.into_iter().enumerate().partition(|(i, _)| i % 3 == 0);
    let flood_conn = hello(&mut ep, "a9", now);
    ep.handle_message(
        flood_conn,
        Message::status(genuine.into_iter().map(|(_, s)| s)),
        Millis(now),
        UnixMillis(now),
    );
    assert_eq!(status_ids(&ep, now), real);
    assert!(!ep.is_banned("a9", Millis(now)));
    ep.handle_message(
        flood_conn,
        Message::status(forged.into_iter().map(|(_, s)| s)),
        Millis(now),
        UnixMillis(now),
    );
    assert_eq!(status_ids(&ep, now), real);
    assert!(ep.is_banned("a9", Millis(now)));
    // Once a1's record expires, a genuine newcomer takes its slot, and
    // only that one.
    let later = now + 30_001;
    let conn = hello(&mut ep, "a2", later);
    ep.handle_message(
        conn,
        Message::status(vec![
            signed_by("n1", &record("n1", "healthy", later)),
            signed_by("n2", &record("n2", "healthy", later)),
        ]),
        Millis(later),
        UnixMillis(later),
    );
    assert_eq!(status_ids(&ep, later), vec!["a0", "a2", "a3", "n1"]);
}

/// `n` healthy records `n0..` and `failed` failure reports `f0..`, all
/// on the same bundle, each signed by its agent.
fn fleet_records(n: usize, failed: usize, now: u64) -> Vec<SignedStatus> {
    (0..n)
        .map(|i| (format!("n{i}"), "healthy"))
        .chain((0..failed).map(|i| (format!("f{i}"), "failed")))
        .map(|(id, health)| signed_by(&id, &record(&id, health, now - 1_000)))
        .collect()
}

#[test]
fn the_status_sample_keeps_the_lowest_ranks_and_every_failure() {
    let now = 1_000_000;
    let records = fleet_records(100, 5, now);
    let mut lowest: Vec<(u64, String)> = (0..100)
        .map(|i| {
            let id = format!("n{i}");
            (status_sample_rank(&aid(&id)), id)
        })
        .collect();
    lowest.sort();
    let mut expected: Vec<String> = lowest.iter().take(8).map(|(_, id)| id.clone()).collect();
    expected.extend((0..5).map(|i| format!("f{i}")));
    expected.push("a0".into());
    expected.sort();
    // Whatever order and batching the records arrive in, every endpoint
    // keeps the same sample: the 8 lowest ranks, plus every failure
    // report and its own record.
    for (order, batch) in [(false, 105), (true, 7), (false, 1)] {
        let mut c = cfg(0, vec![]);
        c.status_sample = 8;
        let mut ep = new_ep(c);
        ep.handle_timeout(Millis(now), UnixMillis(now));
        let conn = hello(&mut ep, "a1", now);
        let mut rs = records.clone();
        if order {
            rs.reverse();
        }
        for chunk in rs.chunks(batch) {
            ep.handle_message(
                conn,
                Message::status(chunk.to_vec()),
                Millis(now),
                UnixMillis(now),
            );
        }
        let mut held = status_ids(&ep, now);
        held.sort();
        assert_eq!(held, expected, "order reversed {order}, batches of {batch}");
        assert!(!ep.is_banned("a1", Millis(now)));
        // What it gossips on is what it holds: a full answer carries the
        // sample and the failures, not the fleet.
        while ep.poll_action().is_some() {}
        ep.handle_message(conn, Message::StatusRequest, Millis(now), UnixMillis(now));
        let sent = std::iter::from_fn(|| ep.poll_action())
            .find_map(|a| match a {
                Action::Send {
                    message: Message::Status(rs),
                    ..
                } => Some(rs.len()),
                _ => None,
            })
            .unwrap();
        assert_eq!(sent, expected.len());
    }
}

/// The digest `ep` sends a new peer `id` on connecting.
fn digest_on_hello(ep: &mut Endpoint, id: &str, now: u64) -> (ConnId, Vec<String>) {
    let c = ep.connected(PeerIdentity::Agent(aid(id)), None, None, Millis(now));
    ep.handle_message(
        c,
        Message::Hello(Hello::new(None)),
        Millis(now),
        UnixMillis(now),
    );
    let mut ids = Vec::new();
    while let Some(a) = ep.poll_action() {
        if let Action::Send {
            message: Message::StatusDigest(d),
            ..
        } = a
        {
            ids.extend(d.into_iter().map(|(id, _)| id.to_string()));
        }
    }
    ids.sort();
    (c, ids)
}

#[test]
fn our_record_is_offered_only_while_a_peer_could_keep_it() {
    let now = 1_000_000;
    let records = fleet_records(100, 0, now);
    let ours = status_sample_rank(&aid("a0"));
    let below = (0..100)
        .filter(|i| status_sample_rank(&aid(&format!("n{i}"))) < ours)
        .count();
    assert!(below >= 1, "a0 ranks lowest of the fleet: pick other ids");
    // Not full (room for everyone): our record is offered with the rest.
    // Full, with a lower rank than ours in it: not offered, since every
    // peer with the same sample would drop it unread; still served when
    // pulled; offered again once it reports a failure.
    for (sample, offered) in [(4_096, true), (1, false)] {
        let mut c = cfg(0, vec![]);
        c.status_sample = sample;
        let mut ep = new_ep(c);
        ep.handle_timeout(Millis(now), UnixMillis(now));
        ep.set_local_status(record("a0", "healthy", 0), UnixMillis(now));
        let feed = hello(&mut ep, "a1", now);
        ep.handle_message(
            feed,
            Message::status(records.clone()),
            Millis(now),
            UnixMillis(now),
        );
        while ep.poll_action().is_some() {}
        let (conn, digest) = digest_on_hello(&mut ep, "a2", now);
        assert_eq!(
            digest.contains(&"a0".to_string()),
            offered,
            "sample {sample}: {digest:?}"
        );
        assert_eq!(digest.len(), sample.min(100) + usize::from(offered));
        ep.handle_message(
            conn,
            Message::StatusPull(vec![aid("a0")]),
            Millis(now),
            UnixMillis(now),
        );
        let served = std::iter::from_fn(|| ep.poll_action()).any(|a| {
            matches!(a, Action::Send { message: Message::Status(rs), .. }
                if rs.len() == 1 && rs[0].decoded(&MeshLimits::default()).unwrap().agent_id == "a0")
        });
        assert!(served, "sample {sample}: a pulled record is served");
        ep.set_local_status(record("a0", "failed", 0), UnixMillis(now + 1));
        let (_, digest) = digest_on_hello(&mut ep, "a3", now + 1);
        assert!(digest.contains(&"a0".to_string()), "{digest:?}");
    }
}

#[test]
fn breaker_counts_failures_exactly_and_estimates_adopters_beyond_the_sample() {
    let now = 1_000_000;
    let bundle = sha256_address(b"bundle");
    let records = fleet_records(2_000, 100, now);
    let default = DEFAULT_STATUS_SAMPLE;
    for (sample, exact) in [(4_096, true), (256, false), (64, false), (default, false)] {
        let mut c = cfg(0, vec![]);
        c.status_sample = sample;
        let mut ep = new_ep(c);
        ep.handle_timeout(Millis(now), UnixMillis(now));
        let conn = hello(&mut ep, "a1", now);
        for chunk in records.chunks(500) {
            ep.handle_message(
                conn,
                Message::status(chunk.to_vec()),
                Millis(now),
                UnixMillis(now),
            );
        }
        let (adopted, failed) = breaker_inputs(&ep, &bundle, now);
        assert_eq!(failed, 100, "sample {sample}: failures are exact");
        if exact {
            assert_eq!(adopted, 2_100);
            assert_eq!(status_ids(&ep, now).len(), 2_101);
        } else {
            // A bottom-k estimate: within a few standard errors (1/sqrt k)
            // of the 2,100 adopters, from k + 100 records held.
            let tolerance = 2_100.0 * 3.0 / (sample as f64).sqrt();
            assert!(
                (adopted as f64 - 2_100.0).abs() <= tolerance,
                "sample {sample}: estimated {adopted} adopters of 2,100"
            );
            assert!(status_ids(&ep, now).len() <= sample + 101);
        }
    }
}

#[test]
fn our_record_is_signed_again_only_when_it_changes_or_ages() {
    let mut c = cfg(0, vec![]);
    c.status_refresh_ms = 60_000;
    let mut ep = new_ep(c);
    let now = 1_000_000;
    ep.set_local_status(record("ignored", "healthy", 0), UnixMillis(now));
    let time = |ep: &Endpoint| ep.status(UnixMillis(now)).next().unwrap().time;
    assert_eq!(time(&ep), now);
    // Unchanged two seconds later: the same signed record.
    ep.set_local_status(record("a0", "healthy", 0), UnixMillis(now + 2_000));
    assert_eq!(time(&ep), now);
    // Changed: signed anew.
    ep.set_local_status(record("a0", "failed", 0), UnixMillis(now + 4_000));
    let r = ep.status(UnixMillis(now)).next().unwrap().clone();
    assert_eq!((r.time, r.health.as_str()), (now + 4_000, "failed"));
    // Our listen address goes into our record.
    assert_eq!(r.listen.as_deref(), Some(addr(0).as_str()));
    // Aged past the refresh period: signed anew by the timer.
    ep.handle_timeout(Millis(now + 64_000), UnixMillis(now + 64_000));
    assert_eq!(
        ep.status(UnixMillis(now)).next().unwrap().time,
        now + 64_000
    );
}

#[test]
fn addresses_are_learned_only_from_signed_records_one_per_agent() {
    let now = 1_000_000;
    let mut ep = new_ep(cfg(0, vec![]));
    let conn = hello(&mut ep, "a1", now);
    let with_listen = |id: &str, listen: &str, t: u64| StatusRecord {
        listen: Some(listen.into()),
        values_digest: None,
        ..record(id, "healthy", t)
    };
    ep.handle_message(
        conn,
        Message::status(vec![
            signed_by("a2", &with_listen("a2", "10.0.0.2:7440", now)),
            // Not unicast, or no port: never dialed.
            signed_by("m1", &with_listen("m1", "224.0.0.1:7440", now)),
            signed_by("m2", &with_listen("m2", "255.255.255.255:7440", now)),
            signed_by("m3", &with_listen("m3", "0.0.0.0:7440", now)),
            signed_by("m4", &with_listen("m4", "10.0.0.4:0", now)),
            signed_by("m5", &with_listen("m5", "[ff02::1]:7440", now)),
        ]),
        Millis(now),
        UnixMillis(now),
    );
    let table = |ep: &Endpoint| -> Vec<(String, Option<String>)> {
        ep.peer_table()
            .map(|e| (e.addr.clone(), e.agent_id.as_ref().map(|a| a.to_string())))
            .collect()
    };
    assert_eq!(
        table(&ep),
        vec![("10.0.0.2:7440".to_owned(), Some("a2".to_owned()))]
    );
    // a2 moves: its newer signed record replaces the address.
    ep.handle_message(
        conn,
        Message::status(vec![signed_by(
            "a2",
            &with_listen("a2", "10.0.0.22:7440", now + 1),
        )]),
        Millis(now + 1),
        UnixMillis(now + 1),
    );
    assert_eq!(
        table(&ep),
        vec![("10.0.0.22:7440".to_owned(), Some("a2".to_owned()))]
    );
    // A fleet member cannot point others at addresses for a2: a forged
    // record is refused and the sender cut off.
    let evil = hello(&mut ep, "evil", now + 2);
    let forged = (0..500)
        .map(|i| {
            signed_by(
                "evil",
                &with_listen("a2", &format!("10.66.{}.{}:22", i / 250, i % 250), now + 2),
            )
        })
        .collect::<Vec<_>>();
    ep.handle_message(
        evil,
        Message::status(forged),
        Millis(now + 2),
        UnixMillis(now + 2),
    );
    assert_eq!(
        table(&ep),
        vec![("10.0.0.22:7440".to_owned(), Some("a2".to_owned()))]
    );
    // The dialer only ever sees that address.
    let mut dials = Vec::new();
    for t in 0..30 {
        ep.handle_timeout(Millis(now + 3 + t * 1_000), UnixMillis(now + 3 + t * 1_000));
        while let Some(a) = ep.poll_action() {
            if let Action::Dial { addr } = a {
                ep.dial_failed(&addr, Millis(now + 3 + t * 1_000));
                dials.push(addr);
            }
        }
    }
    assert!(!dials.is_empty());
    assert!(dials.iter().all(|d| d == "10.0.0.22:7440"), "{dials:?}");
}

#[test]
fn dialable_addresses() {
    for ok in [
        "10.0.0.1:7440",
        "127.0.3.4:1",
        "[fd00::1]:7440",
        "edge-7.local:7440",
    ] {
        assert!(is_dialable(ok), "{ok}");
    }
    for bad in [
        "0.0.0.0:7440",
        "0.1.2.3:7440",
        "224.0.0.1:7440",
        "255.255.255.255:7440",
        "[::]:7440",
        "[ff02::1]:7440",
        "10.0.0.1:0",
        "10.0.0.1",
        "fd00::1:7440",
        "[10.0.0.1]:7440",
        "evil host:7440",
        "-x:7440",
        ":7440",
    ] {
        assert!(!is_dialable(bad), "{bad}");
    }
}

#[test]
fn stale_certificates_drop_records_without_blame() {
    let now = 1_000_000;
    let mut ep = new_ep(cfg(0, vec![]));
    let conn = hello(&mut ep, "a1", now);
    let rec = record("a2", "failed", now);
    let bytes = codec::encode(&rec);
    let stale = SignedStatus {
        cert: b"expired:a2".to_vec(),
        sig: test_signature("a2", &SignedStatus::signed_message(&bytes)),
        record: bytes,
    };
    ep.handle_message(
        conn,
        Message::status(vec![stale]),
        Millis(now),
        UnixMillis(now),
    );
    assert!(status_ids(&ep, now).is_empty());
    assert!(drain_rejections(&mut ep).is_empty());
    assert!(!ep.is_banned("a1", Millis(now)));
}

#[test]
fn peer_exchange_spreads_addresses() {
    let mut sim = Sim::line(4);
    sim.run(20_000);
    let known: BTreeSet<String> = sim.nodes[0]
        .ep
        .peer_table()
        .map(|e| e.addr.clone())
        .collect();
    assert!(
        known.contains(&addr(2)) && known.contains(&addr(3)),
        "{known:?}"
    );
}

#[test]
fn peer_table_is_bounded_and_keeps_seeds() {
    let mut c = cfg(0, vec![1]);
    c.limits.max_peer_table = 4;
    let mut ep = new_ep(c);
    ep.learn_peers((0..20).map(|i| PeerInfo {
        agent_id: None,
        addr: format!("10.9.0.{i}:7440"),
    }));
    let table: Vec<PeerEntry> = ep.peer_table().cloned().collect();
    assert_eq!(table.len(), 4);
    assert!(table.iter().any(|e| e.seed && e.addr == addr(1)));
}

fn hello(ep: &mut Endpoint, id: &str, now: u64) -> ConnId {
    let c = ep.connected(PeerIdentity::Agent(aid(id)), None, None, Millis(now));
    ep.handle_message(
        c,
        Message::Hello(Hello::new(None)),
        Millis(now),
        UnixMillis(now),
    );
    while ep.poll_action().is_some() {}
    c
}

fn drain_rejections(ep: &mut Endpoint) -> Vec<String> {
    let mut out = Vec::new();
    while let Some(a) = ep.poll_action() {
        if let Action::Event(Event::Rejected { reason, .. }) = a {
            out.push(reason.to_string());
        }
    }
    out
}

#[test]
fn protocol_violations_cut_the_peer_off() {
    let now = 1_000_000;
    let addr0 = sha256_address(b"x");
    // Message before hello.
    let mut ep = new_ep(cfg(0, vec![]));
    let c = ep.connected(
        PeerIdentity::Agent(cairn_core::AgentId::parse("p").unwrap()),
        None,
        None,
        Millis(now),
    );
    ep.handle_message(c, Message::Heads(vec![]), Millis(now), UnixMillis(now));
    assert_eq!(drain_rejections(&mut ep), vec!["no_hello"]);
    // Wrong protocol version.
    let mut ep = new_ep(cfg(0, vec![]));
    let c = ep.connected(
        PeerIdentity::Agent(cairn_core::AgentId::parse("p").unwrap()),
        None,
        None,
        Millis(now),
    );
    ep.handle_message(
        c,
        Message::Hello(Hello::speaking(99, 99, None)),
        Millis(now),
        UnixMillis(now),
    );
    assert_eq!(drain_rejections(&mut ep), vec!["protocol_version"]);
    // Unsolicited data.
    let mut ep = new_ep(cfg(0, vec![]));
    let c = hello(&mut ep, "p", now);
    ep.handle_message(
        c,
        Message::Data {
            id: 77,
            items: vec![],
            more: false,
            entries: vec![],
        },
        Millis(now),
        UnixMillis(now),
    );
    assert_eq!(drain_rejections(&mut ep), vec!["unsolicited"]);
    // Too many requests in flight.
    let mut ep = new_ep(cfg(0, vec![]));
    let c = hello(&mut ep, "p", now);
    let max = ep.config().limits.max_inbound_wants as u64;
    for id in 0..=max {
        ep.handle_message(
            c,
            Message::Want {
                id,
                items: vec![Item::Object(address(&addr0))],
            },
            Millis(now),
            UnixMillis(now),
        );
    }
    assert_eq!(drain_rejections(&mut ep), vec!["too_many_requests"]);
    // Garbage on the wire reported by the shell.
    let mut ep = new_ep(cfg(0, vec![]));
    let c = hello(&mut ep, "p", now);
    ep.handle_wire_error(c, WireFailure::OversizedFrame, "5 GB", Millis(now));
    assert_eq!(drain_rejections(&mut ep), vec!["oversized_frame"]);
    // ...and the peer stays banned: a reconnect is closed at once.
    let c2 = ep.connected(
        PeerIdentity::Agent(cairn_core::AgentId::parse("p").unwrap()),
        None,
        None,
        Millis(now + 1),
    );
    assert!(matches!(ep.poll_action(), Some(Action::Close { conn, .. }) if conn == c2));
    // After the ban it may come back.
    let later = now + ep.config().ban_base_ms + 1;
    let c3 = ep.connected(
        PeerIdentity::Agent(cairn_core::AgentId::parse("p").unwrap()),
        None,
        None,
        Millis(later),
    );
    assert!(matches!(ep.poll_action(), Some(Action::Send { conn, .. }) if conn == c3));
}

#[test]
fn operators_may_only_read_status() {
    let now = 1_000_000;
    let mut ep = new_ep(cfg(0, vec![]));
    let c = ep.connected(
        PeerIdentity::Operator("ops".into()),
        None,
        None,
        Millis(now),
    );
    ep.handle_message(
        c,
        Message::Hello(Hello::new(None)),
        Millis(now),
        UnixMillis(now),
    );
    while ep.poll_action().is_some() {}
    ep.handle_message(c, Message::StatusRequest, Millis(now), UnixMillis(now));
    assert!(matches!(
        ep.poll_action(),
        Some(Action::Send {
            message: Message::Status(_),
            ..
        })
    ));
    ep.handle_message(c, Message::Heads(vec![]), Millis(now), UnixMillis(now));
    assert_eq!(drain_rejections(&mut ep), vec!["operator_forbidden"]);
}

#[test]
fn duplicate_connections_keep_one() {
    let mut sim = Sim::new(vec![cfg(0, vec![1]), cfg(1, vec![0])]);
    sim.run(10_000);
    assert_eq!(sim.nodes[0].ep.connected_peers().len(), 1);
    assert_eq!(sim.nodes[1].ep.connected_peers().len(), 1);
}

#[test]
fn self_dials_are_remembered() {
    // A seed list that includes ourselves.
    let mut c = cfg(0, vec![0, 1]);
    c.listen = None;
    let mut sim = Sim::new(vec![c, cfg(1, vec![])]);
    sim.run(10_000);
    assert!(sim.nodes[0]
        .ep
        .peer_table()
        .any(|e| e.addr == addr(0) && e.is_self));
    assert_eq!(sim.nodes[0].ep.connected_peers().len(), 1);
}

#[test]
fn advertised_addresses() {
    assert_eq!(
        advertised_addr("0.0.0.0:7440", Some("10.0.0.2")).as_deref(),
        Some("10.0.0.2:7440")
    );
    assert_eq!(
        advertised_addr("[::]:7440", Some("fd00::2")).as_deref(),
        Some("[fd00::2]:7440")
    );
    assert_eq!(
        advertised_addr("edge.local:7440", Some("10.0.0.2")).as_deref(),
        Some("edge.local:7440")
    );
    assert_eq!(advertised_addr("nonsense", Some("10.0.0.2")), None);
}

#[test]
fn the_same_seed_gives_the_same_run() {
    let run = || {
        let mut sim = Sim::line(4);
        sim.run(2_000);
        sim.publish(0, 1, &objects(20, "v1"), true);
        sim.run(30_000);
        sim.nodes
            .iter()
            .map(|n| (n.objects_in, n.object_bytes_in))
            .collect::<Vec<_>>()
    };
    assert_eq!(run(), run());
}

// ----- protocol version 3: compact wants -------------------------------

fn entries_items(wants: &[Vec<Item>]) -> Vec<EntryRanges> {
    wants
        .iter()
        .flatten()
        .filter_map(|i| match i {
            Item::Entries(e) => Some(e.clone()),
            _ => None,
        })
        .collect()
}

#[test]
fn a_full_release_is_wanted_as_one_range_and_a_delta_as_one_entry() {
    let mut sim = Sim::line(2);
    sim.run(2_000);
    let mut objs = objects(300, "v1");
    let m1 = sim.publish(1, 1, &objs, true);
    sim.run(30_000);
    assert!(sim.converged(1));
    let wants = sim.wants_from(0);
    // The manifest by address, then every entry in one range: no object
    // is named by address.
    assert!(wants
        .iter()
        .flatten()
        .all(|i| !matches!(i, Item::Object(a) if *a != m1)));
    let e = entries_items(&wants);
    assert_eq!(e.len(), 1, "{wants:?}");
    assert_eq!(e[0].bundle, m1);
    assert_eq!(e[0].ranges, vec![(0, 300)]);
    let want_bytes: usize = wants
        .iter()
        .map(|items| {
            encode_frame(
                &Message::Want {
                    id: 1,
                    items: items.clone(),
                },
                4 << 20,
            )
            .unwrap()
            .len()
        })
        .sum();
    assert!(want_bytes < 400, "{want_bytes} bytes of wants");
    assert_eq!(sim.nodes[0].objects.len(), 301);
    // Release 2 changes entry 137.
    sim.delivered.clear();
    objs[137] = b"changed object".to_vec();
    let m2 = sim.publish(1, 2, &objs, true);
    let (bytes0, n0) = (sim.nodes[0].object_bytes_in, sim.nodes[0].objects_in);
    sim.run(30_000);
    assert!(sim.converged(2));
    let e = entries_items(&sim.wants_from(0));
    assert_eq!(e.len(), 1);
    assert_eq!(
        (e[0].bundle.to_string(), e[0].ranges.clone()),
        (m2.clone(), vec![(137, 1)])
    );
    assert_eq!(sim.nodes[0].objects_in - n0, 2);
    assert_eq!(
        sim.nodes[0].object_bytes_in - bytes0,
        sim.nodes[1].objects[&m2].len() + b"changed object".len()
    );
    assert!(sim.nodes.iter().all(|n| n.rejections.is_empty()));
}

#[test]
fn a_large_answer_travels_in_several_data_frames() {
    let c0 = cfg(0, vec![1]);
    let mut c1 = cfg(1, vec![]);
    // About four objects per frame.
    c1.limits.max_reply_bytes = 1_000;
    let mut sim = Sim::new(vec![c0, c1]);
    sim.run(2_000);
    sim.publish(1, 1, &objects(40, "v1"), true);
    sim.run(30_000);
    assert!(sim.converged(1));
    let parts: Vec<(u64, bool, usize)> = sim
        .delivered
        .iter()
        .filter(|(to, _)| *to == 0)
        .filter_map(|(_, m)| match m {
            Message::Data {
                id, more, entries, ..
            } if !entries.is_empty() => Some((*id, *more, entries.len())),
            _ => None,
        })
        .collect();
    assert!(parts.len() >= 10, "{parts:?}");
    // One want, every frame but the last says more follow.
    assert!(parts.iter().all(|(id, _, _)| *id == parts[0].0));
    assert!(parts[..parts.len() - 1].iter().all(|(_, more, _)| *more));
    assert!(!parts[parts.len() - 1].1);
    assert_eq!(parts.iter().map(|(_, _, n)| n).sum::<usize>(), 40);
    assert_eq!(sim.nodes[0].objects.len(), 41);
}

#[test]
fn a_peer_without_the_bundle_answers_not_found_and_is_not_banned() {
    let mut sim = Sim::line(2);
    sim.nodes[1].behaviour = Behaviour::LacksBundle;
    sim.run(2_000);
    sim.publish(1, 1, &objects(5, "v1"), true);
    sim.run(3_000);
    assert_eq!(sim.nodes[0].seq("stable"), 0);
    let answered = sim.delivered.iter().any(|(to, m)| {
        *to == 0
            && matches!(m, Message::Data { items, .. }
                if items.iter().any(|f| matches!(f.item, Item::Entries(_)) && f.bytes.is_none()))
    });
    assert!(answered);
    assert!(
        sim.nodes[0].rejections.is_empty(),
        "{:?}",
        sim.nodes[0].rejections
    );
    assert!(!sim.nodes[0].ep.is_banned("a1", Millis(sim.now)));
}

#[test]
fn an_index_past_the_bundle_cuts_the_peer_off() {
    let mut sim = Sim::line(2);
    sim.nodes[0].behaviour = Behaviour::PastTheEnd;
    sim.run(2_000);
    sim.publish(1, 1, &objects(5, "v1"), true);
    sim.run(5_000);
    assert_eq!(
        sim.nodes[1].rejections,
        vec![("a0".to_string(), "want_index_out_of_range".to_string())]
    );
    assert!(sim.nodes[1].ep.is_banned("a0", Millis(sim.now)));
    assert_eq!(sim.nodes[0].seq("stable"), 0);
}

#[test]
fn oversized_or_malformed_compact_wants_cut_the_peer_off() {
    let now = 1_000_000;
    let bundle = sha256_address(b"bundle");
    let lim = MeshLimits::default();
    let entries = |ranges: Vec<(u32, u32)>| {
        vec![Item::Entries(EntryRanges {
            bundle: BundleId::parse(&bundle).unwrap(),
            ranges,
        })]
    };
    let too_many_ranges: Vec<(u32, u32)> = (0..=lim.max_ranges_per_want as u32)
        .map(|i| (2 * i, 1))
        .collect();
    let half = lim.max_objects_per_want as u32 / 2 + 1;
    let cases = vec![
        (entries(too_many_ranges), "want_too_many_ranges"),
        (
            entries(vec![(0, lim.max_objects_per_want as u32 + 1)]),
            "want_too_many_objects",
        ),
        // Two items that are each within the limit, together over it.
        (
            [entries(vec![(0, half)]), entries(vec![(0, half)])].concat(),
            "want_too_many_objects",
        ),
        (entries(vec![(4, 2), (5, 1)]), "want_malformed_range"),
        (entries(vec![(0, 0)]), "want_malformed_range"),
        (entries(vec![(u32::MAX, 2)]), "want_malformed_range"),
    ];
    for (items, reason) in cases {
        let mut ep = new_ep(cfg(0, vec![]));
        let c = hello(&mut ep, "p", now);
        ep.handle_message(
            c,
            Message::Want { id: 1, items },
            Millis(now),
            UnixMillis(now),
        );
        assert_eq!(drain_rejections(&mut ep), vec![reason]);
        assert!(ep.is_banned("p", Millis(now)));
    }
    // A compact want on a version 2 connection.
    let mut ep = new_ep(cfg(0, vec![]));
    let c = ep.connected(
        PeerIdentity::Agent(cairn_core::AgentId::parse("p").unwrap()),
        None,
        None,
        Millis(now),
    );
    ep.handle_message(
        c,
        Message::Hello(Hello::speaking(2, 2, None)),
        Millis(now),
        UnixMillis(now),
    );
    while ep.poll_action().is_some() {}
    ep.handle_message(
        c,
        Message::Want {
            id: 1,
            items: entries(vec![(0, 1)]),
        },
        Millis(now),
        UnixMillis(now),
    );
    assert_eq!(drain_rejections(&mut ep), vec!["want_not_negotiated"]);
    // An answer for an entry nobody asked for.
    let mut ep = new_ep(cfg(0, vec![]));
    let c = hello(&mut ep, "p", now);
    ep.handle_message(
        c,
        Message::Data {
            id: 5,
            items: vec![],
            more: false,
            entries: vec![EntryFound(3, Some(b"x".to_vec()))],
        },
        Millis(now),
        UnixMillis(now),
    );
    assert_eq!(drain_rejections(&mut ep), vec!["unsolicited"]);
}

#[test]
fn version_2_and_version_3_agents_fall_back_to_per_object_wants() {
    // a0 speaks version 2 only, between two version 3 agents.
    let mut c0 = cfg(0, vec![1]);
    c0.protocol_version = 2;
    let mut sim = Sim::new(vec![c0, cfg(1, vec![2]), cfg(2, vec![])]);
    sim.run(2_000);
    assert_eq!(sim.nodes[1].ep.connected_peers().len(), 2);
    // a0's hello is the one a version 2 agent sends.
    assert!(sim
        .delivered
        .iter()
        .any(|(to, m)| *to == 1 && *m == Message::Hello(Hello::speaking(2, 2, Some(addr(0))))));
    // A release from a2 reaches a1 by compact wants, a0 by addresses;
    // then one from a0 reaches a1 and a2.
    sim.publish(2, 1, &objects(20, "v1"), true);
    sim.run(30_000);
    assert!(sim.converged(1));
    let mut o2 = objects(20, "v1");
    o2[3] = b"changed".to_vec();
    sim.publish(0, 2, &o2, true);
    sim.run(30_000);
    assert!(sim.converged(2));
    for n in &sim.nodes {
        assert!(n.rejections.is_empty(), "{}: {:?}", n.id, n.rejections);
        assert_eq!(n.objects.len(), 23, "{}", n.id);
    }
    // Nothing version 3 ever reached a0; a1 and a2 used compact wants.
    for (to, m) in &sim.delivered {
        let v3 = match m {
            Message::Want { items, .. } => items.iter().any(|i| matches!(i, Item::Entries(_))),
            Message::Data { more, entries, .. } => *more || !entries.is_empty(),
            Message::StatusDigest(_) | Message::StatusPull(_) => true,
            _ => false,
        };
        if *to == 0 {
            assert!(!v3, "a0 got {m:?}");
        }
    }
    assert!(sim.delivered.iter().any(|(to, m)| *to == 2
        && matches!(m, Message::Want { items, .. } if items.iter().any(|i| matches!(i, Item::Entries(_))))));
    // a1 fetched release 2 from a0 by address.
    assert!(sim.delivered.iter().any(|(to, m)| *to == 0
        && matches!(m, Message::Want { items, .. } if items.contains(&Item::Object(Address::of(b"changed"))))));
}

// ----- protocol version 3: status gossip by digest ---------------------

fn set_status(sim: &mut Sim, i: usize, health: &str) -> u64 {
    let now = sim.now;
    let mut r = record("set-by-the-endpoint", health, 0);
    r.sequence = now;
    sim.nodes[i].ep.set_local_status(r, UnixMillis(now));
    sim.nodes[i]
        .ep
        .status(UnixMillis(now))
        .find(|r| r.agent_id == sim.nodes[i].id)
        .unwrap()
        .time
}

#[test]
fn a_status_record_crosses_each_connection_once_and_newer_replaces_it() {
    // A ring of four: every record can reach every node two ways.
    // Records are signed again only when they change (no refresh within
    // the test), so a quiet fleet is quiet.
    let quiet = |i, seeds| {
        let mut c = cfg(i, seeds);
        c.status_refresh_ms = 3_600_000;
        c
    };
    let mut sim = Sim::new(vec![
        quiet(0, vec![1]),
        quiet(1, vec![2]),
        quiet(2, vec![3]),
        quiet(3, vec![0]),
    ]);
    sim.run(2_000);
    let t1 = set_status(&mut sim, 3, "healthy");
    sim.run(40_000);
    for i in 0..3 {
        assert_eq!(sim.record_copies(i, "a3", t1), 1, "a{i}");
    }
    let t2 = set_status(&mut sim, 3, "failed");
    assert!(t2 > t1);
    sim.run(40_000);
    let now = sim.now;
    for i in 0..3 {
        assert_eq!(sim.record_copies(i, "a3", t2), 1, "a{i}");
        let r = sim.nodes[i]
            .ep
            .status(UnixMillis(now))
            .find(|r| r.agent_id == "a3")
            .unwrap()
            .clone();
        assert_eq!((r.time, r.health.as_str()), (t2, "failed"), "a{i}");
    }
    // Once converged, anti-entropy costs no records and no digests.
    sim.delivered.clear();
    sim.run(20_000);
    assert!(sim
        .delivered
        .iter()
        .all(|(_, m)| !matches!(m, Message::Status(rs) if !rs.is_empty())
            && !matches!(m, Message::StatusDigest(_) | Message::StatusPull(_))));
}

#[test]
fn a_restarted_peer_resyncs_status() {
    let mut sim = Sim::line(3);
    sim.run(2_000);
    let t0 = set_status(&mut sim, 0, "healthy");
    let t2 = set_status(&mut sim, 2, "degraded");
    sim.run(30_000);
    let ids = |sim: &Sim, i: usize| status_ids(&sim.nodes[i].ep, sim.now);
    assert_eq!(ids(&sim, 1), vec!["a0", "a1", "a2"]);
    sim.restart(1);
    sim.run(1);
    // Its view is gone with its endpoint (but for its own record) ...
    assert_eq!(ids(&sim, 1), vec!["a1"]);
    sim.run(30_000);
    // ... and comes back from its peers, which told it by digest.
    assert_eq!(ids(&sim, 1), vec!["a0", "a1", "a2"]);
    let view: Vec<u64> = sim.nodes[1]
        .ep
        .status(UnixMillis(sim.now))
        .filter(|r| r.agent_id != "a1")
        .map(|r| r.time)
        .collect();
    assert_eq!(view, vec![t0, t2]);
}

#[test]
fn a_flood_of_digests_keeps_pulls_bounded() {
    let now = 1_000_000;
    let mut ep = new_ep(cfg(0, vec![]));
    let c = hello(&mut ep, "p", now);
    let max = ep.config().limits.max_status_records;
    let mut pulled = 0;
    for round in 0..5u64 {
        let digest = (0..max as u64)
            .map(|k| (aid(&format!("x{round}-{k}")), now))
            .collect();
        ep.handle_message(
            c,
            Message::StatusDigest(digest),
            Millis(now),
            UnixMillis(now),
        );
        while let Some(a) = ep.poll_action() {
            if let Action::Send {
                message: Message::StatusPull(ids),
                ..
            } = a
            {
                pulled += ids.len();
            }
        }
    }
    // At most twice the table's worth of pulls in flight at a time.
    assert_eq!(pulled, 2 * max);
    assert!(ep.pulling.len() <= 2 * max);
}

// ----- image blobs by range (protocol version 4) ------------------------

/// Two endpoints, `a0` and `a1`, connected and past their hellos: returns
/// them with each one's connection id for the other.
fn blob_pair(now: u64, hello_b: Hello) -> (Endpoint, ConnId, Endpoint, ConnId) {
    let mut a = new_ep(cfg(0, vec![]));
    let mut b = new_ep(cfg(1, vec![]));
    let ca = a.connected(PeerIdentity::Agent(aid("a1")), None, None, Millis(now));
    let cb = b.connected(PeerIdentity::Agent(aid("a0")), None, None, Millis(now));
    a.handle_message(ca, Message::Hello(hello_b), Millis(now), UnixMillis(now));
    b.handle_message(
        cb,
        Message::Hello(Hello::new(None)),
        Millis(now),
        UnixMillis(now),
    );
    while a.poll_action().is_some() {}
    while b.poll_action().is_some() {}
    (a, ca, b, cb)
}

/// Moves every message `from` wants to send on `conn` to `to` on
/// `to_conn`, through real frames; returns the events `from` emitted and
/// the largest frame body sent.
fn shuttle(
    from: &mut Endpoint,
    to: &mut Endpoint,
    to_conn: ConnId,
    now: u64,
) -> (Vec<Event>, usize) {
    let lim = MeshLimits::default();
    let mut events = Vec::new();
    let mut largest = 0;
    while let Some(a) = from.poll_action() {
        match a {
            Action::Send { message, .. } => {
                let frame = encode_frame(&message, lim.max_frame_bytes).unwrap();
                largest = largest.max(frame.len() - 4);
                let m = decode_body(&frame[4..], &lim).unwrap();
                to.handle_message(to_conn, m, Millis(now), UnixMillis(now));
            }
            Action::Event(e) => events.push(e),
            _ => {}
        }
    }
    (events, largest)
}

/// A deterministic incompressible blob of `n` bytes.
fn noise(n: usize) -> Vec<u8> {
    let mut x: u64 = 0x2545_f491_4f6c_dd1d;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

#[test]
fn a_blob_moves_in_pieces_of_at_most_one_mib_between_version_4_agents() {
    let now = 1_000_000;
    let (mut a, ca, mut b, cb) = blob_pair(now, Hello::new(None));
    assert_eq!(a.blob_peers(), vec![(ca, aid("a1"))]);
    let blob = noise(2 * (1 << 20) + 12_345);
    let digest = Address::of(&blob);
    let piece = MeshLimits::default().max_blob_piece;
    // Too long a piece is not even asked for.
    let too_long = BlobRange {
        digest: digest.clone(),
        offset: 0,
        length: piece + 1,
    };
    assert_eq!(a.want_blob(ca, too_long, Millis(now)), None);
    let mut got = Vec::new();
    let mut pieces = 0;
    loop {
        let range = BlobRange {
            digest: digest.clone(),
            offset: got.len() as u64,
            length: piece,
        };
        let id = a.want_blob(ca, range.clone(), Millis(now)).unwrap();
        let (_, _) = shuttle(&mut a, &mut b, cb, now);
        // b's shell: the asked range of the blob it holds.
        let mut served = false;
        let serves: Vec<Action> = std::iter::from_fn(|| b.poll_action()).collect();
        for act in serves {
            let Action::Event(Event::Serve { conn, id, items }) = act else {
                continue;
            };
            assert_eq!(items, vec![Item::Blob(range.clone())]);
            let start = (range.offset as usize).min(blob.len());
            let end = (start + range.length as usize).min(blob.len());
            let found = vec![Found {
                item: items[0].clone(),
                bytes: Some(blob[start..end].to_vec()),
            }];
            b.serve(conn, id, found, Millis(now));
            served = true;
        }
        assert!(served);
        let (_, largest) = shuttle(&mut b, &mut a, ca, now);
        assert!(largest < (piece as usize) + 1024, "one piece per frame");
        let (events, _) = shuttle(&mut a, &mut b, cb, now);
        let piece_bytes = events
            .into_iter()
            .find_map(|e| match e {
                Event::BlobPiece {
                    id: i,
                    range: r,
                    bytes,
                    ..
                } if i == id && r == range => bytes,
                _ => None,
            })
            .unwrap();
        assert!(piece_bytes.len() <= piece as usize);
        pieces += 1;
        let done = piece_bytes.len() < piece as usize;
        got.extend(piece_bytes);
        if done {
            break;
        }
    }
    assert_eq!(pieces, 3);
    assert_eq!(got, blob);
    assert!(!a.is_banned("a1", Millis(now)) && !b.is_banned("a0", Millis(now)));
}

#[test]
fn a_peer_without_the_blob_says_so_and_is_not_banned() {
    let now = 1_000_000;
    let (mut a, ca, mut b, cb) = blob_pair(now, Hello::new(None));
    let range = BlobRange {
        digest: Address::of(b"not held"),
        offset: 0,
        length: 10,
    };
    a.want_blob(ca, range.clone(), Millis(now)).unwrap();
    shuttle(&mut a, &mut b, cb, now);
    let serves: Vec<Action> = std::iter::from_fn(|| b.poll_action()).collect();
    for act in serves {
        if let Action::Event(Event::Serve { conn, id, items }) = act {
            let found = vec![Found {
                item: items[0].clone(),
                bytes: None,
            }];
            b.serve(conn, id, found, Millis(now));
        }
    }
    shuttle(&mut b, &mut a, ca, now);
    let events: Vec<Event> = std::iter::from_fn(|| a.poll_action())
        .filter_map(|x| match x {
            Action::Event(e) => Some(e),
            _ => None,
        })
        .collect();
    assert!(events.iter().any(|e| matches!(
        e,
        Event::BlobPiece { bytes: None, range: r, .. } if *r == range
    )));
    assert!(!a.is_banned("a1", Millis(now)));
}

#[test]
fn blob_wants_are_refused_before_version_4_and_when_malformed() {
    let now = 1_000_000;
    let d = Address::of(b"blob");
    let blob = |offset: u64, length: u32| {
        Item::Blob(BlobRange {
            digest: d.clone(),
            offset,
            length,
        })
    };
    // We do not ask a version 3 peer, and a version 3 peer may not ask us.
    let (mut a, ca, _, _) = blob_pair(now, Hello::speaking(2, 3, None));
    assert!(a.blob_peers().is_empty());
    assert_eq!(
        a.want_blob(
            ca,
            BlobRange {
                digest: d.clone(),
                offset: 0,
                length: 1
            },
            Millis(now)
        ),
        None
    );
    a.handle_message(
        ca,
        Message::Want {
            id: 1,
            items: vec![blob(0, 1)],
        },
        Millis(now),
        UnixMillis(now),
    );
    assert_eq!(drain_rejections(&mut a), vec!["want_not_negotiated"]);
    let max = MeshLimits::default().max_blob_piece;
    let cases = vec![
        vec![blob(0, 0)],
        vec![blob(0, max + 1)],
        vec![blob(u64::MAX, 2)],
        vec![blob(0, 1), blob(1, 1)],
    ];
    for items in cases {
        let mut ep = new_ep(cfg(0, vec![]));
        let c = hello(&mut ep, "p", now);
        ep.handle_message(
            c,
            Message::Want { id: 1, items },
            Millis(now),
            UnixMillis(now),
        );
        assert_eq!(drain_rejections(&mut ep), vec!["want_bad_blob_range"]);
        assert!(ep.is_banned("p", Millis(now)));
    }
    // A well-formed blob want is handed to the shell.
    let mut ep = new_ep(cfg(0, vec![]));
    let c = hello(&mut ep, "p", now);
    ep.handle_message(
        c,
        Message::Want {
            id: 1,
            items: vec![blob(5, max)],
        },
        Millis(now),
        UnixMillis(now),
    );
    assert!(std::iter::from_fn(|| ep.poll_action())
        .any(|a| matches!(a, Action::Event(Event::Serve { id: 1, .. }))));
}

#[test]
fn a_wrong_piece_or_a_wrong_blob_cuts_the_peer_off() {
    let now = 1_000_000;
    let d = Address::of(b"blob");
    let range = BlobRange {
        digest: d.clone(),
        offset: 0,
        length: 4,
    };
    let data = |item: Item, bytes: &[u8]| Message::Data {
        id: 1,
        items: vec![Found {
            item,
            bytes: Some(bytes.to_vec()),
        }],
        more: false,
        entries: vec![],
    };
    // Longer than asked.
    let mut ep = new_ep(cfg(0, vec![]));
    let c = hello(&mut ep, "p", now);
    assert_eq!(ep.want_blob(c, range.clone(), Millis(now)), Some(1));
    ep.handle_message(
        c,
        data(Item::Blob(range.clone()), b"12345"),
        Millis(now),
        UnixMillis(now),
    );
    assert_eq!(drain_rejections(&mut ep), vec!["blob_mismatch"]);
    assert!(ep.is_banned("p", Millis(now)));
    // Another range than asked.
    let mut ep = new_ep(cfg(0, vec![]));
    let c = hello(&mut ep, "p", now);
    ep.want_blob(c, range.clone(), Millis(now)).unwrap();
    let other = BlobRange {
        offset: 4,
        ..range.clone()
    };
    ep.handle_message(
        c,
        data(Item::Blob(other), b"1234"),
        Millis(now),
        UnixMillis(now),
    );
    assert_eq!(drain_rejections(&mut ep), vec!["unsolicited"]);
    // A blob range nobody asked for.
    let mut ep = new_ep(cfg(0, vec![]));
    let c = hello(&mut ep, "p", now);
    ep.handle_message(
        c,
        data(Item::Blob(range.clone()), b"1234"),
        Millis(now),
        UnixMillis(now),
    );
    assert_eq!(drain_rejections(&mut ep), vec!["unsolicited"]);
    // Pieces that do not hash to the digest (the shell's verdict).
    let mut ep = new_ep(cfg(0, vec![]));
    let c = hello(&mut ep, "p", now);
    ep.want_blob(c, range.clone(), Millis(now)).unwrap();
    ep.handle_message(
        c,
        data(Item::Blob(range), b"1234"),
        Millis(now),
        UnixMillis(now),
    );
    assert!(std::iter::from_fn(|| ep.poll_action())
        .any(|a| matches!(a, Action::Event(Event::BlobPiece { .. }))));
    ep.blob_refused(c, "blob does not match its digest", Millis(now));
    assert_eq!(drain_rejections(&mut ep), vec!["blob_mismatch"]);
    assert!(ep.is_banned("p", Millis(now)));
    // An unanswered range times out like any want.
    let mut ep = new_ep(cfg(0, vec![]));
    ep.handle_timeout(Millis(now), UnixMillis(now));
    let c = hello(&mut ep, "p", now);
    ep.want_blob(
        c,
        BlobRange {
            digest: d,
            offset: 0,
            length: 1,
        },
        Millis(now),
    )
    .unwrap();
    let later = now + ep.config().request_timeout_ms;
    ep.handle_timeout(Millis(later), UnixMillis(later));
    assert_eq!(drain_rejections(&mut ep), vec!["timeout"]);
}
