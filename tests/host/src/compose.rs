//! Component dependencies (`[component.<id>.dependencies]`), composed as Spin
//! composes them: at load time, with `wac-graph`, the component's imports plugged
//! with its dependencies' exports into one component.
//!
//! Spin's rules, kept here:
//! - A dependency name (`ns:pkg/iface@1.2.3`, `ns:pkg/iface`, `ns:pkg@1.2.3`,
//!   `ns:pkg`, or a plain name) must match at least one import, and no import may
//!   be matched by two dependencies.
//! - The dependency must export the import's name (or the `export` it names),
//!   with a type the import accepts.
//! - A dependency gets none of its parent's capabilities unless it inherits them
//!   (`dependencies_inherit_configuration = true`, or per dependency
//!   `inherit_configuration = true` or a list of capability sets; the two forms
//!   are exclusive). Its imports of an interface of a capability it does not
//!   inherit are cut off from the host: Spin plugs them with a deny adapter. Here
//!   they become imports of their own, `denied-…`, which the host defines with
//!   [`define_denied`]: the environment and the preopened directories are empty
//!   (as Spin's adapter has them), every other function answers an error
//!   ("… is not permitted") where its result type has a case for one, and traps
//!   where it has none.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;

use anyhow::{Context as _, bail};
use wac_graph::types::{InterfaceId, ItemKind, Package, SubtypeChecker, are_semver_compatible};
use wac_graph::{CompositionGraph, EncodeOptions, NodeId};
use wasmtime::component::types::{ComponentFunc, ComponentItem};
use wasmtime::component::{Component, Linker, ResourceType, Val};

/// Which of its parent's capabilities a dependency may use.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Inherit {
    /// All of them.
    All,
    /// These capability sets (`allowed_outbound_hosts`, `key_value_stores`, …);
    /// none when empty (the default).
    Only(Vec<String>),
}

/// One `[component.<id>.dependencies]` entry, resolved to a local file.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Dependency {
    /// The entry's name: what it satisfies.
    pub name: String,
    /// The component file.
    pub source: PathBuf,
    /// The dependency's export to use (default: the import's own name).
    pub export: Option<String>,
    /// Capabilities it inherits.
    pub inherit: Inherit,
}

/// The interfaces of each capability set a dependency can inherit (Spin's
/// grouping): an import of one of them, or of a semver-compatible version, is
/// denied unless its set is inherited.
const CAPABILITY_SETS: &[(&str, &[&str])] = &[
    ("ai_models", &["fermyon:spin/llm", "fermyon:spin/llm@2.0.0"]),
    (
        "allowed_outbound_hosts",
        &[
            "fermyon:spin/http",
            "fermyon:spin/mysql",
            "fermyon:spin/postgres",
            "fermyon:spin/redis",
            "fermyon:spin/mqtt@2.0.0",
            "fermyon:spin/mysql@2.0.0",
            "fermyon:spin/postgres@2.0.0",
            "fermyon:spin/redis@2.0.0",
            "spin:mqtt/mqtt@3.0.0",
            "spin:mysql/mysql@3.0.0",
            "spin:postgres/postgres@3.0.0",
            "spin:postgres/postgres@4.2.0",
            "spin:redis/redis@3.0.0",
            "wasi:http/client@0.3.0",
            "wasi:http/client@0.3.0-rc-2026-03-15",
            "wasi:http/outgoing-handler@0.2.6",
            "wasi:sockets/ip-name-lookup@0.2.6",
            "wasi:sockets/ip-name-lookup@0.3.0",
            "wasi:sockets/ip-name-lookup@0.3.0-rc-2026-03-15",
            "wasi:sockets/tcp-create-socket@0.2.6",
            "wasi:sockets/tcp@0.2.6",
            "wasi:sockets/udp-create-socket@0.2.6",
            "wasi:sockets/udp@0.2.6",
        ],
    ),
    ("environment", &["wasi:cli/environment@0.2.6", "wasi:cli/environment@0.3.0", "wasi:cli/environment@0.3.0-rc-2026-03-15"]),
    ("files", &["wasi:filesystem/preopens@0.2.6", "wasi:filesystem/preopens@0.3.0", "wasi:filesystem/preopens@0.3.0-rc-2026-03-15"]),
    (
        "key_value_stores",
        &["fermyon:spin/key-value", "fermyon:spin/key-value@2.0.0", "spin:key-value/key-value@3.0.0", "wasi:keyvalue/store@0.2.0-draft2"],
    ),
    ("sqlite_databases", &["fermyon:spin/sqlite", "fermyon:spin/sqlite@2.0.0", "spin:sqlite/sqlite@3.1.0"]),
    (
        "variables",
        &["fermyon:spin/config", "fermyon:spin/variables@2.0.0", "spin:variables/variables@3.0.0", "wasi:config/store@0.2.0-draft-2024-09-27"],
    ),
];

