//! A real `redis-server` on a free loopback port with its own directory,
//! started by the tests (never the machine's shared one on 6379).

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use super::{free_port, wait_for};

/// How a test server is set up.
#[derive(Debug, Clone, Default)]
pub struct RedisOptions {
    /// Append-only file with fsync on every write: a kill -9 loses nothing.
    pub aof: bool,
    /// An ACL user with this name and password; the default user is off.
    pub acl_user: Option<(String, String)>,
    /// Serve TLS only, with a CA and server certificate made by `openssl`.
    pub tls: bool,
    /// A Redis Cluster node (see [`RedisCluster`]).
    pub cluster: bool,
}

pub struct RedisServer {
    pub port: u16,
    options: RedisOptions,
    dir: tempfile::TempDir,
    child: Option<Child>,
}

/// The `redis-server` binary: `$REDIS_SERVER_BIN`, else on PATH.
fn binary() -> PathBuf {
    super::find_binary("REDIS_SERVER_BIN", "redis-server", &[]).unwrap_or_else(|| {
        panic!("redis-server is missing: run scripts/install-test-deps (apt-get install redis-server) or set REDIS_SERVER_BIN")
    })
}

impl RedisServer {
    pub fn start() -> RedisServer {
        Self::start_with(RedisOptions::default())
    }

    pub fn start_with(options: RedisOptions) -> RedisServer {
        let dir = tempfile::tempdir().unwrap();
        if options.tls {
            make_certificates(dir.path());
        }
        let mut server = RedisServer {
            port: free_port(),
            options,
            dir,
            child: None,
        };
        server.spawn();
        server
    }

    fn spawn(&mut self) {
        let mut cmd = Command::new(binary());
        let dir = self.dir.path().to_str().unwrap().to_owned();
        let port = self.port.to_string();
        cmd.args(["--bind", "127.0.0.1", "--dir", &dir, "--save", ""]);
        if self.options.tls {
            cmd.args(["--port", "0", "--tls-port", &port]);
            for (flag, file) in [
                ("--tls-cert-file", "server.crt"),
                ("--tls-key-file", "server.key"),
                ("--tls-ca-cert-file", "ca.crt"),
            ] {
                cmd.arg(flag).arg(self.dir.path().join(file));
            }
            cmd.args(["--tls-auth-clients", "no"]);
        } else {
            cmd.args(["--port", &port]);
        }
        if self.options.cluster {
            cmd.args([
                "--cluster-enabled",
                "yes",
                "--cluster-config-file",
                "nodes.conf",
                "--cluster-node-timeout",
                "5000",
            ]);
        }
        if self.options.aof {
            cmd.args(["--appendonly", "yes", "--appendfsync", "always"]);
        } else {
            cmd.args(["--appendonly", "no"]);
        }
        if let Some((user, password)) = &self.options.acl_user {
            cmd.arg("--user")
                .arg(user)
                .args(["on", &format!(">{password}"), "~*", "&*", "+@all"]);
            cmd.args(["--user", "default", "off"]);
        }
        let log = std::fs::File::create(self.dir.path().join("redis.log")).unwrap();
        cmd.stdout(log).stderr(Stdio::null());
        self.child = Some(cmd.spawn().expect("start redis-server"));
        let url = self.url();
        let ca = self.ca_file();
        wait_for(
            "redis-server to answer PING",
            Duration::from_secs(30),
            || {
                if let Some(child) = self.child.as_mut() {
                    if let Some(status) = child.try_wait().unwrap() {
                        let log = std::fs::read_to_string(self.dir.path().join("redis.log"))
                            .unwrap_or_default();
                        panic!("redis-server exited at start ({status}): {log}");
                    }
                }
                let mut conn = connect(&url, ca.as_deref()).ok()?;
                redis::cmd("PING").query::<String>(&mut conn).ok()
            },
        );
    }

    /// The URL a client uses (with the ACL user's credentials when set).
    pub fn url(&self) -> String {
        let scheme = if self.options.tls { "rediss" } else { "redis" };
        match &self.options.acl_user {
            Some((user, password)) => {
                format!("{scheme}://{user}:{password}@127.0.0.1:{}", self.port)
            }
            None => format!("{scheme}://127.0.0.1:{}", self.port),
        }
    }

    /// The CA certificate that signed the server's, with TLS.
    pub fn ca_file(&self) -> Option<String> {
        self.options
            .tls
            .then(|| self.dir.path().join("ca.crt").to_str().unwrap().to_owned())
    }

