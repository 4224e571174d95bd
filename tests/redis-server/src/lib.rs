//! A real `redis-server` for the tests and the benchmark: on a free loopback port,
//! in a directory of its own, with a password or without, persistence as asked,
//! or as a one-node Redis Cluster; stopped on drop.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

/// A `redis-server` of our own on a free loopback port, stopped on drop.
pub struct RedisServer {
    /// The process (behind a lock so that a test can restart the server a
    /// running app is using).
    child: std::sync::Mutex<Child>,
    /// Its port.
    pub port: u16,
    dir: Dir,
    persistence: &'static [&'static str],
    /// `requirepass`, when it has one: every client must authenticate.
    password: Option<String>,
    /// The primary's port, for a replica.
    replica_of: Option<u16>,
}

/// Where a server keeps its data: a directory of its own, or one the caller
/// gave (e.g. a small tmpfs, to fill its disk).
enum Dir {
    Own(tempfile::TempDir),
    At(PathBuf),
}

impl Dir {
    fn path(&self) -> &Path {
        match self {
            Self::Own(d) => d.path(),
            Self::At(p) => p,
        }
    }
}

/// AOF written at once and synced every second: Redis refuses writes
/// (`MISCONF`) while it cannot write its AOF, and takes them again once it can.
pub const AOF_EVERYSEC: &[&str] = &["--save", "", "--appendonly", "yes", "--appendfsync", "everysec"];

/// A password no other text in a test contains: a fresh one per server, so that
/// finding it anywhere (an answer, a log line) can only mean it leaked. It is
/// letters, digits and dashes, so it reads the same however it is encoded; a
/// caller may add characters that need encoding after it.
pub fn fresh_secret(what: &str) -> String {
    static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.subsec_nanos());
    format!("{what}-pw-{:x}{nanos:08x}{n:04x}", std::process::id())
}

/// No persistence: the tests' default.
const NO_PERSISTENCE: &[&str] = &["--save", "", "--appendonly", "no"];
/// AOF with a sync per write: nothing acknowledged is lost when Redis is killed.
pub const AOF_ALWAYS: &[&str] = &["--save", "", "--appendonly", "yes", "--appendfsync", "always"];
/// Cluster mode (no persistence): a one-node Redis Cluster once it owns every
/// slot ([`Redis::start_cluster_node`]). It refuses, as any cluster does, a
/// command or script whose keys are in different hash slots (`CROSSSLOT`).
const CLUSTER_NODE: &[&str] = &["--save", "", "--appendonly", "no", "--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf"];
/// A member of a multi-node cluster ([`Redis::start_cluster`]): AOF with a sync
/// per write, and a node timeout of 2 s, so that a master's failure is noticed
/// and its replica promoted within seconds.
const CLUSTER_MEMBER: &[&str] = &[
    "--save", "", "--appendonly", "yes", "--appendfsync", "always", "--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf", "--cluster-node-timeout", "2000",
];

impl RedisServer {
    /// Starts a server and waits until it answers.
    pub fn start() -> Self {
        Self::start_with(NO_PERSISTENCE)
    }

    /// Starts a one-node Redis Cluster holding all 16,384 slots (so no key is
    /// redirected), and waits until the cluster is up.
    pub fn start_cluster_node() -> Self {
        let server = Self::start_with(CLUSTER_NODE);
        let mut c = server.conn();
        let _: () = redis::cmd("CLUSTER").arg("ADDSLOTSRANGE").arg(0).arg(16383).query(&mut c).expect("CLUSTER ADDSLOTSRANGE");
        server.wait_for(&["CLUSTER", "INFO"], "cluster_state:ok", "the one-node cluster did not come up");
        server
    }

