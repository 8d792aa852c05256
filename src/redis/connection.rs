//! Connections for `[redis]`: one node (`cluster = false`) through a
//! reconnecting `ConnectionManager`, or a Redis Cluster (`cluster = true`)
//! through the redis crate's cluster client, which routes each command or
//! pipeline to the node owning its hash slot and follows `MOVED`/`ASK`.
//! Every key of one shard shares a hash slot (see [`super::keys`]), so each
//! fenced step (`WATCH` … `EXEC` in one pipeline) goes to one node whole.
//! Both kinds look the same to the rest of the worker: [`RedisConn`].

use std::sync::Arc;
use std::time::Duration;

use redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use redis::cluster::{ClusterClient, ClusterClientBuilder};
use redis::cluster_async::ClusterConnection;
use redis::{Client, Cmd, IntoConnectionInfo, Pipeline, RedisError, RedisFuture, Value};

use super::direct::{DirectConn, Target};
use crate::config::RedisSection;

/// Where connections come from.
#[derive(Clone)]
pub enum RedisClient {
    Single(Client),
    Cluster(ClusterClient),
}

impl std::fmt::Debug for RedisClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            RedisClient::Single(_) => "RedisClient::Single",
            RedisClient::Cluster(_) => "RedisClient::Cluster",
        })
    }
}

/// A connection to one node or to a cluster.
#[derive(Clone)]
pub enum RedisConn {
    Single(ConnectionManager),
    Cluster(ClusterConnection),
    /// A shard task's own plain-TCP connection (see [`super::direct`]),
    /// and its database number.
    Direct(Arc<tokio::sync::Mutex<DirectConn>>, i64),
}

impl std::fmt::Debug for RedisConn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            RedisConn::Single(_) => "RedisConn::Single",
            RedisConn::Cluster(_) => "RedisConn::Cluster",
            RedisConn::Direct(..) => "RedisConn::Direct",
        })
    }
}

impl ConnectionLike for RedisConn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            RedisConn::Single(c) => c.req_packed_command(cmd),
            RedisConn::Cluster(c) => c.req_packed_command(cmd),
            RedisConn::Direct(c, _) => {
                Box::pin(async move { c.lock().await.req_packed_command(cmd).await })
            }
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        cmd: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            RedisConn::Single(c) => c.req_packed_commands(cmd, offset, count),
            RedisConn::Cluster(c) => c.req_packed_commands(cmd, offset, count),
            RedisConn::Direct(c, _) => {
                Box::pin(
                    async move { c.lock().await.req_packed_commands(cmd, offset, count).await },
                )
            }
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            RedisConn::Single(c) => c.get_db(),
            RedisConn::Cluster(c) => c.get_db(),
            RedisConn::Direct(_, db) => *db,
        }
    }
}

/// `url` as logs show it: the password, if any, replaced by `***`, so a
/// wrong address is visible and a secret is not.
pub fn display_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    let (authority, path) = match rest.split_once('/') {
        Some((a, p)) => (a, format!("/{p}")),
        None => (rest, String::new()),
    };
    let authority = match authority.rsplit_once('@') {
        Some((userinfo, host)) => match userinfo.split_once(':') {
            Some((user, _password)) => format!("{user}:***@{host}"),
            None => format!("{userinfo}@{host}"),
        },
        None => authority.to_owned(),
    };
    format!("{scheme}://{authority}{path}")
}

/// Why a Redis client could not be built from `[redis]`: a configuration
/// error, so the caller stops.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("redis.url: {0}")]
    Url(RedisError),
    #[error("redis.tls_ca_file: cannot read {path}: {source}")]
    CaFile {
        path: String,
        source: std::io::Error,
    },
}

