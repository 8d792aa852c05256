//! The deployment files (`deploy/`, used by docker-compose.yml and the
//! Dockerfile) agree with the code: the worker, gateway and push configs load, and every
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
    // The compose gateway runs deploy/kafka.toml: its section loads too.
    let text = std::fs::read_to_string(root().join("deploy/kafka.toml")).unwrap();
    let gateway = Config::from_toml(&text, Vec::new()).unwrap().gateway;
    let auth = gateway.expect("deploy/kafka.toml has [gateway]").auth;
    assert_eq!(auth.hashes().unwrap().map(|h| h.len()), Some(1));
    // And compose's push.
    let push = Config::from_toml(&text, Vec::new()).unwrap().push;
    assert_eq!(
        push.expect("deploy/kafka.toml has [push]").dlq,
        "turns-push-dlq"
    );
}

/// Every metric name the workers export.
fn exported() -> BTreeSet<&'static str> {
    use sessionizer::metrics as m;
    [
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
    .collect()
}

/// The `sessionizer_*` metric names a PromQL expression uses, histogram
/// suffixes removed.
fn metric_names(expr: &str) -> Vec<String> {
    expr.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .filter(|w| w.starts_with("sessionizer_"))
        .map(|w| {
            ["_bucket", "_count", "_sum"]
                .iter()
                .find_map(|s| w.strip_suffix(s))
                .unwrap_or(w)
                .to_owned()
        })
        .collect()
}

#[test]
fn the_dashboard_queries_only_exported_metrics() {
    use sessionizer::metrics as m;
    let exported = exported();
    let text =
        std::fs::read_to_string(root().join("deploy/grafana/dashboards/sessionizer.json")).unwrap();
    let dashboard: serde_json::Value = serde_json::from_str(&text).unwrap();
    let mut used = BTreeSet::new();
    for panel in dashboard["panels"].as_array().unwrap() {
        for target in panel["targets"].as_array().unwrap() {
            for name in metric_names(target["expr"].as_str().unwrap()) {
                assert!(
                    exported.contains(name.as_str()),
                    "{} queries unknown {name}",
                    panel["title"]
                );
                used.insert(name);
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
    // Kafka and Redis workers report the same names: every query is
    // filtered by the dashboard's `source` selector, so the two never mix.
    let variables = dashboard["templating"]["list"].as_array().unwrap();
    assert!(
        variables.iter().any(|v| v["name"] == "source"),
        "a source selector"
    );
    for panel in dashboard["panels"].as_array().unwrap() {
        for target in panel["targets"].as_array().unwrap() {
            let expr = target["expr"].as_str().unwrap();
            let uses = expr.matches("sessionizer_").count();
            let filtered = expr.matches("{source=~\"$source\"}").count();
            assert_eq!(
                uses, filtered,
                "{} is filtered by source: {expr}",
                panel["title"]
            );
        }
    }
}

/// The alert rules (loaded by deploy/prometheus.yml) use only exported
/// metrics.
#[test]
fn the_alert_rules_use_only_exported_metrics() {
    let text = std::fs::read_to_string(root().join("deploy/alerts.yml")).unwrap();
    let exported = exported();
    let mut rules = 0;
    for line in text.lines() {
        if let Some(expr) = line.trim().strip_prefix("expr:") {
            rules += 1;
            for name in metric_names(expr) {
                assert!(
                    exported.contains(name.as_str()),
                    "alert uses unknown {name}: {expr}"
                );
            }
        }
    }
    assert!(rules >= 5, "the rules were read");
    let prometheus = std::fs::read_to_string(root().join("deploy/prometheus.yml")).unwrap();
    assert!(prometheus.contains("/etc/prometheus/alerts.yml"));
}
