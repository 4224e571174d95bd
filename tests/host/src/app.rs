//! Loading an application: manifest, variables, runtime config, stores and databases,
//! compiled components, routes and Redis subscriptions.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context as _, bail};
use wasmtime::component::{Component, Linker};

use crate::engine::{engine, load_composed};
use crate::host::key_value::KvBackend;
use crate::host::postgres::PgPools;
use crate::host::sqlite::SqliteDb;
use crate::http::{ChainTargets, HttpComponent, Router};
use crate::manifest::Manifest;
use crate::outbound::AllowedHosts;
use crate::redis_trigger::Subscription;
use crate::runtime_config::{KeyValueConfig, RuntimeConfig};
use crate::template;

/// How WASIp3 HTTP instances are reused, as Spin 4 does (`--max-instance-reuse-count`,
/// `--max-instance-concurrent-reuse-count`, `--idle-instance-timeout`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InstanceReuse {
    /// Requests one instance serves before it is retired.
    pub max_requests: usize,
    /// Requests one instance serves at once.
    pub max_concurrent: usize,
    /// An idle instance is dropped after this long.
    pub idle_timeout: Duration,
}

impl InstanceReuse {
    /// Spin 4's defaults: 128 requests, 16 at once, 1 s idle.
    pub const SPIN_DEFAULT: Self = Self {
        max_requests: 128,
        max_concurrent: 16,
        idle_timeout: Duration::from_secs(1),
    };

    /// A fresh instance for every request (strict per-request isolation).
    pub const PER_REQUEST: Self = Self {
        max_requests: 1,
        max_concurrent: 1,
        idle_timeout: Duration::ZERO,
    };
}

impl Default for InstanceReuse {
    fn default() -> Self {
        Self::SPIN_DEFAULT
    }
}

/// A hosted platform the host can stand in for (`up --emulate
/// akamai-functions`): Fermyon Wasm Functions / Akamai Functions as their
/// published limits describe them (Akamai Functions' "Quotas and limits" and
/// "Use the Key Value store" pages): HTTP triggers only (an app with a Redis
/// trigger or a SQLite database is refused, as the platform refuses it), a
/// key-value store that takes 50 writes a second per app and shows a write to
/// other requests only after it has replicated (see `host::hosted_kv`), no
/// `wasi:keyvalue/atomics` (this host provides none anyway), every request a
/// fresh instance, at most 128 MiB of memory per instance, and 30 s per
/// request: a response not begun by then is cut off (`504`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Hosted {
    /// Key-value writes per second per app.
    pub kv_writes_per_sec: u32,
    /// How long a key-value write takes to reach other requests.
    pub kv_replication_delay: Duration,
    /// How long a request may take.
    pub request_limit: Duration,
    /// Memory per instance, in bytes.
    pub memory_limit: usize,
}

impl Hosted {
    /// Akamai Functions' published limits (the replication delay is not
    /// published: 500 ms stands for "globally replicated").
    pub const AKAMAI_FUNCTIONS: Self = Self {
        kv_writes_per_sec: 50,
        kv_replication_delay: Duration::from_millis(500),
        request_limit: Duration::from_secs(30),
        memory_limit: 128 << 20,
    };
}

/// What to load and how.
#[derive(Debug, Clone)]
pub struct AppOptions {
    /// Path of `spin.toml`.
    pub manifest: PathBuf,
    /// `--runtime-config-file`.
    pub runtime_config: Option<PathBuf>,
    /// Variable values that win over everything (like `spin up --variable k=v`).
    pub variables: BTreeMap<String, String>,
    /// Whether `SPIN_VARIABLE_<NAME>` environment variables are read.
    pub env_variables: bool,
    /// Directory of the default stores (`.spin` beside the manifest by default).
    pub state_dir: Option<PathBuf>,
    /// HTTP instance reuse.
    pub reuse: InstanceReuse,
    /// Keep guest output in memory for [`App::guest_output`].
    pub capture_output: bool,
    /// Stand in for a hosted platform (see [`Hosted`]).
    pub hosted: Option<Hosted>,
}