/// The client for `[redis]`: the URL (on a cluster: any node's), with
/// `username` / `password` and a private CA applied when given.
pub fn client(section: &RedisSection) -> Result<RedisClient, ClientError> {
    let mut info = section
        .url
        .as_str()
        .into_connection_info()
        .map_err(ClientError::Url)?;
    if let Some(user) = &section.username {
        info.redis.username = Some(user.clone());
    }
    if let Some(password) = &section.password {
        info.redis.password = Some(password.clone());
    }
    let tls = section.url.starts_with("rediss://");
    if tls {
        install_tls_provider();
    }
    let root_cert = section
        .tls_ca_file
        .as_ref()
        .map(|path| {
            std::fs::read(path).map_err(|source| ClientError::CaFile {
                path: path.clone(),
                source,
            })
        })
        .transpose()?;
    let certificates = |root_cert| redis::TlsCertificates {
        client_tls: None,
        root_cert: Some(root_cert),
    };
    if section.cluster {
        // The builder takes the user and password from this first node.
        let mut builder = ClusterClientBuilder::new(vec![info])
            .connection_timeout(Duration::from_secs(5))
            .response_timeout(section.block.as_duration() + Duration::from_secs(10));
        if tls {
            builder = builder.tls(redis::cluster::TlsMode::Secure);
        }
        if let Some(root_cert) = root_cert {
            builder = builder.certs(certificates(root_cert));
        }
        return builder
            .build()
            .map(RedisClient::Cluster)
            .map_err(ClientError::Url);
    }
    match root_cert {
        None => Client::open(info),
        Some(root_cert) => Client::build_with_tls(info, certificates(root_cert)),
    }
    .map(RedisClient::Single)
    .map_err(ClientError::Url)
}

/// rustls needs a process-wide crypto provider before the first TLS
/// connection.
pub fn install_tls_provider() {
    // An error only says a provider is installed already.
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// The connection of a one-shot command (`status`, `reshard`, the `dlq`
/// commands): errors name the server.
pub async fn connect_command(section: &RedisSection) -> anyhow::Result<RedisConn> {
    use anyhow::Context as _;
    let client = client(section)?;
    connect(&client, Duration::from_secs(2))
        .await
        .with_context(|| format!("connecting to {}", display_url(&section.url)))
}

/// A connection that reconnects on its own; `block` is the longest a
/// command waits on the server (`XREAD BLOCK`), so replies may take that
/// long. Each shard task has its own, so its blocking wait and its
/// `WATCH` … `EXEC` steps never share a connection with another task's.
pub async fn connect(client: &RedisClient, block: Duration) -> Result<RedisConn, RedisError> {
    match client {
        RedisClient::Single(client) => {
            // Retries at most half a second apart: the crate's default
            // backoff (a factor of 100 on a 1 s base, capped at 60 s) kept
            // a first connection that failed, e.g. on a wrong password, in
            // retries for about two minutes. The callers retry anyway.
            let config = ConnectionManagerConfig::new()
                .set_connection_timeout(Duration::from_secs(5))
                .set_response_timeout(block + Duration::from_secs(10))
                .set_number_of_retries(2)
                .set_max_delay(500);
            ConnectionManager::new_with_config(client.clone(), config)
                .await
                .map(RedisConn::Single)
        }
        RedisClient::Cluster(client) => client.get_async_connection().await.map(RedisConn::Cluster),
    }
}

/// A shard task's connection: on one node over plain TCP the task's own
/// socket with the fast reply reader ([`super::direct`]); over TLS or on a
/// cluster the same as [`connect`].
pub async fn connect_shard(client: &RedisClient, block: Duration) -> Result<RedisConn, RedisError> {
    if let RedisClient::Single(single) = client {
        let info = single.get_connection_info();
        if let redis::ConnectionAddr::Tcp(host, port) = &info.addr {
            let target = Target {
                host: host.clone(),
                port: *port,
                username: info.redis.username.clone(),
                password: info.redis.password.clone(),
                db: info.redis.db,
            };
            let conn = DirectConn::connect(target, block + Duration::from_secs(10)).await?;
            return Ok(RedisConn::Direct(
                Arc::new(tokio::sync::Mutex::new(conn)),
                info.redis.db,
            ));
        }
    }
    connect(client, block).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn logged_urls_hide_the_password_only() {
        assert_eq!(
            display_url("redis://127.0.0.1:6379/2"),
            "redis://127.0.0.1:6379/2"
        );
        assert_eq!(
            display_url("rediss://app:s3cr@t@redis.example:6380"),
            "rediss://app:***@redis.example:6380"
        );
        assert_eq!(display_url("redis://:pw@h:1/0"), "redis://:***@h:1/0");
        assert_eq!(display_url("redis://app@h:1"), "redis://app@h:1");
    }
}
