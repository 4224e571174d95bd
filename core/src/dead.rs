//! Dead letters: an entry of a shard's dead-letter stream, and which dead letters
//! an operator's request means (one parser for replay and purge).

use serde_json::Value as Json;

use crate::layout::WriteId;
use crate::problem::Problem;

/// One dead letter, as the dead-letter stream holds it (`XADD dead * id <write
/// id> w <write> error <why> attempts <n> [t <tenant>]`, see
/// `scripts::DEAD_LETTER`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeadEntry {
    /// The stream entry's id (for `XDEL`).
    pub entry: String,
    /// The write's id.
    pub id: String,
    /// The write, as accepted (JSON text).
    pub write: String,
    /// Why it was dead-lettered (the last failure, credentials masked).
    pub error: String,
    /// Deliveries made.
    pub attempts: u64,
    /// The tenant it was charged to, if any.
    pub tenant: Option<String>,
}

impl DeadEntry {
    /// The entries of a flattened `XRANGE` reply (entry id, then the four
    /// field/value pairs and, for a tenant's write, a fifth, `t`, per entry).
    /// A reply of another shape is an error, never skipped or defaulted.
    pub fn parse_all(flat: &[Option<String>]) -> Result<Vec<Self>, String> {
        let mut out = Vec::new();
        let mut rest = flat;
        while !rest.is_empty() {
            // An entry id never reads `t`: the pair after `attempts` is the
            // tenant's, or the next entry begins.
            let len = if rest.get(9).cloned().flatten().as_deref() == Some("t") { 11 } else { 9 };
            if rest.len() < len {
                return Err(format!("a dead-letter reply ends within an entry ({} values left, not {len})", rest.len()));
            }
            out.push(Self::parse(&rest[..len])?);
            rest = &rest[len..];
        }
        Ok(out)
    }

    fn parse(e: &[Option<String>]) -> Result<Self, String> {
        let at = |i: usize| e.get(i).cloned().flatten().ok_or_else(|| format!("dead-letter entry value {i} is missing"));
        let field = |i: usize, name: &str| match at(i)? {
            f if f == name => at(i + 1),
            f => Err(format!("dead-letter entry field {i} is {f:?}, not {name:?}")),
        };
        let attempts = field(7, "attempts")?;
        Ok(Self {
            entry: at(0)?,
            id: field(1, "id")?,
            write: field(3, "w")?,
            error: field(5, "error")?,
            attempts: attempts.parse().map_err(|_| format!("dead-letter attempts {attempts:?} is not a number"))?,
            tenant: if e.len() > 9 { Some(field(9, "t")?) } else { None },
        })
    }

    /// As `GET /v1/dead` lists it.
    pub fn to_json(&self) -> Json {
        let write: Json = serde_json::from_str(&self.write).unwrap_or(Json::Null);
        let mut j = serde_json::json!({"id": self.id, "write": write, "error": self.error, "attempts": self.attempts});
        if let Some(t) = &self.tenant {
            j["tenant"] = Json::from(t.as_str());
        }
        j
    }
}

/// Which dead letters a request means.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Selection {
    /// `{"ids": [...]}`: these writes (at least one).
    Ids(Vec<WriteId>),
    /// `{"shard": n}`: one shard's.
    Shard(u32),
    /// `{"all": true}`: every one, said explicitly.
    All,
}

impl Selection {
    /// Whether the selection takes the dead letter of write `id` on `shard`.
    pub fn takes(&self, shard: u32, id: &str) -> bool {
        match self {
            Self::All => true,
            Self::Shard(s) => *s == shard,
            Self::Ids(ids) => ids.iter().any(|w| w.shard == shard && w.to_string() == id),
        }
    }

    /// Whether the selection can take anything on `shard`.
    pub fn touches(&self, shard: u32) -> bool {
        match self {
            Self::All => true,
            Self::Shard(s) => *s == shard,
            Self::Ids(ids) => ids.iter().any(|w| w.shard == shard),
        }
    }

