//! Istio's `Telemetry` (telemetry.istio.io): which workloads log their
//! requests, how their traces are sampled, whether their metrics are kept.
//!
//! Scoping follows Istio: a Telemetry without selector in the root
//! namespace is mesh-wide, one without selector elsewhere is
//! namespace-wide, one with `selector.matchLabels` or `targetRefs` (to a
//! Service: its workloads) is workload-level. Levels apply in that order,
//! each more specific one overriding what it sets; where several policies
//! of one level apply, the oldest wins (as in Istio) and loading says so.
//!
//! Resolution is done once per configuration for each workload of the node
//! ([`Telemetries::for_workload`]), never per request.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::sync::Arc;

use serde::de::IgnoredAny;
use serde::Deserialize;

use super::filter::Filter;
use crate::config::{check_metadata, Issues, Labels, Meta, Object, Origin, Service, Workload};
use crate::security::target::{self, TargetRefSpec};
use crate::security::WorkloadSelectorSpec;

/// An access log's format, named as a Telemetry provider.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Format {
    /// Provider `envoy`: Envoy's default text format, on the agent's stdout.
    Text,
    /// Provider `envoy-json`: one JSON object per line, on the agent's stdout.
    Json,
}

/// Access-log providers nodemesh has, by name.
const LOG_PROVIDERS: [(&str, Format); 2] = [("envoy", Format::Text), ("envoy-json", Format::Json)];
/// The only metrics provider: the agent's `/metrics`.
const METRICS_PROVIDER: &str = "prometheus";

impl Format {
    pub fn provider(self) -> &'static str {
        LOG_PROVIDERS
            .iter()
            .find(|(_, f)| *f == self)
            .map_or("envoy", |(name, _)| name)
    }
}

impl fmt::Display for Format {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.provider())
    }
}

/// Which side of a call: Istio's `match.mode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// The caller's (outbound) side.
    Client,
    /// The destination's (inbound) side.
    Server,
}

/// How one workload's calls on one side are observed.
#[derive(Debug, Clone, PartialEq)]
pub struct Side {
    /// `None`: not logged.
    pub access_log: Option<Arc<AccessLog>>,
    /// Istio's metrics are recorded.
    pub metrics: bool,
    /// `randomSamplingPercentage`, when a Telemetry sets one (0 to 100).
    pub sampling_percent: Option<f64>,
    /// `false` when `disableSpanReporting` is set.
    pub span_reporting: bool,
    /// Tracing providers a Telemetry named (`None`: the default).
    pub tracing_providers: Option<Arc<[String]>>,
}

impl Side {
    /// What applies with no Telemetry and no `--access-log`.
    pub fn unset() -> Side {
        Side {
            access_log: None,
            metrics: true,
            sampling_percent: None,
            span_reporting: true,
            tracing_providers: None,
        }
    }
}

/// An enabled access log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AccessLog {
    /// One line per format (never empty).
    pub formats: Box<[Format]>,
    pub filter: Option<Filter>,
}

/// A workload's telemetry, per side.
#[derive(Debug, Clone, PartialEq)]
pub struct Resolved {
    pub client: Side,
    pub server: Side,
}

impl Resolved {
    pub fn side(&self, mode: Mode) -> &Side {
        match mode {
            Mode::Client => &self.client,
            Mode::Server => &self.server,
        }
    }
}

