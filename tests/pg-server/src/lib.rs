//! A real PostgreSQL server for the tests and the benchmark: one cluster per
//! process (`initdb` in a temporary directory, `postgres` on a free loopback
//! port), and a fresh database per caller (ICU en-US collation). The server dies
//! with the process (parent-death signal through `setpriv`); directories left by
//! earlier processes are removed. As root, both run as the `postgres` user
//! (PostgreSQL refuses root).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU32, Ordering};

/// A running server: the shared one, or a [`PgServer`] of its own.
struct Cluster {
    port: u16,
    bin: PathBuf,
    /// The postmaster's process id.
    pid: u32,
    /// Its directory (data, socket, log).
    dir: PathBuf,
    /// `setpriv` arguments that run it as the `postgres` user (as root).
    as_pg: Vec<String>,
    /// Commits wait for their WAL to be written (`synchronous_commit=on`).
    durable: bool,
}

/// A database of its own on the shared server.
#[derive(Debug, Clone)]
pub struct PgDb {
    /// `postgres://postgres@127.0.0.1:<port>/<name>`.
    pub url: String,
    /// `postgres://127.0.0.1:<port>` (for `allowed_outbound_hosts`).
    pub host: String,
    /// The password in `url`, for a database made by [`PgDb::create_secured`].
    pub password: Option<String>,
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").expect("bind").local_addr().expect("addr").port()
}

/// Whether PostgreSQL's server programs are installed.
pub fn installed() -> bool {
    std::panic::catch_unwind(bin_dir).is_ok()
}

/// The directory of PostgreSQL's server programs: Debian's newest
/// `/usr/lib/postgresql/<n>/bin`, else wherever `initdb` is on the PATH.
fn bin_dir() -> PathBuf {
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| Some((e.file_name().to_str()?.parse().ok()?, e.path().join("bin"))))
        .filter(|(_, p): &(u32, PathBuf)| p.join("initdb").exists())
        .collect();
    versions.sort();
    if let Some((_, p)) = versions.pop() {
        return p;
    }
    let out = Command::new("sh").args(["-c", "command -v initdb"]).output().expect("sh runs");
    let path = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    assert!(!path.is_empty(), "PostgreSQL's initdb is not installed (see .ci/run)");
    Path::new(&path).parent().expect("bin dir").to_path_buf()
}

fn id(flag: &str) -> u32 {
    let out = Command::new("id").args([flag, "postgres"]).output().expect("id runs");
    String::from_utf8_lossy(&out.stdout).trim().parse().expect("the postgres user exists (Debian's postgresql package)")
}

fn is_root() -> bool {
    let out = Command::new("id").arg("-u").output().expect("id runs");
    String::from_utf8_lossy(&out.stdout).trim() == "0"
}

/// Removes data directories of test binaries that are gone.
fn remove_stale(tmp: &Path) {
    for e in std::fs::read_dir(tmp).into_iter().flatten().flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        // `spillway-pg-<pid>` (the shared server) or `spillway-pg-<pid>-<n>`.
        if let Some(pid) = name.strip_prefix("spillway-pg-").and_then(|rest| rest.split('-').next())
            && !Path::new("/proc").join(pid).exists()
        {
            let _ = std::fs::remove_dir_all(e.path());
        }
    }
}

fn cluster() -> &'static Cluster {
    static CLUSTER: OnceLock<Cluster> = OnceLock::new();
    CLUSTER.get_or_init(|| {
        let tmp = std::env::temp_dir();
        remove_stale(&tmp);
        start_cluster(tmp.join(format!("spillway-pg-{}", std::process::id())), false)
    })
}

/// Starts a server with its data in `dir` (made afresh) and waits until it
/// answers; `durable`: see [`Cluster::durable`].
fn start_cluster(dir: PathBuf, durable: bool) -> Cluster {
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("pg dir");
    // `setpriv` arguments that run a command as the `postgres` user.
    let as_pg: Vec<String> = if is_root() {
        std::os::unix::fs::chown(&dir, Some(id("-u")), Some(id("-g"))).expect("chown pg dir");
        ["--reuid", "postgres", "--regid", "postgres", "--clear-groups"].map(String::from).to_vec()
    } else {
        Vec::new()
    };
    let bin = bin_dir();
    let data = dir.join("data");
    let status = Command::new("setpriv")
        .args(&as_pg)
        .arg(bin.join("initdb"))
        .arg("-D")
        .arg(&data)
        .args(["-U", "postgres", "-A", "trust", "-E", "UTF8", "--locale=C", "--no-sync", "--no-instructions"])
        .stdout(Stdio::null())
        .status()
        .expect("initdb runs");
    assert!(status.success(), "initdb failed");
    // The tests' own superuser (`postgres`) is trusted; every other role
    // must give its password over TCP (SCRAM), as on a production server.
    let hba = "local all all trust\nhost all postgres 127.0.0.1/32 trust\nhost all all 127.0.0.1/32 scram-sha-256\n";
    std::fs::write(data.join("pg_hba.conf"), hba).expect("write pg_hba.conf");
    let port = free_port();
    let pid = spawn_postmaster(&bin, &dir, port, &as_pg, durable);
    let c = Cluster { port, bin, pid, dir, as_pg, durable };
    c.wait_up();
    c
}

