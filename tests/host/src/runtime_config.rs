//! The runtime configuration file (`--runtime-config-file`), in Spin's TOML format:
//! `[key_value_store.<label>]` (`type = "spin"` with an optional `path`, or
//! `type = "redis"` with `url`) and `[sqlite_database.<label>]` (`type = "spin"`,
//! optional `path`).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{Context as _, bail};
use serde::Deserialize;

/// Where a key-value store lives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyValueConfig {
    /// Spin's SQLite-backed store; `None` is in memory.
    Spin(Option<PathBuf>),
    /// A Redis server; keys are stored as given.
    Redis(String),
}

/// A parsed runtime configuration file.
#[derive(Debug, Clone, Default)]
pub struct RuntimeConfig {
    /// Key-value stores by label.
    pub key_value_stores: BTreeMap<String, KeyValueConfig>,
    /// SQLite databases by label; `None` is in memory.
    pub sqlite_databases: BTreeMap<String, Option<PathBuf>>,
}

#[derive(Deserialize)]
struct Typed {
    #[serde(rename = "type")]
    kind: String,
    #[serde(flatten)]
    rest: toml::Table,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SpinKv {
    path: Option<PathBuf>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RedisKv {
    url: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SpinSqlite {
    path: Option<PathBuf>,
    #[serde(default)]
    #[allow(dead_code)]
    allow_attach_file: bool,
}

impl RuntimeConfig {
    /// Reads the file at `path`. A relative key-value `path` is resolved against the
    /// file's directory and a relative SQLite `path` against `cwd`, as Spin does.
    pub fn load(path: &Path, cwd: &Path) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read runtime config file {}", path.display()))?;
        let dir = path.parent().unwrap_or(Path::new("."));
        Self::parse(&text, dir, cwd)
            .with_context(|| format!("invalid runtime config file {}", path.display()))
    }

    /// Parses runtime config text (see [`RuntimeConfig::load`] for the path rules).
    pub fn parse(text: &str, config_dir: &Path, cwd: &Path) -> anyhow::Result<Self> {
        let mut table: toml::Table = toml::from_str(text)?;
        let mut config = Self::default();
        if let Some(stores) = table.remove("key_value_store") {
            let stores: BTreeMap<String, Typed> = stores.try_into()?;
            for (label, store) in stores {
                let ctx = || format!("could not configure key-value store with label '{label}'");
                let kv = match store.kind.as_str() {
                    "spin" => {
                        let c: SpinKv = store.rest.try_into().with_context(ctx)?;
                        KeyValueConfig::Spin(c.path.map(|p| config_dir.join(p)))
                    }
                    "redis" => {
                        let c: RedisKv = store.rest.try_into().with_context(ctx)?;
                        KeyValueConfig::Redis(c.url)
                    }
                    other => {
                        return Err(anyhow::anyhow!(
                            "the store type '{other}' was not registered with the config resolver"
                        ))
                        .with_context(ctx);
                    }
                };
                config.key_value_stores.insert(label, kv);
            }
        }
        if let Some(dbs) = table.remove("sqlite_database") {
            let dbs: BTreeMap<String, Typed> = dbs.try_into()?;
            for (label, db) in dbs {
                if db.kind != "spin" {
                    bail!("Unknown database kind: {} (sqlite_database.{label})", db.kind);
                }
                let c: SpinSqlite = db
                    .rest
                    .try_into()
                    .with_context(|| format!("invalid [sqlite_database.{label}]"))?;
                config.sqlite_databases.insert(label, c.path.map(|p| cwd.join(p)));
            }
        }
        if !table.is_empty() {
            let keys: Vec<_> = table.keys().map(String::as_str).collect();
            bail!(
                "unused runtime config key(s): {} (this host supports key_value_store and sqlite_database)",
                keys.join(", ")
            );
        }
        Ok(config)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Both store types and SQLite databases parse, with Spin's relative-path rules.
    #[test]
    fn parses_stores_and_databases() {
        let c = RuntimeConfig::parse(
            r#"
[key_value_store.default]
type = "redis"
url = "redis://127.0.0.1:6379"
[key_value_store.local]
type = "spin"
path = "kv.db"
[sqlite_database.default]
type = "spin"
path = "data/app.db"
"#,
            Path::new("/cfg"),
            Path::new("/cwd"),
        )
        .unwrap();
        assert_eq!(c.key_value_stores["default"], KeyValueConfig::Redis("redis://127.0.0.1:6379".into()));
        assert_eq!(c.key_value_stores["local"], KeyValueConfig::Spin(Some("/cfg/kv.db".into())));
        assert_eq!(c.sqlite_databases["default"], Some(PathBuf::from("/cwd/data/app.db")));
    }

    /// Unknown types and keys are errors that name them.
    #[test]
    fn refuses_unknown_types_and_keys() {
        let e = RuntimeConfig::parse("[key_value_store.x]\ntype = \"mongo\"", Path::new("."), Path::new("."));
        assert!(format!("{:#}", e.unwrap_err()).contains("'mongo' was not registered"));
        let e = RuntimeConfig::parse("[llm_compute]\ntype = \"x\"", Path::new("."), Path::new("."));
        assert!(format!("{:#}", e.unwrap_err()).contains("unused runtime config key(s): llm_compute"));
        let e = RuntimeConfig::parse("[key_value_store.x]\ntype = \"redis\"\nurl = \"u\"\nuser = 1", Path::new("."), Path::new("."));
        assert!(format!("{:#}", e.unwrap_err()).contains("user"));
    }
}
