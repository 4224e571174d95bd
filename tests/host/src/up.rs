//! `up`: run an application like `spin up`.

use std::collections::BTreeMap;
use std::io::Write as _;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context as _, bail};

use crate::app::{App, AppOptions, InstanceReuse};

/// Arguments of `up`, named as `spin up`'s.
#[derive(Debug, clap::Args)]
pub struct UpArgs {
    /// Address to serve HTTP on.
    #[arg(long, default_value = "127.0.0.1:3000", env = "SPIN_HTTP_LISTEN_ADDR")]
    pub listen: String,
    /// The manifest, or a directory containing `spin.toml`.
    #[arg(short = 'f', long = "from", default_value = "spin.toml")]
    pub from: PathBuf,
    /// Spin runtime configuration file.
    #[arg(long, env = "RUNTIME_CONFIG_FILE")]
    pub runtime_config_file: Option<PathBuf>,
    /// Directory of the default key-value store and SQLite database.
    #[arg(long)]
    pub state_dir: Option<PathBuf>,
    /// Set an application variable (`name=value`); wins over `SPIN_VARIABLE_*`.
    #[arg(long = "variable", value_name = "NAME=VALUE")]
    pub variables: Vec<String>,
    /// Requests one WASIp3 instance serves before it is retired.
    #[arg(long, default_value_t = InstanceReuse::SPIN_DEFAULT.max_requests)]
    pub max_instance_reuse_count: usize,
    /// Requests one WASIp3 instance serves at once.
    #[arg(long, default_value_t = InstanceReuse::SPIN_DEFAULT.max_concurrent)]
    pub max_instance_concurrent_reuse_count: usize,
    /// How long an idle instance is kept (`1s`, `500ms`, or seconds).
    #[arg(long, default_value = "1s", value_parser = parse_duration)]
    pub idle_instance_timeout: Duration,
    /// Run each component's `[component.<id>.build] command` first (`spin up --build`).
    #[arg(long)]
    pub build: bool,
    /// If no Redis answers at this loopback URL, start a `redis-server` there (with
    /// an append-only file under the state directory) for as long as `up` runs.
    #[arg(long, value_name = "REDIS_URL")]
    pub ensure_redis: Option<String>,
    /// Stand in for a hosted platform, with its published limits (see
    /// `tests/host/README.md`): `akamai-functions` (also Fermyon Wasm
    /// Functions).
    #[arg(long, value_name = "PLATFORM", value_parser = ["akamai-functions"])]
    pub emulate: Option<String>,
}

/// Runs every component's build command, as `spin build` does.
pub fn build(manifest_path: &std::path::Path) -> anyhow::Result<()> {
    let manifest = crate::manifest::Manifest::load(manifest_path)?;
    let dir = manifest_path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(std::path::Path::new("."));
    for (id, c) in &manifest.component {
        let Some(b) = &c.build else { continue };
        let commands: Vec<String> = match &b.command {
            toml::Value::String(s) => vec![s.clone()],
            toml::Value::Array(a) => a.iter().filter_map(|v| v.as_str().map(str::to_owned)).collect(),
            other => bail!("component {id:?}: build command {other} is not a string or a list of strings"),
        };
        let workdir = b.workdir.as_ref().map_or_else(|| dir.to_path_buf(), |w| dir.join(w));
        for cmd in commands {
            eprintln!("Building component {id} with `{cmd}`");
            let status = std::process::Command::new("sh")
                .arg("-c")
                .arg(&cmd)
                .current_dir(&workdir)
                .status()
                .with_context(|| format!("component {id:?}: cannot run `{cmd}`"))?;
            if !status.success() {
                bail!("component {id:?}: build command `{cmd}` failed ({status})");
            }
        }
    }
    eprintln!("Finished building all Spin components");
    Ok(())
}