    /// Parses a request body: `None` when it is empty (the endpoint decides what
    /// that means); `{"ids": []}` is refused (an empty list selects nothing, and
    /// must not read as "all").
    pub fn parse(body: &[u8], shards: u32) -> Result<Option<Self>, Problem> {
        const EXPECTED: &str = "say which dead letters: {\"ids\": [...]}, {\"shard\": n} or {\"all\": true}";
        if body.iter().all(u8::is_ascii_whitespace) {
            return Ok(None);
        }
        let v: Json = serde_json::from_slice(body).map_err(|e| Problem::malformed(&e.to_string()))?;
        let obj = v.as_object().filter(|o| o.len() == 1).ok_or_else(|| Problem::invalid(EXPECTED, ""))?;
        if let Some(all) = obj.get("all") {
            return match all {
                Json::Bool(true) => Ok(Some(Self::All)),
                _ => Err(Problem::invalid("all must be true", "/all")),
            };
        }
        if let Some(list) = obj.get("ids") {
            let list = list.as_array().ok_or_else(|| Problem::invalid("ids must be an array of write ids", "/ids"))?;
            let ids = list
                .iter()
                .enumerate()
                .map(|(i, id)| {
                    id.as_str()
                        .and_then(WriteId::parse)
                        .filter(|w| w.shard < shards)
                        .ok_or_else(|| Problem::invalid("not a write id", &format!("/ids/{i}")))
                })
                .collect::<Result<Vec<_>, _>>()?;
            if ids.is_empty() {
                return Err(Problem::invalid("ids must name at least one write", "/ids"));
            }
            return Ok(Some(Self::Ids(ids)));
        }
        if let Some(shard) = obj.get("shard") {
            // An integral number, however written (3 or 3.0).
            let n = shard.as_u64().or_else(|| shard.as_f64().filter(|f| f.fract() == 0.0 && *f >= 0.0 && *f < 1e9).map(|f| f as u64));
            let shard = n.filter(|n| *n < u64::from(shards)).ok_or_else(|| Problem::invalid(&format!("shard must be a number below {shards}"), "/shard"))?;
            return Ok(Some(Self::Shard(shard as u32)));
        }
        Err(Problem::invalid(EXPECTED, ""))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn field(p: Problem) -> (u16, Option<String>) {
        (p.status, p.field)
    }

    /// One parser for every endpoint: ids, a shard, or all; an empty body is
    /// left to the endpoint; an empty id list is refused, not read as "all".
    #[test]
    fn selections_parse_and_refuse_the_empty_list() {
        assert_eq!(Selection::parse(b"  ", 16).unwrap(), None);
        assert_eq!(Selection::parse(br#"{"all": true}"#, 16).unwrap(), Some(Selection::All));
        assert_eq!(Selection::parse(br#"{"shard": 3.0}"#, 16).unwrap(), Some(Selection::Shard(3)));
        let ids = Selection::parse(br#"{"ids": ["3-17-0"]}"#, 16).unwrap().unwrap();
        assert!(ids.takes(3, "3-17-0") && !ids.takes(3, "3-18-0") && ids.touches(3) && !ids.touches(4));
        assert_eq!(field(Selection::parse(br#"{"ids": []}"#, 16).unwrap_err()), (422, Some("/ids".into())));
        assert_eq!(field(Selection::parse(br#"{"ids": ["16-1-0"]}"#, 16).unwrap_err()), (422, Some("/ids/0".into())));
        assert_eq!(field(Selection::parse(br#"{"all": false}"#, 16).unwrap_err()), (422, Some("/all".into())));
        assert_eq!(field(Selection::parse(br#"{"shard": 16}"#, 16).unwrap_err()), (422, Some("/shard".into())));
        assert_eq!(field(Selection::parse(br#"{"ids": ["1-1-0"], "all": true}"#, 16).unwrap_err()), (422, None));
        assert_eq!(Selection::parse(b"{", 16).unwrap_err().status, 400);
    }

    /// Dead-letter entries read by field name; a reply of another shape is an
    /// error.
    #[test]
    fn dead_entries_parse_or_fail() {
        let s = |v: &[&str]| v.iter().map(|x| Some((*x).to_owned())).collect::<Vec<_>>();
        let flat = s(&["1-0", "id", "3-17-0", "w", r#"{"key":"k"}"#, "error", "boom", "attempts", "5"]);
        let e = &DeadEntry::parse_all(&flat).unwrap()[0];
        assert_eq!((e.entry.as_str(), e.id.as_str(), e.error.as_str(), e.attempts), ("1-0", "3-17-0", "boom", 5));
        assert_eq!(e.to_json()["write"]["key"], "k");
        assert!(DeadEntry::parse_all(&flat[..8]).is_err());
        let mut wrong = flat.clone();
        wrong[5] = Some("err".into());
        assert!(DeadEntry::parse_all(&wrong).unwrap_err().contains("\"error\""));
        assert_eq!(DeadEntry::parse_all(&[]).unwrap(), vec![]);
        // A tenant's entry between two without one.
        let mut three = flat.clone();
        three.extend(s(&["2-0", "id", "3-18-0", "w", "{}", "error", "x", "attempts", "1", "t", "acme"]));
        three.extend(flat.clone());
        let all = DeadEntry::parse_all(&three).unwrap();
        let tenants: Vec<Option<&str>> = all.iter().map(|e| e.tenant.as_deref()).collect();
        assert_eq!(tenants, [None, Some("acme"), None]);
        assert_eq!((all[1].entry.as_str(), all[2].entry.as_str()), ("2-0", "1-0"));
        assert_eq!(all[1].to_json()["tenant"], "acme");
        assert!(DeadEntry::parse_all(&three[..19]).is_err(), "cut within the tenant's pair");
    }
}
