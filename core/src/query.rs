//! Query strings: parsed once, percent-decoded (`form_urlencoded`, as browsers
//! and HTTP clients encode them), and checked against the parameters an endpoint
//! knows, so that a misspelt `min_version` is refused rather than ignored.

use crate::problem::Problem;

/// A request's query parameters, each known to its endpoint and given once.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Query(Vec<(String, String)>);

impl Query {
    /// Parses `raw` (the part after `?`), refusing a parameter without a value,
    /// one not in `known`, and one given twice.
    pub fn parse(raw: Option<&str>, known: &[&str]) -> Result<Self, Problem> {
        let mut params: Vec<(String, String)> = Vec::new();
        for pair in raw.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
            if !pair.contains('=') {
                return Err(Problem::invalid(&format!("query parameter {pair:?} needs a value ({pair}=...)"), &format!("/query/{pair}")));
            }
            let Some((name, value)) = form_urlencoded::parse(pair.as_bytes()).next() else { continue };
            let (name, value) = (name.into_owned(), value.into_owned());
            if !known.contains(&name.as_str()) {
                return Err(Problem::invalid(&format!("unknown query parameter {name:?}; known: {}", known.join(", ")), &format!("/query/{name}")));
            }
            if params.iter().any(|(n, _)| *n == name) {
                return Err(Problem::invalid(&format!("query parameter {name} is given twice"), &format!("/query/{name}")));
            }
            params.push((name, value));
        }
        Ok(Self(params))
    }

    /// The (decoded) value of `name`, if given.
    pub fn get(&self, name: &str) -> Option<&str> {
        self.0.iter().find(|(n, _)| n == name).map(|(_, v)| v.as_str())
    }

    /// A `true` / `false` parameter (`false` when absent).
    pub fn flag(&self, name: &str) -> Result<bool, Problem> {
        match self.get(name) {
            None | Some("false") => Ok(false),
            Some("true") => Ok(true),
            Some(_) => Err(Problem::invalid(&format!("{name} must be true or false"), &format!("/query/{name}"))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Values and names are percent-decoded; unknown, repeated and valueless
    /// parameters are refused with the field at fault.
    #[test]
    fn parameters_are_decoded_and_checked() {
        let q = Query::parse(Some("min_version=%31%32&consistent=tru%65&wait=1.5"), &["min_version", "consistent", "wait"]).unwrap();
        assert_eq!((q.get("min_version"), q.flag("consistent"), q.get("wait"), q.get("other")), (Some("12"), Ok(true), Some("1.5"), None));
        assert_eq!(Query::parse(Some("w%61it=2"), &["wait"]).unwrap().get("wait"), Some("2"));
        assert_eq!(Query::parse(None, &["x"]).unwrap(), Query::default());
        assert_eq!(Query::parse(Some("&&"), &["x"]).unwrap(), Query::default());
        for (raw, field) in [("wiat=1", "/query/wiat"), ("wait=1&wait=2", "/query/wait"), ("wait", "/query/wait")] {
            let p = Query::parse(Some(raw), &["wait"]).unwrap_err();
            assert_eq!((p.status, p.field.as_deref()), (422, Some(field)), "{raw}");
        }
        let bad = Query::parse(Some("consistent=yes"), &["consistent"]).unwrap().flag("consistent").unwrap_err();
        assert_eq!(bad.field.as_deref(), Some("/query/consistent"));
    }
}
