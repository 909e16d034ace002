//! There is no Docker engine in CI, so `compose.yaml` is checked by reading it:
//! every service binary has a compose service built from it, every variable a
//! service reads is documented in `.env.example` and wired in compose, and
//! Prometheus scrapes every service.

use std::{
    collections::{BTreeSet, HashMap},
    fs,
    path::{Path, PathBuf},
};

use serde_yaml::Value;

const SERVICES: [(&str, u16); 4] = [
    ("command-api", 8080),
    ("seckill-edge", 8081),
    ("query-api", 8082),
    ("projection-daemon", 8083),
];

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn read(path: &str) -> String {
    fs::read_to_string(root().join(path)).unwrap_or_else(|e| panic!("{path}: {e}"))
}

fn compose() -> Value {
    let mut value: Value =
        serde_yaml::from_str(&read("compose.yaml")).unwrap_or_else(|e| panic!("compose.yaml is not YAML: {e}"));
    // compose shares the common environment through `<<: *anchor` merge keys
    value
        .apply_merge()
        .unwrap_or_else(|e| panic!("compose.yaml merge keys: {e}"));
    value
}

/// The variable names of every clap `env` attribute in the workspace's Rust sources.
fn env_vars_read_by_code() -> BTreeSet<String> {
    let mut found = BTreeSet::new();
    let mut stack = vec![root()];
    while let Some(dir) = stack.pop() {
        for entry in fs::read_dir(&dir).into_iter().flatten().flatten() {
            let path = entry.path();
            let name = entry.file_name().to_string_lossy().into_owned();
            if path.is_dir() && !name.starts_with('.') && name != "target" {
                stack.push(path);
            } else if name.ends_with(".rs") {
                let text = fs::read_to_string(&path).unwrap_or_default();
                for part in text.split("env = \"").skip(1) {
                    if let Some(end) = part.find('"') {
                        found.insert(part[..end].to_owned());
                    }
                }
            }
        }
    }
    found
}

fn documented_env_vars() -> BTreeSet<String> {
    read(".env.example")
        .lines()
        .map(|line| line.trim_start_matches('#').trim())
        .filter_map(|line| line.split_once('=').map(|(name, _)| name.trim().to_owned()))
        .filter(|name| {
            !name.is_empty()
                && name
                    .chars()
                    .all(|c| c.is_ascii_uppercase() || c == '_' || c.is_ascii_digit())
        })
        .collect()
}

fn service<'a>(compose: &'a Value, name: &str) -> &'a Value {
    compose
        .get("services")
        .and_then(|s| s.get(name))
        .unwrap_or_else(|| panic!("compose has no service {name}"))
}

fn environment(service: &Value) -> HashMap<String, String> {
    match service.get("environment") {
        Some(Value::Mapping(map)) => map
            .iter()
            .filter_map(|(k, v)| {
                let value = match v {
                    Value::String(s) => s.clone(),
                    Value::Number(n) => n.to_string(),
                    Value::Bool(b) => b.to_string(),
                    _ => String::new(),
                };
                Some((k.as_str()?.to_owned(), value))
            })
            .collect(),
        Some(Value::Sequence(items)) => items
            .iter()
            .filter_map(|item| {
                item.as_str()?
                    .split_once('=')
                    .map(|(k, v)| (k.to_owned(), v.to_owned()))
            })
            .collect(),
        _ => HashMap::new(),
    }
}

#[test]
fn compose_runs_the_infrastructure_and_every_service() {
    let compose = compose();
    for infra in ["postgres", "nats", "redis", "jaeger", "prometheus"] {
        service(&compose, infra);
    }
    let nats_image = service(&compose, "nats")
        .get("image")
        .and_then(Value::as_str)
        .unwrap_or_default();
    let version = nats_image.split(':').nth(1).unwrap_or_default();
    let mut parts = version.split(['.', '-']).map(|p| p.parse::<u32>().unwrap_or(0));
    let (major, minor) = (parts.next().unwrap_or(0), parts.next().unwrap_or(0));
    assert!(
        (major, minor) >= (2, 12),
        "JetStream schedules need nats >= 2.12, got {nats_image}"
    );

    for (bin, port) in SERVICES
        .iter()
        .copied()
        .chain([("citypicks-migrate", 0), ("citypicks-topology", 0)])
    {
        let name = match bin {
            "citypicks-migrate" => "migrate",
            "citypicks-topology" => "topology",
            other => other,
        };
        let svc = service(&compose, name);
        let built = svc
            .get("build")
            .and_then(|b| b.get("args"))
            .and_then(|a| a.get("BIN"))
            .and_then(Value::as_str);
        assert_eq!(built, Some(bin), "{name} must be built from the {bin} binary");
        if port != 0 {
            let env = environment(svc);
            let addr = env.values().any(|v| v == &format!("0.0.0.0:{port}"));
            assert!(addr, "{name} must listen on 0.0.0.0:{port} in compose: {env:?}");
            assert!(
                env.contains_key("OTEL_EXPORTER_OTLP_ENDPOINT"),
                "{name} exports traces to jaeger"
            );
            assert!(
                svc.get("healthcheck").is_some(),
                "{name} needs a healthcheck on /health"
            );
        }
    }
}

#[test]
fn every_binary_compose_builds_exists_in_the_workspace() {
    let compose = compose();
    let mut manifests = String::new();
    for dir in [
        "commands",
        "projections",
        "query-api",
        "seckill-edge",
        "platform",
        "nats",
    ] {
        manifests.push_str(&read(&format!("{dir}/Cargo.toml")));
    }
    let services = compose
        .get("services")
        .and_then(Value::as_mapping)
        .cloned()
        .unwrap_or_default();
    for (name, svc) in services {
        if let Some(bin) = svc
            .get("build")
            .and_then(|b| b.get("args"))
            .and_then(|a| a.get("BIN"))
            .and_then(Value::as_str)
        {
            assert!(
                manifests.contains(&format!("name = \"{bin}\"")),
                "{name:?} builds unknown binary {bin}"
            );
        }
    }
}

#[test]
fn every_variable_the_code_reads_is_documented_and_every_documented_one_is_read() {
    let read_by_code = env_vars_read_by_code();
    let documented = documented_env_vars();
    let undocumented: Vec<_> = read_by_code.difference(&documented).collect();
    assert!(undocumented.is_empty(), "missing from .env.example: {undocumented:?}");
    // RUST_LOG is read by the tracing filter, not by clap
    let unread: Vec<_> = documented
        .difference(&read_by_code)
        .filter(|v| *v != "RUST_LOG")
        .collect();
    assert!(
        unread.is_empty(),
        ".env.example documents variables no code reads: {unread:?}"
    );
}

#[test]
fn compose_services_only_set_variables_the_code_reads() {
    let compose = compose();
    let known = env_vars_read_by_code();
    for (name, _) in SERVICES {
        for var in environment(service(&compose, name)).keys() {
            assert!(
                known.contains(var) || var == "RUST_LOG",
                "{name} sets {var}, which no code reads"
            );
        }
    }
}

#[test]
fn prometheus_scrapes_every_service() {
    let prometheus: Value =
        serde_yaml::from_str(&read("deploy/prometheus.yml")).unwrap_or_else(|e| panic!("prometheus.yml: {e}"));
    let text = serde_yaml::to_string(&prometheus).unwrap_or_default();
    for (name, port) in SERVICES {
        assert!(
            text.contains(&format!("{name}:{port}")),
            "prometheus does not scrape {name}:{port}"
        );
    }
}
