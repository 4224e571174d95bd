//! One source for the variables: the table in `docs/variables.md` names exactly
//! the variables of `spin.toml` with their defaults, and each default in the
//! manifest is the one the components use when the variable is not set.

use std::collections::BTreeMap;

use spillway_core::settings::Settings;

use crate::support::workspace;

/// `spin.toml`'s `[variables]`: name -> default (`None`: required).
fn manifest_defaults() -> BTreeMap<String, Option<String>> {
    let manifest: toml::Table = std::fs::read_to_string(workspace().join("spin.toml")).unwrap().parse().unwrap();
    manifest["variables"].as_table().unwrap().iter().map(|(k, v)| (k.clone(), v.get("default").and_then(toml::Value::as_str).map(str::to_owned))).collect()
}

/// The table's rows: name -> the default column as written.
fn documented() -> BTreeMap<String, String> {
    let text = std::fs::read_to_string(workspace().join("docs/variables.md")).unwrap();
    text.lines()
        .filter_map(|l| {
            let cells: Vec<&str> = l.strip_prefix("| `")?.splitn(3, " | ").collect();
            Some((cells[0].strip_suffix('`')?.to_owned(), (*cells.get(1)?).to_owned()))
        })
        .collect()
}

#[test]
fn matches_the_manifest_and_the_defaults() {
    let manifest = manifest_defaults();
    let table = documented();
    assert_eq!(table.keys().collect::<Vec<_>>(), manifest.keys().collect::<Vec<_>>(), "docs/variables.md lists exactly spin.toml's variables");
    let code = Settings::load(|_| None).unwrap();
    for (name, default) in &manifest {
        let default = default.as_deref().unwrap_or_default();
        let written = &table[name];
        if default.is_empty() {
            assert!(written.starts_with("empty"), "{name}: the table says {written:?}, the manifest has no default");
        } else {
            assert!(written.starts_with(&format!("`{default}`")), "{name}: the table says {written:?}, the manifest {default:?}");
        }
        // The manifest's default, given as the value, changes nothing.
        let given = Settings::load(|n| (n == name).then(|| default.to_owned())).unwrap();
        assert_eq!(given, code, "{name}: spin.toml's default {default:?} is not the components' own");
    }
}
