//! The deployment files (`deploy/`, used by docker-compose.yml and the
//! Dockerfile) agree with the code: the worker configs load, and every
//! metric the Grafana dashboard queries is one the workers export.
//! (`scripts/test` validates docker-compose.yml itself with
//! `docker-compose config -q`.)

use std::collections::BTreeSet;
use std::path::Path;

use sessionizer::config::Config;

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

#[test]
fn the_deployed_worker_configs_load() {
    for name in ["kafka.toml", "redis.toml"] {
        let text = std::fs::read_to_string(root().join("deploy").join(name)).unwrap();
        let config =
            Config::from_toml(&text, Vec::new()).unwrap_or_else(|e| panic!("deploy/{name}: {e}"));
        assert!(
            config.metrics.listen.is_some(),
            "deploy/{name} serves metrics"
        );
    }
}

#[test]
fn the_dashboard_queries_only_exported_metrics() {
    use sessionizer::metrics as m;
    let exported: BTreeSet<&str> = [
        m::RECORDS_CONSUMED,
        m::EVENTS,
        m::TURNS,
        m::LATE_TURNS,
        m::DEAD_LETTERS,
        m::DUPLICATES,
        m::DROPPED,
        m::TURN_MESSAGES,
        m::EMIT_DELAY,
        m::OPEN_SESSIONS,
        m::WATERMARK_LAG,
        m::CONSUMER_LAG,
        m::COMMITS,
        m::OWNERSHIP_CHANGES,
        m::OWNED,
    ]
    .into_iter()
    .collect();
    let text =
        std::fs::read_to_string(root().join("deploy/grafana/dashboards/sessionizer.json")).unwrap();
    let dashboard: serde_json::Value = serde_json::from_str(&text).unwrap();
    let mut used = BTreeSet::new();
    for panel in dashboard["panels"].as_array().unwrap() {
        for target in panel["targets"].as_array().unwrap() {
            let expr = target["expr"].as_str().unwrap();
            for word in expr.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')) {
                if let Some(name) = word.strip_prefix("sessionizer_").map(|_| word) {
                    let base = ["_bucket", "_count", "_sum"]
                        .iter()
                        .find_map(|s| name.strip_suffix(s))
                        .unwrap_or(name);
                    assert!(
                        exported.contains(base),
                        "{} queries unknown {name}",
                        panel["title"]
                    );
                    used.insert(base.to_owned());
                }
            }
        }
    }
    for name in [
        m::RECORDS_CONSUMED,
        m::TURNS,
        m::DEAD_LETTERS,
        m::EMIT_DELAY,
        m::CONSUMER_LAG,
    ] {
        assert!(used.contains(name), "the dashboard shows {name}");
    }
}
