"""Every name of the otel-subflow contract, in one place.

These strings are typed by users into Jaeger searches, PromQL queries and
dashboards, so they never change silently. Code and tests import them from here.
"""

from __future__ import annotations

from typing import Final

# -- instrumentation scope -------------------------------------------------
INSTRUMENTATION_NAME: Final = "otel_subflow"
LOGGER_NAME: Final = "otel_subflow"

# -- spans -----------------------------------------------------------------
SPAN_STATE_GET: Final = "subflow.state.get"
SPAN_STATE_INIT: Final = "subflow.state.init"
SPAN_STATE_RACE: Final = "subflow.state.race"

# -- span attributes -------------------------------------------------------
ATTR_RUN_ID: Final = "subflow.run_id"
ATTR_NODE_ID: Final = "subflow.node_id"
ATTR_STATE_KEY: Final = "subflow.state.key"
ATTR_STATE_OUTCOME: Final = "subflow.state.outcome"
ATTR_STATE_TTL_MS: Final = "subflow.state.ttl_ms"
ATTR_STATE_OPERATION: Final = "subflow.state.operation"
ATTR_REDIS_CLIENT_ID: Final = "subflow.redis.client_id"
ATTR_REDIS_SERVER_RUN_ID: Final = "subflow.redis.server_run_id"

# Stable semantic-convention names (database and server).
ATTR_DB_SYSTEM_NAME: Final = "db.system.name"
ATTR_DB_NAMESPACE: Final = "db.namespace"
ATTR_SERVER_ADDRESS: Final = "server.address"
ATTR_SERVER_PORT: Final = "server.port"
ATTR_ERROR_TYPE: Final = "error.type"
DB_SYSTEM_REDIS: Final = "redis"

# Resource attributes.
RES_HOST_NAME: Final = "host.name"
RES_PROCESS_PID: Final = "process.pid"
RES_SERVICE_NAME: Final = "service.name"
RES_SERVICE_INSTANCE_ID: Final = "service.instance.id"

# -- outcomes --------------------------------------------------------------
OUTCOME_HIT: Final = "hit"
OUTCOME_MISS: Final = "miss"
OUTCOME_CREATED: Final = "created"
#: An init whose ``wrote=`` predicate said it wrote nothing (not journalled).
OUTCOME_NOT_WRITTEN: Final = "not_written"
OUTCOME_ERROR: Final = "error"

OPERATION_GET: Final = "get"
OPERATION_INIT: Final = "init"

# -- events ----------------------------------------------------------------
EVENT_STATE_MISSING: Final = "subflow.state.missing"
EVENT_STATE_RACE: Final = "subflow.state.race"

ATTR_MISSING_CAUSE: Final = "subflow.missing.cause"
ATTR_MISSING_PREVIOUS_CAUSE: Final = "subflow.missing.previous_cause"
ATTR_MISSING_CONFIDENCE: Final = "subflow.missing.confidence"
ATTR_MISSING_SUMMARY: Final = "subflow.missing.summary"
EVIDENCE_PREFIX: Final = "subflow.evidence."

CONFIDENCE_DEFINITIVE: Final = "definitive"
CONFIDENCE_PROBABLE: Final = "probable"
CONFIDENCE_UNKNOWN: Final = "unknown"

# -- causes ----------------------------------------------------------------
CAUSE_GET_BEFORE_INIT: Final = "get_before_init"
CAUSE_NEVER_WRITTEN: Final = "never_written"
CAUSE_EXPIRED: Final = "expired"
CAUSE_EVICTED: Final = "evicted"
CAUSE_DELETED: Final = "deleted"
CAUSE_WRONG_ENDPOINT: Final = "wrong_endpoint"
CAUSE_SERVER_RESTART: Final = "server_restart"
CAUSE_REPLICA_LAG: Final = "replica_lag"
CAUSE_KEY_MISMATCH: Final = "key_mismatch"
#: A write acknowledged by a master that failed before replicating it; a replica was promoted.
CAUSE_FAILOVER: Final = "failover"
CAUSE_UNKNOWN: Final = "unknown"

ALL_CAUSES: Final = (
    CAUSE_GET_BEFORE_INIT,
    CAUSE_NEVER_WRITTEN,
    CAUSE_EXPIRED,
    CAUSE_EVICTED,
    CAUSE_DELETED,
    CAUSE_WRONG_ENDPOINT,
    CAUSE_SERVER_RESTART,
    CAUSE_REPLICA_LAG,
    CAUSE_KEY_MISMATCH,
    CAUSE_FAILOVER,
    CAUSE_UNKNOWN,
)