/// Whether a dependency that inherits `inherit` is cut off from `import`.
fn denied(import: &str, inherit: &Inherit) -> bool {
    CAPABILITY_SETS.iter().any(|(set, interfaces)| {
        let inherited = match inherit {
            Inherit::All => true,
            Inherit::Only(sets) => sets.iter().any(|s| s == set),
        };
        !inherited && interfaces.iter().any(|i| *i == import || are_semver_compatible(i, import))
    })
}

/// The composed component's import that stands for a denied `interface`: a
/// plain name (words of letters and digits, each starting with a letter).
fn denied_name(interface: &str) -> String {
    let words = interface.split(|c: char| !c.is_ascii_alphanumeric()).filter(|w| !w.is_empty());
    let words: Vec<String> = words.map(|w| if w.starts_with(|c: char| c.is_ascii_digit()) { format!("v{w}") } else { w.to_ascii_lowercase() }).collect();
    format!("denied-{}", words.join("-"))
}

/// Whether dependency name `dep` satisfies import `import` (Spin's matching).
pub fn matches_import(dep: &str, import: &str) -> bool {
    let split = |name: &str| -> (String, Option<String>, Option<String>) {
        let (name, version) = match name.split_once('@') {
            Some((n, v)) => (n, Some(v.to_owned())),
            None => (name, None),
        };
        match name.split_once('/') {
            Some((package, interface)) => (package.to_owned(), Some(interface.to_owned()), version),
            None => (name.to_owned(), None, version),
        }
    };
    let plain = |name: &str| !name.contains([':', '/']);
    match (plain(dep), plain(import)) {
        (true, true) => dep == import,
        (false, false) => {
            let (dep_package, dep_interface, dep_version) = split(dep);
            let (package, interface, version) = split(import);
            dep_package == package
                && dep_interface.is_none_or(|i| Some(i) == interface)
                && dep_version.is_none_or(|v| Some(v) == version)
        }
        _ => false,
    }
}

