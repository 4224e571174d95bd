//! A network of its own for a process (as root): a network namespace joined to
//! the tests' namespace by a veth pair, and nftables rules inside it that cut
//! the link (both ways, or one way) and heal it. The servers stay on loopback:
//! a [`Relay`] gives each an address on the veth's host side, so what crosses
//! the cut is the real traffic of the process, in real TCP connections.

use std::net::Ipv4Addr;
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};

use tokio::net::{TcpListener, TcpStream};

/// A network namespace with a veth pair: `host_ip` on the tests' side,
/// `ns_ip` inside. Deleted (with its veth and its rules) on drop.
pub(crate) struct Netns {
    pub(crate) name: String,
    pub(crate) host_ip: Ipv4Addr,
    pub(crate) ns_ip: Ipv4Addr,
    inner_if: String,
}

/// What a cut drops.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Cut {
    /// Everything between the process and the server, both ways.
    BothWays,
    /// Only what the server sends to the process: its requests arrive and are
    /// carried out, their answers never come back.
    RepliesLost,
}

fn run(args: &[&str]) {
    let out = Command::new(args[0]).args(&args[1..]).output().unwrap_or_else(|e| panic!("{} runs: {e}", args[0]));
    assert!(
        out.status.success(),
        "`{}` failed (network namespaces and nftables need root, `ip` and `nft`): {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

impl Netns {
    /// A fresh namespace with its link up (a /30 of 10.231.0.0/16 of its own).
    pub(crate) fn create() -> Self {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        loop {
            // Unique among this binary's tests and, by the process id, among
            // binaries that run at once.
            let id = (std::process::id().wrapping_mul(64).wrapping_add(NEXT.fetch_add(1, Ordering::Relaxed))) % 16_384;
            let name = format!("sw{id}");
            let added = Command::new("ip").args(["netns", "add", &name]).output().expect("`ip` runs (iproute2)");
            if !added.status.success() {
                let why = String::from_utf8_lossy(&added.stderr);
                assert!(why.contains("File exists"), "`ip netns add` failed (network namespaces need root): {why}");
                continue; // taken: another id
            }
            let base = (10 << 24) | (231 << 16) | (id * 4);
            let (host_ip, ns_ip) = (Ipv4Addr::from(base + 1), Ipv4Addr::from(base + 2));
            let (outer_if, inner_if) = (format!("{name}h"), format!("{name}n"));
            let ns = Self { name, host_ip, ns_ip, inner_if };
            run(&["ip", "link", "add", &outer_if, "type", "veth", "peer", "name", &ns.inner_if, "netns", &ns.name]);
            run(&["ip", "addr", "add", &format!("{host_ip}/30"), "dev", &outer_if]);
            run(&["ip", "link", "set", &outer_if, "up"]);
            run(&["ip", "-n", &ns.name, "addr", "add", &format!("{ns_ip}/30"), "dev", &ns.inner_if]);
            run(&["ip", "-n", &ns.name, "link", "set", &ns.inner_if, "up"]);
            run(&["ip", "-n", &ns.name, "link", "set", "lo", "up"]);
            ns.nft("add table inet cut");
            ns.nft("add chain inet cut incoming { type filter hook input priority 0; }");
            ns.nft("add chain inet cut outgoing { type filter hook output priority 0; }");
            return ns;
        }
    }

    fn nft(&self, rule: &str) {
        let mut args = vec!["ip", "netns", "exec", &self.name, "nft"];
        args.extend(rule.split(' '));
        run(&args);
    }

    /// Cuts the link to the server behind the host side's `port` (a [`Relay`]).
    pub(crate) fn cut(&self, port: u16, how: Cut) {
        let (host, inner, port) = (self.host_ip.to_string(), &self.inner_if, port.to_string());
        self.nft(&format!("add rule inet cut incoming iifname {inner} ip saddr {host} tcp sport {port} drop"));
        if how == Cut::BothWays {
            self.nft(&format!("add rule inet cut outgoing oifname {inner} ip daddr {host} tcp dport {port} drop"));
        }
    }

    /// Heals every cut.
    pub(crate) fn heal(&self) {
        self.nft("flush chain inet cut incoming");
        self.nft("flush chain inet cut outgoing");
    }

    /// The command prefix that runs a program inside.
    pub(crate) fn exec_prefix(&self) -> [&str; 4] {
        ["ip", "netns", "exec", &self.name]
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.name]).status();
    }
}

/// A TCP relay from the namespace's host-side address to a server on
/// loopback, so that the server is reached across the veth. Stops accepting on
/// drop.
pub(crate) struct Relay {
    /// Its port on the host-side address.
    pub(crate) port: u16,
    task: tokio::task::JoinHandle<()>,
}

impl Relay {
    /// Relays `ns.host_ip:<port>` to `127.0.0.1:target`.
    pub(crate) async fn to(ns: &Netns, target: u16) -> Self {
        let listener = TcpListener::bind((ns.host_ip, 0)).await.expect("bind on the veth");
        let port = listener.local_addr().unwrap().port();
        let task = tokio::spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let Ok(mut outbound) = TcpStream::connect(("127.0.0.1", target)).await else { return };
                    let _ = inbound.set_nodelay(true);
                    let _ = outbound.set_nodelay(true);
                    let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                });
            }
        });
        Self { port, task }
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.task.abort();
    }
}