/// Starts the postmaster on `dir`'s data and `port`; its process id.
fn spawn_postmaster(bin: &Path, dir: &Path, port: u16, as_pg: &[String], durable: bool) -> u32 {
    // Spawned from a thread that never ends: the parent-death signal follows
    // the spawning thread, and a test's thread ends with the test.
    let (tx, rx) = std::sync::mpsc::channel();
    let (server_bin, server_dir, server_as_pg) = (bin.join("postgres"), dir.to_path_buf(), as_pg.to_vec());
    let preload: &[&str] = if statements_tracked(&server_bin) { &["-c", "shared_preload_libraries=pg_stat_statements"] } else { &[] };
    let server_log = std::fs::OpenOptions::new().create(true).append(true).open(dir.join("server.log")).expect("server log");
    std::thread::spawn(move || {
        let child = Command::new("setpriv")
            .arg("--pdeathsig")
            .arg("KILL")
            .args(&server_as_pg)
            .arg(server_bin)
            .arg("-D")
            .arg(server_dir.join("data"))
            .args(["-p", &port.to_string(), "-h", "127.0.0.1", "-k"])
            .arg(&server_dir)
            // Tests measure nothing: no sync to disk (a crashed process leaves
            // what it wrote with the OS). A durable server writes a commit's WAL
            // before answering, as a crash test needs; the shared one does not,
            // and loses its last commits if it crashes. Enough connections for
            // every test's pool.
            .args(["-c", "fsync=off", "-c", if durable { "synchronous_commit=on" } else { "synchronous_commit=off" }, "-c", "full_page_writes=off"])
            .args(["-c", "max_connections=400", "-c", "shared_buffers=64MB"])
            // Statements counted per database, for the benchmark's capacity
            // model, where the extension is installed (Debian's server package).
            .args(preload)
            .stdout(Stdio::null())
            .stderr(server_log)
            .spawn();
        let _ = tx.send(child.as_ref().map(|c| c.id()).map_err(|e| e.to_string()));
        // Reaped when it dies (a crash test kills it): a zombie would still
        // look alive to the next postmaster, which then refuses to start.
        if let Ok(mut c) = child {
            let _ = c.wait();
        }
        loop {
            std::thread::park();
        }
    });
    rx.recv().expect("spawner").expect("postgres starts")
}

/// Whether `pg_stat_statements` is installed beside the server program.
fn statements_tracked(server: &Path) -> bool {
    server.parent().and_then(Path::parent).is_some_and(|root| root.join("lib/pg_stat_statements.so").exists())
}

impl Cluster {
    /// Waits until it answers (10 s at most).
    fn wait_up(&self) {
        for _ in 0..1000 {
            if self.psql("postgres", "SELECT 1").is_ok() {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        panic!("postgres did not start on port {}:\n{}", self.port, std::fs::read_to_string(self.dir.join("server.log")).unwrap_or_default());
    }

    /// Runs `sql` through `psql` on database `db`; its output, or the error.
    fn psql(&self, db: &str, sql: &str) -> Result<String, String> {
        let out = Command::new(self.bin.join("psql"))
            .args(["-X", "-q", "-t", "-A", "-v", "ON_ERROR_STOP=1", "-h", "127.0.0.1", "-U", "postgres"])
            .args(["-p", &self.port.to_string(), "-d", db, "-c", sql])
            .output()
            .map_err(|e| e.to_string())?;
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        } else {
            Err(String::from_utf8_lossy(&out.stderr).into_owned())
        }
    }
}

/// A server of its own (not the shared one), for a test that pauses or
/// crashes it: that would stall every other test's database. It commits
/// durably (`synchronous_commit=on`): a crash loses no acknowledged commit.
pub struct PgServer {
    cluster: Cluster,
}

impl PgServer {
    /// Starts one (a second or two: `initdb`).
    pub fn start() -> Self {
        static N: AtomicU32 = AtomicU32::new(0);
        let tmp = std::env::temp_dir();
        let dir = tmp.join(format!("spillway-pg-{}-{}", std::process::id(), N.fetch_add(1, Ordering::Relaxed)));
        Self { cluster: start_cluster(dir, true) }
    }