/// The component `main` (of component `id`) composed with `deps`.
pub fn compose(id: &str, main: Vec<u8>, deps: &[Dependency]) -> anyhow::Result<Vec<u8>> {
    let mut graph = CompositionGraph::new();
    let package = Package::from_bytes(id, None, main, graph.types_mut()).with_context(|| format!("component {id:?} is not a component"))?;
    let world = package.ty();
    let registered = graph.register_package(package)?;
    let instance = graph.instantiate(registered);
    let imports: Vec<String> = graph.types()[world].imports.keys().cloned().collect();

    // Which dependency satisfies which import.
    let mut plugs: BTreeMap<&str, Vec<usize>> = BTreeMap::new();
    for (i, dep) in deps.iter().enumerate() {
        let matched: Vec<&String> = imports.iter().filter(|import| matches_import(&dep.name, import)).collect();
        if matched.is_empty() {
            bail!("dependency '{}' doesn't match any imports of component '{id}'", dep.name);
        }
        for import in matched {
            plugs.entry(import).or_default().push(i);
        }
    }
    let conflicts: Vec<String> = plugs
        .iter()
        .filter(|(_, by)| by.len() > 1)
        .map(|(import, by)| format!("import '{import}' satisfied by dependencies: '{}'", by.iter().map(|i| deps[*i].name.as_str()).collect::<Vec<_>>().join(", ")))
        .collect();
    if !conflicts.is_empty() {
        bail!("component '{id}' has dependency conflicts: {}", conflicts.join("; "));
    }

    let mut denied_nodes: BTreeMap<String, NodeId> = BTreeMap::new();
    let mut checked = Default::default();
    for (i, dep) in deps.iter().enumerate() {
        let bytes = std::fs::read(&dep.source).with_context(|| format!("dependency '{}': cannot read {}", dep.name, dep.source.display()))?;
        let package_name = dep.name.split(['/', '@']).next().unwrap_or(&dep.name).to_owned();
        let package = Package::from_bytes(&package_name, None, bytes, graph.types_mut())
            .with_context(|| format!("dependency '{}': {} is not a component", dep.name, dep.source.display()))?;
        let dep_world = package.ty();
        let registered = graph.register_package(package)?;
        let dep_instance = graph.instantiate(registered);
        let dep_imports: Vec<(String, ItemKind)> = graph.types()[dep_world].imports.iter().map(|(n, k)| (n.clone(), *k)).collect();
        let denied_imports: Vec<(String, ItemKind)> = dep_imports.into_iter().filter(|(name, _)| denied(name, &dep.inherit)).collect();
        // Each denied interface's type under a name of its own (wac would
        // otherwise fold it into the host's import of that interface), and
        // their types used from one another taken from the renamed ones.
        let mut renamed: HashMap<InterfaceId, InterfaceId> = HashMap::new();
        for (name, kind) in &denied_imports {
            if let ItemKind::Instance(id) = kind {
                let mut own = graph.types()[*id].clone();
                own.id = Some(denied_name(name));
                renamed.insert(*id, graph.types_mut().add_interface(own));
            }
        }
        for id in renamed.values() {
            for used in graph.types_mut()[*id].uses.values_mut() {
                if let Some(own) = renamed.get(&used.interface) {
                    used.interface = *own;
                }
            }
        }
        for (name, kind) in denied_imports {
            let node = match denied_nodes.get(&name) {
                Some(node) => *node,
                None => {
                    let kind = match kind {
                        ItemKind::Instance(id) => ItemKind::Instance(renamed[&id]),
                        other => other,
                    };
                    let node = graph.import(denied_name(&name), kind)?;
                    denied_nodes.insert(name.clone(), node);
                    node
                }
            };
            graph.set_instantiation_argument(dep_instance, &name, node)?;
        }
        for (import, _) in plugs.iter().filter(|(_, by)| by[0] == i) {
            let export = dep.export.clone().unwrap_or_else(|| (*import).to_owned());
            let Some(export_kind) = graph.types()[dep_world].exports.get(&export).copied() else {
                bail!("dependency '{}' doesn't export '{export}' to satisfy import '{import}'", dep.name);
            };
            let import_kind = graph.types()[world].imports[*import];
            SubtypeChecker::new(&mut checked)
                .is_subtype(export_kind, graph.types(), import_kind, graph.types())
                .with_context(|| format!("dependency '{}' exports '{export}' which is not compatible with import '{import}'", dep.name))?;
            let node = graph.alias_instance_export(dep_instance, &export)?;
            graph.set_instantiation_argument(instance, import, node)?;
        }
    }
    for name in graph.types()[world].exports.keys().cloned().collect::<Vec<_>>() {
        let node = graph.alias_instance_export(instance, &name)?;
        graph.export(node, &name)?;
    }
    Ok(graph.encode(EncodeOptions::default())?)
}

/// A resource of a denied interface: never made (its constructors deny).
struct DeniedResource;

/// Defines, in `linker`, every `denied-…` import of `component` not defined yet
/// (see the module's documentation).
pub fn define_denied<T: 'static>(linker: &mut Linker<T>, component: &Component, defined: &mut std::collections::HashSet<String>) -> anyhow::Result<()> {
    let engine = linker.engine().clone();
    // Resources of the interfaces the host provides: a denied interface that
    // `use`s one of them (preopens' `descriptor`) refers to the host's own.
    let provided: Vec<ResourceType> = component
        .component_type()
        .imports(&engine)
        .filter(|(name, _)| !name.starts_with("denied-"))
        .filter_map(|(_, item)| match item.ty {
            ComponentItem::ComponentInstance(i) => Some(i),
            _ => None,
        })
        .flat_map(|i| i.exports(&engine).filter_map(|(_, e)| if let ComponentItem::Resource(r) = e.ty { Some(r) } else { None }).collect::<Vec<_>>())
        .collect();
    for (name, item) in component.component_type().imports(&engine) {
        let ComponentItem::ComponentInstance(instance) = item.ty else { continue };
        if !name.starts_with("denied-") || !defined.insert(name.to_owned()) {
            continue;
        }
        let mut root = linker.root();
        let mut inst = root.instance(name)?;
        for (item_name, item) in instance.exports(&engine) {
            match item.ty {
                ComponentItem::Resource(r) if provided.contains(&r) => {}
                ComponentItem::Resource(_) => inst.resource(item_name, ResourceType::host::<DeniedResource>(), |_, _| Ok(()))?,
                ComponentItem::ComponentFunc(_) => {
                    let what = format!("{name}: {item_name}");
                    inst.func_new(item_name, move |_, ty, _, results| deny(&what, &ty, results).map_err(|e| wasmtime::Error::msg(e.to_string())))?
                }
                _ => {}
            }
        }
    }
    Ok(())
}

