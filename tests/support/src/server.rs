//! A tiny static HTTP/1.1 file server for tests.
//!
//! Serves `GET` and `HEAD` for regular files under a root directory on
//! `127.0.0.1:<ephemeral port>`, one thread per connection, one request
//! per connection (`Connection: close`). Anything else is 404 (missing,
//! outside the root, not a regular file) or 405 (other methods).
//! [`Fault`]s can be injected to test clients against bad mirrors.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Component, Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

/// A fault applied to every following response until cleared.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum Fault {
    /// Serve files as they are.
    #[default]
    None,
    /// Answer every request with this status code and an empty body.
    Status(u16),
    /// Flip the first byte of every body.
    FlipByte,
    /// Send only the first half of every body, then close.
    Truncate,
    /// Wait this long before answering.
    Delay(Duration),
    /// Send headers, then stall forever without a body (slow retrieval).
    Stall,
    /// Answer every request with `302 Found` to this base URL followed by
    /// the request's path (`Redirect("http://127.0.0.2:8080")`).
    Redirect(String),
}

struct Shared {
    root: PathBuf,
    fault: Mutex<Fault>,
    stop: AtomicBool,
    requests: AtomicU64,
    /// Bytes written to clients (status lines, headers and bodies).
    bytes_sent: AtomicU64,
    /// Body bytes written to clients.
    body_bytes_sent: AtomicU64,
}

/// A running static file server; stopped on [`StaticServer::stop`] or drop.
pub struct StaticServer {
    addr: SocketAddr,
    shared: Arc<Shared>,
    accept: Option<JoinHandle<()>>,
}

impl StaticServer {
    /// Starts serving `root` on an ephemeral port of 127.0.0.1.
    pub fn start(root: impl Into<PathBuf>) -> std::io::Result<Self> {
        Self::start_on("127.0.0.1", root)
    }

    /// Starts serving `root` on an ephemeral port of `ip` (e.g. another
    /// loopback address, `127.0.0.2`, to play another host).
    pub fn start_on(ip: &str, root: impl Into<PathBuf>) -> std::io::Result<Self> {
        let listener = TcpListener::bind((ip, 0))?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared {
            root: root.into(),
            fault: Mutex::new(Fault::None),
            stop: AtomicBool::new(false),
            requests: AtomicU64::new(0),
            bytes_sent: AtomicU64::new(0),
            body_bytes_sent: AtomicU64::new(0),
        });
        let s = Arc::clone(&shared);
        let accept = std::thread::spawn(move || {
            for conn in listener.incoming() {
                if s.stop.load(Ordering::SeqCst) {
                    break;
                }
                let Ok(conn) = conn else { continue };
                let s = Arc::clone(&s);
                std::thread::spawn(move || {
                    let _ = serve(&s, conn);
                });
            }
        });
        Ok(Self {
            addr,
            shared,
            accept: Some(accept),
        })
    }

    /// The listening address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://<ip>:<port>` (no trailing slash).
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Sets the fault applied to following requests.
    pub fn set_fault(&self, fault: Fault) {
        if let Ok(mut f) = self.shared.fault.lock() {
            *f = fault;
        }
    }

    /// Requests served so far.
    pub fn requests(&self) -> u64 {
        self.shared.requests.load(Ordering::SeqCst)
    }

    /// Bytes written to clients so far: status lines, headers and bodies
    /// (what a client actually downloads, TCP/IP framing aside).
    pub fn bytes_sent(&self) -> u64 {
        self.shared.bytes_sent.load(Ordering::SeqCst)
    }

    /// Body bytes written to clients so far (file contents only).
    pub fn body_bytes_sent(&self) -> u64 {
        self.shared.body_bytes_sent.load(Ordering::SeqCst)
    }

    /// Sets [`StaticServer::requests`], [`StaticServer::bytes_sent`] and
    /// [`StaticServer::body_bytes_sent`] back to zero (e.g. between the
    /// phases of a measurement).
    pub fn reset_counters(&self) {
        self.shared.requests.store(0, Ordering::SeqCst);
        self.shared.bytes_sent.store(0, Ordering::SeqCst);
        self.shared.body_bytes_sent.store(0, Ordering::SeqCst);
    }

    /// Stops accepting connections and waits for the accept thread.
    /// Connections in progress finish on their own.
    pub fn stop(&mut self) {
        if self.shared.stop.swap(true, Ordering::SeqCst) {
            return;
        }
        // Wake the blocking accept.
        let _ = TcpStream::connect(self.addr);
        if let Some(h) = self.accept.take() {
            let _ = h.join();
        }
    }
}

impl Drop for StaticServer {
    fn drop(&mut self) {
        self.stop();
    }
}

fn resolve(root: &Path, url_path: &str) -> Option<PathBuf> {
    let path = url_path.split(['?', '#']).next()?;
    let rel = Path::new(path.trim_start_matches('/'));
    let mut out = root.to_path_buf();
    for c in rel.components() {
        match c {
            Component::Normal(p) => out.push(p),
            Component::CurDir => {}
            _ => return None,
        }
    }
    let meta = std::fs::symlink_metadata(&out).ok()?;
    meta.is_file().then_some(out)
}

/// A connection that counts what is written to it.
struct Counting<'a> {
    inner: TcpStream,
    s: &'a Shared,
}

impl Counting<'_> {
    /// Writes body bytes (counted in both counters).
    fn write_body(&mut self, body: &[u8]) -> std::io::Result<()> {
        self.write_all(body)?;
        self.s
            .body_bytes_sent
            .fetch_add(body.len() as u64, Ordering::SeqCst);
        Ok(())
    }
}