/// Starts `redis-server` on `url`'s loopback port unless something answers there.
async fn ensure_redis(url: &str, state_dir: &std::path::Path) -> anyhow::Result<Option<tokio::process::Child>> {
    // Messages name the server, never its credentials.
    let server = crate::outbound::destination(url, "redis");
    let client = redis::Client::open(url).with_context(|| format!("--ensure-redis {server:?} is not a Redis URL"))?;
    if let Ok(mut c) = client.get_multiplexed_async_connection().await
        && redis::cmd("PING").query_async::<String>(&mut c).await.is_ok() {
            eprintln!("Using the Redis server at {server}");
            return Ok(None);
        }
    let info = client.get_connection_info().addr().to_string();
    let (host, port) = info.rsplit_once(':').context("--ensure-redis needs host:port")?;
    if !matches!(host, "127.0.0.1" | "localhost") {
        bail!("--ensure-redis starts a server on loopback only; {server} is not a loopback address");
    }
    let dir = state_dir.join("redis");
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let mut cmd = tokio::process::Command::new("redis-server");
    cmd.args(["--port", port, "--bind", "127.0.0.1", "--appendonly", "yes", "--save", ""]);
    // The URL's password, required by the server it starts.
    if let Some(pw) = client.get_connection_info().redis_settings().password() {
        cmd.args(["--requirepass", pw]);
    }
    let child = cmd
        .arg("--dir")
        .arg(&dir)
        .stdout(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .context("cannot start redis-server (install it: apt-get install redis-server)")?;
    for _ in 0..500 {
        if let Ok(mut c) = client.get_multiplexed_async_connection().await
            && redis::cmd("PING").query_async::<String>(&mut c).await.is_ok() {
                eprintln!("Started redis-server on {info} (data in {})", dir.display());
                return Ok(Some(child));
            }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    bail!("redis-server did not come up on {info}")
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    let (num, unit) = s
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .map_or((s, "s"), |i| s.split_at(i));
    let n: f64 = num.parse().map_err(|_| format!("invalid duration {s:?}"))?;
    let secs = match unit {
        "s" => n,
        "ms" => n / 1e3,
        "us" | "μs" => n / 1e6,
        "ns" => n / 1e9,
        _ => return Err(format!("invalid duration unit in {s:?} (use s, ms, us or ns)")),
    };
    Ok(Duration::from_secs_f64(secs))
}

impl UpArgs {
    /// The application options these arguments describe.
    pub fn options(&self) -> anyhow::Result<AppOptions> {
        let manifest = if self.from.is_dir() { self.from.join("spin.toml") } else { self.from.clone() };
        let mut variables = BTreeMap::new();
        for v in &self.variables {
            let Some((k, val)) = v.split_once('=') else {
                bail!("--variable {v:?}: expected NAME=VALUE");
            };
            variables.insert(k.to_owned(), val.to_owned());
        }
        let mut opts = AppOptions::new(manifest);
        opts.runtime_config = self.runtime_config_file.clone();
        opts.state_dir = self.state_dir.clone();
        opts.variables = variables;
        opts.reuse = InstanceReuse {
            max_requests: self.max_instance_reuse_count.max(1),
            max_concurrent: self.max_instance_concurrent_reuse_count.max(1),
            idle_timeout: self.idle_instance_timeout,
        };
        opts.hosted = self.emulate.as_ref().map(|_| crate::app::Hosted::AKAMAI_FUNCTIONS);
        Ok(opts)
    }
}

/// Runs the app's Redis triggers on a runtime of their own, on threads of
/// their own, as many workers as the HTTP trigger's runtime has; the returned
/// future ends when they do. Spin's `spin up` runs each trigger type in a
/// process of its own (`spin trigger http`, `spin trigger redis`), so the
/// system shares the cores between a processor woken by the Redis trigger
/// and the HTTP requests beside it; on one runtime, its invocation would
/// instead wait in one queue behind every HTTP request ready to run.
fn redis_triggers_apart(app: Arc<App>) -> anyhow::Result<impl std::future::Future<Output = anyhow::Result<()>>> {
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().thread_name("redis-trigger").build()?;
    let (done, ended) = tokio::sync::oneshot::channel();
    std::thread::Builder::new().name("redis-trigger".into()).spawn(move || {
        let r = runtime.block_on(app.run_redis_triggers(|listing| {
            print!("{listing}");
            let _ = std::io::stdout().flush();
        }));
        let _ = done.send(r);
    })?;
    Ok(async move { ended.await.unwrap_or_else(|_| Err(anyhow::anyhow!("the Redis trigger's runtime stopped"))) })
}

/// Loads the app, prints what it serves and serves until interrupted or a trigger
/// fails.
pub async fn run(args: UpArgs) -> anyhow::Result<()> {
    let opts = args.options()?;
    if args.build {
        build(&opts.manifest)?;
    }
    let state_dir = opts.state_dir.clone().unwrap_or_else(|| {
        opts.manifest.parent().map_or_else(|| PathBuf::from(".spin"), |d| d.join(".spin"))
    });
    let _redis = match &args.ensure_redis {
        Some(url) => ensure_redis(url, &state_dir).await?,
        None => None,
    };
    let app = Arc::new(App::load(&opts)?);
    for notice in app.notices() {
        eprintln!("{notice}");
    }
    let addr: SocketAddr = tokio::net::lookup_host(&args.listen)
        .await
        .with_context(|| format!("invalid --listen address {:?}", args.listen))?
        .find(SocketAddr::is_ipv4)
        .with_context(|| format!("--listen {:?} resolves to no IPv4 address", args.listen))?;
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("{addr} is already in use or cannot be bound"))?;
    let local = listener.local_addr()?;
    print!("{}", app.route_listing(&format!("http://{local}")));
    std::io::stdout().flush()?;
    let http = app.clone().serve(listener);
    let redis: std::pin::Pin<Box<dyn std::future::Future<Output = anyhow::Result<()>>>> = if app.has_redis_triggers() {
        Box::pin(redis_triggers_apart(app.clone())?)
    } else {
        Box::pin(std::future::pending())
    };
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        r = http => r,
        // As Spin: when the Redis trigger's connection drops the trigger ends, and
        // `spin up` ends with it (run it under a supervisor).
        r = redis => {
            println!("A trigger exited unexpectedly. Terminating.");
            r.and(Err(anyhow::anyhow!("the Redis trigger ended")))
        }
        _ = tokio::signal::ctrl_c() => Ok(()),
        _ = term.recv() => Ok(()),
    }
}
