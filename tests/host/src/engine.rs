//! The one wasmtime [`Engine`] of the process, and compiled components.
//!
//! Compiling a component with Cranelift takes seconds, so each `.wasm` file is compiled
//! once per process (an in-memory map keyed by path and modification time) and, when
//! a cache directory is configured, once per machine (wasmtime's on-disk cache).
//!
//! The engine is configured as Spin's (`spin-core`): epoch interruption with a
//! 10 ms ticker and a deadline no request reaches, and, in a process that runs one
//! app as `spin up` does ([`one_app_per_process`], which `spillway-host up`
//! calls), the pooling instance allocator with Spin's limits (instances are taken
//! from preallocated slots instead of mapped and unmapped each time; on-demand
//! allocation where the address space is too small, as Spin probes). Both change
//! what each instantiation and each guest loop costs, so the host's figures follow
//! Spin's. Test processes run many apps at once, which one app's pool would not
//! hold: they allocate on demand.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, SystemTime};

use anyhow::Context as _;
use wasmtime::component::Component;
use wasmtime::{Cache, CacheConfig, Config, Engine, InstanceAllocationStrategy, PoolingAllocationConfig, Store};

use crate::compose::Dependency;

/// Environment variable naming a directory for wasmtime's compilation cache.
pub const CACHE_DIR_ENV: &str = "SPILLWAY_HOST_CACHE_DIR";

/// Environment variable that, set to `perfmap`, makes the engine write
/// `/tmp/perf-<pid>.map` so `perf` names the components' compiled functions
/// (as `wasmtime run --profile perfmap`).
pub const PROFILE_ENV: &str = "SPILLWAY_HOST_PROFILE";

/// Whether this process runs one app (see the module's documentation).
static ONE_APP: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Declares that this process runs one app, as `spin up`: the engine (if not made
/// yet) uses Spin's instance pool.
pub fn one_app_per_process() {
    ONE_APP.store(true, std::sync::atomic::Ordering::Relaxed);
}

/// The process-wide engine: component model with async (WASIp3) enabled.
pub fn engine() -> &'static Engine {
    static ENGINE: OnceLock<Engine> = OnceLock::new();
    ENGINE.get_or_init(|| {
        let mut config = Config::new();
        config.wasm_component_model_async(true);
        config.epoch_interruption(true);
        if ONE_APP.load(std::sync::atomic::Ordering::Relaxed) && use_pooling() {
            config.allocation_strategy(InstanceAllocationStrategy::Pooling(pooling()));
        }
        if std::env::var(PROFILE_ENV).is_ok_and(|p| p == "perfmap") {
            config.profiler(wasmtime::ProfilingStrategy::PerfMap);
        }
        if let Some(dir) = std::env::var_os(CACHE_DIR_ENV) {
            let mut cache = CacheConfig::new();
            cache.with_directory(PathBuf::from(dir));
            match Cache::new(cache) {
                Ok(cache) => {
                    config.cache(Some(cache));
                }
                Err(e) => eprintln!("warning: compilation cache disabled: {e:#}"),
            }
        }
        let engine = Engine::new(&config).expect("the engine configuration is static and valid");
        let ticking = engine.clone();
        std::thread::Builder::new()
            .name("epoch-ticker".into())
            .spawn(move || {
                loop {
                    std::thread::sleep(EPOCH_TICK);
                    ticking.increment_epoch();
                }
            })
            .expect("a thread can be started");
        engine
    })
}

/// Spin's epoch tick (`DEFAULT_EPOCH_TICK_INTERVAL`).
pub(crate) const EPOCH_TICK: Duration = Duration::from_millis(10);

/// A store on the engine, with the epoch deadline Spin gives every store (far
/// enough that no request reaches it; Spin's request timeouts are timers).
pub fn new_store<T: 'static>(data: T) -> Store<T> {
    let mut store = Store::new(engine(), data);
    store.set_epoch_deadline(u64::MAX / 2);
    store
}

