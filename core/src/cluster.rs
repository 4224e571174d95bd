//! Redis Cluster, as a client must know it when its connection follows no
//! redirects (Spin's outbound Redis): which hash slot a key is in, which
//! master owns each slot (`CLUSTER NODES`, one text reply), what a `MOVED`,
//! `ASK` or `TRYAGAIN` refusal says, and the URL of a node reached with a seed
//! node's scheme and credentials.

use crate::redact::userinfo_of;

/// Hash slots in a Redis Cluster.
pub const SLOTS: u16 = 16_384;

/// The hash slot of `key`: CRC16 (XMODEM) of its hash tag (the text between
/// the first `{` and the next `}`, if not empty) or of the whole key, modulo
/// 16384, as Redis computes it.
pub fn key_slot(key: &[u8]) -> u16 {
    let tagged = key.iter().position(|&b| b == b'{').and_then(|open| {
        let rest = &key[open + 1..];
        rest.iter().position(|&b| b == b'}').filter(|&close| close > 0).map(|close| &rest[..close])
    });
    crc16(tagged.unwrap_or(key)) % SLOTS
}

fn crc16(data: &[u8]) -> u16 {
    let mut crc: u16 = 0;
    for &byte in data {
        crc ^= u16::from(byte) << 8;
        for _ in 0..8 {
            crc = if crc & 0x8000 != 0 { (crc << 1) ^ 0x1021 } else { crc << 1 };
        }
    }
    crc
}

/// Which master owns each slot, as `host:port`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SlotMap {
    /// `(first slot, last slot, node)`, sorted by first slot.
    ranges: Vec<(u16, u16, String)>,
    /// The node the map was read through (flagged `myself`), if a master.
    myself: Option<String>,
}

impl SlotMap {
    /// Reads `CLUSTER NODES`: one line per node, `<id> <ip:port@cport[,hostname]>
    /// <flags> <master> <ping> <pong> <epoch> <link> <slot>...`, a slot being `n`
    /// or `a-b` (`[n->-id]` and `[n-<-id]`, slots being migrated, are left out:
    /// their owner is still the node that lists them plainly). Only masters that
    /// are not failing count.
    pub fn parse_nodes(text: &str) -> Result<Self, String> {
        let mut ranges = Vec::new();
        let mut myself = None;
        for line in text.lines().map(str::trim).filter(|l| !l.is_empty()) {
            let fields: Vec<&str> = line.split(' ').collect();
            if fields.len() < 8 {
                return Err(format!("a CLUSTER NODES line of {} fields", fields.len()));
            }
            let flags: Vec<&str> = fields[2].split(',').collect();
            if !flags.contains(&"master") || flags.iter().any(|f| matches!(*f, "fail" | "fail?" | "handshake" | "noaddr")) {
                continue;
            }
            // `ip:port@cport[,hostname]`: the hostname, when the node
            // announces one (`cluster-announce-hostname`: what TLS
            // certificates and allowed hosts name), else the IP.
            let (endpoint, hostname) = fields[1].split_once(',').unwrap_or((fields[1], ""));
            let ip_port = endpoint.split('@').next().unwrap_or_default();
            if ip_port.is_empty() || ip_port.starts_with(':') {
                continue; // no address known yet
            }
            let address = match (hostname.is_empty(), ip_port.rsplit_once(':')) {
                (false, Some((_, port))) => format!("{hostname}:{port}"),
                _ => ip_port.to_owned(),
            };
            if flags.contains(&"myself") {
                myself = Some(address.clone());
            }
            for slot in &fields[8..] {
                if slot.starts_with('[') {
                    continue;
                }
                let (first, last) = slot.split_once('-').unwrap_or((slot, slot));
                let (Ok(first), Ok(last)) = (first.parse::<u16>(), last.parse::<u16>()) else {
                    return Err(format!("a slot {slot:?} in CLUSTER NODES"));
                };
                if first > last || last >= SLOTS {
                    return Err(format!("a slot range {slot:?} in CLUSTER NODES"));
                }
                ranges.push((first, last, address.clone()));
            }
        }
        ranges.sort();
        Ok(Self { ranges, myself })
    }

    /// The master the map was read through, if it is one (a replica, or a
    /// master that is failing, is none).
    pub fn myself(&self) -> Option<&str> {
        self.myself.as_deref()
    }

