//! `allowed_outbound_hosts`: which network destinations a component may open, by
//! Spin's rules (its `outbound-networking-config` crate, read for behaviour).
//!
//! An entry is `<scheme>://<host>[:<port>]`:
//!
//! - scheme: `*` or letters only (no lists);
//! - host: `*`; `self` / `self.alt` (relative requests only); an IP network
//!   (`10.0.0.0/8`, host bits dropped) or a bare IP address (a network of one);
//!   `*.domain` (subdomains of a domain, not an IP); or a literal host, which
//!   must be a valid URL host: no user information (`:pw@host` is refused with
//!   "Invalid allowed host"), no path, no wildcard elsewhere;
//! - port: `*`, a number, a half-open range `a..b`, or none, when the scheme's
//!   well-known port applies (redis 6379, postgres 5432, mysql 3306, mqtt 1883,
//!   http 80, https 443; any other scheme must name a port).
//!
//! When entries are checked, also as Spin: an entry without templates is checked
//! when the app loads ([`AllowedHosts::validate`]: a bad one stops the load); a
//! templated one is checked at load with the variables' defaults, and resolved
//! with the values in force for the running component ([`AllowedHosts::resolve`]).
//! An entry that resolves to nothing (an empty variable, or a bare `http://` /
//! `https://`) is skipped. One that resolves to something invalid does not stop
//! the app: every outbound connection of that component then fails with the
//! parse error (Spin's `Error::Other("Invalid allowed host ...")`).

use anyhow::{Context as _, bail};
use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, utf8_percent_encode};
use url::Host;

use crate::template;