/// A denied call's answer: empty for the environment and preopens, else an
/// error case if the result type has one, else a trap.
fn deny(what: &str, ty: &ComponentFunc, results: &mut [Val]) -> anyhow::Result<()> {
    use wasmtime::component::types::Type;
    let message = format!("{what} is not permitted (a dependency inherits no configuration by default)");
    let Some(result_ty) = ty.results().next() else { bail!("{message}") };
    let value = match result_ty {
        Type::List(_) => Val::List(Vec::new()),
        Type::Option(_) => Val::Option(None),
        Type::Result(r) => {
            let error = match r.err() {
                None => None,
                Some(Type::String) => Some(Box::new(Val::String(message.clone()))),
                Some(Type::Variant(v)) => {
                    let case = v
                        .cases()
                        .find(|c| c.name == "other" && matches!(c.ty, Some(Type::String)))
                        .map(|c| (c.name.to_owned(), Some(Box::new(Val::String(message.clone())))))
                        .or_else(|| v.cases().find(|c| matches!(c.name, "access-denied" | "not-permitted") && c.ty.is_none()).map(|c| (c.name.to_owned(), None)));
                    match case {
                        Some((name, payload)) => Some(Box::new(Val::Variant(name, payload))),
                        None => bail!("{message}"),
                    }
                }
                Some(Type::Enum(e)) => match e.names().find(|n| matches!(*n, "access-denied" | "not-permitted")) {
                    Some(n) => Some(Box::new(Val::Enum(n.to_owned()))),
                    None => bail!("{message}"),
                },
                Some(_) => bail!("{message}"),
            };
            Val::Result(Err(error))
        }
        _ => bail!("{message}"),
    };
    match results.first_mut() {
        Some(slot) => *slot = value,
        None => bail!("{message}"),
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Dependency names match imports as Spin matches them.
    #[test]
    fn names_match_as_in_spin() {
        for (dep, imports) in [
            ("foo:bar/baz@0.1.0", vec!["foo:bar/baz@0.1.0"]),
            ("foo:bar/baz", vec!["foo:bar/baz@0.1.0", "foo:bar/baz"]),
            ("foo:bar", vec!["foo:bar/baz@0.1.0", "foo:bar/baz"]),
            ("foo:bar@0.1.0", vec!["foo:bar/baz@0.1.0"]),
            ("foo-bar", vec!["foo-bar"]),
        ] {
            for import in imports {
                assert!(matches_import(dep, import), "{dep} should match {import}");
            }
        }
        for (dep, imports) in [
            ("foo:bar/baz@0.1.0", vec!["foo:bar/baz"]),
            ("foo:bar/baz", vec!["foo:bar/bub", "foo:bar/bub@0.1.0"]),
            ("foo:bar", vec!["foo:bub/bib"]),
            ("foo:bar@0.1.0", vec!["foo:bar/baz"]),
            ("foo:bar/baz", vec!["foo:bar/baz-bub", "foo-bar"]),
        ] {
            for import in imports {
                assert!(!matches_import(dep, import), "{dep} should not match {import}");
            }
        }
    }

    /// What is denied follows the inherited capability sets, semver-compatible
    /// versions included; the denied imports get valid plain names.
    #[test]
    fn capabilities_are_denied_unless_inherited() {
        let none = Inherit::Only(vec![]);
        assert!(denied("wasi:cli/environment@0.2.3", &none));
        assert!(denied("spin:key-value/key-value@3.0.0", &none));
        assert!(!denied("wasi:io/streams@0.2.6", &none));
        assert!(!denied("spin:key-value/key-value@3.0.0", &Inherit::Only(vec!["key_value_stores".into()])));
        assert!(denied("spin:redis/redis@3.0.0", &Inherit::Only(vec!["key_value_stores".into()])));
        assert!(!denied("spin:redis/redis@3.0.0", &Inherit::All));
        assert_eq!(denied_name("wasi:cli/environment@0.2.6"), "denied-wasi-cli-environment-v0-v2-v6");
    }
}