    /// A hash tag (`heal<n>`, the first such) whose slot `node` owns: keys
    /// named with it live on that node. `None` if it owns no slot.
    pub fn tag_owned_by(&self, node: &str) -> Option<String> {
        if !self.ranges.iter().any(|(_, _, owner)| owner == node) {
            return None;
        }
        // A node with a single slot is found after about 16,384 tries.
        (0..1u32 << 22).map(|n| format!("heal{n}")).find(|tag| self.owner(key_slot(tag.as_bytes())) == Some(node))
    }

    /// The node that owns `slot`, if any does.
    pub fn owner(&self, slot: u16) -> Option<&str> {
        let i = self.ranges.partition_point(|(first, _, _)| *first <= slot);
        let (_, last, node) = self.ranges.get(i.checked_sub(1)?)?;
        (slot <= *last).then_some(node.as_str())
    }

    /// Sets `slot`'s owner (a `MOVED` says so before a new map is read).
    pub fn set_owner(&mut self, slot: u16, node: &str) {
        let mut ranges = Vec::with_capacity(self.ranges.len() + 2);
        for (first, last, owner) in self.ranges.drain(..) {
            if slot < first || slot > last {
                ranges.push((first, last, owner));
                continue;
            }
            if first < slot {
                ranges.push((first, slot - 1, owner.clone()));
            }
            if slot < last {
                ranges.push((slot + 1, last, owner));
            }
        }
        ranges.push((slot, slot, node.to_owned()));
        ranges.sort();
        self.ranges = ranges;
    }

    /// Every node that owns a slot, each once.
    pub fn nodes(&self) -> Vec<&str> {
        let mut out: Vec<&str> = Vec::new();
        for (_, _, node) in &self.ranges {
            if !out.contains(&node.as_str()) {
                out.push(node);
            }
        }
        out
    }
}

/// A cluster's refusal that names where to go, or to try again.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Redirect {
    /// `MOVED <slot> <node>`: the slot is the node's now (the map is out of date).
    Moved {
        /// The slot.
        slot: u16,
        /// Its owner, `host:port`.
        node: String,
    },
    /// `ASK <slot> <node>`: the slot is being migrated and the key is (or will
    /// be) on the node: send `ASKING` there, then the command, once.
    Ask {
        /// The slot.
        slot: u16,
        /// The node it is being migrated to, `host:port`.
        node: String,
    },
    /// `TRYAGAIN`: the call's keys are split between the two nodes of a slot
    /// being migrated; it succeeds once the migration of the slot is done.
    TryAgain,
}

impl Redirect {
    /// Reads an error message of a client that passes the server's error on
    /// (redis-rs words them `MOVED 3999 host:port`, `Moved: 3999 host:port`,
    /// `An error was signalled by the server - Moved: 3999 host:port`, …).
    pub fn parse(message: &str) -> Option<Self> {
        let words: Vec<&str> = message.split([' ', ':', '(', ')', '"', '\'']).filter(|w| !w.is_empty()).collect();
        for (i, word) in words.iter().enumerate() {
            let word = word.to_ascii_uppercase();
            if word == "TRYAGAIN" {
                return Some(Self::TryAgain);
            }
            if word != "MOVED" && word != "ASK" {
                continue;
            }
            // `<slot> <host>:<port>`, the colon split off above: the slot, then
            // the node as the rest of the message gives it back.
            let Some(slot) = words.get(i + 1).and_then(|s| s.parse::<u16>().ok()).filter(|s| *s < SLOTS) else { continue };
            // The node follows the slot, after the word (not at an earlier
            // occurrence of the same digits).
            let word_at = message.to_ascii_uppercase().find(word.as_str())?;
            let after_word = &message[word_at + word.len()..];
            let after_slot = after_word.find(words[i + 1]).map(|at| &after_word[at + words[i + 1].len()..])?;
            let node = after_slot.split_whitespace().next()?.trim_end_matches(['"', '\'', ')', ',']);
            if !node.contains(':') {
                continue;
            }
            let node = node.to_owned();
            return Some(if word == "MOVED" { Self::Moved { slot, node } } else { Self::Ask { slot, node } });
        }
        None
    }
}