impl AppOptions {
    /// Options for the manifest at `manifest`, with Spin's defaults.
    pub fn new(manifest: impl Into<PathBuf>) -> Self {
        Self {
            manifest: manifest.into(),
            runtime_config: None,
            variables: BTreeMap::new(),
            env_variables: true,
            state_dir: None,
            reuse: InstanceReuse::default(),
            capture_output: false,
            hosted: None,
        }
    }
}

/// Everything one component may use; shared by all its instances.
pub(crate) struct ComponentCaps {
    /// Component id.
    pub(crate) id: String,
    /// Resolved component variables.
    pub(crate) variables: HashMap<String, String>,
    /// Key-value stores it may open, with their backends.
    pub(crate) key_value: HashMap<String, Arc<KvBackend>>,
    /// SQLite databases it may open.
    pub(crate) sqlite: HashMap<String, Arc<SqliteDb>>,
    /// PostgreSQL connection pools (the app's, shared by its components).
    pub(crate) postgres: Arc<PgPools>,
    /// The app's HTTP components, for service chaining.
    pub(crate) chain: Arc<ChainTargets>,
    /// Network destinations it may reach.
    pub(crate) allowed_hosts: AllowedHosts,
    /// WASI environment.
    pub(crate) environment: Vec<(String, String)>,
    /// Where guest output is kept, when captured.
    pub(crate) output: Option<Arc<Mutex<Vec<u8>>>>,
    /// Each instance's memory limit, in bytes (the hosted platform's), if any.
    pub(crate) memory_limit: Option<usize>,
    /// The most any instance has used, and the longest request.
    pub(crate) peaks: Peaks,
}

/// The most a component's instances have used so far (see [`App::peaks`]).
#[derive(Default)]
pub(crate) struct Peaks {
    /// The largest linear memory of any instance, in bytes.
    pub(crate) memory: std::sync::atomic::AtomicUsize,
    /// The longest HTTP request, in microseconds.
    pub(crate) request_us: std::sync::atomic::AtomicU64,
    /// The longest life of an instance under the platform's time limit, in
    /// microseconds.
    pub(crate) instance_us: std::sync::atomic::AtomicU64,
    /// Requests and instances cut off at the platform's limit.
    pub(crate) cut_off: std::sync::atomic::AtomicU64,
    /// Memory growths refused at the platform's limit.
    pub(crate) memory_refused: std::sync::atomic::AtomicU64,
}

/// The most one component's instances have used so far: what tests compare
/// with the hosted platform's limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Peak {
    /// The largest linear memory any one instance grew to, in bytes.
    pub memory_bytes: usize,
    /// The longest HTTP request it served (zero for none; one cut off counts
    /// as the limit).
    pub longest_request: Duration,
    /// Under the platform's time limit (a fresh instance per request): the
    /// longest an instance lived, its request and the work after its
    /// response together (zero without the limit).
    pub longest_instance: Duration,
    /// Requests cut off at the platform's time limit (answered 504), and
    /// instances stopped there (work after the response included).
    pub cut_off: u64,
    /// Times an instance was refused memory at the platform's limit (the
    /// guest then fails, usually trapping).
    pub memory_refused: u64,
}

/// A compiled component with its capabilities.
pub(crate) struct LoadedComponent {
    pub(crate) component: Component,
    pub(crate) caps: Arc<ComponentCaps>,
}

/// A loaded application, ready to serve.
pub struct App {
    /// `[application] name`.
    pub name: String,
    pub(crate) components: BTreeMap<String, Arc<LoadedComponent>>,
    pub(crate) router: Router,
    pub(crate) http: Arc<HashMap<String, HttpComponent>>,
    pub(crate) subscriptions: Vec<Subscription>,
    pub(crate) notices: Vec<String>,
    output: Option<Arc<Mutex<Vec<u8>>>>,
    /// The app's SQLite databases by label.
    sqlite: HashMap<String, Arc<SqliteDb>>,
}

