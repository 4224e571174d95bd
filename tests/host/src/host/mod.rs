//! The Spin host interfaces the components import, each against a real backend.
//!
//! Bindings come from the upstream WIT packages vendored under `wit/deps/`
//! (`wasi:keyvalue` store and batch beside the `spin:*` packages). Every
//! interface is implemented on [`Spin`] (the [`HasData`] marker) and reaches the
//! per-store [`SpinView`]: the resource table shared with WASI, and the calling
//! component's [`ComponentCaps`] (what it may open).

pub(crate) mod hosted_kv;
pub(crate) mod key_value;
pub(crate) mod postgres;
pub(crate) mod redis;
pub(crate) mod sqlite;
pub(crate) mod variables;

use std::sync::Arc;

use wasmtime::component::{HasData, Linker, ResourceTable};

use crate::app::ComponentCaps;
use crate::state::StoreData;

wasmtime::component::bindgen!({
    path: [
        "../../wit/deps/spin-redis@3.0.0",
        "../../wit/deps/spin-key-value@3.0.0",
        "../../wit/deps/spin-sqlite@3.1.0",
        "../../wit/deps/spin-postgres@4.2.0",
        "../../wit/deps/spin-variables@3.0.0",
    ],
    inline: "
        package spillway:testhost;

        world spin-host {
            import spin:redis/redis@3.0.0;
            import spin:key-value/key-value@3.0.0;
            import spin:sqlite/sqlite@3.1.0;
            import spin:postgres/postgres@4.2.0;
            import spin:variables/variables@3.0.0;
        }
    ",
    world: "spin-host",
    imports: {
        // The synchronous sqlite functions block on the database, as Spin's do.
        default: trappable,
    },
    with: {
        "spin:redis/redis.connection": redis::Connection,
        "spin:key-value/key-value.store": key_value::Store,
        "spin:sqlite/sqlite.connection": sqlite::Connection,
        "spin:postgres/postgres.connection": postgres::Connection,
        "spin:postgres/postgres.connection-builder": postgres::Builder,
    },
});

/// `wasi:keyvalue@0.2.0-draft2` `store` and `batch`, as Spin provides them over the
/// same stores (and the same resource table) as `spin:key-value`. `atomics` and
/// `watch` are not provided: Fermyon Wasm Functions has neither, so Spillway does
/// not use them, and a component importing them fails to load with the import named.
pub(crate) mod wasi_keyvalue {
    wasmtime::component::bindgen!({
        path: ["../../wit/deps/wasi-keyvalue-2024-10-17"],
        inline: "
            package spillway:testhost-keyvalue;
            world keyvalue {
                import wasi:keyvalue/store@0.2.0-draft2;
                import wasi:keyvalue/batch@0.2.0-draft2;
            }
        ",
        world: "keyvalue",
        imports: { default: async | trappable },
        with: {
            "wasi:keyvalue/store.bucket": super::key_value::Store,
        },
    });
}

/// Bindings of the world a Redis-triggered component exports.
pub(crate) mod trigger {
    wasmtime::component::bindgen!({
        path: ["../../wit/deps/spin-redis@3.0.0"],
        inline: "
            package spillway:testhost-trigger;
            world redis-trigger {
                export spin:redis/inbound-redis@3.0.0;
            }
        ",
        world: "redis-trigger",
        exports: { default: async },
    });
}

/// [`HasData`] marker for the Spin interfaces.
pub(crate) struct Spin;

impl HasData for Spin {
    type Data<'a> = SpinView<'a>;
}

/// What a Spin host function sees of its store.
pub(crate) struct SpinView<'a> {
    /// The store's resource table (shared with WASI).
    pub(crate) table: &'a mut ResourceTable,
    /// What the calling component is allowed to use.
    pub(crate) caps: &'a Arc<ComponentCaps>,
    /// Which instance calls (unique in the process).
    pub(crate) instance: u64,
}

fn view(data: &mut StoreData) -> SpinView<'_> {
    SpinView {
        table: &mut data.table,
        caps: &data.caps,
        instance: data.instance,
    }
}

/// Adds every Spin interface to `linker`.
pub(crate) fn add_to_linker(linker: &mut Linker<StoreData>) -> wasmtime::Result<()> {
    SpinHost::add_to_linker::<StoreData, Spin>(linker, view)?;
    wasi_keyvalue::Keyvalue::add_to_linker::<StoreData, Spin>(linker, view)
}
