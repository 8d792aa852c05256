//! `sessionizer gateway`: an HTTP service for chat frontends that can only
//! call webhooks. `POST /v1/events` takes one ChatEvent or a JSON array of
//! them, authenticated (`[gateway.auth]`), validated by the workers' own
//! decoder (one invalid event: 400 and nothing of the request is written),
//! stamped with the receive time when it has no `event_time`, and written
//! to the configured source's input; the answer is 202 only after the
//! broker acknowledged every event (503 with `Retry-After` when it did not).
//! The same server answers `/metrics`, `/healthz` and `/readyz`
//! (`docs/gateway.md`).

mod auth;
pub mod config;
mod publish;
mod tls;
pub mod wait;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{header, HeaderMap, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::Router;
use prost::Message as _;
use serde_json::{json, Value};

pub use config::{AuthSection, GatewaySection};
pub use publish::{Publisher, Record};

use crate::codec::{proto, Decoder};
use crate::config::Config;
use crate::wall_clock::now_ms;

/// What every request handler shares.
#[derive(Debug)]
struct Gateway {
    auth: auth::Auth,
    decoder: Decoder,
    publisher: Publisher,
    max_batch: usize,
    max_wait: Duration,
    max_held: usize,
    superseded_status: u16,
    holds: Arc<wait::Holds>,
    /// `[gateway.agent]`: the client and the call's settings.
    agent: Option<(reqwest::Client, config::AgentSection)>,
    /// Set at SIGTERM: held requests are answered "pending" at once.
    stopping: tokio::sync::watch::Receiver<bool>,
}

/// Runs the gateway on `[gateway] listen` until `shutdown` resolves (then it
/// stops accepting and finishes the requests in progress).
pub async fn run(
    config: &Config,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let listen = section(config)?.listen;
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("invalid configuration: gateway.listen: cannot bind {listen}"))?;
    serve(config, listener, shutdown).await
}

fn section(config: &Config) -> anyhow::Result<&GatewaySection> {
    config
        .gateway
        .as_ref()
        .context("the gateway needs a [gateway] section with [gateway.auth]")
}

/// Runs the gateway on a bound listener (the demo binds port 0).
pub async fn serve(
    config: &Config,
    listener: tokio::net::TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let section = section(config)?;
    let auth = auth::Auth::new(&section.auth)?;
    let tls = match (&section.tls_cert, &section.tls_key) {
        (Some(cert), Some(key)) => Some(tls::server_config(cert, key)?),
        _ => None,
    };
    let publisher = Publisher::open(config).await?;
    let holds = Arc::new(wait::Holds::default());
    wait::start_reader(config, holds.clone()).await?;
    // Ready once the broker is reached and turns are read: the gateway
    // owns no partitions.
    crate::metrics::READINESS.set_connected(true);
    crate::metrics::READINESS.set_owned(1);
    let (stop, stopping) = tokio::sync::watch::channel(false);
    let gateway = Arc::new(Gateway {
        auth,
        decoder: Decoder::new(config.input_format(), config.decode_limits()),
        publisher,
        max_batch: section.max_batch,
        max_wait: section.max_wait.as_duration(),
        max_held: section.max_held,
        superseded_status: section.superseded_status,
        holds,
        agent: match &section.agent {
            None => None,
            Some(agent) => Some((
                reqwest::Client::builder()
                    .timeout(agent.timeout.as_duration())
                    .build()
                    .context("building the agent's HTTP client")?,
                agent.clone(),
            )),
        },
        stopping,
    });
    let app = Router::new()
        .route("/v1/events", post(ingest))
        .with_state(gateway)
        .layer(DefaultBodyLimit::max(section.max_body_bytes))
        .merge(crate::http::router(crate::metrics::install_recorder()?));
    let scheme = if tls.is_some() { "https" } else { "http" };
    tracing::info!(listen = %listener.local_addr()?, scheme, source = ?config.source, "gateway serving /v1/events, /metrics, /healthz and /readyz");
    let shutdown = async move {
        shutdown.await;
        // Held requests answer "pending" now; then the server drains.
        let _ = stop.send(true);
    };
    match tls {
        None => axum::serve(listener, app)
            .with_graceful_shutdown(shutdown)
            .await
            .context("the gateway's server"),
        Some(tls) => {
            let handle = axum_server::Handle::new();
            let draining = handle.clone();
            tokio::spawn(async move {
                shutdown.await;
                draining.graceful_shutdown(None);
            });
            let listener = listener.into_std().context("the gateway's listener")?;
            axum_server::from_tcp_rustls(
                listener,
                axum_server::tls_rustls::RustlsConfig::from_config(tls),
            )
            .handle(handle)
            .serve(app.into_make_service())
            .await
            .context("the gateway's HTTPS server")
        }
    }
}

/// A JSON answer, counted by status.
fn answer(status: StatusCode, body: Value) -> Response {
    crate::metrics::gateway_request("/v1/events", status.as_u16());
    (
        status,
        [(header::CONTENT_TYPE, "application/json")],
        body.to_string(),
    )
        .into_response()
}

