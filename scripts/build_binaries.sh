#!/usr/bin/env bash
# Build the Go binaries the local stack and the end-to-end tests run:
#   - otelcol-subflow: a minimal OpenTelemetry Collector from collector/manifest.yaml (ocb)
#   - jaeger: Jaeger v2 built through a throwaway wrapper module
# into a cache directory OUTSIDE the repository, keyed by version:
#   ${OTEL_SUBFLOW_CACHE_DIR:-$HOME/.cache/otel-subflow}/otelcol-subflow-v0.161.0/otelcol-subflow
#   ${OTEL_SUBFLOW_CACHE_DIR:-$HOME/.cache/otel-subflow}/jaeger-v1.76.0/jaeger
# A binary that is already there (and, for the collector, was built from the same
# manifest) is reused: the second run takes well under a second.
#
# Usage: scripts/build_binaries.sh [all|collector|jaeger] [--print-paths]
set -euo pipefail

OTELCOL_VERSION=0.161.0
JAEGER_VERSION=1.76.0    # Go module version of github.com/jaegertracing/jaeger ...
JAEGER_V2_VERSION=2.13.0 # ... and the Jaeger v2 release it is (docker image tag)

repo_root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cache_dir=${OTEL_SUBFLOW_CACHE_DIR:-$HOME/.cache/otel-subflow}
otelcol_dir=$cache_dir/otelcol-subflow-v$OTELCOL_VERSION
otelcol_bin=$otelcol_dir/otelcol-subflow
jaeger_dir=$cache_dir/jaeger-v$JAEGER_VERSION
jaeger_bin=$jaeger_dir/jaeger
manifest=$repo_root/collector/manifest.yaml

what=all
print_paths=0
for arg in "$@"; do
  case $arg in
    all | collector | jaeger) what=$arg ;;
    --print-paths) print_paths=1 ;;
    -h | --help)
      sed -n '2,12p' "${BASH_SOURCE[0]}"
      exit 0
      ;;
    *)
      echo "unknown argument: $arg" >&2
      exit 2
      ;;
  esac
done

if [[ $print_paths == 1 ]]; then
  echo "otelcol=$otelcol_bin"
  echo "jaeger=$jaeger_bin"
  exit 0
fi

command -v go >/dev/null || {
  echo "go is required (https://go.dev/dl/); found none on PATH" >&2
  exit 1
}

# -trimpath keeps local paths out of the binaries; -s -w strips symbols (smaller, faster link).
export GOFLAGS="${GOFLAGS:+$GOFLAGS }-trimpath -buildvcs=false"
export CGO_ENABLED=0

log() { printf '[build_binaries] %s\n' "$*" >&2; }

manifest_sum() { sha256sum "$manifest" | cut -d' ' -f1; }

build_collector() {
  local want
  want=$(manifest_sum)
  if [[ -x $otelcol_bin && -f $otelcol_bin.manifest.sha256 && $(cat "$otelcol_bin.manifest.sha256") == "$want" ]]; then
    log "collector: cached $otelcol_bin"
    return 0
  fi
  mkdir -p "$otelcol_dir"
  local work=$otelcol_dir/build
  rm -rf "$work"
  mkdir -p "$work"
  # ocb takes the output path from the manifest only: point a copy of it at the cache.
  sed -E "s|^(  output_path:).*|\1 $work/dist|" "$manifest" >"$work/manifest.yaml"
  log "collector: building otelcol-subflow v$OTELCOL_VERSION with ocb (cold: ~minutes on 2 cores)"
  local start=$SECONDS
  (cd "$work" && go run "go.opentelemetry.io/collector/cmd/builder@v$OTELCOL_VERSION" \
    --config "$work/manifest.yaml" --ldflags "-s -w")
  mv -f "$work/dist/otelcol-subflow" "$otelcol_bin.tmp"
  mv -f "$otelcol_bin.tmp" "$otelcol_bin"
  echo "$want" >"$otelcol_bin.manifest.sha256"
  rm -rf "$work"
  log "collector: built $otelcol_bin in $((SECONDS - start)) s"
}

build_jaeger() {
  if [[ -x $jaeger_bin ]]; then
    log "jaeger: cached $jaeger_bin"
    return 0
  fi
  mkdir -p "$jaeger_dir"
  local work=$jaeger_dir/build
  rm -rf "$work"
  mkdir -p "$work"
  log "jaeger: building jaeger v$JAEGER_VERSION (v2) through a wrapper module"
  local start=$SECONDS
  # `go install .../cmd/jaeger@v1.76.0` fails (the module has replace directives);
  # a wrapper module that depends on it as a tool builds it with its go.mod honoured
  # for everything but replaces. It stays apart from the collector's module, which
  # pins a newer collector than Jaeger does.
  (
    cd "$work"
    go mod init otel-subflow.local/jaeger-build >/dev/null 2>&1
    go get -tool "github.com/jaegertracing/jaeger/cmd/jaeger@v$JAEGER_VERSION"
    go build -ldflags "-s -w -X github.com/jaegertracing/jaeger/internal/version.latestVersion=v$JAEGER_V2_VERSION" \
      -o "$jaeger_bin.tmp" github.com/jaegertracing/jaeger/cmd/jaeger
  )
  mv -f "$jaeger_bin.tmp" "$jaeger_bin"
  rm -rf "$work"
  log "jaeger: built $jaeger_bin in $((SECONDS - start)) s"
}

mkdir -p "$cache_dir"
# One build at a time per cache: a second caller (make stack while the tests build)
# waits for the first instead of racing it.
exec 9>"$cache_dir/.build.lock"
flock 9

case $what in
  collector) build_collector ;;
  jaeger) build_jaeger ;;
  all)
    # One after the other: building both at once on 2 cores was slower
    # (8.5 min vs 5.5 min cold) and doubles peak memory.
    build_collector
    build_jaeger
    ;;
esac
