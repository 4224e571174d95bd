//! The deployment manifests under `deploy/` agree with `spin.toml`: what they set
//! exists, what a cluster needs is set, and no secret is written in a file.

use std::collections::BTreeMap;

use serde_yaml::Value as Yaml;

use crate::support::workspace;

/// `spin.toml`'s `[variables]`: name -> whether it is a secret.
fn app_variables() -> BTreeMap<String, bool> {
    manifest_variables(&manifest("spin.toml"))
}

/// A manifest of the repository, parsed.
fn manifest(path: &str) -> toml::Table {
    std::fs::read_to_string(workspace().join(path)).unwrap().parse().unwrap()
}

/// A manifest's `[variables]`: name -> whether it is a secret.
fn manifest_variables(manifest: &toml::Table) -> BTreeMap<String, bool> {
    manifest["variables"]
        .as_table()
        .unwrap()
        .iter()
        .map(|(k, v)| (k.clone(), v.get("secret").and_then(toml::Value::as_bool).unwrap_or(false)))
        .collect()
}

/// Every YAML document of a file.
fn documents(path: &str) -> Vec<Yaml> {
    let text = std::fs::read_to_string(workspace().join(path)).unwrap();
    serde_yaml::Deserializer::from_str(&text).map(|d| serde::Deserialize::deserialize(d).unwrap()).collect()
}

/// `name: <secret>/<key>` of a `valueFrom.secretKeyRef`, if the item has one.
fn secret_ref(item: &Yaml) -> Option<String> {
    let r = item.get("valueFrom")?.get("secretKeyRef")?;
    Some(format!("{}/{}", r.get("name")?.as_str()?, r.get("key")?.as_str()?))
}

/// Whether `text` looks like a URL with a password in it (`scheme://user:pass@`).
fn has_credentials(text: &str) -> bool {
    text.split("://").skip(1).any(|rest| rest.split(['/', ' ', '"', '\'']).next().is_some_and(|auth| auth.contains('@') && auth.split('@').next().is_some_and(|u| u.contains(':') && !u.contains('<'))))
}

/// The SpinApp runs several replicas of the app with every variable a cluster
/// needs: the secrets (admin token, database URL, Redis URL, which may carry a
/// password) from a Kubernetes Secret, the database host (for
/// `allowed_outbound_hosts`) as a value; the record cache on the shared Redis
/// through runtime config. Every variable it names exists in `spin.toml`, and no
/// secret is in the file.
#[test]
fn spinkube_app_wires_every_variable_and_holds_no_secret() {
    let docs = documents("deploy/spinkube/spillway.yaml");
    let apps: Vec<&Yaml> = docs.iter().filter(|d| d.get("kind").and_then(Yaml::as_str) == Some("SpinApp")).collect();
    assert_eq!(apps.len(), 1, "one SpinApp");
    let app = apps[0];
    assert_eq!(app["apiVersion"].as_str(), Some("core.spinkube.dev/v1alpha1"));
    let spec = &app["spec"];
    assert_eq!(spec["executor"].as_str(), Some("containerd-shim-spin"));
    assert!(spec["image"].as_str().is_some_and(|i| !i.is_empty()));
    assert!(spec["replicas"].as_u64().is_some_and(|n| n >= 2), "several replicas");

    let declared = app_variables();
    let mut wired = BTreeMap::new();
    for v in spec["variables"].as_sequence().unwrap() {
        let name = v["name"].as_str().unwrap().to_owned();
        assert!(declared.contains_key(&name), "{name} is not a variable of spin.toml");
        let from_secret = secret_ref(v);
        let from_pod = v.get("valueFrom").and_then(|f| f.get("fieldRef")?.get("fieldPath")?.as_str());
        let sources = [from_secret.is_some(), v.get("value").is_some(), from_pod.is_some()];
        assert_eq!(sources.iter().filter(|s| **s).count(), 1, "{name}: one of a value, a secret reference or a pod field");
        if name == "node_name" {
            assert_eq!(from_pod, Some("metadata.name"), "each replica named after its pod");
        }
        wired.insert(name, from_secret.is_some());
    }
    for (name, secret) in &declared {
        if *secret && let Some(from_secret) = wired.get(name) {
            assert!(from_secret, "secret variable {name} comes from a Kubernetes Secret");
        }
    }
    assert!(wired.contains_key("node_name"), "the replicas are named, so that the leases spread over them");
    for name in ["admin_token", "database", "redis_address"] {
        assert_eq!(wired.get(name), Some(&true), "{name} comes from a Kubernetes Secret");
    }
    for name in ["redis_address", "redis_host", "database", "database_host"] {
        assert!(wired.contains_key(name), "{name} is set: its default points at localhost");
    }

    let stores = spec["runtimeConfig"]["keyValueStores"].as_sequence().unwrap();
    let default = stores.iter().find(|s| s["name"].as_str() == Some("default")).expect("the default store is configured");
    assert_eq!(default["type"].as_str(), Some("redis"), "the cache is shared by the replicas");
    let url = default["options"].as_sequence().unwrap().iter().find(|o| o["name"].as_str() == Some("url")).expect("a url option");
    assert!(secret_ref(url).is_some(), "the Redis URL comes from the Secret");

    // No Secret object with data, no URL with a password, in any deployment file.
    for entry in std::fs::read_dir(workspace().join("deploy/spinkube")).unwrap() {
        let path = entry.unwrap().path();
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(!has_credentials(&text), "{} holds a URL with a password", path.display());
        if path.extension().is_some_and(|e| e == "yaml" || e == "yml") {
            for d in documents(&format!("deploy/spinkube/{}", path.file_name().unwrap().to_string_lossy())) {
                if d.get("kind").and_then(Yaml::as_str) == Some("Secret") {
                    assert!(d.get("data").is_none() && d.get("stringData").is_none(), "{} has a Secret with data", path.display());
                }
            }
        }
    }
}