    /// The server's process id.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    pub fn conn(&self) -> redis::Connection {
        connect(&self.url(), self.ca_file().as_deref()).expect("connect to the test redis")
    }

    /// Kills the server (SIGKILL) and starts it again on the same port and
    /// directory (with `aof`, every acknowledged write survives).
    pub fn restart(&mut self) {
        self.kill();
        self.spawn();
    }

    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            super::stop_child(&mut child);
        }
    }
}

/// Whether every entry of every stream was delivered to `group` and acked.
pub fn all_acked(conn: &mut redis::Connection, streams: &[String], group: &str) -> bool {
    streams.iter().all(|s| {
        let info: redis::streams::StreamInfoStreamReply = redis::cmd("XINFO")
            .arg("STREAM")
            .arg(s)
            .query(conn)
            .unwrap();
        let groups: redis::streams::StreamInfoGroupsReply = redis::cmd("XINFO")
            .arg("GROUPS")
            .arg(s)
            .query(conn)
            .unwrap();
        groups.groups.iter().any(|g| {
            g.name == group && g.pending == 0 && g.last_delivered_id == info.last_generated_id
        })
    })
}

/// A Redis Cluster of three primaries (no replicas) on free loopback ports,
/// made with `redis-cli --cluster create`.
pub struct RedisCluster {
    pub nodes: Vec<RedisServer>,
}

impl RedisCluster {
    pub fn start() -> RedisCluster {
        let options = RedisOptions {
            cluster: true,
            ..RedisOptions::default()
        };
        let nodes: Vec<RedisServer> = (0..3)
            .map(|_| RedisServer::start_with(options.clone()))
            .collect();
        let out = Command::new("redis-cli")
            .arg("--cluster")
            .arg("create")
            .args(nodes.iter().map(|n| format!("127.0.0.1:{}", n.port)))
            .args(["--cluster-replicas", "0", "--cluster-yes"])
            .output()
            .expect("redis-cli is missing: run scripts/install-test-deps");
        assert!(
            out.status.success(),
            "redis-cli --cluster create: {}",
            String::from_utf8_lossy(&out.stdout)
        );
        for node in &nodes {
            wait_for("the cluster to be ready", Duration::from_secs(30), || {
                let info: String = redis::cmd("CLUSTER")
                    .arg("INFO")
                    .query(&mut node.conn())
                    .ok()?;
                info.contains("cluster_state:ok").then_some(())
            });
        }
        RedisCluster { nodes }
    }

    /// A node's URL (any node leads a cluster client to all of them).
    pub fn url(&self) -> String {
        self.nodes[0].url()
    }

    /// A cluster connection: each command goes to the node of its key.
    pub fn conn(&self) -> redis::cluster::ClusterConnection {
        redis::cluster::ClusterClient::new(vec![self.url()])
            .unwrap()
            .get_connection()
            .expect("connect to the test cluster")
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
    }
}

fn connect(url: &str, ca_file: Option<&str>) -> redis::RedisResult<redis::Connection> {
    let client = match ca_file {
        None => redis::Client::open(url)?,
        Some(ca) => {
            sessionizer::redis::connection::install_tls_provider();
            redis::Client::build_with_tls(
                url,
                redis::TlsCertificates {
                    client_tls: None,
                    root_cert: Some(std::fs::read(ca).unwrap()),
                },
            )?
        }
    };
    client.get_connection_with_timeout(Duration::from_secs(2))
}

/// A CA (`ca.crt`) and a server certificate for 127.0.0.1 (`server.crt`,
/// `server.key`) in `dir`, made with `openssl`.
pub fn make_certificates(dir: &std::path::Path) {
    let run = |args: &[&str]| {
        let out = Command::new("openssl")
            .args(args)
            .current_dir(dir)
            .output()
            .expect("openssl is missing: run scripts/install-test-deps");
        assert!(
            out.status.success(),
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    run(&[
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-days",
        "2",
        "-subj",
        "/CN=sessionizer test CA",
        "-keyout",
        "ca.key",
        "-out",
        "ca.crt",
    ]);
    run(&[
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-subj",
        "/CN=127.0.0.1",
        "-keyout",
        "server.key",
        "-out",
        "server.csr",
    ]);
    std::fs::write(
        dir.join("san.ext"),
        "subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\n",
    )
    .unwrap();
    run(&[
        "x509",
        "-req",
        "-in",
        "server.csr",
        "-CA",
        "ca.crt",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-days",
        "2",
        "-extfile",
        "san.ext",
        "-out",
        "server.crt",
    ]);
}
