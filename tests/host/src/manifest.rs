//! `spin.toml` (manifest version 2), parsed as Spin parses it: the same keys, unknown
//! keys refused where Spin refuses them, ids and variable names validated.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{Context as _, bail};
use serde::Deserialize;

use crate::compose::{Dependency, Inherit};

/// A whole manifest.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    /// Must be the integer 2.
    pub spin_manifest_version: toml::Value,
    /// `[application]`.
    pub application: Application,
    /// `[variables]`: application variables.
    #[serde(default)]
    pub variables: BTreeMap<String, Variable>,
    /// `[[trigger.<type>]]`, kept raw and parsed per type.
    pub trigger: BTreeMap<String, Vec<toml::Table>>,
    /// `[component.<id>]`.
    #[serde(default)]
    pub component: BTreeMap<String, Component>,
}

/// `[application]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Application {
    /// Application name.
    pub name: String,
    /// Version string.
    pub version: Option<String>,
    /// Description.
    pub description: Option<String>,
    /// Authors.
    #[serde(default)]
    pub authors: Vec<String>,
    /// Deployment targets (not used by this host).
    pub targets: Option<toml::Value>,
    /// `[application.trigger.<type>]`: trigger-wide settings.
    #[serde(default)]
    pub trigger: BTreeMap<String, toml::Table>,
    /// Tool-specific data (ignored).
    pub tool: Option<toml::Value>,
}

/// One `[variables]` entry.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Variable {
    /// Description.
    pub description: Option<String>,
    /// Must be given a value at startup.
    #[serde(default)]
    pub required: bool,
    /// Value when nothing overrides it.
    pub default: Option<String>,
    /// Never to be logged.
    #[serde(default)]
    pub secret: bool,
}

/// `[component.<id>]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Component {
    /// Path of the `.wasm` file, relative to the manifest (remote sources are parsed
    /// but not supported by this host).
    pub source: toml::Value,
    /// Description.
    pub description: Option<String>,
    /// Component variables: templates over application variables.
    #[serde(default)]
    pub variables: BTreeMap<String, String>,
    /// WASI environment variables.
    #[serde(default)]
    pub environment: BTreeMap<String, String>,
    /// Files to mount (not supported by this host).
    #[serde(default)]
    pub files: Vec<toml::Value>,
    /// Files to exclude from `files`.
    #[serde(default)]
    pub exclude_files: Vec<String>,
    /// Deprecated form of `allowed_outbound_hosts`.
    #[serde(default)]
    pub allowed_http_hosts: Vec<String>,
    /// Network destinations the component may open (templates allowed).
    #[serde(default)]
    pub allowed_outbound_hosts: Vec<String>,
    /// Key-value store labels the component may open.
    #[serde(default)]
    pub key_value_stores: Vec<String>,
    /// SQLite database labels the component may open.
    #[serde(default)]
    pub sqlite_databases: Vec<String>,
    /// AI models (not supported by this host).
    #[serde(default)]
    pub ai_models: Vec<String>,
    /// Deployment targets.
    pub targets: Option<toml::Value>,
    /// `[component.<id>.build]` (used by `spin build`, ignored here).
    pub build: Option<Build>,
    /// Tool-specific data.
    pub tool: Option<toml::Value>,
    /// Whether dependencies inherit this component's configuration.
    pub dependencies_inherit_configuration: Option<bool>,
    /// `[component.<id>.dependencies]`.
    pub dependencies: Option<toml::Table>,
    /// Build profiles.
    pub profile: Option<toml::Table>,
}

/// `[component.<id>.build]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Build {
    /// Command (or commands) that build the component.
    pub command: toml::Value,
    /// Directory to run it in.
    pub workdir: Option<String>,
    /// Globs `spin watch` watches.
    #[serde(default)]
    pub watch: Vec<String>,
}

/// `[[trigger.http]]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpTrigger {
    /// Trigger id.
    pub id: Option<String>,
    /// The component that handles the route.
    pub component: Option<String>,
    /// A route pattern, or `{ private = true }`.
    pub route: toml::Value,
    /// `{ type = "http" }` (the only executor this host runs).
    pub executor: Option<toml::Table>,
    /// A fixed response instead of a component (not supported by this host).
    pub static_response: Option<toml::Table>,
}

