//! The one wasmtime [`Engine`] of the process, and compiled components.
//!
//! Compiling a component with Cranelift takes seconds, so each `.wasm` file is compiled
//! once per process (an in-memory map keyed by path and modification time) and, when
//! a cache directory is configured, once per machine (wasmtime's on-disk cache).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};
use std::time::SystemTime;

use anyhow::Context as _;
use wasmtime::component::Component;
use wasmtime::{Cache, CacheConfig, Config, Engine};

use crate::compose::Dependency;

/// Environment variable naming a directory for wasmtime's compilation cache.
pub const CACHE_DIR_ENV: &str = "SPILLWAY_HOST_CACHE_DIR";

/// The process-wide engine: component model with async (WASIp3) enabled.
pub fn engine() -> &'static Engine {
    static ENGINE: OnceLock<Engine> = OnceLock::new();
    ENGINE.get_or_init(|| {
        let mut config = Config::new();
        config.wasm_component_model_async(true);
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
        Engine::new(&config).expect("the engine configuration is static and valid")
    })
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