async fn ingest(
    State(gateway): State<Arc<Gateway>>,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let caller = match gateway.auth.check(&headers) {
        Ok(caller) => caller,
        Err((status, why)) => {
            let refused = if status == StatusCode::UNAUTHORIZED {
                "unauthorized"
            } else {
                "forbidden"
            };
            let mut response = answer(status, json!({"status": refused, "error": why}));
            if status == StatusCode::UNAUTHORIZED {
                response.headers_mut().insert(
                    header::WWW_AUTHENTICATE,
                    header::HeaderValue::from_static("Bearer"),
                );
            }
            return response;
        }
    };
    let wait = match wait_param(uri.query(), gateway.max_wait) {
        Ok(wait) => wait,
        Err(error) => {
            return answer(
                StatusCode::BAD_REQUEST,
                json!({"status": "invalid", "error": error}),
            )
        }
    };
    let protobuf = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|t| t.starts_with("application/x-protobuf"));
    let now = now_ms();
    let payloads = match if protobuf {
        protobuf_event(&body, now).map(|p| vec![p])
    } else {
        json_events(&body, now, gateway.max_batch)
    } {
        Ok(payloads) => payloads,
        Err((status, error)) => {
            return answer(status, json!({"status": "invalid", "error": error}));
        }
    };
    let mut records = Vec::with_capacity(payloads.len());
    for (index, payload) in payloads.into_iter().enumerate() {
        match gateway.decoder.decode(&payload, now) {
            Ok(event) => records.push(Record {
                message_id: event.message_id.into_owned(),
                user_id: event.user_id.into_owned(),
                conversation_id: event.conversation_id.map(|c| c.into_owned()),
                payload: payload.clone(),
            }),
            Err(poison) => {
                return answer(
                    StatusCode::BAD_REQUEST,
                    json!({
                        "status": "invalid",
                        "index": index,
                        "reason": poison.reason.as_str(),
                        "error": poison.message,
                    }),
                );
            }
        }
    }
    if let Some(user) = &caller.user_id {
        if let Some(other) = records.iter().position(|r| r.user_id != *user) {
            return answer(
                StatusCode::FORBIDDEN,
                json!({"status": "forbidden", "index": other, "error": "the token is for another user_id"}),
            );
        }
    }
    // Held before the write, so its turn cannot pass unseen.
    let held = match wait {
        None => None,
        Some(wait) => {
            let last = records.last().expect("at least one event");
            let ids = records
                .iter()
                .filter(|r| r.user_id == last.user_id)
                .map(|r| r.message_id.clone())
                .collect();
            match gateway.holds.hold(&last.user_id, ids, gateway.max_held) {
                Some((hold, rx)) => Some((hold, rx, wait)),
                None => {
                    return answer(
                        StatusCode::SERVICE_UNAVAILABLE,
                        json!({"status": "unavailable", "error": format!(
                            "{} requests held already (gateway.max_held)", gateway.max_held
                        )}),
                    )
                }
            }
        }
    };
    let published = gateway.publisher.publish(&records).await;
    if let Some((hold, answer_rx, wait)) = held {
        if published.is_ok() {
            let mut stopping = gateway.stopping.clone();
            let held_since = std::time::Instant::now();
            let outcome = tokio::select! {
                outcome = answer_rx => outcome.ok(),
                () = tokio::time::sleep(wait) => None,
                _ = stopping.wait_for(|s| *s) => None,
            };
            drop(hold);
            crate::metrics::gateway_wait(
                match &outcome {
                    Some(wait::Outcome::Turn(_)) => "turn",
                    Some(wait::Outcome::Superseded(_)) => "superseded",
                    None => "pending",
                },
                held_since.elapsed(),
            );
            if let (Some(wait::Outcome::Turn(turn)), Some(agent)) = (&outcome, &gateway.agent) {
                return call_agent(agent, turn).await;
            }
            return held_answer(&gateway, outcome, records.len());
        }
        drop(hold);
    }
    match published {
        Ok(()) => answer(
            StatusCode::ACCEPTED,
            json!({"status": "accepted", "count": records.len()}),
        ),
        Err(e) => {
            tracing::warn!(error = %format!("{e:#}"), "the broker did not take a request's events; answered 503");
            let mut response = answer(
                StatusCode::SERVICE_UNAVAILABLE,
                json!({"status": "unavailable", "error": format!("{e:#}")}),
            );
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, header::HeaderValue::from_static("1"));
            response
        }
    }
}

