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
        Ok(opts)
    }
}

/// Loads the app, prints what it serves and serves until interrupted or a trigger
/// fails.
pub async fn run(args: UpArgs) -> anyhow::Result<()> {
    let opts = args.options()?;
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
    let redis = app.clone().run_redis_triggers(|listing| {
        print!("{listing}");
        let _ = std::io::stdout().flush();
    });
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        r = http => r,
        r = redis => r,
        _ = tokio::signal::ctrl_c() => Ok(()),
        _ = term.recv() => Ok(()),
    }
}
