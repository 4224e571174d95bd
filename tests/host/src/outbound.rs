//! `allowed_outbound_hosts`: which network destinations a component may open.
//!
//! Entries are `<scheme>://<host>[:<port>]` as in Spin: scheme `*` or a name, host
//! `*`, `*.domain` or a literal, port `*`, a number or a half-open range `a..b`; with
//! no port the scheme's well-known port applies. Hosts are compared literally
//! (`localhost` does not allow `127.0.0.1`).

use anyhow::{Context as _, bail};

/// One parsed `allowed_outbound_hosts` entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AllowedHost {
    scheme: Option<String>,
    host: HostPattern,
    ports: PortPattern,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum HostPattern {
    Any,
    Suffix(String),
    Exact(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum PortPattern {
    Any,
    Range(u16, u16),
}

/// The well-known port of a scheme, as Spin knows them.
fn default_port(scheme: &str) -> Option<u16> {
    Some(match scheme {
        "redis" => 6379,
        "postgres" => 5432,
        "mysql" => 3306,
        "mqtt" => 1883,
        "http" => 80,
        "https" => 443,
        _ => return None,
    })
}

impl AllowedHost {
    /// Parses one entry.
    pub fn parse(entry: &str) -> anyhow::Result<Self> {
        let (scheme, rest) = entry
            .split_once("://")
            .with_context(|| format!("allowed_outbound_hosts entry {entry:?} has no scheme (expected scheme://host[:port])"))?;
        let scheme = match scheme {
            "*" => None,
            s if !s.is_empty() && s.chars().all(|c| c.is_ascii_alphabetic()) => Some(s.to_owned()),
            s => bail!("allowed_outbound_hosts entry {entry:?} has an invalid scheme {s:?}"),
        };
        let rest = rest.trim_end_matches('/');
        let (host, port) = match rest.rsplit_once(':') {
            Some((h, p)) if !h.ends_with(']') || rest.starts_with('[') => (h, Some(p)),
            _ => (rest, None),
        };
        if host.is_empty() || host.contains('/') {
            bail!("allowed_outbound_hosts entry {entry:?} has an invalid host {host:?}");
        }
        let host = match host {
            "*" => HostPattern::Any,
            h if h.starts_with("*.") => HostPattern::Suffix(h[1..].to_ascii_lowercase()),
            h => HostPattern::Exact(h.to_ascii_lowercase()),
        };
        let ports = match port {
            Some("*") => PortPattern::Any,
            Some(p) => match p.split_once("..") {
                Some((a, b)) => {
                    let parse = |s: &str| s.parse::<u16>().with_context(|| format!("allowed_outbound_hosts entry {entry:?} has an invalid port range"));
                    PortPattern::Range(parse(a)?, parse(b)?)
                }
                None => {
                    let p: u16 = p.parse().with_context(|| format!("allowed_outbound_hosts entry {entry:?} has an invalid port {p:?}"))?;
                    PortPattern::Range(p, p.saturating_add(1))
                }
            },
            None => {
                let Some(p) = scheme.as_deref().and_then(default_port) else {
                    bail!("allowed_outbound_hosts entry {entry:?}: no port was provided and the scheme has no known default port number");
                };
                PortPattern::Range(p, p + 1)
            }
        };
        Ok(Self { scheme, host, ports })
    }

    fn allows(&self, scheme: &str, host: &str, port: u16) -> bool {
        let scheme_ok = self.scheme.as_deref().is_none_or(|s| s == scheme);
        let host_ok = match &self.host {
            HostPattern::Any => true,
            HostPattern::Suffix(suffix) => host.ends_with(suffix.as_str()),
            HostPattern::Exact(h) => h == host,
        };
        let port_ok = match self.ports {
            PortPattern::Any => true,
            PortPattern::Range(a, b) => (a..b).contains(&port),
        };
        scheme_ok && host_ok && port_ok
    }
}

/// The destinations one component may reach.
#[derive(Debug, Clone, Default)]
pub struct AllowedHosts(Vec<AllowedHost>);

impl AllowedHosts {
    /// Parses rendered entries; empty entries are skipped, as Spin does.
    pub fn parse<S: AsRef<str>>(entries: &[S]) -> anyhow::Result<Self> {
        entries
            .iter()
            .map(AsRef::as_ref)
            .filter(|e| !e.is_empty())
            .map(AllowedHost::parse)
            .collect::<anyhow::Result<_>>()
            .map(Self)
    }

    /// Whether `url` (e.g. `redis://127.0.0.1:6379/0`) may be opened. A URL with no
    /// scheme is read as `default_scheme://url`; an unparseable URL is not allowed.
    pub fn allows_url(&self, url: &str, default_scheme: &str) -> bool {
        let (scheme, rest) = match url.split_once("://") {
            Some((s, r)) => (s.to_ascii_lowercase(), r),
            None => (default_scheme.to_owned(), url),
        };
        // Drop userinfo and path.
        let authority = rest.split(['/', '?', '#']).next().unwrap_or_default();
        let authority = authority.rsplit_once('@').map_or(authority, |(_, a)| a);
        let (host, port) = match authority.rsplit_once(':') {
            Some((h, p)) if !h.is_empty() && !p.contains(']') => match p.parse::<u16>() {
                Ok(p) => (h, p),
                Err(_) => return false,
            },
            _ => match default_port(&scheme) {
                Some(p) => (authority, p),
                None => return false,
            },
        };
        if host.is_empty() {
            return false;
        }
        let host = host.to_ascii_lowercase();
        self.0.iter().any(|h| h.allows(&scheme, &host, port))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hosts(entries: &[&str]) -> AllowedHosts {
        AllowedHosts::parse(entries).unwrap()
    }

    /// An exact entry allows that address and nothing else; default ports apply.
    #[test]
    fn exact_entries_match_literally() {
        let h = hosts(&["redis://127.0.0.1:6379"]);
        assert!(h.allows_url("redis://127.0.0.1:6379", "redis"));
        assert!(h.allows_url("redis://127.0.0.1", "redis"));
        assert!(h.allows_url("127.0.0.1:6379", "redis"));
        assert!(!h.allows_url("redis://127.0.0.1:6380", "redis"));
        assert!(!h.allows_url("redis://localhost:6379", "redis"));
        assert!(!h.allows_url("rediss://127.0.0.1:6379", "redis"));
    }

    /// Wildcards for scheme, host and port, and port ranges, work as Spin's.
    #[test]
    fn wildcards_and_ranges() {
        assert!(hosts(&["*://*:*"]).allows_url("redis://10.1.2.3:1", "redis"));
        assert!(hosts(&["redis://*:*"]).allows_url("redis://example.com:7000", "redis"));
        assert!(hosts(&["redis://*.example.com:*"]).allows_url("redis://a.example.com:1", "redis"));
        let r = hosts(&["redis://h:7000..7002"]);
        assert!(r.allows_url("redis://h:7001", "redis"));
        assert!(!r.allows_url("redis://h:7002", "redis"));
    }

    /// No entry, no access; malformed entries are refused at load.
    #[test]
    fn empty_denies_and_malformed_fails() {
        assert!(!AllowedHosts::default().allows_url("redis://127.0.0.1:6379", "redis"));
        assert!(AllowedHost::parse("127.0.0.1:6379").is_err());
        assert!(AllowedHost::parse("foo://h").is_err());
    }
}