/// `[[trigger.redis]]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RedisTrigger {
    /// Trigger id.
    pub id: Option<String>,
    /// The component that handles messages.
    pub component: String,
    /// Channel to subscribe to (template).
    pub channel: String,
    /// Redis address overriding `[application.trigger.redis] address` (template).
    pub address: Option<String>,
}

/// `[application.trigger.redis]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RedisTriggerGlobal {
    /// Default Redis address of the Redis triggers (template).
    pub address: String,
}

impl Manifest {
    /// Reads and validates the manifest at `path`.
    pub fn load(path: &Path) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read manifest {}", path.display()))?;
        Self::parse(&text).with_context(|| format!("invalid manifest {}", path.display()))
    }

    /// Parses and validates manifest text.
    pub fn parse(text: &str) -> anyhow::Result<Self> {
        let raw: toml::Table = toml::from_str(text)?;
        match raw.get("spin_manifest_version") {
            Some(toml::Value::Integer(2)) => {}
            Some(v) => bail!("invalid manifest version: {v} (this host reads spin_manifest_version = 2)"),
            None => bail!("missing spin_manifest_version (expected spin_manifest_version = 2)"),
        }
        let m: Manifest = toml::from_str(text)?;
        for (name, var) in &m.variables {
            validate_lower_snake(name).with_context(|| format!("invalid variable name {name:?}"))?;
            if var.required == var.default.is_some() {
                bail!("variable {name:?} must be `required` OR have a `default`");
            }
        }
        for (id, c) in &m.component {
            validate_kebab(id).with_context(|| format!("invalid component id {id:?}"))?;
            for name in c.variables.keys() {
                validate_lower_snake(name)
                    .with_context(|| format!("component {id:?}: invalid variable name {name:?}"))?;
            }
            for label in c.key_value_stores.iter().chain(&c.sqlite_databases) {
                if validate_kebab(label).is_err() && validate_lower_snake(label).is_err() {
                    bail!("component {id:?}: store label {label:?}: expected kebab-case or snake_case");
                }
            }
        }
        Ok(m)
    }

    /// The HTTP triggers.
    pub fn http_triggers(&self) -> anyhow::Result<Vec<HttpTrigger>> {
        self.triggers("http")
    }

    /// The Redis triggers.
    pub fn redis_triggers(&self) -> anyhow::Result<Vec<RedisTrigger>> {
        self.triggers("redis")
    }

    /// `[application.trigger.redis]`, if present.
    pub fn redis_global(&self) -> anyhow::Result<Option<RedisTriggerGlobal>> {
        self.application
            .trigger
            .get("redis")
            .map(|t| {
                t.clone()
                    .try_into()
                    .context("invalid [application.trigger.redis]")
            })
            .transpose()
    }

    fn triggers<T: serde::de::DeserializeOwned>(&self, kind: &str) -> anyhow::Result<Vec<T>> {
        let Some(list) = self.trigger.get(kind) else {
            return Ok(Vec::new());
        };
        list.iter()
            .enumerate()
            .map(|(i, t)| {
                t.clone()
                    .try_into()
                    .with_context(|| format!("invalid [[trigger.{kind}]] number {}", i + 1))
            })
            .collect()
    }

    /// The dependencies of component `id` (`[component.<id>.dependencies]`),
    /// with the capabilities each inherits. Local files and the app's own
    /// components are supported; registry and URL sources are refused by name.
    pub fn dependencies(&self, id: &str, manifest_dir: &Path) -> anyhow::Result<Vec<Dependency>> {
        let c = self
            .component
            .get(id)
            .with_context(|| format!("no [component.{id}] in the manifest"))?;
        let Some(table) = &c.dependencies else { return Ok(Vec::new()) };
        let mut out = Vec::new();
        for (name, value) in table {
            let ctx = || format!("component {id:?}: dependency {name:?}");
            validate_dependency_name(name).with_context(ctx)?;
            let toml::Value::Table(dep) = value else {
                bail!("component {id:?}: dependency {name:?}: a version constraint names a registry package, which this host does not fetch");
            };
            let forms: [(&str, &[&str]); 4] = [
                ("path", &["path", "export", "inherit_configuration"]),
                ("component", &["component", "export", "inherit_configuration"]),
                ("version", &["version", "registry", "package", "export", "inherit_configuration"]),
                ("url", &["url", "digest", "export", "inherit_configuration"]),
            ];
            let Some((form, keys)) = forms.iter().find(|(k, _)| dep.contains_key(*k)) else {
                bail!("component {id:?}: dependency {name:?}: expected `path`, `component`, `version` or `url`");
            };
            if let Some(extra) = dep.keys().find(|k| !keys.contains(&k.as_str())) {
                bail!("component {id:?}: dependency {name:?}: unknown key {extra:?} for a `{form}` dependency");
            }
            let source = match (*form, &dep[*form]) {
                ("path", toml::Value::String(p)) => manifest_dir.join(p),
                ("component", toml::Value::String(other)) => self.source_path(other, manifest_dir).with_context(ctx)?,
                ("version" | "url", _) => bail!("component {id:?}: dependency {name:?}: `{form}` sources are not supported by this host (local files and app components only)"),
                (_, v) => bail!("component {id:?}: dependency {name:?}: `{form}` must be a string, not {v}"),
            };
            let export = match dep.get("export") {
                None => None,
                Some(toml::Value::String(e)) => Some(e.clone()),
                Some(v) => bail!("component {id:?}: dependency {name:?}: `export` must be a string, not {v}"),
            };
            let inherit = match (c.dependencies_inherit_configuration, dep.get("inherit_configuration")) {
                (Some(_), Some(_)) => bail!(
                    "Component `{id}` specifies both `dependencies_inherit_configuration` and per-dependency `inherit_configuration`. \
                     These are mutually exclusive; use one or the other."
                ),
                (Some(true), None) | (None, Some(toml::Value::Boolean(true))) => Inherit::All,
                (Some(false) | None, None) | (None, Some(toml::Value::Boolean(false))) => Inherit::Only(Vec::new()),
                (None, Some(toml::Value::Array(sets))) => Inherit::Only(
                    sets.iter()
                        .map(|s| s.as_str().map(str::to_owned).with_context(|| format!("component {id:?}: dependency {name:?}: `inherit_configuration` lists names of capability sets")))
                        .collect::<anyhow::Result<_>>()?,
                ),
                (None, Some(v)) => bail!("component {id:?}: dependency {name:?}: `inherit_configuration` must be a boolean or a list, not {v}"),
            };
            out.push(Dependency { name: name.clone(), source, export, inherit });
        }
        Ok(out)
    }

    /// The `.wasm` path of component `id`, resolved against the manifest's directory.
    pub fn source_path(&self, id: &str, manifest_dir: &Path) -> anyhow::Result<PathBuf> {
        let c = self
            .component
            .get(id)
            .with_context(|| format!("no [component.{id}] in the manifest"))?;
        match &c.source {
            toml::Value::String(s) => Ok(manifest_dir.join(s)),
            other => bail!(
                "component {id:?}: source {other} is not a local file; this host runs local .wasm files only"
            ),
        }
    }
}

