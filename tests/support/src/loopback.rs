//! Loopback address blocks that cannot collide across processes.
//!
//! Agents that must know each other's addresses before any of them starts
//! (mesh seeds) cannot use port 0. A test instead reserves a whole
//! `127.a.b.0/24` block with [`LoopbackBlock::reserve`]:
//!
//! 1. a block is picked at random from `127.64.0.0`–`127.254.255.0` (the
//!    `127.0.x` and `127.1.x` blocks stay free for fixed test addresses and
//!    the mesh tests' dial trap);
//! 2. the process takes an exclusive `flock` on
//!    `<tmp>/cairn-test-loopback/127.a.b.lock`; the kernel drops it when the
//!    process ends however it ends, so a crashed test never leaks a block,
//!    and the file is opened close-on-exec, so agents it starts do not hold it;
//! 3. the block is kept only if every mesh address in it
//!    (`127.a.b.<1..=CHECKED>:7440`) can be bound right now, which also
//!    steps over blocks used by anything that does not take the lock (an
//!    orphaned agent of a killed run, an older checkout's tests).
//!
//! Two test processes, in one worktree or in two, therefore never hand out
//! the same block while both live.

use std::fs::{File, OpenOptions};
use std::hash::{BuildHasher, Hasher};
use std::net::{Ipv4Addr, TcpListener};
use std::os::fd::AsRawFd;
use std::path::PathBuf;

/// The port every agent of a block listens on for the mesh.
pub const MESH_PORT: u16 = 7440;

/// How many addresses of a block are checked free at reservation (agent
/// indices `0..CHECKED`); a test that needs more still gets a reserved
/// block, only unchecked past this.
pub const CHECKED: usize = 32;

/// A `127.a.b.0/24` block reserved for this process while the value lives.
#[derive(Debug)]
pub struct LoopbackBlock {
    a: u8,
    b: u8,
    _lock: File,
}

impl LoopbackBlock {
    /// Reserves a free block (see the module documentation). Panics only
    /// when no block at all could be reserved, naming the lock directory.
    pub fn reserve() -> LoopbackBlock {
        let dir = lock_dir();
        std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("mkdir {}: {e}", dir.display()));
        let blocks = (254 - 64 + 1) * 256;
        let start = random() % blocks;
        for k in 0..blocks {
            let n = (start + k) % blocks;
            let (a, b) = ((64 + n / 256) as u8, (n % 256) as u8);
            let Some(lock) = try_lock(&dir, a, b) else {
                continue;
            };
            if all_bindable(a, b) {
                return LoopbackBlock { a, b, _lock: lock };
            }
        }
        panic!(
            "no free loopback block: every 127.a.b lock in {} is held or its addresses are in use",
            dir.display()
        )
    }

    /// `127.a.b.<i+1>`: the address of agent `i` (0–253).
    pub fn ip(&self, i: usize) -> Ipv4Addr {
        assert!(
            i < 254,
            "loopback block has 254 addresses, asked for index {i}"
        );
        Ipv4Addr::new(127, self.a, self.b, (i + 1) as u8)
    }

    /// `127.a.b.<i+1>:7440`: agent `i`'s mesh address.
    pub fn mesh_addr(&self, i: usize) -> String {
        format!("{}:{MESH_PORT}", self.ip(i))
    }

    /// `127.a.b` (for messages).
    pub fn prefix(&self) -> String {
        format!("127.{}.{}", self.a, self.b)
    }
}

fn lock_dir() -> PathBuf {
    std::env::temp_dir().join("cairn-test-loopback")
}

/// A random number from the standard library's per-process hash keys
/// mixed with the pid and the time (no extra dependency; not for secrets).
fn random() -> usize {
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u32(std::process::id());
    if let Ok(d) = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH) {
        h.write_u128(d.as_nanos());
    }
    h.finish() as usize
}

/// The block's lock file, locked exclusively without waiting, or `None`
/// when another process holds it (or it cannot be opened).
fn try_lock(dir: &std::path::Path, a: u8, b: u8) -> Option<File> {
    let path = dir.join(format!("127.{a}.{b}.lock"));
    let f = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .ok()?;
    // SAFETY: flock on a file descriptor this function owns; no memory is
    // passed.
    let rc = unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    (rc == 0).then_some(f)
}

fn all_bindable(a: u8, b: u8) -> bool {
    (0..CHECKED).all(|i| {
        let ip = Ipv4Addr::new(127, a, b, (i + 1) as u8);
        TcpListener::bind((ip, MESH_PORT)).is_ok()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn two_reservations_in_one_process_differ_and_are_bindable() {
        let x = LoopbackBlock::reserve();
        let y = LoopbackBlock::reserve();
        assert_ne!(x.prefix(), y.prefix());
        assert!(x.mesh_addr(0).starts_with(&format!("{}.1:", x.prefix())));
        // The lock is exclusive: the same block cannot be taken again.
        assert!(try_lock(&lock_dir(), x.a, x.b).is_none());
        let l = TcpListener::bind(x.mesh_addr(3)).unwrap();
        assert_eq!(l.local_addr().unwrap().ip(), x.ip(3));
    }

    #[test]
    fn a_dropped_block_is_free_again() {
        let x = LoopbackBlock::reserve();
        let (a, b) = (x.a, x.b);
        drop(x);
        assert!(try_lock(&lock_dir(), a, b).is_some());
    }
}