/// The URL of `node` (`host:port`) reached as `seed` is: its scheme, user
/// information (credentials) and query kept, its host and port replaced.
pub fn node_url(seed: &str, node: &str) -> String {
    let Some((scheme, rest)) = seed.trim().split_once("://") else { return format!("redis://{node}") };
    let after = userinfo_of(seed).map_or(rest, |info| &rest[info.len() + 1..]);
    let tail = after.find(['/', '?', '#']).map_or("", |at| &after[at..]);
    match userinfo_of(seed) {
        Some(info) => format!("{scheme}://{info}@{node}{tail}"),
        None => format!("{scheme}://{node}{tail}"),
    }
}

/// `host:port` of a Redis URL (no credentials), to compare with a map's nodes.
pub fn node_of(url: &str) -> Option<String> {
    let (_, rest) = url.trim().split_once("://")?;
    let after = userinfo_of(url).map_or(rest, |info| &rest[info.len() + 1..]);
    let host = after.split(['/', '?', '#']).next().unwrap_or_default();
    (!host.is_empty()).then(|| if host.contains(':') { host.to_owned() } else { format!("{host}:6379") })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Slots as Redis computes them (`CLUSTER KEYSLOT`).
    #[test]
    fn slots_are_redis_s() {
        assert_eq!(key_slot(b"foo"), 12182);
        assert_eq!(key_slot(b"bar"), 5061);
        assert_eq!(key_slot(b"123456789"), 12739);
        // The hash tag alone counts; an empty tag does not make one.
        assert_eq!(key_slot(b"{user1000}.following"), key_slot(b"user1000"));
        assert_eq!(key_slot(b"spillway:{s3}:stream"), key_slot(b"s3"));
        // An empty first tag: the whole key (Redis's own example).
        assert_eq!(key_slot(b"foo{}{bar}"), crc16(b"foo{}{bar}") % SLOTS);
        assert_ne!(key_slot(b"foo{}{bar}"), key_slot(b"bar"));
        assert_eq!(key_slot(b"foo{{bar}}zap"), key_slot(b"{bar"));
    }

    const NODES: &str = "\
07c37dfeb235213a872192d90877d0cd55635b91 127.0.0.1:30004@31004,hostname4 slave e7d1eecce10fd6bb5eb35b9f99a514335d9ba9ca 0 1426238317239 4 connected
67ed2db8d677e59ec4a4cefb06858cf2a1a89fa1 127.0.0.1:30002@31002,hostname2 master - 0 1426238316232 2 connected 5461-10922
292f8b365bb7edb5e285caf0b7e6ddc7265d2f4f 127.0.0.1:30003@31003,hostname3 master - 0 1426238318243 3 connected 10923-16383 [10922-<-67ed2db8d677e59ec4a4cefb06858cf2a1a89fa1]
e7d1eecce10fd6bb5eb35b9f99a514335d9ba9ca 127.0.0.1:30001@31001,hostname1 myself,master - 0 0 1 connected 0-5460
824fe116063bc5fcf9f4ffd895bc17aee7731ac3 127.0.0.1:30006@31006 master,fail - 1426238316232 1426238316232 6 disconnected 100
";

    #[test]
    fn the_map_is_read_from_cluster_nodes() {
        let m = SlotMap::parse_nodes(NODES).unwrap();
        // The announced hostnames, with the ports.
        assert_eq!(m.owner(0), Some("hostname1:30001"));
        assert_eq!(m.owner(5460), Some("hostname1:30001"));
        assert_eq!(m.owner(5461), Some("hostname2:30002"));
        // Being migrated: still its source's.
        assert_eq!(m.owner(10922), Some("hostname2:30002"));
        assert_eq!(m.owner(16383), Some("hostname3:30003"));
        assert_eq!(m.nodes(), ["hostname1:30001", "hostname2:30002", "hostname3:30003"]);
        assert_eq!(m.myself(), Some("hostname1:30001"));
        // Without hostnames, the IPs.
        let plain = SlotMap::parse_nodes("e7d1 127.0.0.1:30001@31001 myself,master - 0 0 1 connected 0-16383").unwrap();
        assert_eq!(plain.owner(7), Some("127.0.0.1:30001"));
        assert!(SlotMap::parse_nodes("x y").is_err());
        assert!(SlotMap::parse_nodes("a 1.2.3.4:1@2 master - 0 0 1 connected 9-x").is_err());
        assert_eq!(SlotMap::parse_nodes("").unwrap().owner(0), None);
    }

    /// A tag is found for each node that owns slots, even a single one, and
    /// its keys hash there; none for a node without slots.
    #[test]
    fn a_tag_lands_on_the_node_asked_for() {
        let mut m = SlotMap::parse_nodes(NODES).unwrap();
        for node in m.nodes().into_iter().map(str::to_owned).collect::<Vec<_>>() {
            let tag = m.tag_owned_by(&node).unwrap();
            assert_eq!(m.owner(key_slot(format!("spillway:{{{tag}}}:heal:3:lease").as_bytes())), Some(node.as_str()));
        }
        m.set_owner(12345, "127.0.0.1:7000");
        let tag = m.tag_owned_by("127.0.0.1:7000").unwrap();
        assert_eq!(key_slot(tag.as_bytes()), 12345);
        assert_eq!(m.tag_owned_by("127.0.0.1:30006"), None, "failing, and no slots");
        let replica = SlotMap::parse_nodes("e7d1 127.0.0.1:30001@31001 myself,slave abc 0 0 1 connected").unwrap();
        assert_eq!(replica.myself(), None);
    }

    #[test]
    fn a_move_changes_one_slot() {
        let mut m = SlotMap::parse_nodes(NODES).unwrap();
        m.set_owner(5461, "hostname3:30003");
        assert_eq!((m.owner(5460), m.owner(5461), m.owner(5462)), (Some("hostname1:30001"), Some("hostname3:30003"), Some("hostname2:30002")));
        m.set_owner(0, "127.0.0.1:30009");
        assert_eq!((m.owner(0), m.owner(1)), (Some("127.0.0.1:30009"), Some("hostname1:30001")));
    }

    #[test]
    fn redirects_are_read_however_the_client_words_them() {
        let moved = Redirect::Moved { slot: 3999, node: "127.0.0.1:6381".into() };
        assert_eq!(Redirect::parse("MOVED 3999 127.0.0.1:6381"), Some(moved.clone()));
        assert_eq!(Redirect::parse("Moved: 3999 127.0.0.1:6381"), Some(moved.clone()));
        assert_eq!(Redirect::parse("An error was signalled by the server - Moved: 3999 127.0.0.1:6381"), Some(moved.clone()));
        assert_eq!(Redirect::parse("Error::Other(\"Moved: 3999 127.0.0.1:6381\")"), Some(moved));
        assert_eq!(Redirect::parse("ASK 12 10.0.0.2:7000"), Some(Redirect::Ask { slot: 12, node: "10.0.0.2:7000".into() }));
        assert_eq!(Redirect::parse("Ask: 12 redis-1.redis:7000"), Some(Redirect::Ask { slot: 12, node: "redis-1.redis:7000".into() }));
        assert_eq!(Redirect::parse("TryAgain: Multiple keys request during rehashing of slot"), Some(Redirect::TryAgain));
        assert_eq!(Redirect::parse("TRYAGAIN Multiple keys request during rehashing of slot"), Some(Redirect::TryAgain));
        assert_eq!(Redirect::parse("connection refused"), None);
        assert_eq!(Redirect::parse("ERR unknown command 'ASK'"), None);
        // The node after the word, not after an earlier match of the digits.
        assert_eq!(Redirect::parse("12 MOVED 12 10.0.0.3:7001"), Some(Redirect::Moved { slot: 12, node: "10.0.0.3:7001".into() }));
    }

    #[test]
    fn a_node_is_reached_with_the_seed_s_credentials() {
        assert_eq!(node_url("redis://:s3cret@10.0.0.1:6379", "10.0.0.2:7000"), "redis://:s3cret@10.0.0.2:7000");
        assert_eq!(node_url("rediss://app:pw@seed:6379/0?protocol=resp3", "n2:6380"), "rediss://app:pw@n2:6380/0?protocol=resp3");
        assert_eq!(node_url("redis://seed", "n2:6380"), "redis://n2:6380");
        assert_eq!(node_of("redis://:pw@10.0.0.1:7000/0").as_deref(), Some("10.0.0.1:7000"));
        assert_eq!(node_of("redis://seed").as_deref(), Some("seed:6379"));
    }
}