/// A dependency's name: `ns:pkg`, optionally `/interface` and `@version`, each
/// name kebab-case; or a plain kebab-case name.
pub fn validate_dependency_name(name: &str) -> anyhow::Result<()> {
    let (name, version) = match name.split_once('@') {
        Some((n, v)) => (n, Some(v)),
        None => (name, None),
    };
    if let Some(v) = version {
        let parts: Vec<&str> = v.split(['-', '+']).next().unwrap_or("").split('.').collect();
        if parts.len() != 3 || parts.iter().any(|p| p.parse::<u64>().is_err()) {
            bail!("invalid version {v:?} (expected semver, e.g. 0.1.0)");
        }
    }
    let Some((namespace, rest)) = name.split_once(':') else {
        if version.is_some() || name.contains('/') {
            bail!("expected ns:pkg, ns:pkg/interface or a plain kebab-case name");
        }
        return validate_kebab(name);
    };
    let (package, interface) = match rest.split_once('/') {
        Some((p, i)) => (p, Some(i)),
        None => (rest, None),
    };
    for part in [Some(namespace), Some(package), interface].into_iter().flatten() {
        validate_kebab(part).with_context(|| format!("in {name:?}"))?;
    }
    Ok(())
}

/// Spin's `LowerSnakeId`: `_`-separated words, each starting with a letter, all
/// lower-case letters and digits.
pub fn validate_lower_snake(id: &str) -> anyhow::Result<()> {
    if id.is_empty() {
        bail!("must not be empty");
    }
    for word in id.split('_') {
        let Some(first) = word.chars().next() else {
            bail!("'_'-separated words must not be empty");
        };
        if !first.is_ascii_alphabetic() {
            bail!("'_'-separated words must start with an ASCII letter; got {first:?}");
        }
        if let Some(c) = word.chars().find(|c| !(c.is_ascii_lowercase() || c.is_ascii_digit())) {
            bail!("lower-case identifiers may contain only a-z, 0-9 and '_'; got {c:?}");
        }
    }
    Ok(())
}