impl Write for Counting<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.s.bytes_sent.fetch_add(n as u64, Ordering::SeqCst);
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

fn serve(s: &Shared, conn: TcpStream) -> std::io::Result<()> {
    conn.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut reader = BufReader::new(conn.try_clone()?);
    let mut line = String::new();
    reader.read_line(&mut line)?;
    // Drain headers.
    loop {
        let mut h = String::new();
        if reader.read_line(&mut h)? == 0 || h == "\r\n" || h == "\n" {
            break;
        }
    }
    s.requests.fetch_add(1, Ordering::SeqCst);
    let mut parts = line.split_whitespace();
    let method = parts.next().unwrap_or("");
    let target = parts.next().unwrap_or("/");
    let fault = s.fault.lock().map(|f| f.clone()).unwrap_or_default();
    let mut w = Counting { inner: conn, s };
    let respond = |w: &mut Counting, code: u16, reason: &str, body: &[u8], send_body: bool| {
        write!(
            w,
            "HTTP/1.1 {code} {reason}\r\nContent-Length: {}\r\nContent-Type: application/octet-stream\r\nConnection: close\r\n\r\n",
            body.len()
        )?;
        if send_body {
            w.write_body(body)?;
        }
        w.flush()
    };
    if let Fault::Delay(d) = fault {
        std::thread::sleep(d);
    }
    if let Fault::Status(code) = fault {
        return respond(&mut w, code, "Injected", b"", true);
    }
    if let Fault::Redirect(base) = &fault {
        write!(
            w,
            "HTTP/1.1 302 Found\r\nLocation: {base}{target}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
        )?;
        return w.flush();
    }
    if method != "GET" && method != "HEAD" {
        return respond(&mut w, 405, "Method Not Allowed", b"", true);
    }
    let Some(file) = resolve(&s.root, target) else {
        return respond(&mut w, 404, "Not Found", b"not found\n", method == "GET");
    };
    let mut body = Vec::new();
    std::fs::File::open(&file)?.read_to_end(&mut body)?;
    match fault {
        Fault::FlipByte => {
            if let Some(b) = body.first_mut() {
                *b ^= 0x01;
            }
            respond(&mut w, 200, "OK", &body, method == "GET")
        }
        Fault::Truncate => {
            write!(
                w,
                "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                body.len()
            )?;
            w.write_body(&body[..body.len() / 2])?;
            w.flush()
        }
        Fault::Stall => {
            write!(
                w,
                "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                body.len()
            )?;
            w.flush()?;
            while !s.stop.load(Ordering::SeqCst) {
                std::thread::sleep(Duration::from_millis(50));
            }
            Ok(())
        }
        _ => respond(&mut w, 200, "OK", &body, method == "GET"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn get(addr: SocketAddr, path: &str) -> (u16, Vec<u8>) {
        let mut c = TcpStream::connect(addr).unwrap();
        write!(c, "GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
        let mut buf = Vec::new();
        c.read_to_end(&mut buf).unwrap();
        let split = buf.windows(4).position(|w| w == b"\r\n\r\n").unwrap();
        let head = String::from_utf8_lossy(&buf[..split]).into_owned();
        let code = head.split_whitespace().nth(1).unwrap().parse().unwrap();
        (code, buf[split + 4..].to_vec())
    }

    #[test]
    fn serves_files_404s_and_faults() {
        let d = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(d.path().join("a")).unwrap();
        std::fs::write(d.path().join("a/f"), b"hello").unwrap();
        let mut s = StaticServer::start(d.path()).unwrap();
        assert_eq!(get(s.addr(), "/a/f"), (200, b"hello".to_vec()));
        assert_eq!(get(s.addr(), "/a/missing").0, 404);
        assert_eq!(get(s.addr(), "/../etc/passwd").0, 404);
        assert_eq!(get(s.addr(), "/a").0, 404);
        s.set_fault(Fault::FlipByte);
        assert_eq!(get(s.addr(), "/a/f"), (200, b"iello".to_vec()));
        s.set_fault(Fault::Status(503));
        assert_eq!(get(s.addr(), "/a/f").0, 503);
        s.set_fault(Fault::Redirect("http://127.0.0.2:1".into()));
        let mut c = TcpStream::connect(s.addr()).unwrap();
        write!(c, "GET /a/f HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
        let mut head = String::new();
        c.read_to_string(&mut head).unwrap();
        assert!(head.starts_with("HTTP/1.1 302 "), "{head}");
        assert!(
            head.contains("Location: http://127.0.0.2:1/a/f\r\n"),
            "{head}"
        );
        s.set_fault(Fault::None);
        assert!(s.requests() >= 6);
        s.reset_counters();
        assert_eq!(
            (s.requests(), s.bytes_sent(), s.body_bytes_sent()),
            (0, 0, 0)
        );
        assert_eq!(get(s.addr(), "/a/f"), (200, b"hello".to_vec()));
        assert_eq!(s.requests(), 1);
        assert_eq!(s.body_bytes_sent(), 5);
        assert!(
            s.bytes_sent() > 5 + 30,
            "headers counted: {}",
            s.bytes_sent()
        );
        s.stop();
        assert!(TcpStream::connect(s.addr()).is_err() || get_fails(s.addr()));
    }

    fn get_fails(addr: SocketAddr) -> bool {
        let Ok(mut c) = TcpStream::connect(addr) else {
            return true;
        };
        let _ = write!(c, "GET / HTTP/1.1\r\n\r\n");
        let mut buf = Vec::new();
        c.set_read_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        c.read_to_end(&mut buf).map(|n| n == 0).unwrap_or(true)
    }
}
