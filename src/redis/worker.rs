//! The Redis worker: shard leases, fair sharing, graceful release.
//!
//! Every `lease_ttl / 3` the worker heartbeats into the members set, renews
//! the leases it holds, and moves toward its fair share of the shards
//! (`ceil(shards / live workers)`): it releases shards above it (the task
//! stops first, so nothing is written after the release) and takes free
//! shards below it. A dead worker's leases lapse after `lease_ttl` and its
//! shards are taken by the survivors, who replay its pending entries.

use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use redis::RedisError;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use super::connection::{client, connect, connect_shard, RedisClient, RedisConn};
use super::keys::{members_key, ShardKeys};
use super::reshard::leftover_streams;
use super::scripts;
use super::shard::{Settings, ShardExit, ShardTask};
use crate::codec::Decoder;
use crate::config::{Config, RedisSection};
use crate::metrics::{self, PartitionGauges};
use crate::pipeline::Stats;
use crate::wall_clock::{now_ms, worker_id};

#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    #[error("the configuration has no [redis] section")]
    NoRedisSection,
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    #[error(transparent)]
    Client(#[from] super::connection::ClientError),
    /// Refused credentials or ACL permissions before the first lease
    /// round: a configuration error, so the worker stops instead of
    /// retrying forever. (Later, e.g. after a password rotation, the worker
    /// keeps what it holds and retries.)
    #[error("redis: {0} (check redis.url, redis.username and redis.password, and the user's ACL)")]
    Refused(RedisError),
}

/// Whether Redis refused the credentials or the user's permissions.
fn is_refused(error: &RedisError) -> bool {
    error.kind() == redis::ErrorKind::AuthenticationFailed
        || matches!(error.code(), Some("WRONGPASS" | "NOAUTH" | "NOPERM"))
}

/// A shard this worker holds.
struct Owned {
    token: String,
    stop: watch::Sender<bool>,
    task: JoinHandle<(ShardExit, Stats)>,
}

/// Runs the worker until `shutdown` resolves; returns the counts of every
/// shard it held.
pub async fn run(
    config: &Config,
    shutdown: impl Future<Output = ()>,
) -> Result<Stats, WorkerError> {
    let section = config.redis.as_ref().ok_or(WorkerError::NoRedisSection)?;
    let client = client(section)?;
    let worker = worker_id();
    let settings = Arc::new(Settings {
        group: section.group.clone(),
        batch: section.batch,
        block: section.block.as_duration(),
        max_deliveries: section.max_deliveries,
        output_maxlen: section.output_maxlen,
        dlq_maxlen: section.dlq_maxlen,
        decoder: Decoder::new(config.input_format(), config.decode_limits()),
        window: config.window_config(),
        idle: config.idle_policy(),
        format: config.output_format(),
        worker: worker.clone(),
        shards: section.shards,
        misrouted: section.misrouted,
        redactor: config.redactor()?,
    });
    let mut coordinator = Coordinator {
        section: section.clone(),
        shards: ShardKeys::all(section),
        client,
        conn: None,
        settings,
        worker,
        owned: HashMap::new(),
        stats: Stats::default(),
        groups_ready: false,
        unreachable: false,
    };
    let server = super::connection::display_url(&section.url);
    tracing::info!(worker = %coordinator.worker, %server, shards = section.shards, "redis worker starting");
    tokio::pin!(shutdown);
    let mut tick = tokio::time::interval(Duration::from_millis(
        (section.lease_ttl.0 / 3).max(1) as u64
    ));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut reached = false;
    loop {
        tokio::select! {
            biased;
            () = &mut shutdown => break,
            _ = tick.tick() => {
                // A round waits on Redis (connecting, taking leases):
                // shutdown must not wait for it. A lease taken by a round
                // cut short is not released below; it lapses after
                // lease_ttl, as a crashed worker's would.
                let round = tokio::select! {
                    biased;
                    () = &mut shutdown => break,
                    round = coordinator.rebalance() => round,
                };
                match round {
                    Ok(()) => {
                        reached = true;
                        coordinator.unreachable = false;
                        metrics::READINESS.set_connected(true);
                        metrics::READINESS.set_owned(coordinator.owned.len());
                        if let Err(e) = coordinator.report_lag().await {
                            tracing::debug!(error = %e, "reading the shards' lag failed");
                        }
                    }
                    Err(e) if !reached && is_refused(&e) => return Err(WorkerError::Refused(e)),
                    Err(e) => {
                        metrics::READINESS.set_connected(false);
                        metrics::READINESS.cause(format!("{server}: {e}"));
                        tracing::warn!(error = %e, %server, "lease round failed; retrying at the next one");
                    }
                }
            }
        }
    }
    coordinator.shutdown().await;
    Ok(coordinator.stats)
}