/// Spin's `KebabId`: `-`-separated words, each starting with a letter, alphanumeric,
/// each word all lower-case or all upper-case.
pub fn validate_kebab(id: &str) -> anyhow::Result<()> {
    if id.is_empty() {
        bail!("must not be empty");
    }
    for word in id.split('-') {
        let Some(first) = word.chars().next() else {
            bail!("'-'-separated words must not be empty");
        };
        if !first.is_ascii_alphabetic() {
            bail!("'-'-separated words must start with an ASCII letter; got {first:?}");
        }
        if !word.chars().all(|c| c.is_ascii_alphanumeric()) {
            bail!("words must be separated with '-' and contain only letters and digits");
        }
        let lower = word.chars().all(|c| !c.is_ascii_uppercase());
        let upper = word.chars().all(|c| !c.is_ascii_lowercase());
        if !lower && !upper {
            bail!("each word must be all lower-case or all upper-case; got {word:?}");
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = r#"
spin_manifest_version = 2
[application]
name = "t"
[variables]
a = { default = "1" }
b = { required = true, secret = true }
[[trigger.http]]
route = "/..."
component = "web"
[component.web]
source = "web.wasm"
variables = { x = "{{ a }}" }
"#;

    /// A valid manifest parses with its variables, triggers and components.
    #[test]
    fn parses_a_minimal_manifest() {
        let m = Manifest::parse(MINIMAL).unwrap();
        assert_eq!(m.application.name, "t");
        assert!(m.variables["b"].required && m.variables["b"].secret);
        assert_eq!(m.http_triggers().unwrap()[0].component.as_deref(), Some("web"));
        assert_eq!(m.component["web"].variables["x"], "{{ a }}");
    }

    /// Unknown keys, a wrong version and bad ids are refused with the place named.
    #[test]
    fn refuses_what_spin_refuses() {
        let e = Manifest::parse(&MINIMAL.replace("source =", "sourze =")).unwrap_err();
        assert!(format!("{e:#}").contains("sourze"), "{e:#}");
        let e = Manifest::parse(&MINIMAL.replace("= 2", "= 3")).unwrap_err();
        assert!(format!("{e:#}").contains("invalid manifest version"), "{e:#}");
        let e = Manifest::parse(&MINIMAL.replace("component.web", "component.Web_x")).unwrap_err();
        assert!(format!("{e:#}").contains("invalid component id"), "{e:#}");
        let e = Manifest::parse(&MINIMAL.replace("a = { default = \"1\" }", "a = {}")).unwrap_err();
        assert!(format!("{e:#}").contains("must be `required` OR have a `default`"), "{e:#}");
        let m = Manifest::parse(&MINIMAL.replace("route = \"/...\"", "route = \"/\"\nroutez = 1")).unwrap();
        let e = m.http_triggers().unwrap_err();
        assert!(format!("{e:#}").contains("routez"), "{e:#}");
    }

    /// Identifier rules match Spin's.
    #[test]
    fn identifier_rules() {
        assert!(validate_lower_snake("redis_address").is_ok());
        assert!(validate_lower_snake("Redis").is_err());
        assert!(validate_lower_snake("a__b").is_err());
        assert!(validate_lower_snake("1a").is_err());
        assert!(validate_kebab("cache-reader").is_ok());
        assert!(validate_kebab("cache_reader").is_err());
        assert!(validate_kebab("MixedCase").is_err());
    }
}