impl App {
    /// Loads the application described by `opts`: every error says what is wrong and
    /// where (manifest key, variable, file).
    pub fn load(opts: &AppOptions) -> anyhow::Result<Self> {
        let manifest = Manifest::load(&opts.manifest)?;
        let dir = opts
            .manifest
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_else(|| PathBuf::from("."));
        let cwd = std::env::current_dir().context("no current directory")?;
        let runtime = match &opts.runtime_config {
            Some(p) => RuntimeConfig::load(p, &cwd)?,
            None => RuntimeConfig::default(),
        };
        let state_dir = opts.state_dir.clone().unwrap_or_else(|| dir.join(".spin"));
        let app_vars = resolve_app_variables(&manifest, opts)?;
        let lookup = |name: &str| app_vars.get(name).cloned();
        let mut notices = Vec::new();

        // Stores and databases: the defaults, then what the runtime config says.
        let mut kv_configs: BTreeMap<String, KeyValueConfig> = BTreeMap::new();
        kv_configs.insert(
            "default".into(),
            KeyValueConfig::Spin(Some(state_dir.join("sqlite_key_value.db"))),
        );
        kv_configs.extend(runtime.key_value_stores.clone());
        let mut db_configs: BTreeMap<String, Option<PathBuf>> = BTreeMap::new();
        db_configs.insert("default".into(), Some(state_dir.join("sqlite_db.db")));
        db_configs.extend(runtime.sqlite_databases.clone());

        let used_kv: HashSet<&String> = manifest.component.values().flat_map(|c| &c.key_value_stores).collect();
        let used_db: HashSet<&String> = manifest.component.values().flat_map(|c| &c.sqlite_databases).collect();
        let mut kv_backends = HashMap::new();
        if let Some(h) = &opts.hosted {
            if let Some((id, _)) = manifest.component.iter().find(|(_, c)| !c.sqlite_databases.is_empty()) {
                bail!("component {id:?} uses a SQLite database, which the hosted platform does not provide");
            }
            if !manifest.redis_triggers()?.is_empty() {
                bail!("the app has a Redis trigger; the hosted platform runs HTTP triggers only");
            }
            if opts.runtime_config.is_some() {
                bail!("the hosted platform takes no runtime config");
            }
            for label in &used_kv {
                kv_backends.insert((*label).clone(), Arc::new(KvBackend::Hosted(crate::host::hosted_kv::HostedKv::new(h.kv_writes_per_sec, h.kv_replication_delay))));
            }
        }
        for (label, cfg) in kv_configs.iter().filter(|_| opts.hosted.is_none()) {
            if used_kv.contains(label) {
                kv_backends.insert(label.clone(), Arc::new(KvBackend::new(cfg)?));
                if label == "default" && !runtime.key_value_stores.contains_key("default") {
                    notices.push(format!(
                        "Storing default key-value data to {:?}.",
                        state_dir.join("sqlite_key_value.db")
                    ));
                }
            }
        }
        let mut dbs = HashMap::new();
        let mut undefined_dbs = Vec::new();
        for (id, c) in &manifest.component {
            for label in &c.sqlite_databases {
                match db_configs.get(label) {
                    Some(path) => {
                        dbs.entry(label.clone())
                            .or_insert_with(|| Arc::new(SqliteDb::new(path.clone())));
                    }
                    None => undefined_dbs.push(format!("- Component {id} uses database '{label}'")),
                }
            }
            for label in &c.key_value_stores {
                if !kv_backends.contains_key(label) {
                    bail!("unknown key_value_stores label {label:?} for component {id:?}");
                }
            }
        }
        if !undefined_dbs.is_empty() {
            bail!(
                "One or more components use SQLite databases which are not defined.\n\
                 Check the spelling, or pass a runtime configuration file that defines these stores.\n\
                 Details:\n{}",
                undefined_dbs.join("\n")
            );
        }
        if used_db.contains(&"default".to_owned()) && !runtime.sqlite_databases.contains_key("default") {
            notices.push(format!("Storing default SQLite data to {:?}.", state_dir.join("sqlite_db.db")));
        }

        let output = opts.capture_output.then(|| Arc::new(Mutex::new(Vec::new())));
        let mut components = BTreeMap::new();
        let pg_pools = Arc::new(PgPools::default());
        let chain = Arc::new(ChainTargets::default());
        for (id, c) in &manifest.component {
            let ctx = || format!("component {id:?}");
            let variables = c
                .variables
                .iter()
                .map(|(k, t)| {
                    let v = template::render(t, lookup)
                        .with_context(|| format!("component {id:?}: variable {k:?}"))?;
                    Ok((k.clone(), v))
                })
                .collect::<anyhow::Result<_>>()?;
            // As Spin: checked at load with the variables' defaults, resolved
            // with the values in force for the running component.
            let default_of = |name: &str| manifest.variables.get(name).and_then(|v| v.default.clone());
            AllowedHosts::validate(&c.allowed_outbound_hosts, default_of)
                .with_context(|| format!("component {id:?}: `allowed_outbound_hosts` is malformed"))?;
            let allowed_hosts = AllowedHosts::resolve(&c.allowed_outbound_hosts, lookup);
            let caps = Arc::new(ComponentCaps {
                id: id.clone(),
                variables,
                key_value: c.key_value_stores.iter().map(|l| (l.clone(), kv_backends[l].clone())).collect(),
                sqlite: c.sqlite_databases.iter().map(|l| (l.clone(), dbs[l].clone())).collect(),
                postgres: pg_pools.clone(),
                chain: chain.clone(),
                allowed_hosts,
                environment: c.environment.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
                output: output.clone(),
                memory_limit: opts.hosted.map(|h| h.memory_limit),
                peaks: Peaks::default(),
            });
            let path = manifest.source_path(id, &dir).with_context(ctx)?;
            if !path.exists() {
                bail!(
                    "component {id:?}: source file {} does not exist (build it first: cargo build --target wasm32-wasip2 --release)",
                    path.display()
                );
            }
            let deps = manifest.dependencies(id, &dir)?;
            if let Some(d) = deps.iter().find(|d| !d.source.exists()) {
                bail!("component {id:?}: dependency {:?}: {} does not exist (build it first)", d.name, d.source.display());
            }
            let component = load_composed(id, &path, &deps).with_context(ctx)?;
            components.insert(id.clone(), Arc::new(LoadedComponent { component, caps }));
        }

        let mut linker = Linker::new(engine());
        wasmtime_wasi::p2::add_to_linker_async(&mut linker)?;
        wasmtime_wasi::p3::add_to_linker(&mut linker)?;
        wasmtime_wasi_http::p3::add_to_linker(&mut linker)?;
        crate::host::add_to_linker(&mut linker)?;
        let mut denied = HashSet::new();
        for c in components.values() {
            crate::compose::define_denied(&mut linker, &c.component, &mut denied)?;
        }
        let linker = Arc::new(linker);

        let mut router = Router::default();
        let mut http = HashMap::new();
        // The hosted platform: a fresh instance per request, each within its limit.
        let reuse = if opts.hosted.is_some() { InstanceReuse::PER_REQUEST } else { opts.reuse };
        let request_limit = opts.hosted.map(|h| h.request_limit);
        for t in manifest.http_triggers()? {
            if t.static_response.is_some() {
                bail!("[[trigger.http]] static_response is not supported by this host");
            }
            let Some(id) = t.component else {
                bail!("[[trigger.http]] route {} has no component", t.route);
            };
            let loaded = components
                .get(&id)
                .with_context(|| format!("[[trigger.http]] names component {id:?}, which is not defined"))?;
            let route = match &t.route {
                toml::Value::String(r) => r.clone(),
                // A private endpoint has no route: only service chaining reaches it.
                toml::Value::Table(p) if p.get("private") == Some(&toml::Value::Boolean(true)) => {
                    if !http.contains_key(&id) {
                        http.insert(id.clone(), HttpComponent::new(loaded.clone(), linker.clone(), reuse, request_limit).with_context(|| format!("component {id:?} cannot serve HTTP"))?);
                    }
                    continue;
                }
                other => bail!("route must be a string pattern or '{{ private = true }}': {id:?} has {other}"),
            };
            router.add(&route, &id)?;
            if !http.contains_key(&id) {
                http.insert(id.clone(), HttpComponent::new(loaded.clone(), linker.clone(), reuse, request_limit).with_context(|| format!("component {id:?} cannot serve HTTP"))?);
            }
        }

        let http = Arc::new(http);
        chain.set(&http);

        let redis_global = manifest.redis_global()?;
        let mut subscriptions = Vec::new();
        for t in manifest.redis_triggers()? {
            let loaded = components.get(&t.component).with_context(|| {
                format!("[[trigger.redis]] names component {:?}, which is not defined", t.component)
            })?;
            let address = match (&t.address, &redis_global) {
                (Some(a), _) => a.clone(),
                (None, Some(g)) => g.address.clone(),
                (None, None) => String::new(),
            };
            let address = template::render(&address, lookup).with_context(|| {
                format!("failed to resolve redis trigger address {address:?} for component {}", t.component)
            })?;
            if address.is_empty() {
                bail!("[[trigger.redis]] for component {} has no address: set [application.trigger.redis] address", t.component);
            }
            let channel = template::render(&t.channel, lookup).with_context(|| {
                format!("failed to resolve redis trigger channel {:?} for component {}", t.channel, t.component)
            })?;
            subscriptions.push(Subscription::new(address, channel, loaded.clone(), &linker)?);
        }

        Ok(Self {
            name: manifest.application.name.clone(),
            components,
            router,
            http,
            subscriptions,
            notices,
            output,
            sqlite: dbs,
        })
    }