struct Coordinator {
    section: RedisSection,
    shards: Vec<ShardKeys>,
    client: RedisClient,
    conn: Option<RedisConn>,
    settings: Arc<Settings>,
    worker: String,
    owned: HashMap<u32, Owned>,
    stats: Stats,
    groups_ready: bool,
    /// A release found Redis unreachable since the last good lease round:
    /// further best-effort calls (releases, leaving the members set) are
    /// skipped, so a stop with Redis down does not wait out a reconnect for
    /// each. Unreleased leases lapse after `lease_ttl`.
    unreachable: bool,
}

impl Coordinator {
    async fn conn(&mut self) -> Result<RedisConn, RedisError> {
        if let Some(conn) = &self.conn {
            return Ok(conn.clone());
        }
        let conn = connect(&self.client, self.settings.block).await?;
        self.conn = Some(conn.clone());
        Ok(conn)
    }

    /// One lease round: heartbeat, renew, release above the fair share, take
    /// free shards below it.
    async fn rebalance(&mut self) -> Result<(), RedisError> {
        let mut conn = self.conn().await?;
        if !self.groups_ready {
            for shard in &self.shards {
                create_group(&mut conn, &shard.stream, &self.section.group).await?;
            }
            for (stream, entries) in leftover_streams(&mut conn, &self.section).await? {
                tracing::warn!(
                    stream = %stream,
                    entries,
                    "a stream of another shard count still holds entries that no worker reads \
                     under redis.shards = {}: stop the workers and run `sessionizer reshard \
                     --from <the old count>` (docs/redis.md, \"Changing the shard count\")",
                    self.section.shards
                );
            }
            self.groups_ready = true;
        }
        self.reap().await;
        let ttl = self.section.lease_ttl.0;
        let now = now_ms();
        let members = members_key(&self.section);
        let (_, _, live): ((), (), u32) = redis::pipe()
            .zadd(&members, &self.worker, now)
            .cmd("ZREMRANGEBYSCORE")
            .arg(&members)
            .arg("-inf")
            .arg(now - ttl)
            .zcard(&members)
            .query_async(&mut conn)
            .await?;
        let mut lost = Vec::new();
        for (index, owned) in &self.owned {
            let renewed: i64 = scripts::RENEW
                .key(&self.shards[*index as usize].lease)
                .arg(&owned.token)
                .arg(ttl)
                .invoke_async(&mut conn)
                .await?;
            if renewed == 0 {
                lost.push(*index);
            }
        }
        for index in lost {
            tracing::warn!(shard = %self.shards[index as usize].stream, "lease lost before renewal; stopping the shard");
            metrics::ownership_change("lost", 1);
            self.stop(index, false).await;
        }
        let fair = self.section.shards.div_ceil(live.max(1)) as usize;
        while self.owned.len() > fair {
            let index = *self.owned.keys().max().expect("not empty");
            tracing::info!(shard = %self.shards[index as usize].stream, fair, live, "releasing a shard to another worker");
            self.stop(index, true).await;
        }
        if self.owned.len() < fair {
            // Start at a worker-specific shard so workers starting together
            // do not all race for shard 0.
            let n = self.section.shards;
            let start = crate::redis::keys::shard_of(&self.worker, None, n);
            for i in (0..n).map(|k| (start + k) % n) {
                if self.owned.len() >= fair {
                    break;
                }
                if self.owned.contains_key(&i) {
                    continue;
                }
                let keys = &self.shards[i as usize];
                let token: Option<String> = scripts::ACQUIRE
                    .key(&keys.lease)
                    .key(&keys.epoch)
                    .arg(&self.worker)
                    .arg(ttl)
                    .invoke_async(&mut conn)
                    .await?;
                if let Some(token) = token {
                    self.start(i, token).await?;
                }
            }
        }
        Ok(())
    }

    /// The group's lag on each owned shard (Redis 7: entries not yet
    /// delivered to the group), for the consumer-lag gauge.
    async fn report_lag(&mut self) -> Result<(), RedisError> {
        let mut conn = self.conn().await?;
        for index in self.owned.keys() {
            let stream = &self.shards[*index as usize].stream;
            let Some(group) =
                super::status::group_state(&mut conn, stream, &self.section.group).await?
            else {
                continue;
            };
            // Redis 7.0 forgets a group's `entries-read` across a restart;
            // until the group reads to the stream's end its lag is nil
            // ("unknown"), never a number to keep showing from before.
            let gauges = PartitionGauges::new(stream);
            match group.lag {
                Some(lag) => gauges.consumer_lag(lag),
                None => gauges.consumer_lag_unknown(),
            }
        }
        Ok(())
    }