/// The answer of a held request: its turn, "superseded", or "pending" when
/// no turn came within the wait (or the gateway is stopping).
fn held_answer(gateway: &Gateway, outcome: Option<wait::Outcome>, count: usize) -> Response {
    match outcome {
        Some(wait::Outcome::Turn(turn)) => {
            answer(StatusCode::OK, json!({"status": "turn", "turn": turn}))
        }
        Some(wait::Outcome::Superseded(_)) if gateway.superseded_status == 204 => {
            crate::metrics::gateway_request("/v1/events", 204);
            StatusCode::NO_CONTENT.into_response()
        }
        Some(wait::Outcome::Superseded(turn_id)) => answer(
            StatusCode::OK,
            json!({"status": "superseded", "turn_id": turn_id}),
        ),
        None => answer(
            StatusCode::ACCEPTED,
            json!({"status": "pending", "count": count}),
        ),
    }
}

/// POSTs the turn to the agent (`Idempotency-Key: <turn_id>`, the
/// configured headers) and relays its status and body; 504 with the turn id
/// when it does not answer in time, 502 when it cannot be reached.
async fn call_agent(agent: &(reqwest::Client, config::AgentSection), turn: &Value) -> Response {
    let (client, section) = agent;
    let turn_id = turn["turn_id"].as_str().unwrap_or_default().to_owned();
    let mut request = client
        .post(&section.url)
        .header(header::CONTENT_TYPE, "application/json")
        .header("idempotency-key", &turn_id)
        .body(turn.to_string());
    for (name, value) in &section.headers {
        request = request.header(name, value);
    }
    let started = std::time::Instant::now();
    let result = async {
        let response = request.send().await?;
        let status = response.status().as_u16();
        let content_type = response.headers().get(header::CONTENT_TYPE).cloned();
        let body = response.bytes().await?;
        Ok::<_, reqwest::Error>((status, content_type, body))
    }
    .await;
    crate::metrics::gateway_agent_call(started.elapsed());
    match result {
        Ok((status, content_type, body)) => {
            let status = StatusCode::from_u16(status).unwrap_or(StatusCode::BAD_GATEWAY);
            crate::metrics::gateway_request("/v1/events", status.as_u16());
            let mut response = (status, body).into_response();
            if let Some(content_type) = content_type {
                response
                    .headers_mut()
                    .insert(header::CONTENT_TYPE, content_type);
            }
            response
        }
        Err(e) if e.is_timeout() => answer(
            StatusCode::GATEWAY_TIMEOUT,
            json!({"status": "agent_timeout", "turn_id": turn_id}),
        ),
        Err(e) => answer(
            StatusCode::BAD_GATEWAY,
            json!({"status": "agent_unreachable", "turn_id": turn_id, "error": e.to_string()}),
        ),
    }
}

/// The `wait` query parameter (`?wait=20s`), cut to `max`.
fn wait_param(query: Option<&str>, max: Duration) -> Result<Option<Duration>, String> {
    let Some(value) = query
        .into_iter()
        .flat_map(|q| q.split('&'))
        .find_map(|pair| pair.strip_prefix("wait="))
    else {
        return Ok(None);
    };
    let wait = humantime::parse_duration(value)
        .map_err(|e| format!("wait={value}: {e} (use e.g. wait=20s)"))?;
    Ok(Some(wait.min(max)))
}

/// The events of a JSON body (one object, or an array of at most
/// `max_batch`), each with `event_time` set to `now` where it had none.
fn json_events(
    body: &[u8],
    now: i64,
    max_batch: usize,
) -> Result<Vec<Vec<u8>>, (StatusCode, String)> {
    let bad = |e: String| (StatusCode::BAD_REQUEST, e);
    let value: Value =
        serde_json::from_slice(body).map_err(|e| bad(format!("the body is not JSON: {e}")))?;
    let events = match value {
        Value::Object(_) => vec![value],
        Value::Array(items) if items.len() > max_batch => {
            return Err((
                StatusCode::PAYLOAD_TOO_LARGE,
                format!(
                    "{} events, over gateway.max_batch ({max_batch})",
                    items.len()
                ),
            ))
        }
        Value::Array(items) if items.is_empty() => return Err(bad("an empty array".to_owned())),
        Value::Array(items) => items,
        _ => {
            return Err(bad(
                "the body is neither an event nor an array of events".to_owned()
            ))
        }
    };
    events
        .into_iter()
        .enumerate()
        .map(|(i, mut event)| {
            let Value::Object(fields) = &mut event else {
                return Err(bad(format!("element {i} is not an object")));
            };
            if fields.get("event_time").is_none_or(Value::is_null) {
                fields.insert("event_time".to_owned(), Value::from(now));
            }
            Ok(serde_json::to_vec(&event).expect("a JSON value serializes"))
        })
        .collect()
}

/// One protobuf ChatEvent, with `event_time_ms` set to `now` when unset.
fn protobuf_event(body: &[u8], now: i64) -> Result<Vec<u8>, (StatusCode, String)> {
    let mut event = proto::ChatEvent::decode(body).map_err(|e| {
        (
            StatusCode::BAD_REQUEST,
            format!("not a protobuf ChatEvent: {e}"),
        )
    })?;
    if event.event_time_ms == 0 {
        event.event_time_ms = now;
    }
    Ok(event.encode_to_vec())
}
