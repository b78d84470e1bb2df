# Shared helpers for the native stack scripts. Sourced, never run.
#
# Every server runs as a plain process on loopback. State, data and logs live
# under $SLUICE_STATE_DIR (git-ignored); downloads are cached under
# $SLUICE_CACHE_DIR so a second `up` on the same machine fetches nothing.

set -euo pipefail

NATIVE_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT_DIR="$(cd "$NATIVE_DIR/../.." && pwd)"
STATE_DIR="${SLUICE_STATE_DIR:-$ROOT_DIR/.state}"
CACHE_DIR="${SLUICE_CACHE_DIR:-$HOME/.cache/sluice}"

# Ports: the same names as compose/docker-compose.yml and the sluice config.
: "${SLUICE_RABBITMQ_PORT:=5672}"
: "${SLUICE_RABBITMQ_MGMT_PORT:=15672}"
: "${SLUICE_KAFKA_PORT:=9092}"
: "${SLUICE_KAFKA_CONTROLLER_PORT:=9093}"
: "${SLUICE_REGISTRY_PORT:=8081}"
: "${SLUICE_REGISTRY_MGMT_PORT:=9001}"
: "${SLUICE_CQL_PORT:=9042}"
: "${SLUICE_CASSANDRA_STORAGE_PORT:=7000}"
: "${SLUICE_CASSANDRA_JMX_PORT:=7199}"

# Java servers use JDK 17 (Cassandra 5 fails on newer JDKs).
JAVA17_HOME="${JAVA17_HOME:-/usr/lib/jvm/java-17-openjdk-amd64}"
JAVA="$JAVA17_HOME/bin/java"

mkdir -p "$STATE_DIR" "$CACHE_DIR"

log() { printf '[%s] %s\n' "${COMPONENT:-stack}" "$*" >&2; }
die() { log "error: $*"; exit 1; }

# wait_until <seconds> <description> <command...>: polls the command every
# half second until it succeeds; fails with the description after the deadline.
wait_until() {
  local timeout=$1 what=$2; shift 2
  local deadline=$((SECONDS + timeout))
  until "$@" >/dev/null 2>&1; do
    if ((SECONDS >= deadline)); then
      log "gave up after ${timeout}s waiting for $what"
      return 1
    fi
    sleep 0.5
  done
}

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

# Background processes are tracked by pid files under $STATE_DIR/run.
pidfile() { echo "$STATE_DIR/run/$1.pid"; }

is_running() {
  local f; f="$(pidfile "$1")"
  [[ -f $f ]] && kill -0 "$(cat "$f")" 2>/dev/null
}

# start_bg <name> <logfile> <command...>: starts a detached process (own
# session, so `down` can stop its whole group) and records its pid.
start_bg() {
  local name=$1 logfile=$2; shift 2
  mkdir -p "$STATE_DIR/run" "$(dirname "$logfile")"
  setsid "$@" >>"$logfile" 2>&1 < /dev/null &
  echo $! >"$(pidfile "$name")"
}

# stop_bg <name> [seconds]: SIGTERM, wait, then SIGKILL.
stop_bg() {
  local name=$1 grace=${2:-30} f pid
  f="$(pidfile "$name")"
  [[ -f $f ]] || return 0
  pid="$(cat "$f")"
  if kill -0 "$pid" 2>/dev/null; then
    kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid" 2>/dev/null || true
    local deadline=$((SECONDS + grace))
    while kill -0 "$pid" 2>/dev/null && ((SECONDS < deadline)); do sleep 0.5; done
    kill -KILL -- "-$pid" 2>/dev/null || kill -KILL "$pid" 2>/dev/null || true
  fi
  rm -f "$f"
}

# maven_fetch <dest-dir> <pom-file>: copies the runtime dependencies declared
# by a throwaway pom into dest-dir (once; Maven's own cache makes reruns cheap).
maven_fetch() {
  local dest=$1 pom=$2
  mvn -q -B -f "$pom" dependency:copy-dependencies \
    -DincludeScope=runtime -DoutputDirectory="$dest" >&2
}
