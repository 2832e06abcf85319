//! Logs and traces: journald when stderr is the journal (`JOURNAL_STREAM` names it), readable text
//! on stdout otherwise, and OpenTelemetry trace export over OTLP/gRPC only when
//! `OTEL_EXPORTER_OTLP_ENDPOINT` is set (no exporter, so no export errors, without one).
//!
//! The log filter sits behind a reload handle so `systemctl reload` can change it live.

use std::collections::HashMap;
use std::io::IsTerminal;
use std::os::fd::AsFd;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer, Registry, reload};

/// Why telemetry could not start.
#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    /// The filter directives do not parse.
    #[error("invalid log filter: {0}")]
    Filter(String),
    /// stderr is the journal but its socket cannot be opened.
    #[error("cannot connect to journald")]
    Journald(#[source] std::io::Error),
    /// `OTEL_EXPORTER_OTLP_ENDPOINT` is set but the exporter cannot be built.
    #[error("cannot build the OTLP trace exporter for OTEL_EXPORTER_OTLP_ENDPOINT")]
    Otlp(#[source] opentelemetry_otlp::ExporterBuildError),
    /// A global subscriber was already installed.
    #[error("a tracing subscriber is already installed")]
    AlreadyInstalled(#[source] tracing_subscriber::util::TryInitError),
}

/// Checks filter directives the way [`Telemetry::set_filter`] will apply them.
pub fn check_filter(directives: &str) -> Result<(), String> {
    EnvFilter::try_new(directives).map(drop).map_err(|err| format!("`{directives}`: {err}"))
}

/// A warning that a client or the machine can repeat many times a second (a refused TLS
/// connection, an accept error while out of descriptors): logged at most once every `every`, and
/// the occurrences in between are counted for the next line logged, so the journal says how many
/// there were without filling up.
pub struct LogEvery {
    every: Duration,
    /// When a line was last logged, and how many occurrences were only counted since.
    state: Mutex<(Option<Instant>, u64)>,
}

impl LogEvery {
    /// At most one line every `every`.
    pub const fn new(every: Duration) -> Self {
        LogEvery { every, state: Mutex::new((None, 0)) }
    }

    /// Records one occurrence. `Some(n)` when it is to be logged now, `n` being how many were
    /// not logged since the last one that was; `None` when it is only counted (log it at debug).
    pub fn occurred(&self) -> Option<u64> {
        let now = Instant::now();
        let mut state = self.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let (last, unlogged) = &mut *state;
        if last.is_some_and(|at| now.duration_since(at) < self.every) {
            *unlogged += 1;
            return None;
        }
        *last = Some(now);
        Some(std::mem::take(unlogged))
    }
}

/// " (N more since the last such line)" when `unlogged` is not zero, for a [`LogEvery`] line.
pub fn more_since(unlogged: u64) -> String {
    if unlogged == 0 {
        String::new()
    } else {
        format!(" ({unlogged} more since the last such line)")
    }
}

/// The installed subscriber's live parts.
pub struct Telemetry {
    filter: reload::Handle<EnvFilter, Registry>,
    tracer_provider: Option<SdkTracerProvider>,
    /// Where log lines go, for the start-up line.
    pub destination: &'static str,
}

impl Telemetry {
    /// Installs the global subscriber. `service` names the daemon in journald
    /// (`SYSLOG_IDENTIFIER`) and in exported traces (`service.name`). Call inside a tokio runtime:
    /// the OTLP exporter uses it.
    pub fn init(service: &'static str, directives: &str) -> Result<Telemetry, TelemetryError> {
        let filter = EnvFilter::try_new(directives)
            .map_err(|err| TelemetryError::Filter(format!("`{directives}`: {err}")))?;
        let (filter, handle) = reload::Layer::new(filter);

        let (journald, stdout, destination) = if stderr_is_journal() {
            let layer = tracing_journald::layer()
                .map_err(TelemetryError::Journald)?
                .with_field_prefix(None)
                .with_syslog_identifier(service.to_owned())
                .with_priority_mappings(tracing_journald::PriorityMappings {
                    info: tracing_journald::Priority::Informational,
                    debug: tracing_journald::Priority::Debug,
                    ..tracing_journald::PriorityMappings::new()
                });
            (Some(layer), None, "journald")
        } else {
            let layer = tracing_subscriber::fmt::layer()
                .with_target(false)
                .with_ansi(std::io::stdout().is_terminal());
            (None, Some(layer), "stdout")
        };

        let tracer_provider = otlp_provider(service)?;
        let otel = tracer_provider.as_ref().map(|provider| {
            opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
            tracing_opentelemetry::layer().with_tracer(provider.tracer(service)).boxed()
        });

        tracing_subscriber::registry()
            .with(filter)
            .with(journald)
            .with(stdout)
            .with(otel)
            .try_init()
            .map_err(TelemetryError::AlreadyInstalled)?;
        Ok(Telemetry { filter: handle, tracer_provider, destination })
    }

    /// Replaces the log filter of the running daemon.
    pub fn set_filter(&self, directives: &str) -> Result<(), TelemetryError> {
        let filter = EnvFilter::try_new(directives)
            .map_err(|err| TelemetryError::Filter(format!("`{directives}`: {err}")))?;
        self.filter
            .reload(filter)
            .map_err(|err| TelemetryError::Filter(format!("cannot swap the filter: {err}")))
    }

    /// Whether traces are exported.
    pub fn exports_traces(&self) -> bool {
        self.tracer_provider.is_some()
    }

    /// Flushes spans still buffered for export.
    pub fn shutdown(self) {
        if let Some(provider) = self.tracer_provider
            && let Err(err) = provider.shutdown()
        {
            tracing::warn!(%err, "flushing traces at exit failed");
        }
    }
}

fn otlp_provider(service: &'static str) -> Result<Option<SdkTracerProvider>, TelemetryError> {
    if std::env::var("OTEL_EXPORTER_OTLP_ENDPOINT").is_ok_and(|v| !v.trim().is_empty()) {
        // The exporter reads the endpoint (and OTEL_EXPORTER_OTLP_* options) from the environment.
        let exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_tonic()
            .build()
            .map_err(TelemetryError::Otlp)?;
        let resource = opentelemetry_sdk::Resource::builder().with_service_name(service).build();
        Ok(Some(
            SdkTracerProvider::builder()
                .with_batch_exporter(exporter)
                .with_resource(resource)
                .build(),
        ))
    } else {
        Ok(None)
    }
}

/// True when stderr is the journal stream systemd set up: `JOURNAL_STREAM` is "DEV:INODE" of it.
fn stderr_is_journal() -> bool {
    use std::os::unix::fs::MetadataExt;

    let Ok(expected) = std::env::var("JOURNAL_STREAM") else {
        return false;
    };
    let Ok(fd) = std::io::stderr().as_fd().try_clone_to_owned() else {
        return false;
    };
    let Ok(meta) = std::fs::File::from(fd).metadata() else {
        return false;
    };
    expected == format!("{}:{}", meta.dev(), meta.ino())
}

/// Makes `span` a child of a trace context given as W3C header values (the proxy reads them
/// from the client's HTTP/2 headers), when traces are exported.
pub fn continue_trace_from(
    span: &tracing::Span,
    traceparent: Option<&str>,
    tracestate: Option<&str>,
) {
    use tracing_opentelemetry::OpenTelemetrySpanExt;

    let headers: HashMap<String, String> =
        [("traceparent", traceparent), ("tracestate", tracestate)]
            .into_iter()
            .filter_map(|(key, value)| Some((key.to_owned(), value?.to_owned())))
            .collect();
    let parent =
        opentelemetry::global::get_text_map_propagator(|propagator| propagator.extract(&headers));
    // Fails only when the span is disabled or has no OpenTelemetry layer: then there is nothing
    // to continue.
    let _ = span.set_parent(parent);
}

/// The W3C trace headers (`traceparent`, `tracestate`) that make a callee's spans children of
/// `span`. Empty when traces are not exported (no propagator is installed then) or `span` is
/// disabled by the log filter.
pub fn trace_headers(span: &tracing::Span) -> HashMap<String, String> {
    use tracing_opentelemetry::OpenTelemetrySpanExt;

    let context = span.context();
    let mut headers = HashMap::new();
    opentelemetry::global::get_text_map_propagator(|propagator| {
        propagator.inject_context(&context, &mut headers);
    });
    // The propagator writes an empty `tracestate` when there is none; W3C asks not to send that.
    headers.retain(|_, value| !value.is_empty());
    headers
}

/// Makes `span` a child of the trace context the caller sent in its gRPC metadata, when traces
/// are exported.
pub fn continue_trace(span: &tracing::Span, metadata: &tonic::metadata::MetadataMap) {
    let header = |key: &str| metadata.get(key).and_then(|value| value.to_str().ok());
    continue_trace_from(span, header("traceparent"), header("tracestate"));
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The first occurrence is logged; the next ones within the interval are only counted, and
    /// the count goes out with the next line logged.
    #[test]
    fn a_repeated_warning_is_logged_once_an_interval_and_counted_between() {
        let every = Duration::from_millis(30);
        let log = LogEvery::new(every);
        assert_eq!(log.occurred(), Some(0));
        assert_eq!(log.occurred(), None);
        assert_eq!(log.occurred(), None);
        std::thread::sleep(every);
        assert_eq!(log.occurred(), Some(2), "counted in the line logged");
        assert_eq!(log.occurred(), None);
        assert_eq!(more_since(0), "");
        assert_eq!(more_since(2), " (2 more since the last such line)");
    }
}
