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

# refuse_taken <port>...: before a server starts, each of its ports must be
# free. A server this stack did not start (e.g. the RabbitMQ that Debian's
# package runs on 5672) is reported with its pid, never adopted as ours.
refuse_taken() {
  local port who
  for port in "$@"; do
    port_open "$port" || continue
    who="$(ss -ltnpH "sport = :$port" 2>/dev/null |
      sed -n 's/.*users:(("\([^"]*\)",pid=\([0-9]*\).*/\1 (pid \2)/p' | head -n 1)"
    die "port $port is taken by ${who:-a process this user cannot see}, which this stack did not start: stop it, or move this server with its SLUICE_*_PORT variable"
  done
}

# Background processes are tracked by pid files under $STATE_DIR/run: the pid
# and the process's start time, so a pid the kernel has since given to another
# process (after a reboot, or a crash that left the file) is never taken for
# ours, and never signalled.
pidfile() { echo "$STATE_DIR/run/$1.pid"; }

# start_time <pid>: when the process started (field 22 of /proc/<pid>/stat, in
# clock ticks since boot); fails if there is no such process, or only its
# zombie (exited, not yet reaped).
start_time() {
  local stat rest
  stat="$(cat "/proc/$1/stat" 2>/dev/null)" || return 1
  rest="${stat##*) }" # the command name may hold spaces and parentheses
  # shellcheck disable=SC2086
  set -- $rest
  [[ $1 != Z ]] || return 1
  echo "${20}"
}

# track_pid <name> <pid>: records <pid> as our process <name>.
track_pid() {
  local started
  started="$(start_time "$2")" || return 1
  mkdir -p "$STATE_DIR/run"
  echo "$2 $started" >"$(pidfile "$1")"
}

# tracked_pid <name>: the pid of our process <name>, if that very process is
# still alive (same pid and start time as recorded).
tracked_pid() {
  local f pid started
  f="$(pidfile "$1")"
  [[ -f $f ]] || return 1
  read -r pid started <"$f" || true
  [[ -n ${pid:-} && -n ${started:-} && "$(start_time "$pid" 2>/dev/null)" == "$started" ]] || return 1
  echo "$pid"
}

is_running() { tracked_pid "$1" >/dev/null; }

# start_bg <name> <logfile> <command...>: starts a detached process (own
# session, so `down` can stop its whole group) and records it.
start_bg() {
  local name=$1 logfile=$2; shift 2
  mkdir -p "$STATE_DIR/run" "$(dirname "$logfile")"
  setsid "$@" >>"$logfile" 2>&1 < /dev/null &
  track_pid "$name" $!
}

# stop_bg <name> [seconds]: SIGTERM, wait, then SIGKILL; only the process the
# pid file recorded (a stale file is removed, its pid left alone).
stop_bg() {
  local name=$1 grace=${2:-30} f pid
  f="$(pidfile "$name")"
  [[ -f $f ]] || return 0
  if pid="$(tracked_pid "$name")"; then
    kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid" 2>/dev/null || true
    local deadline=$((SECONDS + grace))
    while is_running "$name" && ((SECONDS < deadline)); do sleep 0.5; done
    if is_running "$name"; then
      kill -KILL -- "-$pid" 2>/dev/null || kill -KILL "$pid" 2>/dev/null || true
    fi
  else
    log "$f names no process of ours (stale): left alone"
  fi
  rm -f "$f"
}

# maven_fetch <dest-dir> <pom-file>: copies the runtime dependencies declared
# by a throwaway pom into dest-dir (once; Maven's own cache makes reruns cheap).
# --strict-checksums: a file that does not match the repository's checksum
# fails the fetch (by default Maven only warns, and -q hides the warning).
maven_fetch() {
  local dest=$1 pom=$2
  mvn -q -B -Dstyle.color=never --strict-checksums -f "$pom" dependency:copy-dependencies \
    -DincludeScope=runtime -DoutputDirectory="$dest" >&2
}

# verify_download <dir> <server>: every file that compose/native/checksums/
# <server>.sha256 pins is in <dir> with that SHA-256, and <dir> holds no jar
# or archive the list does not name (anything there would run as root). The
# repository's own checksum only says the file arrived as the repository
# has it; the pinned list says it is the file this stack was written for.
# After a version bump, check the new files against Maven Central's published
# checksums and pin them: (cd <dir> && sha256sum *.jar) > checksums/<server>.sha256
verify_download() {
  local dir=$1 list="$NATIVE_DIR/checksums/$2.sha256" unpinned
  [[ -f $list ]] || die "no pinned checksums for $2 ($list)"
  (cd "$dir" && sha256sum --quiet --strict -c "$list" >&2) ||
    die "a file in $dir does not match the SHA-256 pinned in $list: not run"
  unpinned="$(cd "$dir" && comm -13 <(awk '{print $2}' "$list" | sort) \
    <(find . -maxdepth 1 -type f \( -name '*.jar' -o -name '*.tar.gz' \) -printf '%f\n' | sort))"
  [[ -z $unpinned ]] || die "$dir holds files $list does not pin, which would run: $unpinned"
}