/// The credential check itself: a password in a URL is found, a placeholder or a
/// user without a password is not.
#[test]
fn credentials_in_urls_are_recognised() {
    assert!(has_credentials("url: redis://:hunter2@redis:6379"));
    assert!(has_credentials("postgres://app:s3cret@db:5432/app"));
    assert!(!has_credentials("postgres://app@db:5432/app"));
    assert!(!has_credentials("postgres://spillway:<password>@postgres:5432/spillway"));
    assert!(!has_credentials("value: \"postgres://postgres:5432\""));
}

/// Spin refuses an `allowed_outbound_hosts` entry with user information in it
/// ("Invalid allowed host"), and an entry is no place for a secret: in every
/// manifest, each entry is built only from variables that are not secrets and
/// hold no credentials by default, and each variable that may carry
/// credentials (the addresses) is a secret.
#[test]
fn allowed_hosts_are_built_from_variables_without_credentials() {
    for path in ["spin.toml", "deploy/http-only/spin.toml"] {
        let m = manifest(path);
        let vars = manifest_variables(&m);
        for name in ["redis_address", "shard_redis_addresses", "database", "admin_token"] {
            assert_eq!(vars.get(name), Some(&true), "{path}: {name} may hold credentials and is a secret");
        }
        let defaults: BTreeMap<&str, &str> = m["variables"]
            .as_table()
            .unwrap()
            .iter()
            .filter_map(|(k, v)| Some((k.as_str(), v.get("default")?.as_str()?)))
            .collect();
        for (id, c) in m["component"].as_table().unwrap() {
            for entry in c.get("allowed_outbound_hosts").and_then(toml::Value::as_array).into_iter().flatten() {
                let entry = entry.as_str().unwrap();
                for name in entry.split("{{").skip(1).map(|r| r.split("}}").next().unwrap().trim()) {
                    assert_eq!(vars.get(name), Some(&false), "{path}: component {id}: {entry:?} uses {name}, a secret or undeclared variable");
                    assert!(!defaults.get(name).is_some_and(|d| d.contains('@')), "{path}: {name}'s default holds credentials");
                }
            }
        }
    }
}
