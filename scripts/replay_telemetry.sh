#!/usr/bin/env bash
# Replay OTLP-JSON files (what `otel-subflow demo` writes to ./subflow-demo-telemetry/
# without OTEL_EXPORTER_OTLP_ENDPOINT) into a collector's OTLP/HTTP receiver, e.g. the
# running stack (`make stack` / `otel-subflow stack` / `docker compose up`).
#
# Each line of <host>.traces.jsonl, <host>.metrics.jsonl and <host>.logs.jsonl is
# one OTLP/JSON export request: it is POSTed as is to <endpoint>/v1/traces,
# /v1/metrics or /v1/logs. This is the equivalent of the contrib collector's
# otlpjsonfile receiver (docs/demo.md), with nothing but bash and curl.
#
# Usage: scripts/replay_telemetry.sh [DIR] [OTLP_HTTP_ENDPOINT]
#   DIR                 default ./subflow-demo-telemetry
#   OTLP_HTTP_ENDPOINT  default http://localhost:4318 (the stack's OTLP/HTTP port)
# Exits non-zero at the first request the collector refuses.
set -euo pipefail

dir=${1:-./subflow-demo-telemetry}
endpoint=${2:-http://localhost:4318}
endpoint=${endpoint%/}

[[ -d $dir ]] || {
  echo "replay_telemetry: no such directory: $dir" >&2
  exit 2
}

sent=0
for signal in traces metrics logs; do
  for file in "$dir"/*."$signal".jsonl; do
    [[ -e $file ]] || continue
    while IFS= read -r line || [[ -n $line ]]; do
      [[ -n ${line//[[:space:]]/} ]] || continue
      if ! response=$(printf '%s' "$line" | curl -sS --fail-with-body -X POST \
        -H 'Content-Type: application/json' --data-binary @- "$endpoint/v1/$signal"); then
        echo "replay_telemetry: $endpoint/v1/$signal refused a request from $file: $response" >&2
        exit 1
      fi
      # A 200 can still carry a partial success with rejected items.
      if [[ $response =~ \"rejected[A-Za-z]*\":\"?[1-9] ]]; then
        echo "replay_telemetry: $endpoint/v1/$signal rejected part of a request from $file: $response" >&2
        exit 1
      fi
      sent=$((sent + 1))
    done <"$file"
  done
done
echo "replay_telemetry: $sent requests from $dir sent to $endpoint"