// ---- spec, read strictly so that typos are errors ----

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(crate) struct TelemetrySpec {
    selector: Option<WorkloadSelectorSpec>,
    target_ref: Option<TargetRefSpec>,
    #[serde(default)]
    target_refs: Vec<TargetRefSpec>,
    #[serde(default)]
    access_logging: Vec<AccessLoggingSpec>,
    #[serde(default)]
    tracing: Vec<TracingSpec>,
    #[serde(default)]
    metrics: Vec<MetricsSpec>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ProviderSpec {
    name: String,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct MatchSpec {
    #[serde(default)]
    mode: ModeSpec,
}

#[derive(Deserialize, Default, Debug, Clone, Copy)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
enum ModeSpec {
    #[default]
    ClientAndServer,
    Client,
    Server,
}

impl ModeSpec {
    fn covers(self, mode: Mode) -> bool {
        matches!(
            (self, mode),
            (ModeSpec::ClientAndServer, _)
                | (ModeSpec::Client, Mode::Client)
                | (ModeSpec::Server, Mode::Server)
        )
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AccessLoggingSpec {
    #[serde(rename = "match")]
    matching: Option<MatchSpec>,
    #[serde(default)]
    providers: Vec<ProviderSpec>,
    disabled: Option<bool>,
    filter: Option<FilterSpec>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FilterSpec {
    expression: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct TracingSpec {
    #[serde(rename = "match")]
    matching: Option<MatchSpec>,
    #[serde(default)]
    providers: Vec<ProviderSpec>,
    random_sampling_percentage: Option<f64>,
    disable_span_reporting: Option<bool>,
    custom_tags: Option<IgnoredAny>,
    use_request_id_for_trace_sampling: Option<IgnoredAny>,
    enable_istio_tags: Option<IgnoredAny>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct MetricsSpec {
    #[serde(default)]
    providers: Vec<ProviderSpec>,
    #[serde(default)]
    overrides: Vec<MetricsOverrideSpec>,
    reporting_interval: Option<IgnoredAny>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct MetricsOverrideSpec {
    #[serde(rename = "match")]
    matching: Option<MetricSelectorSpec>,
    disabled: Option<bool>,
    tag_overrides: Option<IgnoredAny>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct MetricSelectorSpec {
    metric: Option<String>,
    custom_metric: Option<String>,
    #[serde(default)]
    mode: ModeSpec,
}

// ---- checked policy ----

/// One `accessLogging` entry.
#[derive(Debug, Clone)]
struct LogRule {
    mode: ModeSpec,
    /// Empty: the providers of the less specific level (else the default).
    formats: Vec<Format>,
    disabled: bool,
    filter: Option<Filter>,
}

#[derive(Debug, Clone)]
struct TraceRule {
    mode: ModeSpec,
    providers: Vec<String>,
    sampling_percent: Option<f64>,
    disable_span_reporting: Option<bool>,
}

#[derive(Debug, Clone)]
struct MetricsRule {
    mode: ModeSpec,
    disabled: bool,
}

/// A checked Telemetry, waiting for the others (and for Services, which
/// `targetRefs` name) to be sorted into levels.
pub(crate) struct TelemetryDraft {
    meta: Meta,
    selector: Option<BTreeMap<String, String>>,
    targets: Vec<String>,
    rules: Rules,
}

#[derive(Debug, Clone, Default)]
struct Rules {
    logs: Vec<LogRule>,
    traces: Vec<TraceRule>,
    metrics: Vec<MetricsRule>,
}

pub(crate) fn telemetry(doc: Object<TelemetrySpec>, issues: &mut Issues) -> TelemetryDraft {
    check_metadata(&doc.metadata, issues);
    let spec = doc.spec;
    let (selector, targets) = target::scope(
        spec.selector,
        spec.target_ref,
        spec.target_refs,
        &doc.metadata.namespace,
        issues,
    );
    let logs = spec.access_logging.into_iter().enumerate();
    let logs = logs
        .map(|(i, s)| log_rule(s, &format!("spec.accessLogging[{i}]"), issues))
        .collect();
    let traces = spec.tracing.into_iter().enumerate();
    let traces = traces
        .map(|(i, s)| trace_rule(s, &format!("spec.tracing[{i}]"), issues))
        .collect();
    let mut metrics = Vec::new();
    for (i, spec) in spec.metrics.into_iter().enumerate() {
        metrics_rules(spec, &format!("spec.metrics[{i}]"), issues, &mut metrics);
    }
    TelemetryDraft {
        meta: Meta::new(&doc.metadata),
        selector,
        targets,
        rules: Rules {
            logs,
            traces,
            metrics,
        },
    }
}

fn log_rule(spec: AccessLoggingSpec, field: &str, issues: &mut Issues) -> LogRule {
    let mut formats = Vec::new();
    for (i, provider) in spec.providers.iter().enumerate() {
        match LOG_PROVIDERS
            .iter()
            .find(|(name, _)| *name == provider.name)
        {
            Some((_, format)) if !formats.contains(format) => formats.push(*format),
            Some(_) => {}
            None => issues.add(
                format!("{field}.providers[{i}].name"),
                format!(
                    "unknown access-log provider {:?}: nodemesh has \"envoy\" (Envoy's text \
                     format) and \"envoy-json\" (JSON), both on the agent's stdout",
                    provider.name
                ),
            ),
        }
    }
    let filter = spec.filter.and_then(|f| {
        Filter::parse(&f.expression)
            .map_err(|e| issues.add(format!("{field}.filter.expression"), e.to_string()))
            .ok()
    });
    LogRule {
        mode: spec.matching.unwrap_or_default().mode,
        formats,
        disabled: spec.disabled.unwrap_or(false),
        filter,
    }
}

fn trace_rule(spec: TracingSpec, field: &str, issues: &mut Issues) -> TraceRule {
    let unsupported = [
        ("customTags", spec.custom_tags.is_some()),
        (
            "useRequestIdForTraceSampling",
            spec.use_request_id_for_trace_sampling.is_some(),
        ),
        ("enableIstioTags", spec.enable_istio_tags.is_some()),
    ];
    for (name, set) in unsupported {
        if set {
            issues.add(
                format!("{field}.{name}"),
                "is not supported by nodemesh; remove it (the Telemetry is rejected rather than \
                 applied differently from what it says)",
            );
        }
    }
    if let Some(p) = spec.random_sampling_percentage {
        if !(0.0..=100.0).contains(&p) {
            issues.add(
                format!("{field}.randomSamplingPercentage"),
                format!("{p} is not a percentage between 0 and 100"),
            );
        }
    }
    TraceRule {
        mode: spec.matching.unwrap_or_default().mode,
        providers: spec.providers.into_iter().map(|p| p.name).collect(),
        sampling_percent: spec.random_sampling_percentage,
        disable_span_reporting: spec.disable_span_reporting,
    }
}

fn metrics_rules(spec: MetricsSpec, field: &str, issues: &mut Issues, out: &mut Vec<MetricsRule>) {
    for (i, provider) in spec.providers.iter().enumerate() {
        if provider.name != METRICS_PROVIDER {
            issues.add(
                format!("{field}.providers[{i}].name"),
                format!(
                    "unknown metrics provider {:?}: nodemesh's only one is \"prometheus\" (the \
                     agent's /metrics)",
                    provider.name
                ),
            );
        }
    }
    if spec.reporting_interval.is_some() {
        issues.add(
            format!("{field}.reportingInterval"),
            "is not supported: Prometheus scrapes the agent when it wants",
        );
    }
    for (i, o) in spec.overrides.into_iter().enumerate() {
        let field = format!("{field}.overrides[{i}]");
        let matching = o.matching.unwrap_or_default();
        let metric = matching.metric.as_deref().unwrap_or("ALL_METRICS");
        if metric != "ALL_METRICS" || matching.custom_metric.is_some() {
            issues.add(
                format!("{field}.match"),
                "only ALL_METRICS can be overridden: nodemesh keeps or drops Istio's metrics \
                 together",
            );
        }
        if o.tag_overrides.is_some() {
            issues.add(
                format!("{field}.tagOverrides"),
                "is not supported: the labels are Istio's standard ones",
            );
        }
        if let Some(disabled) = o.disabled {
            out.push(MetricsRule {
                mode: matching.mode,
                disabled,
            });
        }
    }
}

// ---- compiled ----

#[derive(Debug, Clone)]
struct Policy {
    rules: Rules,
}

#[derive(Debug, Clone)]
struct Selected {
    /// Any of them (a selector, or the selectors of the target Services).
    selectors: Vec<Labels>,
    policy: Arc<Policy>,
}

impl Selected {
    fn selects(&self, w: &Workload) -> bool {
        self.selectors
            .iter()
            .any(|s| w.labels.contains_all(s.iter()))
    }
}

#[derive(Debug, Clone, Default)]
struct NamespacePolicies {
    /// The oldest policy without selector or targets.
    wide: Option<Arc<Policy>>,
    /// Oldest first.
    selected: Vec<Selected>,
}

/// Every Telemetry of the config, sorted into levels.
#[derive(Debug, Clone, Default)]
pub struct Telemetries {
    mesh: Option<Arc<Policy>>,
    namespaces: HashMap<String, NamespacePolicies>,
    /// Policies that lose to an older one; logged at each load.
    pub warnings: Vec<String>,
}

impl Telemetries {
    pub(crate) fn compile(
        mut drafts: Vec<(Origin, TelemetryDraft)>,
        root_namespace: &str,
        services: &[Service],
    ) -> Telemetries {
        drafts.sort_by(|(_, a), (_, b)| a.meta.rank().cmp(&b.meta.rank()));
        let mut out = Telemetries::default();
        let mut wide_origin = HashMap::<String, String>::new();
        for (origin, draft) in drafts {
            let namespace = draft.meta.namespace.clone();
            let policy = Arc::new(Policy { rules: draft.rules });
            let selectors = match (draft.selector, draft.targets.is_empty()) {
                (Some(labels), _) => vec![labels.into()],
                (None, false) => target::selectors(
                    &origin,
                    &namespace,
                    &draft.targets,
                    services,
                    &mut out.warnings,
                ),
                (None, true) => {
                    if let Some(winner) = wide_origin.get(&namespace) {
                        let scope = match namespace == root_namespace {
                            true => "mesh-wide".to_owned(),
                            false => format!("namespace-wide in {namespace}"),
                        };
                        out.warnings.push(format!(
                            "{origin}: ignored; {winner} is older and is the {scope} Telemetry \
                             (Istio applies the oldest)"
                        ));
                        continue;
                    }
                    wide_origin.insert(namespace.clone(), origin.to_string());
                    match namespace == root_namespace {
                        true => out.mesh = Some(policy),
                        false => out.namespaces.entry(namespace).or_default().wide = Some(policy),
                    }
                    continue;
                }
            };
            let selected = Selected { selectors, policy };
            out.namespaces
                .entry(namespace)
                .or_default()
                .selected
                .push(selected);
        }
        out
    }

    /// What applies to `w`'s calls; `default_log`: the format `--access-log`
    /// turns on mesh-wide (and the provider of an entry that names none).
    pub fn for_workload(&self, w: &Workload, default_log: Option<Format>) -> Resolved {
        let namespace = self.namespaces.get(&w.namespace);
        let levels = [
            self.mesh.as_deref(),
            namespace.and_then(|n| n.wide.as_deref()),
            namespace
                .and_then(|n| n.selected.iter().find(|s| s.selects(w)))
                .map(|s| &*s.policy),
        ];
        resolved(&levels, default_log)
    }

    /// What applies to a workload that only the mesh-wide Telemetry selects.
    pub fn mesh_wide(&self, default_log: Option<Format>) -> Resolved {
        resolved(&[self.mesh.as_deref()], default_log)
    }
}

/// `levels`: least specific first, `None` where no policy applies.
fn resolved(levels: &[Option<&Policy>], default_log: Option<Format>) -> Resolved {
    let levels: Vec<&Policy> = levels.iter().flatten().copied().collect();
    Resolved {
        client: resolve(&levels, Mode::Client, default_log),
        server: resolve(&levels, Mode::Server, default_log),
    }
}

fn resolve(levels: &[&Policy], mode: Mode, default_log: Option<Format>) -> Side {
    let mut side = Side::unset();
    let mut formats: Vec<Format> = default_log.into_iter().collect();
    let mut log: Option<(bool, Option<Filter>)> = default_log.map(|_| (true, None));
    let mut providers = Vec::new();
    for policy in levels {
        let rules = &policy.rules;
        for rule in rules.logs.iter().filter(|r| r.mode.covers(mode)) {
            if !rule.formats.is_empty() {
                formats = rule.formats.clone();
            }
            log = Some((!rule.disabled, rule.filter.clone()));
        }
        for rule in rules.traces.iter().filter(|r| r.mode.covers(mode)) {
            if !rule.providers.is_empty() {
                providers = rule.providers.clone();
            }
            side.sampling_percent = rule.sampling_percent.or(side.sampling_percent);
            if let Some(disable) = rule.disable_span_reporting {
                side.span_reporting = !disable;
            }
        }
        for rule in rules.metrics.iter().filter(|r| r.mode.covers(mode)) {
            side.metrics = !rule.disabled;
        }
    }
    if formats.is_empty() {
        formats.push(Format::Text);
    }
    side.access_log = match log {
        Some((true, filter)) => Some(Arc::new(AccessLog {
            formats: formats.into_boxed_slice(),
            filter,
        })),
        _ => None,
    };
    side.tracing_providers = (!providers.is_empty()).then(|| providers.into());
    side
}