    /// Starts a Redis Cluster of `masters` masters with `replicas` replicas
    /// each (`redis-cli --cluster create`, slots spread evenly), and waits
    /// until every node says the cluster is up. The masters come first.
    pub fn start_cluster(masters: usize, replicas: usize) -> Vec<Self> {
        let nodes: Vec<Self> = (0..masters * (1 + replicas)).map(|_| Self::start_with(CLUSTER_MEMBER)).collect();
        let out = Command::new("redis-cli")
            .arg("--cluster")
            .arg("create")
            .args(nodes.iter().map(|n| format!("127.0.0.1:{}", n.port)))
            .args(["--cluster-replicas", &replicas.to_string(), "--cluster-yes"])
            .stdin(Stdio::null())
            .output()
            .expect("redis-cli is installed with redis-server");
        assert!(out.status.success(), "redis-cli --cluster create: {}", String::from_utf8_lossy(&out.stdout));
        for n in &nodes {
            n.wait_for(&["CLUSTER", "INFO"], "cluster_state:ok", "the cluster did not come up");
        }
        // Every master's view has every node's slots (the others learn
        // through the cluster bus).
        for n in &nodes {
            let knows = || {
                let text: String = redis::cmd("CLUSTER").arg("NODES").query(&mut n.conn()).expect("CLUSTER NODES");
                text.lines().filter(|l| l.contains("master") && l.split(' ').count() > 8).count() == masters
            };
            let mut tries = 0;
            while !knows() {
                tries += 1;
                assert!(tries < 1000, "node {} never saw every master's slots", n.port);
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
        }
        // Every replica has its master's data: one that never synced cannot
        // be promoted when its master fails.
        for n in &nodes {
            let role: String = redis::cmd("INFO").arg("replication").query(&mut n.conn()).expect("INFO replication");
            if role.contains("role:slave") {
                n.wait_for(&["INFO", "replication"], "master_link_status:up", "a replica never synced with its master");
            }
        }
        nodes
    }

    /// Starts a node and adds it to the cluster `member` belongs to, as an
    /// empty master (`redis-cli --cluster add-node`); waits until it knows the
    /// cluster.
    pub fn join_cluster_of(member: &Self) -> Self {
        let node = Self::start_with(CLUSTER_MEMBER);
        let out = Command::new("redis-cli")
            .args(["--cluster", "add-node", &format!("127.0.0.1:{}", node.port), &format!("127.0.0.1:{}", member.port)])
            .stdin(Stdio::null())
            .output()
            .expect("redis-cli runs");
        assert!(out.status.success(), "redis-cli --cluster add-node: {}", String::from_utf8_lossy(&out.stdout));
        node.wait_for(&["CLUSTER", "INFO"], "cluster_state:ok", "the added node did not join");
        node
    }

    /// This cluster node's id (`CLUSTER MYID`).
    pub fn node_id(&self) -> String {
        redis::cmd("CLUSTER").arg("MYID").query(&mut self.conn()).expect("CLUSTER MYID")
    }

    /// Moves `slots` slots from cluster node `from` to node `to` (this node
    /// names the cluster), as an operator reshards: `redis-cli --cluster
    /// reshard`, which migrates the slots' keys one batch at a time.
    /// Both nodes must know each other first: a node just added is known to
    /// the others only once gossip has reached them (slow on a busy machine),
    /// and a migration to a node the source does not know fails.
    pub fn reshard(&self, from: &Self, to: &Self, slots: u32) {
        let (from_id, to_id) = (from.node_id(), to.node_id());
        from.wait_for(&["CLUSTER", "NODES"], &to_id, "the source node never learned of the destination");
        to.wait_for(&["CLUSTER", "NODES"], &from_id, "the destination node never learned of the source");
        self.wait_for(&["CLUSTER", "NODES"], &to_id, "the node resharding never learned of the destination");
        let out = Command::new("redis-cli")
            .args(["--cluster", "reshard", &format!("127.0.0.1:{}", self.port)])
            .args(["--cluster-from", &from_id, "--cluster-to", &to_id, "--cluster-slots", &slots.to_string(), "--cluster-yes"])
            .stdin(Stdio::null())
            .output()
            .expect("redis-cli runs");
        assert!(out.status.success(), "redis-cli --cluster reshard: {}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    }

    /// Polls `command` (for up to 10 s) until its text reply contains `want`;
    /// panics saying `otherwise`.
    fn wait_for(&self, command: &[&str], want: &str, otherwise: &str) {
        let mut c = self.conn();
        for _ in 0..1000 {
            let text: String = redis::cmd(command[0]).arg(&command[1..]).query(&mut c).expect("the command answers");
            if text.contains(want) {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        panic!("{otherwise}");
    }

    /// Starts a server with these persistence options.
    pub fn start_with(persistence: &'static [&'static str]) -> Self {
        Self::start_full(persistence, None)
    }

    /// Starts a server with these persistence options whose data (its AOF)
    /// is in `dir`, which the caller owns.
    pub fn start_in(persistence: &'static [&'static str], dir: &Path) -> Self {
        for _ in 0..5 {
            let port = free_port();
            let child = Self::spawn(port, dir, persistence, None, None);
            let server = Self { child: child.into(), port, dir: Dir::At(dir.to_path_buf()), persistence, password: None, replica_of: None };
            if server.wait_ready() {
                return server;
            }
        }
        panic!("redis-server did not start in {}", dir.display());
    }

    /// Starts a server that requires a password (`requirepass`, a fresh one), as
    /// a production Redis does; [`Redis::url`] carries it.
    pub fn start_secured() -> Self {
        // Characters a URL must encode, and `{:?}` escapes: the password must
        // stay hidden however an error spells it.
        Self::start_full(NO_PERSISTENCE, Some(format!("{}\"/@#:%x", fresh_secret("redis"))))
    }

    /// Starts a replica of `primary` (its persistence and password: promoted, it
    /// serves the same clients), and waits until it has synchronised.
    pub fn start_replica_of(primary: &RedisServer) -> Self {
        let server = Self::start_full_of(primary.persistence, primary.password.clone(), Some(primary.port));
        server.wait_for(&["INFO", "replication"], "master_link_status:up", "the replica did not synchronise");
        server
    }

    /// Cuts a replica off from its primary (`REPLICAOF` a port nothing listens
    /// on): it keeps its data and falls behind, as behind a partition.
    pub fn detach(&self) {
        let _: () = redis::cmd("REPLICAOF").arg("127.0.0.1").arg(free_port()).query(&mut self.conn()).expect("REPLICAOF elsewhere");
    }

    /// Makes a replica the primary (`REPLICAOF NO ONE`), as a failover does.
    pub fn promote(&mut self) {
        let _: () = redis::cmd("REPLICAOF").arg("NO").arg("ONE").query(&mut self.conn()).expect("REPLICAOF NO ONE");
        self.replica_of = None;
    }

    fn start_full(persistence: &'static [&'static str], password: Option<String>) -> Self {
        Self::start_full_of(persistence, password, None)
    }

    fn start_full_of(persistence: &'static [&'static str], password: Option<String>, replica_of: Option<u16>) -> Self {
        for _ in 0..5 {
            let port = free_port();
            let dir = tempfile::tempdir().expect("tempdir");
            let child = Self::spawn(port, dir.path(), persistence, password.as_deref(), replica_of);
            let server = Self { child: child.into(), port, dir: Dir::Own(dir), persistence, password: password.clone(), replica_of };
            if server.wait_ready() {
                return server;
            }
        }
        panic!("redis-server did not start");
    }

    fn spawn(port: u16, dir: &Path, persistence: &[&str], password: Option<&str>, replica_of: Option<u16>) -> Child {
        let mut cmd = Command::new("redis-server");
        cmd.args(["--port", &port.to_string(), "--bind", "127.0.0.1"]).args(persistence);
        if persistence.contains(&"--cluster-enabled") {
            // The bus on a free port of its own (by default the port + 10000,
            // which may be taken, or past 65535).
            cmd.args(["--cluster-port", &free_port().to_string()]);
        }
        if let Some(pw) = password {
            cmd.args(["--requirepass", pw, "--masterauth", pw]);
        }
        if let Some(primary) = replica_of {
            cmd.args(["--replicaof", "127.0.0.1", &primary.to_string()]);
        }
        cmd.arg("--dir")
            .arg(dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server is installed (see .ci/run)")
    }

    /// SIGKILLs the server.
    pub fn kill(&self) {
        let mut child = self.child();
        let _ = child.kill();
        let _ = child.wait();
    }

    /// Pauses the server (SIGSTOP): connections stay open and nothing answers,
    /// as on a stalled machine.
    pub fn pause(&self) {
        self.signal("STOP");
    }

    /// Resumes a paused server (SIGCONT).
    pub fn resume(&self) {
        self.signal("CONT");
    }

    fn signal(&self, sig: &str) {
        let status = Command::new("kill").arg(format!("-{sig}")).arg(self.child().id().to_string()).status().expect("kill runs");
        assert!(status.success(), "kill -{sig} redis-server");
    }

    /// Whether the process has exited (e.g. Redis exits when it cannot write
    /// its AOF with `appendfsync always`).
    pub fn exited(&self) -> bool {
        matches!(self.child().try_wait(), Ok(Some(_)))
    }

    /// Starts it again on the same port and data directory (AOF reloaded).
    pub fn restart(&self) {
        *self.child() = Self::spawn(self.port, self.dir.path(), self.persistence, self.password.as_deref(), self.replica_of);
        assert!(self.wait_ready(), "redis-server did not come back");
    }

    fn child(&self) -> std::sync::MutexGuard<'_, Child> {
        self.child.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn wait_ready(&self) -> bool {
        let client = redis::Client::open(self.url()).expect("url");
        for _ in 0..500 {
            if self.exited() {
                return false; // port taken meanwhile: try another
            }
            if let Ok(mut c) = client.get_connection()
                && redis::cmd("PING").query::<String>(&mut c).is_ok() {
                    return true;
                }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        false
    }

    /// `redis://127.0.0.1:<port>`, with `:<password>@` (percent-encoded) when it
    /// has one.
    pub fn url(&self) -> String {
        match &self.password {
            Some(pw) => {
                let pw = percent_encoding::utf8_percent_encode(pw, percent_encoding::NON_ALPHANUMERIC);
                format!("redis://:{pw}@127.0.0.1:{}", self.port)
            }
            None => self.host(),
        }
    }

    /// `redis://127.0.0.1:<port>`, never with credentials: the
    /// `allowed_outbound_hosts` entry (`redis_host`).
    pub fn host(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Its password, if it requires one.
    pub fn password(&self) -> Option<&str> {
        self.password.as_deref()
    }

    /// A synchronous connection for assertions.
    pub fn conn(&self) -> redis::Connection {
        redis::Client::open(self.url()).expect("url").get_connection().expect("connect")
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A loopback port nothing listens on right now.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").expect("bind").local_addr().expect("addr").port()
}
