//! The operator's view, checked without servers: every query of the Grafana
//! dashboard (deploy/grafana/dashboards) and every expression of the
//! Prometheus rules (deploy/prometheus/rules) parses, by promtool, and names
//! only metrics that exist: those the services register (found by scanning
//! the workspace's Rust sources for the `metrics` crate's counter, gauge and
//! histogram macros; a histogram exports `_bucket`, `_sum` and `_count`),
//! the few the exporters and Prometheus export ([`EXPORTER_METRICS`]) and,
//! in the rules, the rules' own recorded series. The rules' unit tests
//! (deploy/prometheus/tests, run by `./dev test` through promtool) cover
//! every alert firing and quiet and every recording rule; compose runs
//! Grafana with the dashboard and the Prometheus that loads the rules.
//!
//! promtool comes from the Debian package `prometheus`, which `./dev test`
//! installs: without it these tests fail, they never skip.

use std::{
    collections::{BTreeMap, BTreeSet},
    fs,
    path::{Path, PathBuf},
    process::Command,
    time::{SystemTime, UNIX_EPOCH},
};

use anyhow::Context as _;
use serde_json::{Value, json};

/// Metrics the dashboard or the rules use that no City Picks service
/// registers: `up` (Prometheus, per scrape target) and the Postgres and
/// Redis exporters' (prometheus-postgres-exporter, prometheus-redis-exporter).
const EXPORTER_METRICS: &[&str] = &["up", "pg_up", "redis_up", "redis_memory_used_bytes"];

/// What the dashboard must show (issue 15): sale progress, latencies, lags,
/// dead letters, errors.
const DASHBOARD_MUST_USE: &[&str] = &[
    "seckill_attempts_total",
    "seckill_claims_total",
    "seckill_stock_remaining",
    "http_request_duration_seconds_bucket",
    "relay_lag_seconds",
    "projection_lag_seconds",
    "nats_consumer_messages_total",
    "projection_dead_letters_total",
    "order_timeouts_dead_lettered_total",
    "http_requests_total",
];

/// Grafana's interval variables, replaced by a duration before parsing.
const GRAFANA_INTERVALS: &[&str] = &["$__rate_interval", "$__interval", "$__range", "${__rate_interval}"];

const DASHBOARD: &str = "deploy/grafana/dashboards/citypicks.json";
const DATASOURCES: &str = "deploy/grafana/provisioning/datasources/prometheus.yml";
const DASHBOARD_PROVIDERS: &str = "deploy/grafana/provisioning/dashboards/citypicks.yml";
const RULES_DIR: &str = "deploy/prometheus/rules";
const RULE_TESTS_DIR: &str = "deploy/prometheus/tests";

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap_or(Path::new(".."))
        .to_path_buf()
}

fn read(path: &str) -> anyhow::Result<String> {
    fs::read_to_string(root().join(path)).with_context(|| format!("reading {path}"))
}

/// The `.yml` files of a folder of the repository, sorted.
fn yaml_files(dir: &str) -> anyhow::Result<Vec<PathBuf>> {
    let mut files: Vec<PathBuf> = fs::read_dir(root().join(dir))
        .with_context(|| format!("reading {dir}"))?
        .flatten()
        .map(|entry| entry.path())
        .filter(|path| path.extension().is_some_and(|ext| ext == "yml" || ext == "yaml"))
        .collect();
    files.sort();
    anyhow::ensure!(!files.is_empty(), "no .yml files in {dir}");
    Ok(files)
}

/// promtool on PATH, or a failure that says how to get it.
fn promtool() -> anyhow::Result<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .map(|dir| dir.join("promtool"))
        .find(|candidate| candidate.is_file())
        .context(
            "promtool is not on PATH: it comes with the Debian package `prometheus` \
             (`./dev test` installs it; by hand: apt-get install --no-install-recommends prometheus)",
        )
}

/// Runs promtool; its output, or a failure with it and `context`.
fn run_promtool(args: &[&str], context: &str) -> anyhow::Result<String> {
    let output = Command::new(promtool()?)
        .args(args)
        .output()
        .context("running promtool")?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    anyhow::ensure!(
        output.status.success(),
        "promtool {} failed:\n{text}\n{context}",
        args.join(" ")
    );
    Ok(text)
}