#: The kinds of fix a cause calls for (``diagnose --patterns``): the servers and their settings,
#: the timing between the workflow's steps, or the application's own code and configuration.
CATEGORY_INFRASTRUCTURE: Final = "infrastructure"
CATEGORY_TIMING: Final = "timing"
CATEGORY_APPLICATION: Final = "application_logic"
CATEGORY_UNKNOWN: Final = "unknown"
CAUSE_CATEGORY: Final = {
    CAUSE_EVICTED: CATEGORY_INFRASTRUCTURE,
    CAUSE_SERVER_RESTART: CATEGORY_INFRASTRUCTURE,
    CAUSE_REPLICA_LAG: CATEGORY_INFRASTRUCTURE,
    CAUSE_FAILOVER: CATEGORY_INFRASTRUCTURE,
    CAUSE_EXPIRED: CATEGORY_TIMING,
    CAUSE_GET_BEFORE_INIT: CATEGORY_TIMING,
    CAUSE_KEY_MISMATCH: CATEGORY_APPLICATION,
    CAUSE_WRONG_ENDPOINT: CATEGORY_APPLICATION,  # a URL or db the application was configured with
    CAUSE_DELETED: CATEGORY_APPLICATION,
    CAUSE_NEVER_WRITTEN: CATEGORY_APPLICATION,
    CAUSE_UNKNOWN: CATEGORY_UNKNOWN,
}

# -- metrics (never carry run or node ids) ----------------------------------
METRIC_OPERATION_DURATION: Final = "subflow.state.operation.duration"
METRIC_STATE_MISSING: Final = "subflow.state.missing"
#: A verdict corrected after it was recorded (a race found later): by previous and new cause.
METRIC_STATE_MISSING_CORRECTED: Final = "subflow.state.missing.corrected"
METRIC_INTERNAL_ERRORS: Final = "subflow.internal.errors"
METRIC_MONITOR_ALERTS: Final = "subflow.monitor.alerts"
#: Counter of the keyspace watcher's errors (attribute ``error.type``, plus ``server.address`` / ``server.port``).
METRIC_WATCHER_ERRORS: Final = "subflow.watcher.errors"
#: Observable gauge: 1 while a keyspace watcher is subscribed, 0 otherwise (``server.address`` / ``server.port``).
METRIC_WATCHER_UP: Final = "subflow.watcher.up"
METRIC_JOURNAL_WRITTEN: Final = "subflow.journal.written"
METRIC_JOURNAL_DROPPED: Final = "subflow.journal.dropped"
METRIC_JOURNAL_USAGE: Final = "subflow.journal.usage"
METRIC_JOURNAL_BUDGET: Final = "subflow.journal.budget"
ATTR_JOURNAL_ENDPOINT: Final = "subflow.journal.endpoint"
ATTR_JOURNAL_DROP_REASON: Final = "subflow.journal.drop_reason"

# Semantic-convention buckets for db.client.operation.duration (seconds).
DB_DURATION_BUCKETS: Final = (0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0)

# -- log record messages -----------------------------------------------------
LOG_STATE_OPERATION_DETAILED: Final = "STATE_OPERATION_DETAILED"
LOG_MISSING_STATE_ANALYSIS: Final = "MISSING_STATE_ANALYSIS"
LOG_CRITICAL_STATE_ISSUE: Final = "CRITICAL_STATE_ISSUE"

# -- keyspace watcher states (``KeyspaceWatcher.status.state``, monitor output) --
WATCHER_STARTING: Final = "starting"
WATCHER_RUNNING: Final = "running"
WATCHER_RETRYING: Final = "retrying"
WATCHER_STOPPED: Final = "stopped"
WATCHER_STATES: Final = (WATCHER_STARTING, WATCHER_RUNNING, WATCHER_RETRYING, WATCHER_STOPPED)

# -- Redis key layout --------------------------------------------------------
DEFAULT_KEY_TEMPLATE: Final = "subflow:state:{run_id}:{node_id}"
#: Every key of the journal starts with this (one hash tag: one cluster slot). No run id,
#: node id or state key can name one of them (see otel_subflow/_journal/schema.py).
JOURNAL_KEY_PREFIX: Final = "{subflow:journal}:"

# -- CLI: monitor alerts and race conflicts (JSON output, log records, metric attributes) --
ATTR_ALERT_RULE: Final = "subflow.alert.rule"
ATTR_ALERT_SEVERITY: Final = "subflow.alert.severity"
ATTR_ALERT_STATUS: Final = "subflow.alert.status"
ATTR_ALERT_VALUE: Final = "subflow.alert.value"
ATTR_ALERT_THRESHOLD: Final = "subflow.alert.threshold"

ALERT_RULE_CONNECTION: Final = "redis_connection"
ALERT_RULE_LATENCY: Final = "redis_latency"
ALERT_RULE_MEMORY: Final = "redis_memory"
ALERT_RULE_STATE_FAILURES: Final = "state_failures"
ALERT_RULE_EVICTIONS: Final = "key_evictions"

CONFLICT_GET_BEFORE_INIT: Final = "get_before_init"
CONFLICT_DOUBLE_INIT: Final = "double_init"
CONFLICT_INIT_AFTER_MISS: Final = "init_after_miss"
CONFLICT_CROSS_HOST_INTERLEAVING: Final = "cross_host_interleaving"


def state_attributes(run_id: str | None, node_id: str | None, key: str | None) -> dict[str, str]:
    """The attributes that name a state on a span, event or log record (the unknown ones left out)."""
    attrs: dict[str, str] = {}
    for name, value in ((ATTR_RUN_ID, run_id), (ATTR_NODE_ID, node_id), (ATTR_STATE_KEY, key)):
        if value is not None:
            attrs[name] = value
    return attrs