/// A limit of the pool, overridable through Spin's environment variable of the same
/// meaning.
fn env_or(name: &str, default: u64) -> u64 {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

/// Spin's pool: sized from `SPIN_MAX_INSTANCE_COUNT` (1,000 by default) as Spin
/// sizes it; what an instance slot keeps resident when freed is Spin's default
/// too, or `SPIN_WASMTIME_LINEAR_MEMORY_KEEP_RESIDENT` /
/// `SPIN_WASMTIME_TABLE_KEEP_RESIDENT` (bytes).
fn pooling() -> PoolingAllocationConfig {
    const MB: u64 = 1 << 20;
    let max = env_or("SPIN_MAX_INSTANCE_COUNT", 1_000);
    let mut p = PoolingAllocationConfig::default();
    p.total_component_instances(max as u32)
        .total_memories(max as u32)
        .total_tables(2 * max as u32)
        .total_stacks(max as u32)
        .total_core_instances(4 * max as u32)
        .table_elements(100_000)
        .max_component_instance_size(10 * MB as usize)
        .max_core_instance_size(10 * MB as usize)
        .max_core_instances_per_component(200)
        .max_tables_per_component(64)
        .max_memories_per_component(32)
        .max_tables_per_module(2)
        .max_memories_per_module(2)
        .max_memory_size(4 << 30)
        .linear_memory_keep_resident(env_or("SPIN_WASMTIME_LINEAR_MEMORY_KEEP_RESIDENT", 2 * MB) as usize)
        .table_keep_resident(env_or("SPIN_WASMTIME_TABLE_KEEP_RESIDENT", MB / 2) as usize);
    p
}

/// Whether the pooling allocator can be used here: `SPIN_WASMTIME_POOLING` (`1`
/// or `0`) decides if set; otherwise, as Spin probes, whether a memory can reserve
/// 42 bits of address space.
fn use_pooling() -> bool {
    match std::env::var("SPIN_WASMTIME_POOLING").as_deref() {
        Ok("1") => return true,
        Ok("0") => return false,
        _ => {}
    }
    const BITS: u32 = 42;
    let mut config = Config::new();
    config.wasm_memory64(true);
    config.memory_reservation(1 << BITS);
    let Ok(engine) = Engine::new(&config) else { return false };
    let mut store = Store::new(&engine, ());
    let ty = wasmtime::MemoryType::new64(0, Some(1 << (BITS - 16)));
    wasmtime::Memory::new(&mut store, ty).is_ok()
}

/// Loads and compiles the component at `path`, reusing an earlier compilation of the
/// same unchanged file in this process.
pub fn load_component(path: &Path) -> anyhow::Result<Component> {
    load_composed("", path, &[])
}

/// Loads the component `id` at `path` composed with its dependencies `deps` (see
/// [`crate::compose`]), compiled once per process for the same unchanged files.
pub fn load_composed(id: &str, path: &Path, deps: &[Dependency]) -> anyhow::Result<Component> {
    type Key = (Vec<(PathBuf, Option<SystemTime>)>, Vec<Dependency>);
    static COMPILED: OnceLock<Mutex<HashMap<Key, Component>>> = OnceLock::new();
    let mut files = Vec::new();
    for file in std::iter::once(path).chain(deps.iter().map(|d| d.source.as_path())) {
        let meta = std::fs::metadata(file)
            .with_context(|| format!("component file {} cannot be read", file.display()))?;
        files.push((file.to_path_buf(), meta.modified().ok()));
    }
    let key = (files, deps.to_vec());
    // Held while compiling: concurrent loads of the same file (parallel tests) wait
    // for the one compilation instead of each running Cranelift, which already uses
    // every core.
    let mut compiled = COMPILED.get_or_init(Default::default).lock().expect("poisoned");
    if let Some(c) = compiled.get(&key) {
        return Ok(c.clone());
    }
    let mut bytes = std::fs::read(path)
        .with_context(|| format!("component file {} cannot be read", path.display()))?;
    if !deps.is_empty() {
        bytes = crate::compose::compose(id, bytes, deps)?;
    }
    let component = Component::new(engine(), &bytes)
        .map_err(anyhow::Error::from)
        .with_context(|| format!("{} is not a valid Wasm component", path.display()))?;
    compiled.insert(key, component.clone());
    Ok(component)
}