/// A scratch directory of this test's own, removed when dropped.
struct Scratch(PathBuf);

impl Scratch {
    fn new(name: &str) -> anyhow::Result<Self> {
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos();
        let dir = std::env::temp_dir().join(format!("cp-{name}-{}-{nanos}", std::process::id()));
        fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        Ok(Self(dir))
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// Checks that every expression parses: each becomes a recording rule of a
/// scratch rule file (JSON, which is YAML) that `promtool check rules` reads.
/// `exprs` are (where it comes from, expression).
fn check_parse(exprs: &[(String, String)], what: &str) -> anyhow::Result<()> {
    let scratch = Scratch::new(what)?;
    let mut rules = Vec::new();
    let mut legend = String::new();
    for (index, (origin, expr)) in exprs.iter().enumerate() {
        let record = format!("check:expr_{index}");
        legend.push_str(&format!("  {record}: {origin}\n"));
        rules.push(json!({"record": record, "expr": expr}));
    }
    let file = scratch.0.join("exprs.yml");
    let body = json!({"groups": [{"name": what, "rules": rules}]});
    fs::write(&file, serde_json::to_string_pretty(&body)?)?;
    run_promtool(
        &["check", "rules", &file.to_string_lossy()],
        &format!("(an expression of the {what} does not parse; the rules stand for\n{legend})"),
    )?;
    Ok(())
}

// ------------------------------------------------------- exported metrics

/// Every metric name the workspace's Rust sources register through the
/// `metrics` macros, with a histogram's series.
fn exported_metrics() -> anyhow::Result<BTreeSet<String>> {
    let mut found = BTreeSet::new();
    let mut stack = vec![root()];
    while let Some(dir) = stack.pop() {
        for entry in fs::read_dir(&dir)?.flatten() {
            let path = entry.path();
            let name = entry.file_name().to_string_lossy().into_owned();
            if path.is_dir() {
                if !name.starts_with('.') && name != "target" && name != "node_modules" {
                    stack.push(path);
                }
            } else if name.ends_with(".rs") {
                let text = fs::read_to_string(&path).unwrap_or_default();
                for kind in ["counter", "gauge", "histogram"] {
                    for metric in macro_metric_names(&text, kind) {
                        if kind == "histogram" {
                            for suffix in ["_bucket", "_sum", "_count"] {
                                found.insert(format!("{metric}{suffix}"));
                            }
                        }
                        found.insert(metric);
                    }
                }
            }
        }
    }
    Ok(found)
}

/// The string-literal names given to `kind!(` in `text`.
fn macro_metric_names(text: &str, kind: &str) -> Vec<String> {
    let opening = format!("{kind}!(");
    text.match_indices(&opening)
        .filter_map(|(at, _)| {
            let rest = text[at + opening.len()..].trim_start().strip_prefix('"')?;
            let name = &rest[..rest.find('"')?];
            let valid = !name.is_empty()
                && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
                && !name.starts_with(|c: char| c.is_ascii_digit());
            valid.then(|| name.to_owned())
        })
        .collect()
}

// ----------------------------------------------------------------- PromQL

/// Keywords that take a parenthesized list of label names.
const LABEL_LIST_KEYWORDS: &[&str] = &["by", "without", "on", "ignoring", "group_left", "group_right"];
/// Other words that are not metric names.
const KEYWORDS: &[&str] = &["and", "or", "unless", "bool", "offset", "atan2", "inf", "nan"];
/// Aggregation operators, which may take `by (...)` or `without (...)`
/// before their parenthesized argument.
const AGGREGATIONS: &[&str] = &[
    "sum",
    "min",
    "max",
    "avg",
    "group",
    "stddev",
    "stdvar",
    "count",
    "count_values",
    "bottomk",
    "topk",
    "quantile",
    "limitk",
    "limit_ratio",
];

/// The index just past the string literal that opens at `start`.
fn skip_string(chars: &[char], start: usize) -> anyhow::Result<usize> {
    let quote = chars[start];
    let mut i = start + 1;
    while i < chars.len() {
        match chars[i] {
            '\\' if quote != '`' => i += 2,
            c if c == quote => return Ok(i + 1),
            _ => i += 1,
        }
    }
    anyhow::bail!("unterminated string literal")
}

/// The index just past the `close` that ends the bracket opening at `start`
/// (string literals inside may hold anything).
fn skip_bracket(chars: &[char], start: usize, close: char) -> anyhow::Result<usize> {
    let mut i = start + 1;
    while i < chars.len() {
        match chars[i] {
            '"' | '\'' | '`' => i = skip_string(chars, i)?,
            c if c == close => return Ok(i + 1),
            _ => i += 1,
        }
    }
    anyhow::bail!("unclosed '{}'", chars[start])
}

/// The metric names a PromQL expression selects: identifiers that are not
/// keywords, not functions or aggregations (followed by `(`), not label
/// names (in `{...}` matchers or the lists of `by`, `without`, `on`,
/// `ignoring`, `group_left`, `group_right`) and not durations or numbers.
fn metric_names(expr: &str) -> anyhow::Result<BTreeSet<String>> {
    let chars: Vec<char> = expr.chars().collect();
    let mut names = BTreeSet::new();
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        if matches!(c, '"' | '\'' | '`') {
            i = skip_string(&chars, i)?;
        } else if c == '#' {
            while i < chars.len() && chars[i] != '\n' {
                i += 1;
            }
        } else if c == '{' {
            let end = skip_bracket(&chars, i, '}')?;
            let matchers: String = chars[i..end].iter().collect();
            anyhow::ensure!(
                !matchers.contains("__name__"),
                "selects a metric by __name__ ({matchers}): name it instead"
            );
            i = end;
        } else if c == '[' {
            // a range or a subquery: durations
            let end = skip_bracket(&chars, i, ']')?;
            anyhow::ensure!(
                !chars[i..end].contains(&'$'),
                "a Grafana variable that is not an interval: {expr}"
            );
            i = end;
        } else if c.is_ascii_digit() || (c == '.' && chars.get(i + 1).is_some_and(char::is_ascii_digit)) {
            // a number or a duration (15m, 1h30m, 0.99, 1e3, 0x1f)
            while i < chars.len() && (chars[i].is_ascii_alphanumeric() || chars[i] == '.') {
                i += 1;
            }
        } else if c.is_ascii_alphabetic() || c == '_' || c == ':' {
            let start = i;
            while i < chars.len() && (chars[i].is_ascii_alphanumeric() || chars[i] == '_' || chars[i] == ':') {
                i += 1;
            }
            let word: String = chars[start..i].iter().collect();
            let lower = word.to_ascii_lowercase();
            let mut next = i;
            while next < chars.len() && chars[next].is_whitespace() {
                next += 1;
            }
            let rest: String = chars[next..].iter().take(8).collect::<String>().to_ascii_lowercase();
            let grouped = AGGREGATIONS.contains(&lower.as_str())
                && ["by", "without"].iter().any(|modifier| {
                    rest.strip_prefix(modifier)
                        .is_some_and(|after| after.starts_with(|c: char| c.is_whitespace() || c == '('))
                });
            let call = chars.get(next) == Some(&'(') || grouped;
            if LABEL_LIST_KEYWORDS.contains(&lower.as_str()) {
                if call {
                    i = skip_bracket(&chars, next, ')')?;
                }
            } else if !KEYWORDS.contains(&lower.as_str()) && !call {
                names.insert(word);
            }
        } else if c == '$' {
            anyhow::bail!("a Grafana variable that is not an interval: {expr}");
        } else {
            i += 1;
        }
    }
    Ok(names)
}

/// Grafana's interval variables replaced by a duration PromQL accepts.
fn without_grafana_intervals(expr: &str) -> String {
    GRAFANA_INTERVALS
        .iter()
        .fold(expr.to_owned(), |expr, variable| expr.replace(variable, "5m"))
}

/// The names in `exprs` (origin, expression) that `known` lacks, with where.
fn unknown_metrics(exprs: &[(String, String)], known: &BTreeSet<String>) -> anyhow::Result<Vec<String>> {
    let mut unknown = Vec::new();
    for (origin, expr) in exprs {
        for name in metric_names(expr).with_context(|| format!("{origin}: {expr}"))? {
            if !known.contains(&name) {
                unknown.push(format!("{origin}: {name}"));
            }
        }
    }
    Ok(unknown)
}

#[test]
fn promql_metric_names_leave_out_functions_labels_keywords_and_durations() -> anyhow::Result<()> {
    let expr = r#"
        sum by (job, le) (rate(http_request_duration_seconds_bucket{route="/seckill/{voucher_id}", le=~"0.1|+Inf"}[5m:1m] offset 15m))
          / ignoring (le) group_left (route) job:http_requests:rate5m > bool 0.5
        and on () vector(1) unless sum(x_total) without (instance)   # a comment naming not_a_metric
        or max(relay_lag_seconds and on (job, instance) (relay_active == 1)) * -Inf
        or label_replace(up, "dst", "$1", "instance", "(.*):.*") @ 1609746000 or histogram_quantile(0.99, y_bucket)
    "#;
    let names: Vec<String> = metric_names(expr)?.into_iter().collect();
    assert_eq!(
        names,
        [
            "http_request_duration_seconds_bucket",
            "job:http_requests:rate5m",
            "relay_active",
            "relay_lag_seconds",
            "up",
            "x_total",
            "y_bucket",
        ]
    );
    assert!(
        metric_names(r#"{__name__="up"}"#).is_err(),
        "__name__ selectors are refused"
    );
    assert!(
        metric_names("rate(x[$job])").is_err(),
        "unknown Grafana variables are refused"
    );
    assert_eq!(
        without_grafana_intervals("rate(x[$__rate_interval]) + increase(y[$__range])"),
        "rate(x[5m]) + increase(y[5m])"
    );
    let known = exported_metrics()?;
    for name in [
        "http_requests_total",
        "http_request_duration_seconds_bucket",
        "seckill_attempts_total",
    ] {
        assert!(known.contains(name), "the source scan missed {name}: {known:?}");
    }
    Ok(())
}

// ---------------------------------------------------------------- dashboard

/// Every panel's queries: (panel and target, expression), rows' panels included.
fn dashboard_queries(dashboard: &Value) -> anyhow::Result<Vec<(String, String)>> {
    fn walk(panels: &[Value], out: &mut Vec<(String, String)>, uids: &mut BTreeSet<String>) {
        for panel in panels {
            let title = panel["title"].as_str().unwrap_or_default();
            let id = panel["id"].as_u64().unwrap_or_default();
            if let Some(uid) = panel["datasource"]["uid"].as_str() {
                uids.insert(uid.to_owned());
            }
            for target in panel["targets"].as_array().into_iter().flatten() {
                if let Some(uid) = target["datasource"]["uid"].as_str() {
                    uids.insert(uid.to_owned());
                }
                let reference = target["refId"].as_str().unwrap_or("?");
                let expr = target["expr"].as_str().unwrap_or_default();
                out.push((format!("panel {id} {title:?} query {reference}"), expr.to_owned()));
            }
            if let Some(inner) = panel["panels"].as_array() {
                walk(inner, out, uids);
            }
        }
    }
    let panels = dashboard["panels"].as_array().context("the dashboard has no panels")?;
    let mut queries = Vec::new();
    let mut uids = BTreeSet::new();
    walk(panels, &mut queries, &mut uids);
    anyhow::ensure!(!queries.is_empty(), "the dashboard has no queries");
    for (origin, expr) in &queries {
        anyhow::ensure!(!expr.trim().is_empty(), "{origin} has no expression");
    }
    // the provisioned datasource is the only one the panels use
    let provisioned = read(DATASOURCES)?;
    for uid in &uids {
        anyhow::ensure!(
            provisioned.contains(&format!("uid: {uid}\n")),
            "the dashboard uses datasource uid {uid:?}, which {DATASOURCES} does not provision"
        );
    }
    Ok(queries)
}

#[test]
fn every_dashboard_query_parses_and_names_only_exported_metrics() -> anyhow::Result<()> {
    promtool()?;
    let dashboard: Value =
        serde_json::from_str(&read(DASHBOARD)?).with_context(|| format!("{DASHBOARD} is not JSON"))?;
    let queries: Vec<(String, String)> = dashboard_queries(&dashboard)?
        .into_iter()
        .map(|(origin, expr)| (origin, without_grafana_intervals(&expr)))
        .collect();
    check_parse(&queries, "dashboard")?;

    let mut known = exported_metrics()?;
    known.extend(EXPORTER_METRICS.iter().map(|name| (*name).to_owned()));
    let unknown = unknown_metrics(&queries, &known)?;
    assert!(
        unknown.is_empty(),
        "{DASHBOARD} queries metrics nobody exports: {unknown:#?}"
    );

    let used: BTreeSet<String> = queries
        .iter()
        .map(|(_, expr)| metric_names(expr))
        .collect::<anyhow::Result<Vec<_>>>()?
        .into_iter()
        .flatten()
        .collect();
    let missing: Vec<_> = DASHBOARD_MUST_USE
        .iter()
        .filter(|name| !used.contains(**name))
        .collect();
    assert!(missing.is_empty(), "{DASHBOARD} shows nothing of {missing:?}");
    Ok(())
}

// -------------------------------------------------------------------- rules

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Record,
    Alert,
}

#[derive(Debug)]
struct Rule {
    kind: Kind,
    name: String,
    expr: String,
}

fn indentation(line: &str) -> usize {
    line.len() - line.trim_start().len()
}

/// A YAML scalar written on one line: unquoted (up to a comment), or quoted.
fn plain_scalar(value: &str) -> String {
    let value = value.trim();
    if let Some(inner) = value.strip_prefix('"').and_then(|v| v.strip_suffix('"')) {
        inner.replace("\\\"", "\"").replace("\\\\", "\\")
    } else if let Some(inner) = value.strip_prefix('\'').and_then(|v| v.strip_suffix('\'')) {
        inner.replace("''", "'")
    } else {
        value.split(" #").next().unwrap_or_default().trim().to_owned()
    }
}

/// The rules of a Prometheus rule file, read line by line (the files keep to
/// `- record:`/`- alert:` items with an `expr:` that is a one-line scalar or
/// a `|`/`>` block); the count is checked against promtool's.
fn rules_of(text: &str) -> anyhow::Result<Vec<Rule>> {
    let lines: Vec<&str> = text.lines().collect();
    let mut rules: Vec<Rule> = Vec::new();
    let mut i = 0;
    while i < lines.len() {
        let line = lines[i];
        let trimmed = line.trim_start();
        if let Some(name) = trimmed.strip_prefix("- record:") {
            rules.push(Rule {
                kind: Kind::Record,
                name: plain_scalar(name),
                expr: String::new(),
            });
        } else if let Some(name) = trimmed.strip_prefix("- alert:") {
            rules.push(Rule {
                kind: Kind::Alert,
                name: plain_scalar(name),
                expr: String::new(),
            });
        } else if let Some(value) = trimmed.strip_prefix("expr:") {
            let rule = rules.last_mut().context("an expr: before any rule")?;
            anyhow::ensure!(rule.expr.is_empty(), "rule {} has two expr:", rule.name);
            let value = value.trim();
            if value.starts_with('|') || value.starts_with('>') {
                let key_indent = indentation(line);
                let mut block = Vec::new();
                while i + 1 < lines.len() && (lines[i + 1].trim().is_empty() || indentation(lines[i + 1]) > key_indent)
                {
                    i += 1;
                    block.push(lines[i].trim());
                }
                rule.expr = block.join("\n").trim().to_owned();
            } else {
                rule.expr = plain_scalar(value);
            }
        }
        i += 1;
    }
    for rule in &rules {
        anyhow::ensure!(!rule.expr.is_empty(), "rule {} has no expr", rule.name);
    }
    Ok(rules)
}

/// Every rule of deploy/prometheus/rules, checked by promtool, with the
/// number of rules it found equal to ours.
fn all_rules() -> anyhow::Result<Vec<(String, Rule)>> {
    let mut all = Vec::new();
    for file in yaml_files(RULES_DIR)? {
        let shown = file.strip_prefix(root()).unwrap_or(&file).display().to_string();
        let text = fs::read_to_string(&file)?;
        let rules = rules_of(&text).with_context(|| format!("reading the rules of {shown}"))?;
        let output = run_promtool(&["check", "rules", &file.to_string_lossy()], &shown)?;
        let expected = format!("SUCCESS: {} rules found", rules.len());
        anyhow::ensure!(
            output.contains(&expected),
            "{shown}: this test read {} rules, promtool says:\n{output}",
            rules.len()
        );
        all.extend(rules.into_iter().map(|rule| (shown.clone(), rule)));
    }
    Ok(all)
}

#[test]
fn every_rule_expression_parses_and_names_only_exported_metrics() -> anyhow::Result<()> {
    promtool()?;
    let rules = all_rules()?;
    let exprs: Vec<(String, String)> = rules
        .iter()
        .map(|(file, rule)| (format!("{file}: {}", rule.name), rule.expr.clone()))
        .collect();
    check_parse(&exprs, "rules")?;

    let mut known = exported_metrics()?;
    known.extend(EXPORTER_METRICS.iter().map(|name| (*name).to_owned()));
    known.extend(
        rules
            .iter()
            .filter(|(_, rule)| rule.kind == Kind::Record)
            .map(|(_, rule)| rule.name.clone()),
    );
    let unknown = unknown_metrics(&exprs, &known)?;
    assert!(
        unknown.is_empty(),
        "rules in {RULES_DIR} use metrics nobody exports or records: {unknown:#?}"
    );
    Ok(())
}

#[test]
fn the_rule_unit_tests_cover_every_alert_firing_and_quiet_and_every_recording_rule() -> anyhow::Result<()> {
    // alert name -> (has a firing case, has a quiet case)
    let mut alerts: BTreeMap<String, (bool, bool)> = BTreeMap::new();
    let mut tested_exprs = String::new();
    for file in yaml_files(RULE_TESTS_DIR)? {
        let text = fs::read_to_string(&file)?;
        let lines: Vec<&str> = text.lines().collect();
        for (index, line) in lines.iter().enumerate() {
            let trimmed = line.trim_start().trim_start_matches("- ");
            if let Some(expr) = trimmed.strip_prefix("expr:") {
                tested_exprs.push_str(expr);
                tested_exprs.push('\n');
            }
            let Some(name) = trimmed.strip_prefix("alertname:") else {
                continue;
            };
            let expected = lines[index + 1..]
                .iter()
                .map(|l| l.trim())
                .find(|l| l.starts_with("exp_alerts:"))
                .with_context(|| format!("{}: alertname {name} without exp_alerts", file.display()))?;
            let quiet = expected.trim_start_matches("exp_alerts:").trim() == "[]";
            let entry = alerts.entry(plain_scalar(name)).or_default();
            if quiet {
                entry.1 = true;
            } else {
                entry.0 = true;
            }
        }
    }
    let mut gaps = Vec::new();
    for (_, rule) in all_rules()? {
        match rule.kind {
            Kind::Alert => match alerts.get(&rule.name) {
                Some((true, true)) => {}
                Some((firing, _)) => gaps.push(format!(
                    "alert {} has no {} case",
                    rule.name,
                    if *firing { "quiet" } else { "firing" }
                )),
                None => gaps.push(format!("alert {} is not tested", rule.name)),
            },
            Kind::Record => {
                let tested = tested_exprs
                    .lines()
                    .any(|expr| metric_names(&plain_scalar(expr)).is_ok_and(|names| names.contains(&rule.name)));
                if !tested {
                    gaps.push(format!("recording rule {} has no promql_expr_test", rule.name));
                }
            }
        }
    }
    assert!(gaps.is_empty(), "{RULE_TESTS_DIR} leaves out: {gaps:#?}");
    Ok(())
}

// ------------------------------------------------------------------ compose

/// The lines of a top-level compose service (two-space indented key).
fn compose_service<'a>(compose: &'a str, name: &str) -> anyhow::Result<Vec<&'a str>> {
    let header = format!("  {name}:");
    let mut lines = compose.lines().skip_while(|line| line.trim_end() != header);
    anyhow::ensure!(lines.next().is_some(), "compose.yaml has no service {name}");
    Ok(lines
        .take_while(|line| line.trim().is_empty() || indentation(line) > 2)
        .collect())
}