    async fn start(&mut self, index: u32, token: String) -> Result<(), RedisError> {
        let keys = self.shards[index as usize].clone();
        tracing::info!(shard = %keys.stream, token = %token, "lease acquired");
        metrics::ownership_change("acquired", 1);
        let conn = match connect_shard(&self.client, self.settings.block).await {
            Ok(conn) => conn,
            Err(e) => {
                self.release(index, &token).await;
                return Err(e);
            }
        };
        let (stop, stopped) = watch::channel(false);
        let task = ShardTask::new(keys, token.clone(), conn, self.settings.clone());
        let task = tokio::spawn(task.run(stopped));
        self.owned.insert(index, Owned { token, stop, task });
        Ok(())
    }

    /// Collects tasks that ended on their own (fenced).
    async fn reap(&mut self) {
        let done: Vec<u32> = self
            .owned
            .iter()
            .filter(|(_, o)| o.task.is_finished())
            .map(|(i, _)| *i)
            .collect();
        for index in done {
            self.stop(index, true).await;
        }
    }

    /// Stops a shard's task and waits for it; releases the lease when asked
    /// (and when the task was not fenced).
    async fn stop(&mut self, index: u32, release: bool) {
        let Some(owned) = self.owned.remove(&index) else {
            return;
        };
        let _ = owned.stop.send(true);
        match owned.task.await {
            Ok((exit, stats)) => {
                self.stats.add(&stats);
                // A task that ended on its own found its lease taken (a
                // lease lost at renewal was counted there).
                if release && exit == ShardExit::Fenced {
                    metrics::ownership_change("lost", 1);
                }
                if release && exit == ShardExit::Stopped {
                    self.release(index, &owned.token).await;
                }
            }
            Err(e) => tracing::error!(error = %e, "a shard task failed"),
        }
    }

    async fn release(&mut self, index: u32, token: &str) {
        let keys = &self.shards[index as usize];
        let Some(mut conn) = self.conn.clone().filter(|_| !self.unreachable) else {
            return;
        };
        let released: Result<i64, _> = scripts::RELEASE
            .key(&keys.lease)
            .arg(token)
            .invoke_async(&mut conn)
            .await;
        match released {
            Ok(_) => {
                metrics::ownership_change("released", 1);
                tracing::info!(shard = %keys.stream, "lease released")
            }
            Err(e) => {
                self.unreachable = e.is_io_error() || e.is_connection_dropped();
                tracing::warn!(shard = %keys.stream, error = %e, "releasing the lease failed; it lapses after lease_ttl")
            }
        }
    }

    /// Graceful stop: every task finishes its in-flight step, the leases are
    /// released so other workers take the shards at once, and this worker
    /// leaves the members set.
    async fn shutdown(&mut self) {
        let all: Vec<u32> = self.owned.keys().copied().collect();
        for owned in self.owned.values() {
            let _ = owned.stop.send(true);
        }
        for index in all {
            self.stop(index, true).await;
        }
        if let Some(mut conn) = self.conn.clone().filter(|_| !self.unreachable) {
            let left: Result<i64, _> = redis::cmd("ZREM")
                .arg(members_key(&self.section))
                .arg(&self.worker)
                .query_async(&mut conn)
                .await;
            if let Err(e) = left {
                tracing::warn!(error = %e, "leaving the members set failed");
            }
        }
        tracing::info!(
            records = self.stats.records,
            turns = self.stats.total_turns(),
            dead_letters = self.stats.total_dead_letters(),
            "redis worker stopped"
        );
    }
}

/// Creates the consumer group at the start of the stream (creating the
/// stream too), so entries written before the first worker are processed.
pub async fn create_group(
    conn: &mut RedisConn,
    stream: &str,
    group: &str,
) -> Result<(), RedisError> {
    let created: Result<(), RedisError> = redis::cmd("XGROUP")
        .arg("CREATE")
        .arg(stream)
        .arg(group)
        .arg("0")
        .arg("MKSTREAM")
        .query_async(conn)
        .await;
    match created {
        Err(e) if e.code() == Some("BUSYGROUP") => Ok(()),
        other => other,
    }
}
