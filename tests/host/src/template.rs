//! Spin's `{{ name }}` templates, used in component variables, `allowed_outbound_hosts`
//! and Redis trigger addresses and channels. Names always refer to application
//! variables.

use anyhow::bail;

/// One piece of a parsed template.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Part {
    /// Text copied as it is.
    Literal(String),
    /// `{{ name }}`: the value of an application variable.
    Variable(String),
}

/// Splits `template` into literal text and variable references.
pub fn parse(template: &str) -> anyhow::Result<Vec<Part>> {
    let mut parts = Vec::new();
    let mut rest = template;
    while let Some(start) = rest.find("{{") {
        if start > 0 {
            parts.push(Part::Literal(rest[..start].to_owned()));
        }
        let after = &rest[start + 2..];
        let Some(end) = after.find("}}") else {
            bail!("invalid variable template: unmatched '{{{{' in template {template:?}");
        };
        parts.push(Part::Variable(after[..end].trim().to_owned()));
        rest = &after[end + 2..];
    }
    if !rest.is_empty() {
        parts.push(Part::Literal(rest.to_owned()));
    }
    Ok(parts)
}

/// Renders `template`, looking each variable up with `lookup`; an unknown name is an
/// error naming it.
pub fn render(template: &str, lookup: impl Fn(&str) -> Option<String>) -> anyhow::Result<String> {
    let mut out = String::new();
    for part in parse(template)? {
        match part {
            Part::Literal(s) => out.push_str(&s),
            Part::Variable(name) => match lookup(&name) {
                Some(v) => out.push_str(&v),
                None => bail!("invalid variable template: unknown variable {name:?} in {template:?}"),
            },
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Literal text around variables is kept and inner whitespace is trimmed.
    #[test]
    fn renders_literals_and_variables() {
        let out = render("redis://{{ host }}:{{port}}/x", |n| {
            Some(if n == "host" { "h" } else { "1" }.to_owned())
        })
        .unwrap();
        assert_eq!(out, "redis://h:1/x");
    }

    /// Unknown names and unclosed braces are errors that say what is wrong.
    #[test]
    fn rejects_unknown_and_unclosed() {
        let e = render("{{ nope }}", |_| None).unwrap_err().to_string();
        assert!(e.contains("unknown variable \"nope\""), "{e}");
        let e = parse("a {{ b").unwrap_err().to_string();
        assert!(e.contains("unmatched '{{'"), "{e}");
    }
}