    /// Statements the components have executed on database `label` so far (0 for
    /// an unknown label): what tests count database reads with.
    pub fn sqlite_statements(&self, label: &str) -> u64 {
        self.sqlite.get(label).map_or(0, |db| db.executed())
    }

    /// The guest output (stdout and stderr) captured so far, when
    /// [`AppOptions::capture_output`] is on.
    pub fn guest_output(&self) -> String {
        self.output
            .as_ref()
            .map(|o| String::from_utf8_lossy(&o.lock().expect("poisoned")).into_owned())
            .unwrap_or_default()
    }

    /// Lines `spin up` prints on stderr before serving (default store locations).
    pub fn notices(&self) -> &[String] {
        &self.notices
    }

    /// The most each component's instances have used so far: the largest
    /// instance memory and the longest request.
    pub fn peaks(&self) -> BTreeMap<String, Peak> {
        use std::sync::atomic::Ordering::Relaxed;
        self.components
            .iter()
            .map(|(id, c)| {
                let p = &c.caps.peaks;
                let peak = Peak {
                    memory_bytes: p.memory.load(Relaxed),
                    longest_request: Duration::from_micros(p.request_us.load(Relaxed)),
                    longest_instance: Duration::from_micros(p.instance_us.load(Relaxed)),
                    cut_off: p.cut_off.load(Relaxed),
                    memory_refused: p.memory_refused.load(Relaxed),
                };
                (id.clone(), peak)
            })
            .collect()
    }

    /// Ids of the loaded components.
    pub fn component_ids(&self) -> impl Iterator<Item = &str> {
        self.components.keys().map(String::as_str)
    }
}

/// Application variable values: `--variable`-style overrides, then
/// `SPIN_VARIABLE_<NAME>`, then the manifest default. A required variable with no
/// value is an error naming it and how to set it.
fn resolve_app_variables(manifest: &Manifest, opts: &AppOptions) -> anyhow::Result<HashMap<String, String>> {
    let mut values = HashMap::new();
    let mut missing = Vec::new();
    for (name, var) in &manifest.variables {
        let env_name = format!("SPIN_VARIABLE_{}", name.to_ascii_uppercase());
        let value = opts
            .variables
            .get(name)
            .cloned()
            .or_else(|| opts.env_variables.then(|| std::env::var(&env_name).ok()).flatten())
            .or_else(|| var.default.clone());
        match value {
            Some(v) => {
                values.insert(name.clone(), v);
            }
            None => missing.push(format!("{name} (set {env_name})")),
        }
    }
    if !missing.is_empty() {
        bail!("no value for required variable(s): {}", missing.join(", "));
    }
    Ok(values)
}