    /// A database of its own on this server, as [`PgDb::create_secured`].
    pub fn create_secured(&self) -> PgDb {
        PgDb::secured_on(&self.cluster)
    }

    /// Pauses the whole server (SIGSTOP to the postmaster and every backend):
    /// connections stay open and nothing answers, as on a stalled machine.
    pub fn pause(&self) {
        self.signal("STOP");
    }

    /// Resumes it (SIGCONT).
    pub fn resume(&self) {
        self.signal("CONT");
    }

    /// Crashes the server (SIGKILL to the postmaster and every backend, as a
    /// machine or an OOM killer does) and starts it again on the same data
    /// and port: it recovers from its write-ahead log.
    pub fn crash_and_restart(&mut self) {
        let pids = self.pids();
        let _ = Command::new("kill").arg("-KILL").args(&pids).status();
        for _ in 0..1000 {
            if pids.iter().all(|p| !Path::new("/proc").join(p).exists()) {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        let c = &mut self.cluster;
        c.pid = spawn_postmaster(&c.bin, &c.dir, c.port, &c.as_pg, c.durable);
        c.wait_up();
    }

    /// The postmaster's process id and its children's.
    fn pids(&self) -> Vec<String> {
        let pid = self.cluster.pid.to_string();
        let mut pids = vec![pid.clone()];
        for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
            let stat = std::fs::read_to_string(e.path().join("stat")).unwrap_or_default();
            // pid (comm) state ppid ...: the fields after the last ')'.
            let ppid = stat.rsplit(')').next().and_then(|r| r.split_whitespace().nth(1));
            if ppid == Some(pid.as_str()) {
                pids.push(e.file_name().to_string_lossy().into_owned());
            }
        }
        pids
    }

    /// Sends `sig` to the postmaster and its children (backends, workers).
    fn signal(&self, sig: &str) {
        let pids = self.pids();
        let status = Command::new("kill").arg(format!("-{sig}")).args(&pids).status().expect("kill runs");
        assert!(status.success() || sig == "CONT", "kill -{sig} {pids:?}");
    }
}

impl Drop for PgServer {
    fn drop(&mut self) {
        // Resumed first: a stopped server would not act on the shutdown.
        self.signal("CONT");
        let _ = Command::new("kill").args(["-QUIT", &self.cluster.pid.to_string()]).status();
        let _ = std::fs::remove_dir_all(&self.cluster.dir);
    }
}

impl PgDb {
    /// Runs `sql` in this database as the superuser, on the shared server
    /// (the benchmark reads the server's statistics); its output, one row per
    /// line, columns separated by `|`.
    pub fn sql(&self, sql: &str) -> Result<String, String> {
        let name = self.url.rsplit('/').next().unwrap_or_default();
        cluster().psql(name, sql)
    }

    /// Creates a database of its own on the shared server (started on first
    /// use; panics if PostgreSQL's programs are missing).
    pub fn create() -> Self {
        Self::on(cluster())
    }

    /// A database of its own on `c`.
    fn on(c: &Cluster) -> Self {
        static N: AtomicU32 = AtomicU32::new(0);
        let name = format!("t{}_{}", std::process::id(), N.fetch_add(1, Ordering::Relaxed));
        // A linguistic collation (ICU's en-US), as a production database may
        // have: the app's statements must not depend on the cluster's C locale.
        c.psql("postgres", &format!("CREATE DATABASE {name} TEMPLATE template0 LOCALE_PROVIDER icu ICU_LOCALE 'en-US' LOCALE 'C'"))
            .expect("create database");
        Self { url: format!("postgres://postgres@127.0.0.1:{}/{name}", c.port), host: format!("postgres://127.0.0.1:{}", c.port), password: None }
    }

    /// Like [`PgDb::create`], owned by a role of its own that logs in with a
    /// password (a fresh one, `password`): `url` carries it, as a production
    /// `database` variable does.
    pub fn create_secured() -> Self {
        Self::secured_on(cluster())
    }

    fn secured_on(c: &Cluster) -> Self {
        let mut db = Self::on(c);
        let name = db.url.rsplit('/').next().expect("database name").to_owned();
        let role = format!("{name}_owner");
        let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.subsec_nanos());
        let password = format!("pg-pw-{name}-{nanos:08x}");
        c.psql("postgres", &format!("CREATE ROLE {role} LOGIN PASSWORD '{password}'")).expect("create role");
        c.psql("postgres", &format!("ALTER DATABASE {name} OWNER TO {role}")).expect("hand the database over");
        c.psql(&name, &format!("ALTER SCHEMA public OWNER TO {role}")).expect("hand the schema over");
        db.url = format!("postgres://{role}:{password}@127.0.0.1:{}/{name}", c.port);
        db.password = Some(password);
        db
    }
}
