//! `spin:variables/variables@3.0.0`: the calling component's own variables.

use wasmtime::component::Accessor;

use super::spin::variables::variables::{Error, Host, HostWithStore};
use super::{Spin, SpinView};

/// Spin's runtime check of a variable name; the reason is Spin's wording.
fn invalid_name(name: &str) -> Option<String> {
    let reason = if name.is_empty() {
        "must not be empty".to_owned()
    } else if let Some(c) = name
        .chars()
        .find(|c| !(c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '_'))
    {
        format!("invalid character {c:?}. Variable names may contain only lower-case letters, numbers, and underscores.")
    } else if !name.starts_with(|c: char| c.is_ascii_lowercase()) {
        "must start with a lowercase ASCII letter".to_owned()
    } else if !name.ends_with(|c: char| c.is_ascii_lowercase() || c.is_ascii_digit()) {
        "must end with a lowercase ASCII letter or digit".to_owned()
    } else if name.contains("__") {
        "must not contain multiple consecutive underscores".to_owned()
    } else {
        return None;
    };
    Some(format!("{name:?}: {reason}"))
}

impl<T> HostWithStore<T> for Spin {
    async fn get(accessor: &Accessor<T, Self>, name: String) -> wasmtime::Result<Result<String, Error>> {
        Ok(accessor.with(|mut access| {
            let view = access.get();
            if let Some(msg) = invalid_name(&name) {
                return Err(Error::InvalidName(msg));
            }
            view.caps
                .variables
                .get(&name)
                .cloned()
                .ok_or_else(|| Error::Undefined(format!("no variable for {:?}.{name:?}", view.caps.id)))
        }))
    }
}

impl Host for SpinView<'_> {}

#[cfg(test)]
mod tests {
    use super::invalid_name;

    /// Names are checked with Spin's rules and reasons.
    #[test]
    fn name_rules() {
        assert_eq!(invalid_name("redis_address"), None);
        assert!(invalid_name("Foo").unwrap().contains("invalid character 'F'"));
        assert!(invalid_name("1a").unwrap().contains("must start with"));
        assert!(invalid_name("a_").unwrap().contains("must end with"));
        assert!(invalid_name("a__b").unwrap().contains("consecutive underscores"));
        assert!(invalid_name("").unwrap().contains("must not be empty"));
    }
}
