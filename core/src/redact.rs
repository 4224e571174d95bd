//! Keeping credentials out of what Spillway says: answers, stats and log lines.
//!
//! Redis and PostgreSQL addresses carry credentials (`redis://user:password@host`),
//! and the errors of the servers, of Spin and of the client libraries may repeat
//! an address, or just the part of it that they could not parse. Two defences,
//! both applied to every text that leaves a component:
//!
//! - [`strip_userinfo`]: any `scheme://user:password@` in a text loses its user
//!   information;
//! - [`Redactor`]: every configured secret (each password and user information of
//!   the configured addresses, the admin token), in any of the spellings an error
//!   may use (as written, percent-decoded, percent-encoded), is replaced
//!   wherever it appears, URL or not.
//!
//! Clients never see a backend's own error text at all (a stable problem type and
//! a short message written here); these functions make the log lines and the
//! operators' figures safe too.

use percent_encoding::{NON_ALPHANUMERIC, percent_decode_str, utf8_percent_encode};

/// What replaces a secret.
pub const MASK: &str = "***";

/// What URL encoders leave as it is in user information: RFC 3986's unreserved
/// characters.
const USERINFO: &percent_encoding::AsciiSet = &NON_ALPHANUMERIC.remove(b'-').remove(b'.').remove(b'_').remove(b'~');

/// `text` with the hex digits of its `%XX` escapes in lower case.
fn lower_hex(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut escape = 0;
    for c in text.chars() {
        if c == '%' {
            escape = 2;
            out.push(c);
        } else if escape > 0 {
            escape -= 1;
            out.push(c.to_ascii_lowercase());
        } else {
            out.push(c);
        }
    }
    out
}

/// The shortest secret that is replaced by value: shorter ones would mask common
/// text (a password that short is no protection anyway).
const MIN_SECRET_LEN: usize = 4;

/// `url` without user information, path, query or fragment: `scheme://host:port`
/// (the part that is safe to name in a message). A text that is not a URL gives
/// `None`.
pub fn server_of(url: &str) -> Option<String> {
    let (scheme, rest) = url.trim().split_once("://")?;
    let after = userinfo_of(url).map_or(rest, |info| &rest[info.len() + 1..]);
    let host = after.split(['/', '?', '#']).next().unwrap_or_default();
    (!scheme.is_empty() && !host.is_empty()).then(|| format!("{scheme}://{host}"))
}

/// The user information of `url` (`user:password`, `:password` or `user`), if
/// any: what must never be shown. It runs to the last '@' of the URL, so that a
/// password holding '/', '?', '#' or '@' is taken whole (an '@' in a path would
/// be taken too: masking too much is the safe mistake).
pub fn userinfo_of(url: &str) -> Option<&str> {
    let (_, rest) = url.trim().split_once("://")?;
    let at = rest.rfind('@')?;
    (at > 0).then(|| &rest[..at])
}

/// The values of `password=` parameters of `url`'s query (PostgreSQL's URLs may
/// carry the password there).
fn query_passwords(url: &str) -> Vec<String> {
    let Some((_, query)) = url.split_once('?') else { return Vec::new() };
    query.split('&').filter_map(|kv| kv.strip_prefix("password=")).map(str::to_owned).collect()
}

/// `text` with the user information of every `scheme://…@` in it replaced by
/// [`MASK`].
pub fn strip_userinfo(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(i) = rest.find("://") {
        let (head, tail) = rest.split_at(i + 3);
        out.push_str(head);
        // The URL runs to the next blank or quote; its user information to the
        // last '@' in it that comes before the host.
        let url_end = tail.find(|c: char| c.is_whitespace() || matches!(c, '"' | '\'' | '`' | '<' | '>')).unwrap_or(tail.len());
        let url = &tail[..url_end];
        match url.rfind('@') {
            Some(at) if at > 0 => {
                out.push_str(MASK);
                out.push_str(&url[at..]);
            }
            _ => out.push_str(url),
        }
        rest = &tail[url_end..];
    }
    out.push_str(rest);
    out
}

/// Replaces configured secrets wherever they appear.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Redactor {
    /// Every spelling of every secret, longest first (so that a secret that
    /// contains another is replaced whole).
    spellings: Vec<String>,
}