/// The host side of a volume `HOST:CONTAINER[:ro]` whose container side is `container`.
fn mounted_at<'a>(service: &[&'a str], host: &str) -> Option<&'a str> {
    service.iter().find_map(|line| {
        let item = line.trim().strip_prefix("- ")?.trim_matches('"');
        let rest = item.strip_prefix(host)?.strip_prefix(':')?;
        Some(rest.strip_suffix(":ro").unwrap_or(rest))
    })
}

#[test]
fn compose_runs_grafana_with_the_dashboard_and_prometheus_with_the_rules() -> anyhow::Result<()> {
    let compose = read("compose.yaml")?;

    let grafana = compose_service(&compose, "grafana")?;
    let text = grafana.join("\n");
    for needed in [
        "image: grafana/grafana:${GRAFANA_VERSION:-11.",
        "\"127.0.0.1:3000:3000\"",
        "GF_AUTH_ANONYMOUS_ENABLED: \"true\"",
        "GF_AUTH_ANONYMOUS_ORG_ROLE: Viewer",
    ] {
        anyhow::ensure!(text.contains(needed), "compose's grafana lacks {needed}:\n{text}");
    }
    anyhow::ensure!(
        mounted_at(&grafana, "./deploy/grafana/provisioning") == Some("/etc/grafana/provisioning"),
        "compose's grafana must mount deploy/grafana/provisioning at /etc/grafana/provisioning"
    );
    let dashboards = mounted_at(&grafana, "./deploy/grafana/dashboards")
        .context("compose's grafana does not mount deploy/grafana/dashboards")?;
    anyhow::ensure!(
        read(DASHBOARD_PROVIDERS)?.contains(&format!("path: {dashboards}\n")),
        "{DASHBOARD_PROVIDERS} must read the dashboards where compose mounts them ({dashboards})"
    );
    anyhow::ensure!(
        read(DATASOURCES)?.contains("url: http://prometheus:9090\n"),
        "{DATASOURCES} must point at compose's prometheus"
    );

    // Prometheus: the configuration, and the rule files where it looks for them
    let prometheus = compose_service(&compose, "prometheus")?;
    let config = mounted_at(&prometheus, "./deploy/prometheus.yml")
        .context("compose's prometheus does not mount deploy/prometheus.yml")?;
    let config_dir = Path::new(config).parent().context("the configuration's folder")?;
    let rules_at = mounted_at(&prometheus, "./deploy/prometheus/rules")
        .context("compose's prometheus does not mount deploy/prometheus/rules")?;
    let configured = read("deploy/prometheus.yml")?;
    let rule_files: Vec<String> = configured
        .lines()
        .skip_while(|line| !line.starts_with("rule_files:"))
        .skip(1)
        .map_while(|line| line.trim().strip_prefix("- ").map(plain_scalar))
        .collect();
    anyhow::ensure!(
        rule_files
            .iter()
            .any(|glob| config_dir.join(glob) == Path::new(rules_at).join("*.yml")),
        "deploy/prometheus.yml loads {rule_files:?} (relative to {}), compose mounts the rules at {rules_at}",
        config_dir.display()
    );
    // the same files on the host, where promtool (./dev test) checks them
    anyhow::ensure!(
        rule_files
            .iter()
            .any(|glob| Path::new("deploy").join(glob) == Path::new(RULES_DIR).join("*.yml")),
        "deploy/prometheus.yml's rule_files {rule_files:?} do not name {RULES_DIR}/*.yml"
    );

    // the exporters Prometheus scrapes exist, and nothing new is published beyond loopback
    for (service, target) in [
        ("postgres-exporter", "postgres-exporter:9187"),
        ("redis-exporter", "redis-exporter:9121"),
    ] {
        compose_service(&compose, service)?;
        anyhow::ensure!(
            configured.contains(&format!("\"{target}\"")),
            "deploy/prometheus.yml does not scrape {target}"
        );
    }
    for service in ["grafana", "postgres-exporter", "redis-exporter"] {
        for line in compose_service(&compose, service)? {
            let item = line.trim().trim_start_matches("- ").trim_matches('"');
            let published = item.split(':').count() >= 2 && item.chars().next().is_some_and(|c| c.is_ascii_digit());
            anyhow::ensure!(
                !published || item.starts_with("127.0.0.1:"),
                "compose's {service} publishes {item} beyond 127.0.0.1"
            );
        }
    }
    Ok(())
}