/// One parsed `allowed_outbound_hosts` entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AllowedHost {
    scheme: Option<String>,
    host: HostRule,
    port: PortRule,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum HostRule {
    Any,
    /// Relative ("self") requests only.
    ToSelf,
    /// A domain's subdomains: the suffix, with its leading dot.
    SubdomainOf(String),
    Literal(Host),
    Network(ipnet::IpNet),
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum PortRule {
    Any,
    /// A half-open range (a single port is `p..p+1`).
    Range(u32, u32),
}

/// The well-known port of a scheme, as Spin knows them.
fn well_known_port(scheme: &str) -> Option<u16> {
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

impl PortRule {
    fn parse(port: &str, scheme: &str) -> anyhow::Result<Self> {
        let number = |p: &str| p.parse::<u16>().map(u32::from);
        Ok(match port {
            "" => {
                let p = well_known_port(scheme)
                    .with_context(|| format!("no port was provided and the scheme {scheme:?} does not have a known default port number"))?;
                Self::Range(u32::from(p), u32::from(p) + 1)
            }
            "*" => Self::Any,
            p if p.starts_with('{') => bail!("port lists are not yet supported"),
            p => match p.split_once("..") {
                Some((a, b)) => match (number(a), number(b)) {
                    (Ok(a), Ok(b)) => Self::Range(a, b),
                    _ => bail!("port range {p:?} contains non-number"),
                },
                None => {
                    let n = number(p).with_context(|| format!("port {p:?} is not a number"))?;
                    Self::Range(n, n + 1)
                }
            },
        })
    }

    fn allows(&self, port: Option<u16>, scheme: &str) -> bool {
        match self {
            Self::Any => true,
            Self::Range(a, b) => port.or_else(|| well_known_port(scheme)).is_some_and(|p| (*a..*b).contains(&u32::from(p))),
        }
    }
}

/// An IP network written with its prefix length; host bits are dropped
/// (`127.0.0.1/24` is `127.0.0.0/24`). A bare address is no network: it is a
/// literal host (an IPv6 one in brackets), as in Spin.
fn ip_network(text: &str) -> Option<ipnet::IpNet> {
    text.parse::<ipnet::IpNet>().ok().map(|n| n.trunc())
}

impl HostRule {
    fn parse(host: &str) -> anyhow::Result<Self> {
        let host = host.trim();
        match host {
            "*" => return Ok(Self::Any),
            "self" | "self.alt" => return Ok(Self::ToSelf),
            h if h.starts_with('{') => bail!("host lists are not yet supported"),
            _ => {}
        }
        if let Some(net) = ip_network(host) {
            return Ok(Self::Network(net));
        }
        let host = host.strip_suffix('/').unwrap_or(host);
        if host.contains('/') {
            bail!("must not include a path");
        }
        if let Some(domain) = host.strip_prefix("*.") {
            if domain.contains('*') {
                bail!("wildcards are allowed only as prefixes");
            }
            return match Host::parse(domain).with_context(|| format!("invalid wildcard host \"*.{domain}\""))? {
                Host::Domain(d) => Ok(Self::SubdomainOf(format!(".{d}"))),
                _ => bail!("wildcard suffix must be a domain"),
            };
        }
        if host.contains('*') {
            bail!("wildcards are allowed only as subdomains");
        }
        Ok(Self::Literal(Host::parse(host)?))
    }

    fn allows(&self, host: &str) -> bool {
        let Ok(host) = Host::parse(host) else { return false };
        match (self, host) {
            (Self::Any, _) => true,
            (Self::SubdomainOf(suffix), Host::Domain(d)) => d.ends_with(suffix.as_str()),
            (Self::Literal(l), h) => *l == h,
            (Self::Network(n), Host::Ipv4(ip)) => n.contains(&std::net::IpAddr::V4(ip)),
            (Self::Network(n), Host::Ipv6(ip)) => n.contains(&std::net::IpAddr::V6(ip)),
            _ => false,
        }
    }
}

impl AllowedHost {
    /// Parses one entry (no templates), with Spin's error messages.
    pub fn parse(entry: &str) -> anyhow::Result<Self> {
        let entry = entry.trim();
        let Some((scheme, rest)) = entry.split_once("://") else {
            if matches!(entry, "*" | ":" | "" | "?") {
                bail!(
                    "{entry:?} is not an allowed outbound host format.\nHosts must be in the form <scheme>://<host>[:<port>], with '*' wildcards allowed for each.\nIf you intended to allow all outbound networking, you can use '*://*:*' - this will obviate all network sandboxing."
                );
            }
            bail!("{entry:?} does not contain a scheme (e.g., 'http://' or '*://')");
        };
        // The port follows the last ':', unless the whole rest is a host (an
        // IPv6 address or network, which has colons of its own).
        let (host, port) = match rest.rsplit_once(':') {
            None => (rest, ""),
            Some((h, "")) => (h, ""),
            Some(_) if HostRule::parse(rest).is_ok() => (rest, ""),
            Some((h, tail)) => match tail.split_once('/') {
                Some((_, path)) if !path.is_empty() => bail!("{entry:?} has a path but is not allowed to"),
                Some((port, _)) => (h, port),
                None => (h, tail),
            },
        };
        // Checked in Spin's order (port, scheme, host), so the same entry fails
        // with the same message.
        let port = PortRule::parse(port, scheme).with_context(|| format!("Invalid allowed host port {port:?}"))?;
        let scheme = match scheme {
            "*" => None,
            s if s.starts_with('{') => Err(anyhow::anyhow!("scheme lists are not supported")).with_context(|| format!("Invalid allowed host scheme {s:?}"))?,
            s if s.chars().any(|c| !c.is_alphabetic()) => {
                Err(anyhow::anyhow!("only alphabetic characters are allowed")).with_context(|| format!("Invalid allowed host scheme {s:?}"))?
            }
            s => Some(s.to_owned()),
        };
        let host = HostRule::parse(host).with_context(|| format!("Invalid allowed host {host:?}"))?;
        Ok(Self { scheme, host, port })
    }

    fn allows(&self, url: &Target) -> bool {
        self.scheme.as_deref().is_none_or(|s| s == url.scheme) && self.host.allows(&url.host) && self.port.allows(url.port, &url.scheme)
    }
}

/// A destination a component asks for, as Spin reads it.
#[derive(Debug)]
struct Target {
    scheme: String,
    host: String,
    port: Option<u16>,
}

/// Characters of user information left as they are when it is re-encoded.
const USERINFO_KEEP: &AsciiSet = &NON_ALPHANUMERIC.remove(b'-').remove(b'.').remove(b'_').remove(b'~');

impl Target {
    /// Parses `url`; one that does not parse as it is (no scheme) is read as
    /// `default_scheme://url`. User information is percent-encoded first, so
    /// that a password holding `#`, `/` or `@` does not change where the host
    /// is.
    fn parse(url: &str, default_scheme: &str) -> Option<Self> {
        let mut url = url.to_owned();
        if let Some(at) = url.find('@') {
            let start = url.find("://").map_or(0, |i| i + 3);
            let path = url[start..].find('/').map_or(usize::MAX, |i| i + start);
            if at < path {
                let encoded = utf8_percent_encode(&url[start..at], USERINFO_KEEP).to_string();
                url = format!("{}{encoded}{}", &url[..start], &url[at..]);
            }
        }
        let parsed = match url::Url::parse(&url) {
            Ok(u) if u.has_host() => u,
            _ => url::Url::parse(&format!("{default_scheme}://{url}")).ok()?,
        };
        Some(Self { scheme: parsed.scheme().to_owned(), host: parsed.host_str()?.to_owned(), port: parsed.port() })
    }

    /// `scheme://host[:port]`: how a refusal names the destination (never with
    /// user information).
    fn authority(&self) -> String {
        match self.port {
            Some(p) => format!("{}://{}:{p}", self.scheme, self.host),
            None => format!("{}://{}", self.scheme, self.host),
        }
    }
}

/// The destinations one component may reach: its entries resolved with the
/// variables in force, or the error that resolving them gave.
#[derive(Debug, Clone)]
pub struct AllowedHosts(Result<Vec<AllowedHost>, String>);

impl Default for AllowedHosts {
    fn default() -> Self {
        Self(Ok(Vec::new()))
    }
}

/// Whether a resolved entry is skipped rather than parsed: an empty variable
/// makes an optional destination.
fn skipped(resolved: &str) -> bool {
    matches!(resolved, "" | "http://" | "https://")
}

impl AllowedHosts {
    /// The load-time check: every entry without templates must parse, and every
    /// templated one must parse once rendered with the variables' defaults
    /// (`default_of`; an entry naming a variable without a default is left to
    /// run time).
    pub fn validate(entries: &[String], default_of: impl Fn(&str) -> Option<String>) -> anyhow::Result<()> {
        if let [only] = entries
            && only == "insecure:allow-all"
        {
            bail!("'insecure:allow-all' is not allowed - use '*://*:*' instead if you really want to allow all outbound traffic'");
        }
        for entry in entries {
            let parts = template::parse(entry)?;
            if parts.iter().all(|p| matches!(p, template::Part::Literal(_))) {
                AllowedHost::parse(entry)?;
                continue;
            }
            let Ok(resolved) = template::render(entry, &default_of) else { continue };
            if !skipped(&resolved) {
                AllowedHost::parse(&resolved)
                    .with_context(|| format!("using default variable value(s) with template {entry:?} results in invalid config {resolved:?}"))?;
            }
        }
        Ok(())
    }

    /// The entries for a running component, rendered with `lookup` (the values
    /// in force). An entry that does not parse makes every check fail with its
    /// error (logged once here), as Spin fails each outbound call.
    pub fn resolve(entries: &[String], lookup: impl Fn(&str) -> Option<String>) -> Self {
        let parsed = entries
            .iter()
            .map(|e| template::render(e, &lookup))
            .filter(|r| !r.as_ref().is_ok_and(|r| skipped(r)))
            .map(|r| r.and_then(|r| AllowedHost::parse(&r)))
            .collect::<anyhow::Result<Vec<_>>>()
            .map_err(|e| e.to_string());
        if let Err(e) = &parsed {
            eprintln!("{}", log_line(e, entries, &lookup));
        }
        Self(parsed)
    }

    /// Parses entries that need no rendering (empty ones skipped).
    pub fn parse<S: AsRef<str>>(entries: &[S]) -> anyhow::Result<Self> {
        let hosts = entries.iter().map(AsRef::as_ref).filter(|e| !skipped(e)).map(AllowedHost::parse).collect::<anyhow::Result<_>>()?;
        Ok(Self(Ok(hosts)))
    }

    /// Whether `url` (e.g. `redis://:pw@127.0.0.1:6379/0`) may be opened: `Err`
    /// with the resolution error when the entries did not resolve. A URL with
    /// no scheme is read as `default_scheme://url`; an unparseable URL is not
    /// allowed.
    pub fn check_url(&self, url: &str, default_scheme: &str) -> Result<bool, String> {
        // As Spin: an address that does not parse is refused before the entries
        // are resolved.
        let Some(target) = Target::parse(url, default_scheme) else { return Ok(false) };
        let hosts = self.0.as_ref().map_err(Clone::clone)?;
        Ok(hosts.iter().any(|h| h.allows(&target)))
    }

    /// [`AllowedHosts::check_url`], a resolution error counting as not allowed.
    pub fn allows_url(&self, url: &str, default_scheme: &str) -> bool {
        self.check_url(url, default_scheme).unwrap_or(false)
    }
}

/// The host's log line for entries that did not resolve. The error repeats the
/// entry, which may hold a password (it is what the component gets back, as
/// from Spin); the host's own line masks the user information of every rendered
/// entry.
fn log_line(error: &str, entries: &[String], lookup: &impl Fn(&str) -> Option<String>) -> String {
    let mut shown = error.to_owned();
    for entry in entries {
        if let Ok(rendered) = template::render(entry, lookup)
            && let Some((_, rest)) = rendered.split_once("://")
            && let Some(at) = rest.rfind('@')
        {
            shown = shown.replace(&rest[..at], "***");
        }
    }
    format!("Error parsing allowed outbound hosts: {shown}")
}

/// `url` as a refusal names it: `scheme://host[:port]`, without the user
/// information Spin never logs.
pub fn destination(url: &str, default_scheme: &str) -> String {
    Target::parse(url, default_scheme).map_or_else(|| "<unparseable address>".to_owned(), |t| t.authority())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hosts(entries: &[&str]) -> AllowedHosts {
        AllowedHosts::parse(entries).unwrap()
    }

    fn refused(entry: &str) -> String {
        format!("{:#}", AllowedHost::parse(entry).expect_err(entry))
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
        assert!(hosts(&["redis://LocalHost"]).allows_url("redis://localhost:6379", "redis"), "hosts compare without case");
    }

    /// The rule that broke every password-protected deployment: user
    /// information is no part of an entry. Spin refuses it, port first, then
    /// host, with these words.
    #[test]
    fn user_information_in_an_entry_is_refused() {
        assert_eq!(refused("redis://:s3cret@127.0.0.1:6379"), r#"Invalid allowed host ":s3cret@127.0.0.1": invalid international domain name"#);
        assert!(refused("redis://user:pw@redis.internal").starts_with("Invalid allowed host port \"pw@redis.internal\""));
        assert!(refused("postgres://app@db:5432").starts_with(r#"Invalid allowed host "app@db""#));
    }

    /// A URL's user information is never mistaken for its host, whatever the
    /// password holds.
    #[test]
    fn credentials_in_urls_do_not_move_the_host() {
        let h = hosts(&["redis://127.0.0.1:6379", "postgres://db:5432"]);
        for url in ["redis://:s3cret@127.0.0.1:6379", "redis://user:pa#ss@127.0.0.1:6379/0", "redis://u:p@ss@127.0.0.1:6379"] {
            assert!(h.allows_url(url, "redis"), "{url}");
        }
        // Spin takes the first '/' for the start of the path, so a raw '/' in a
        // password makes the address unreadable (percent-encode it: %2F).
        assert!(!h.allows_url("redis://:a/b@127.0.0.1:6379", "redis"));
        assert!(h.allows_url("redis://:a%2Fb@127.0.0.1:6379", "redis"));
        assert!(h.allows_url("user%3Apass%23word@db", "postgres"));
        assert!(!h.allows_url("redis://127.0.0.1@evil.example:6379", "redis"));
        assert_eq!(destination("redis://:s3cret@127.0.0.1:6379/0", "redis"), "redis://127.0.0.1:6379");
    }

    /// Wildcards for scheme, host and port, and port ranges, work as Spin's;
    /// a subdomain wildcard matches subdomains only, and domains only.
    #[test]
    fn wildcards_and_ranges() {
        assert!(hosts(&["*://*:*"]).allows_url("redis://10.1.2.3:1", "redis"));
        assert!(hosts(&["redis://*:*"]).allows_url("redis://example.com:7000", "redis"));
        let sub = hosts(&["redis://*.Example.com:*"]);
        assert!(sub.allows_url("redis://a.b.example.com:1", "redis"));
        assert!(!sub.allows_url("redis://example.com:1", "redis"));
        assert!(!sub.allows_url("redis://myexample.com:1", "redis"));
        let r = hosts(&["redis://h:7000..7002"]);
        assert!(r.allows_url("redis://h:7001", "redis"));
        assert!(!r.allows_url("redis://h:7002", "redis"));
        assert!(hosts(&["https://my.api.com/"]).allows_url("https://my.api.com/a/b", "https"), "one trailing slash is allowed");
    }

    /// IP networks and bare addresses match by containment; IPv6 literals and
    /// networks parse with or without a port.
    #[test]
    fn networks_and_ipv6() {
        let n = hosts(&["*://127.0.0.1/24:63551", "http://[::1]", "http://2001:db8::/32", "redis://10.0.0.0/8:*"]);
        assert!(n.allows_url("tcp://127.0.0.9:63551", "tcp"));
        assert!(!n.allows_url("tcp://127.0.1.1:63551", "tcp"));
        assert!(n.allows_url("http://[::1]/x", "http"));
        assert!(!n.allows_url("http://[::1]:81", "http"));
        assert!(n.allows_url("http://[2001:db8:abcd::1]", "http"));
        assert!(n.allows_url("redis://10.200.3.4:7000", "redis"));
        assert!(!n.allows_url("redis://example.com:7000", "redis"), "a network matches addresses only");
        AllowedHost::parse("http://[::1]:8000..9000").unwrap();
        AllowedHost::parse("http://2001:db8::/32:443").unwrap();
        assert!(hosts(&["redis://127.0.0.1"]).allows_url("redis://127.0.0.1", "redis"), "a bare address is a literal host");
        for bare_v6 in ["http://::1", "http://2001:db8::1", "redis://::1:6379"] {
            assert!(AllowedHost::parse(bare_v6).is_err(), "{bare_v6}: IPv6 needs brackets, as in Spin");
        }
    }

    /// What Spin refuses is refused at load.
    #[test]
    fn malformed_entries_are_refused() {
        for bad in [
            "127.0.0.1:6379",
            "foo://h",
            "redis://h:notaport",
            "redis://h:70000",
            "redis://h:8080..70000",
            "redis://h:1..",
            "http://example.com:8080/p",
            "http://*.example.com/p",
            "http://example.com//",
            "http://*.",
            "http://*.127.0.0.1",
            "http://a*.example.com",
            "http://*.a*.com",
            "http://exa[mple.com",
            "http://example%GG.com",
            "http://[::1",
            "http://{a,b}.com",
            "{http,https}://h",
            "h1tp://h",
            "*",
            "",
        ] {
            assert!(AllowedHost::parse(bad).is_err(), "{bad:?} should be refused");
        }
        assert_eq!(refused("http://example.com:99999"), "Invalid allowed host port \"99999\": port \"99999\" is not a number: number too large to fit in target type");
    }

    /// Templated entries: checked at load with the defaults, resolved with the
    /// values in force; empty ones skipped; one that resolves to an invalid
    /// entry fails every check with Spin's message instead of the load.
    #[test]
    fn templated_entries_resolve_like_spin() {
        let entries = vec!["{{ redis_address }}".to_owned(), "{{ optional }}".to_owned(), "https://{{ none }}".to_owned()];
        let defaults = |n: &str| match n {
            "redis_address" => Some("redis://127.0.0.1:6379".to_owned()),
            "optional" | "none" => Some(String::new()),
            _ => None,
        };
        AllowedHosts::validate(&entries, defaults).unwrap();
        assert!(AllowedHosts::validate(&["redis://:pw@h:1".to_owned()], defaults).is_err(), "a literal is checked at load");
        assert!(AllowedHosts::validate(&["{{ redis_address }}".to_owned()], |_| Some("redis://:pw@h:1".to_owned())).is_err());
        assert!(AllowedHosts::validate(&["{{ required }}".to_owned()], |_| None).is_ok(), "no default: checked at run time");
        assert!(AllowedHosts::validate(&["insecure:allow-all".to_owned()], defaults).is_err());

        let with_password = |n: &str| if n == "redis_address" { Some("redis://:s3cret@127.0.0.1:6379".to_owned()) } else { defaults(n) };
        let resolved = AllowedHosts::resolve(&entries, with_password);
        assert_eq!(resolved.check_url("redis://:s3cret@127.0.0.1:6379", "redis"), Err(r#"Invalid allowed host ":s3cret@127.0.0.1""#.to_owned()));
        assert_eq!(resolved.check_url("not a url at all", "redis"), Ok(false), "an unreadable address is refused first");
        let line = log_line(r#"Invalid allowed host ":s3cret@127.0.0.1""#, &entries, &with_password);
        assert_eq!(line, r#"Error parsing allowed outbound hosts: Invalid allowed host "***@127.0.0.1""#, "the host's own line masks it");
        let fine = AllowedHosts::resolve(&entries, defaults);
        assert_eq!(fine.check_url("redis://127.0.0.1:6379", "redis"), Ok(true));
    }
}
