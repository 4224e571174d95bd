//! A TCP proxy in front of PostgreSQL that makes commits ambiguous: armed, it
//! lets a `COMMIT` reach the server and drops the connection when the server
//! answers, before the answer reaches the client. The transaction is committed;
//! the client only sees its connection gone.
//!
//! It reads the client's side of the protocol (v3): the untyped start-up
//! messages (an `SSLRequest` or `GSSENCRequest` first, perhaps), then typed
//! messages. A `Parse` whose query is `COMMIT` names a prepared statement (or
//! the unnamed one); a `Bind` of that statement arms the cut, and the server's
//! answer that carries the commit's completion (`CommandComplete` "COMMIT") is
//! dropped with the connection.

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};

/// The proxy, on a loopback port of its own; it stops with the test's runtime.
pub(crate) struct CommitCutter {
    pub(crate) port: u16,
    /// Commits still to cut.
    armed: Arc<AtomicUsize>,
    /// Commits cut so far.
    cut: Arc<AtomicUsize>,
}

impl CommitCutter {
    /// Starts the proxy in front of the server on `upstream` (a loopback port).
    pub(crate) async fn start(upstream: u16) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let (armed, cut) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
        let (a, c) = (armed.clone(), cut.clone());
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                tokio::spawn(relay(client, upstream, a.clone(), c.clone()));
            }
        });
        Self { port, armed, cut }
    }

    /// Cuts the next commit (of any connection).
    pub(crate) fn arm(&self) {
        self.armed.fetch_add(1, Ordering::SeqCst);
    }

    /// Commits cut so far.
    pub(crate) fn cut(&self) -> usize {
        self.cut.load(Ordering::SeqCst)
    }
}

/// One client connection: its messages to the server read as they pass, the
/// server's bytes copied back unless a cut is due.
async fn relay(client: TcpStream, upstream: u16, armed: Arc<AtomicUsize>, cut: Arc<AtomicUsize>) {
    let Ok(server) = TcpStream::connect(("127.0.0.1", upstream)).await else { return };
    let _ = (client.set_nodelay(true), server.set_nodelay(true));
    let (mut cr, mut cw) = client.into_split();
    let (mut sr, mut sw) = server.into_split();
    let due = Arc::new(AtomicBool::new(false));
    let to_server = {
        let due = due.clone();
        async move {
            // Start-up: untyped messages until one that is not an encryption request.
            loop {
                let Some(msg) = read_untyped(&mut cr).await else { return };
                let code = msg.get(4..8).map_or(0, |b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]));
                if sw.write_all(&msg).await.is_err() {
                    return;
                }
                if code != 80_877_103 && code != 80_877_104 {
                    break;
                }
            }
            let mut commits: HashSet<Vec<u8>> = HashSet::new();
            loop {
                let Some((kind, msg)) = read_typed(&mut cr).await else { return };
                let body = &msg[5..];
                // Whether this message runs a COMMIT (a Bind of a statement
                // that is one, or a simple query).
                let runs_commit = match kind {
                    b'P' => {
                        let (name, rest) = cstr(body);
                        if is_commit(cstr(rest).0) {
                            commits.insert(name.to_vec());
                        }
                        false
                    }
                    b'B' => commits.contains(cstr(cstr(body).1).0),
                    b'Q' => is_commit(cstr(body).0),
                    _ => false,
                };
                if runs_commit && armed.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1)).is_ok() {
                    due.store(true, Ordering::SeqCst);
                }
                if sw.write_all(&msg).await.is_err() {
                    return;
                }
            }
        }
    };
    let to_client = async move {
        let mut buf = vec![0u8; 64 << 10];
        loop {
            let n = match sr.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            };
            // The server says the commit is done (its CommandComplete tag):
            // the client never hears of it.
            if due.load(Ordering::SeqCst) && buf[..n].windows(7).any(|w| w == b"COMMIT\0") {
                cut.fetch_add(1, Ordering::SeqCst);
                return;
            }
            if cw.write_all(&buf[..n]).await.is_err() {
                return;
            }
        }
    };
    // Whichever side ends first ends the connection (both halves dropped).
    tokio::select! {
        () = to_server => {}
        () = to_client => {}
    }
}

/// A start-up message: its length (which counts itself) and body.
async fn read_untyped(r: &mut tokio::net::tcp::OwnedReadHalf) -> Option<Vec<u8>> {
    let mut len = [0u8; 4];
    r.read_exact(&mut len).await.ok()?;
    let n = u32::from_be_bytes(len) as usize;
    let mut msg = len.to_vec();
    msg.resize(n.max(4), 0);
    r.read_exact(&mut msg[4..]).await.ok()?;
    Some(msg)
}

/// A typed message: its type byte, and the whole message (type, length, body).
async fn read_typed(r: &mut tokio::net::tcp::OwnedReadHalf) -> Option<(u8, Vec<u8>)> {
    let mut head = [0u8; 5];
    r.read_exact(&mut head).await.ok()?;
    let n = u32::from_be_bytes([head[1], head[2], head[3], head[4]]) as usize;
    let mut msg = head.to_vec();
    msg.resize(1 + n.max(4), 0);
    r.read_exact(&mut msg[5..]).await.ok()?;
    Some((head[0], msg))
}

fn is_commit(query: &[u8]) -> bool {
    query.trim_ascii().eq_ignore_ascii_case(b"commit")
}

/// A NUL-terminated string at the start of `b`, and what follows it.
fn cstr(b: &[u8]) -> (&[u8], &[u8]) {
    match b.iter().position(|c| *c == 0) {
        Some(i) => (&b[..i], &b[i + 1..]),
        None => (b, &[]),
    }
}