impl Redactor {
    /// A redactor for these addresses (their user information and password) and
    /// plain secrets (tokens).
    pub fn new<'a>(addresses: impl IntoIterator<Item = &'a str>, secrets: impl IntoIterator<Item = &'a str>) -> Self {
        let mut raw: Vec<String> = Vec::new();
        for address in addresses {
            if let Some(info) = userinfo_of(address) {
                raw.push(info.to_owned());
                if let Some((_, password)) = info.split_once(':') {
                    raw.push(password.to_owned());
                }
            }
            raw.extend(query_passwords(address));
        }
        raw.extend(secrets.into_iter().map(str::to_owned));
        let mut spellings: Vec<String> = Vec::new();
        for s in raw {
            let decoded = percent_decode_str(&s).decode_utf8_lossy().into_owned();
            // As an error may spell it: as written, decoded, encoded the way URL
            // encoders do (all but unreserved characters, or all but letters and
            // digits), in lower-case hex too, and escaped as Rust's `{:?}` does.
            let encoded = [utf8_percent_encode(&decoded, USERINFO).to_string(), utf8_percent_encode(&decoded, NON_ALPHANUMERIC).to_string()];
            let lower = encoded.iter().map(|e| lower_hex(e)).collect::<Vec<_>>();
            let debug = decoded.escape_debug().to_string();
            for v in [s, decoded].into_iter().chain(encoded).chain(lower).chain([debug]) {
                if v.chars().count() >= MIN_SECRET_LEN && !spellings.contains(&v) {
                    spellings.push(v);
                }
            }
        }
        spellings.sort_by_key(|s| std::cmp::Reverse(s.len()));
        Self { spellings }
    }

    /// `text` with user information stripped from its URLs and every secret
    /// replaced by [`MASK`].
    pub fn redact(&self, text: &str) -> String {
        let mut out = strip_userinfo(text);
        for s in &self.spellings {
            if out.contains(s.as_str()) {
                out = out.replace(s.as_str(), MASK);
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A URL names its server without its credentials, whatever they contain.
    #[test]
    fn servers_are_named_without_credentials() {
        assert_eq!(server_of("redis://:s3cret@10.0.0.5:6379/0").as_deref(), Some("redis://10.0.0.5:6379"));
        assert_eq!(server_of("postgres://app:p@ss@db:5432/app?sslmode=require").as_deref(), Some("postgres://db:5432"));
        assert_eq!(server_of("rediss://user:pw@cache.example.com:6380").as_deref(), Some("rediss://cache.example.com:6380"));
        assert_eq!(server_of("redis://127.0.0.1:6379").as_deref(), Some("redis://127.0.0.1:6379"));
        assert_eq!(server_of("sqlite"), None);
        assert_eq!(userinfo_of("redis://:s3cret@h:1"), Some(":s3cret"));
        assert_eq!(userinfo_of("redis://user:pa@ss@h:1/0"), Some("user:pa@ss"));
        assert_eq!(userinfo_of("redis://h:1/0"), None);
        assert_eq!(userinfo_of("postgres://u:pa/ss@db:5432/app"), Some("u:pa/ss"));
        assert_eq!(userinfo_of("redis://:pa/ss#x@h:1/0?a@b"), Some(":pa/ss#x@h:1/0?a"), "to the last '@': too much, never too little");
        assert_eq!(server_of("redis://:pa/ss@h:6379/0").as_deref(), Some("redis://h:6379"));
        assert_eq!(server_of("redis://:p?a#s@h:1").as_deref(), Some("redis://h:1"));
    }

    /// User information disappears from every URL in a text, and nothing else.
    #[test]
    fn user_information_is_stripped_from_texts() {
        let text = r#"Error::Other("could not connect to redis://spillway:hunter22@10.1.2.3:6379/0: refused"), retry postgres://u:pw1234@db/x"#;
        let out = strip_userinfo(text);
        assert!(!out.contains("hunter22") && !out.contains("pw1234"), "{out}");
        assert!(out.contains("redis://***@10.1.2.3:6379/0: refused") && out.contains("postgres://***@db/x"), "{out}");
        assert_eq!(strip_userinfo("no url here: a@b"), "no url here: a@b");
        // An '@' in a path is taken for the end of user information: masking
        // too much is the safe mistake.
        assert_eq!(strip_userinfo("http://example.com/a@b"), "http://***@b");
    }

    /// A secret is replaced wherever and however it is written: inside Spin's
    /// "Invalid allowed host" message (no scheme), percent-encoded, and as the
    /// admin token.
    #[test]
    fn configured_secrets_are_replaced_in_any_spelling() {
        let r = Redactor::new(["redis://:s3cret#1@127.0.0.1:6379", "postgres://app:p%40ss-word@db:5432/app", "sqlite"], ["admin-token-42"]);
        let spin = r#"Error::Other("Invalid allowed host \":s3cret#1@127.0.0.1\"")"#;
        assert_eq!(r.redact(spin), r#"Error::Other("Invalid allowed host \"***@127.0.0.1\"")"#);
        for leak in ["password p@ss-word refused", "p%40ss-word", "token admin-token-42", "s3cret%231"] {
            let out = r.redact(leak);
            assert!(out.contains(MASK) && !out.contains("ss-word") && !out.contains("admin-token-42") && !out.contains("s3cret"), "{leak} -> {out}");
        }
        assert_eq!(r.redact("nothing secret"), "nothing secret");
        // Spelled as URL encoders, lower-case hex and `{:?}` spell it, and given
        // as a PostgreSQL `password=` parameter.
        let odd = Redactor::new(["redis://:Sp%22ill%2Fway%40pw-1@h:1", "postgres://app@db/app?password=q-word-99"], []);
        for leak in [r#"Sp"ill/way@pw-1"#, "Sp%22ill%2Fway%40pw-1", "Sp%22ill%2fway%40pw-1", r#"Other("Sp\"ill/way@pw-1")"#, "q-word-99"] {
            let out = odd.redact(leak);
            assert!(!out.contains("way@pw") && !out.contains("way%") && !out.contains("q-word"), "{leak} -> {out}");
        }
        // Too short to replace by value (it would mask ordinary words).
        assert_eq!(Redactor::new(["redis://:ab@h"], []).redact("ab cd"), "ab cd");
    }
}
