#!/usr/bin/env bash
# Apache Cassandra 5.0 as a single local node: the CQL store (stand-in for
# ScyllaDB). Jars come from Maven Central; the daemon runs on JDK 17.
#
#   cassandra.sh install | start | wait | stop | status
#   cassandra.sh cql "<statement>" ["<statement>" ...]
#   cassandra.sh nodetool <args>          (e.g. status, tablestats ks)
#
# `cql` is a tiny CQL (protocol v4) client written in bash, because cqlsh is
# Python with pip dependencies; it runs the statements in order on one
# connection and prints rows as text (simple types decoded, others as hex).
COMPONENT=cassandra
SELF="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/$(basename "${BASH_SOURCE[0]}")"
source "$(dirname "$SELF")/lib.sh"

CASSANDRA_VERSION="${SLUICE_CASSANDRA_VERSION:-5.0.9}"
# At 512m the old generation filled under `sluice bench` load (memtables and
# the metrics of every table the tests create live on the heap) and each
# fill cost a full collection of 200-270 ms, every request stalled: 1536m
# with memtables off the heap has room for both.
CASSANDRA_HEAP="${SLUICE_CASSANDRA_HEAP:-1536m}"

HOME_DIR="$CACHE_DIR/cassandra"
LIBS="$HOME_DIR/libs"
RUN_DIR="$STATE_DIR/cassandra"
CONF_DIR="$RUN_DIR/conf"
LOG_DIR="$RUN_DIR/logs"
DATA_DIR="$RUN_DIR/data"

# ---------------------------------------------------------------- install --

install() {
  if [[ -f $LIBS/.complete && $(cat "$LIBS/.complete") == "$CASSANDRA_VERSION" ]]; then
    log "cassandra $CASSANDRA_VERSION already installed"
    return 0
  fi
  command -v mvn >/dev/null || die "mvn not found (apt-get install maven)"
  [[ -x $JAVA ]] || die "JDK 17 not found at $JAVA17_HOME"
  log "fetching cassandra-all $CASSANDRA_VERSION and its dependencies (first run: a few minutes)"
  mkdir -p "$HOME_DIR"
  # cassandra-all already depends on logback-classic, so logging needs no extra
  # artifact; the list of jars is whatever its pom declares for runtime.
  cat >"$HOME_DIR/pom.xml" <<EOF
<project xmlns="http://maven.apache.org/POM/4.0.0">
  <modelVersion>4.0.0</modelVersion>
  <groupId>local.sluice</groupId>
  <artifactId>cassandra-runtime</artifactId>
  <version>1</version>
  <packaging>pom</packaging>
  <dependencies>
    <dependency>
      <groupId>org.apache.cassandra</groupId>
      <artifactId>cassandra-all</artifactId>
      <version>$CASSANDRA_VERSION</version>
    </dependency>
  </dependencies>
</project>
EOF
  rm -rf "$LIBS"
  maven_fetch "$LIBS" "$HOME_DIR/pom.xml"
  [[ -f $LIBS/cassandra-all-$CASSANDRA_VERSION.jar ]] || die "cassandra-all jar missing after fetch"
  ls "$LIBS"/logback-classic-*.jar >/dev/null 2>&1 || die "logback-classic missing after fetch"
  verify_download "$LIBS" cassandra
  echo "$CASSANDRA_VERSION" >"$LIBS/.complete"
  log "installed $(ls "$LIBS"/*.jar | wc -l) jars into $LIBS"
}

# ----------------------------------------------------------------- config --

write_config() {
  mkdir -p "$CONF_DIR" "$LOG_DIR" "$DATA_DIR" "$RUN_DIR/triggers"
  # Unknown keys are fatal, so only keys Cassandra 5.0 knows. Directories come
  # from -Dcassandra.storagedir (data/, commitlog/, hints/, saved_caches/...).
  cat >"$CONF_DIR/cassandra.yaml" <<EOF
cluster_name: sluice
num_tokens: 16
partitioner: org.apache.cassandra.dht.Murmur3Partitioner
endpoint_snitch: SimpleSnitch
seed_provider:
  - class_name: org.apache.cassandra.locator.SimpleSeedProvider
    parameters:
      - seeds: "127.0.0.1:$SLUICE_CASSANDRA_STORAGE_PORT"
listen_address: 127.0.0.1
rpc_address: 127.0.0.1
storage_port: $SLUICE_CASSANDRA_STORAGE_PORT
native_transport_port: $SLUICE_CQL_PORT
start_native_transport: true

commitlog_sync: periodic
commitlog_sync_period: 10000ms
commitlog_segment_size: 8MiB
# Cells of memtables off the JVM heap: less for the collector to copy.
memtable_allocation_type: offheap_objects
# Trie memtables (Cassandra 5.0) keep a memtable's rows in a few large
# buffers instead of a skip list of small objects, each of which a young
# collection copies while the memtable lives.
memtable:
  configurations:
    skiplist:
      class_name: SkipListMemtable
    trie:
      class_name: TrieMemtable
    default:
      inherits: trie

# One node on a shared 2-core box: few threads, no hints to replay.
concurrent_reads: 4
concurrent_writes: 4
concurrent_counter_writes: 2
concurrent_materialized_view_writes: 1
concurrent_compactors: 1
native_transport_max_threads: 32
hinted_handoff_enabled: false

# Tests drop and truncate a lot; snapshots would make that slow and fill disk.
auto_snapshot: false
snapshot_before_compaction: false

# Read models write unlogged batches of up to 32 rows of partitions on the
# same replicas (one request, no fan-out), a few KiB above the default warning.
batch_size_warn_threshold: 32KiB
unlogged_batch_across_partitions_warn_threshold: 64

materialized_views_enabled: false
sasi_indexes_enabled: false
user_defined_functions_enabled: false
authenticator: AllowAllAuthenticator
authorizer: AllowAllAuthorizer
EOF
  # INFO goes to a rolling file; the console (start_bg's log) only gets WARN+,
  # so the default DEBUG flood to stdout never happens.
  cat >"$CONF_DIR/logback.xml" <<EOF
<configuration scan="false">
  <appender name="FILE" class="ch.qos.logback.core.rolling.RollingFileAppender">
    <file>$LOG_DIR/system.log</file>
    <rollingPolicy class="ch.qos.logback.core.rolling.FixedWindowRollingPolicy">
      <fileNamePattern>$LOG_DIR/system.log.%i</fileNamePattern>
      <minIndex>1</minIndex>
      <maxIndex>3</maxIndex>
    </rollingPolicy>
    <triggeringPolicy class="ch.qos.logback.core.rolling.SizeBasedTriggeringPolicy">
      <maxFileSize>20MB</maxFileSize>
    </triggeringPolicy>
    <encoder>
      <pattern>%-5level [%thread] %date{ISO8601} %F:%L - %msg%n</pattern>
    </encoder>
  </appender>
  <appender name="CONSOLE" class="ch.qos.logback.core.ConsoleAppender">
    <filter class="ch.qos.logback.classic.filter.ThresholdFilter">
      <level>WARN</level>
    </filter>
    <encoder>
      <pattern>%-5level [%thread] %date{ISO8601} %F:%L - %msg%n</pattern>
    </encoder>
  </appender>
  <root level="INFO">
    <appender-ref ref="FILE"/>
    <appender-ref ref="CONSOLE"/>
  </root>
</configuration>
EOF
}

# Tools (nodetool) log DEBUG to stdout by default; keep only warnings.
write_tools_logback() {
  mkdir -p "$CONF_DIR"
  cat >"$CONF_DIR/logback-tools.xml" <<EOF
<configuration scan="false">
  <appender name="STDERR" class="ch.qos.logback.core.ConsoleAppender">
    <target>System.err</target>
    <encoder><pattern>%-5level %msg%n</pattern></encoder>
  </appender>
  <root level="WARN"><appender-ref ref="STDERR"/></root>
</configuration>
EOF
}

# Facts from Cassandra's conf/jvm17-server.options: on JDK 17 the daemon reaches
# into JDK internals (Unsafe, direct buffers, file channels, RMI/JMX, attach),
# and without these it dies at startup with IllegalAccessError/InaccessibleObject.
jvm17_module_flags() {
  local e o
  for e in java.base/jdk.internal.misc java.base/jdk.internal.ref java.base/sun.nio.ch \
    java.base/java.lang.ref java.management.rmi/com.sun.jmx.remote.internal.rmi \
    java.rmi/sun.rmi.registry java.rmi/sun.rmi.server java.sql/java.sql \
    jdk.unsupported/sun.misc jdk.attach/sun.tools.attach; do
    printf -- '--add-exports=%s=ALL-UNNAMED\n' "$e"
  done
  for o in java.base/java.lang java.base/java.lang.module java.base/java.lang.reflect \
    java.base/java.io java.base/java.nio java.base/java.util java.base/java.util.concurrent \
    java.base/java.util.concurrent.atomic java.base/sun.nio.ch java.base/jdk.internal.loader \
    java.base/jdk.internal.ref java.base/jdk.internal.reflect java.base/jdk.internal.math \
    java.base/jdk.internal.module java.base/jdk.internal.util.jar \
    jdk.management/com.sun.management.internal; do
    printf -- '--add-opens=%s=ALL-UNNAMED\n' "$o"
  done
}

# ------------------------------------------------------------- CQL client --
# Frames are built and parsed as hex strings (bash variables cannot hold NUL).

_hex() { od -An -v -tx1 | tr -d ' \n'; }                     # stdin -> hex
_unhex() { [[ -z $1 ]] || printf "$(sed 's/../\\x&/g' <<<"$1")"; } # hex -> stdout
_str_hex() { printf '%04x' "$(printf %s "$1" | wc -c)"; printf %s "$1" | _hex; }
_lstr_hex() { printf '%08x' "$(printf %s "$1" | wc -c)"; printf %s "$1" | _hex; }

_stream=0
# _cql_call <opcode-hex> <body-hex>: sends one v4 frame on fd 3; sets
# _op (response opcode, hex) and _body (response body, hex).
_cql_call() {
  local op=$1 body=$2 head len
  _stream=$((_stream + 1))
  _unhex "0400$(printf '%04x' $_stream)${op}$(printf '%08x' $((${#body} / 2)))$body" >&3
  head="$(head -c 9 <&3 | _hex)"
  [[ ${#head} -eq 18 ]] || { echo "cql: connection closed" >&2; return 1; }
  _op=${head:8:2}
  len=$((16#${head:10:8}))
  _body=""
  ((len == 0)) || _body="$(head -c "$len" <&3 | _hex)"
  [[ ${#_body} -eq $((len * 2)) ]] || { echo "cql: short frame" >&2; return 1; }
  # Flag 0x08: the body starts with server warnings (e.g. unbounded aggregates).
  if ((16#${head:2:2} & 8)); then
    local n i
    _p=0; _rd_short; n=$_v
    for ((i = 0; i < n; i++)); do _rd_string; echo "warning: $_v" >&2; done
    _body=${_body:_p}
  fi
}

# Cursor-based readers over $_body; _p is a position in hex digits.
_rd_int() { _v=$((16#${_body:_p:8})); ((_v < 2147483648)) || _v=$((_v - 4294967296)); _p=$((_p + 8)); }
_rd_short() { _v=$((16#${_body:_p:4})); _p=$((_p + 4)); }
_rd_string() { local n; _rd_short; n=$_v; _v="$(_unhex "${_body:_p:n*2}")"; _p=$((_p + n * 2)); }
# _rd_type: reads a type option; sets _t to its id (nested parts are skipped).
_rd_type() {
  local id n i
  _rd_short; id=$_v
  case $id in
    0) _rd_string ;;
    32 | 34) _rd_type ;;
    33) _rd_type; _rd_type ;;
    48) _rd_string; _rd_string; _rd_short; n=$_v
        for ((i = 0; i < n; i++)); do _rd_string; _rd_type; done ;;
    49) _rd_short; n=$_v; for ((i = 0; i < n; i++)); do _rd_type; done ;;
  esac
  _t=$id
}

_fmt_value() { # <type-id> <hex>
  local t=$1 h=$2 v
  case $t in
    1 | 13) _unhex "$h" ;;
    2 | 5 | 9 | 19 | 20 | 11)
      v=$((16#$h)); local bits=$((${#h} * 4))
      ((bits >= 64 || v < (1 << (bits - 1)))) || v=$((v - (1 << bits)))
      printf '%s' "$v" ;;
    4) [[ $h == 00 ]] && printf false || printf true ;;
    12 | 15) printf '%s-%s-%s-%s-%s' "${h:0:8}" "${h:8:4}" "${h:12:4}" "${h:16:4}" "${h:20:12}" ;;
    *) printf '0x%s' "$h" ;;
  esac
}

_print_result() {
  local kind flags ncols nrows i j n names=() types=() line
  _p=0; _rd_int; kind=$_v
  case $kind in
    1) echo "ok" ;;
    3) _rd_string; echo "ok (keyspace $_v)" ;;
    5) _rd_string; echo "ok (schema $_v)" ;;
    2)
      _rd_int; flags=$_v; _rd_int; ncols=$_v
      if ((flags & 2)); then _rd_int; _p=$((_p + (_v > 0 ? _v : 0) * 2)); fi
      if ((flags & 1)); then _rd_string; _rd_string; fi
      for ((i = 0; i < ncols; i++)); do
        ((flags & 1)) || { _rd_string; _rd_string; }
        _rd_string; names+=("$_v"); _rd_type; types+=("$_t")
      done
      (IFS='|'; echo "${names[*]}")
      _rd_int; nrows=$_v
      for ((i = 0; i < nrows; i++)); do
        line=""
        for ((j = 0; j < ncols; j++)); do
          _rd_int; n=$_v
          ((j == 0)) || line+="|"
          if ((n < 0)); then line+="null"; else
            line+="$(_fmt_value "${types[j]}" "${_body:_p:n*2}")"; _p=$((_p + n * 2))
          fi
        done
        printf '%s\n' "$line"
      done
      echo "($nrows rows)" ;;
    *) echo "ok (result kind $kind)" ;;
  esac
}

# cql_session <statement...>: one connection, STARTUP then each statement at
# consistency ONE. Exits 2 on a server error, 1 on a transport problem.
cql_session() {
  exec 3<>"/dev/tcp/127.0.0.1/$SLUICE_CQL_PORT" || { echo "cql: cannot connect to port $SLUICE_CQL_PORT" >&2; return 1; }
  _cql_call 01 "0001$(_str_hex CQL_VERSION)$(_str_hex 3.0.0)" || return 1
  [[ $_op == 02 ]] || { echo "cql: STARTUP answered with opcode 0x$_op" >&2; return 1; }
  local stmt
  for stmt in "$@"; do
    _cql_call 07 "$(_lstr_hex "$stmt")000100" || return 1
    case $_op in
      08) _print_result ;;
      00) _p=0; _rd_int; local code=$_v; _rd_string
          printf 'cql error 0x%04x: %s\n' "$code" "$_v" >&2; return 2 ;;
      *) echo "cql: unexpected opcode 0x$_op" >&2; return 1 ;;
    esac
  done
  exec 3>&-
}

# The readiness check: a real query answered through the native protocol.
cql_ready() {
  local out
  out="$(timeout 15 "$SELF" __cql "SELECT release_version FROM system.local" 2>/dev/null)" || return 1
  [[ $out == *$'\n'5.* ]]
}

# ---------------------------------------------------------------- control --

# From /proc rather than ps: procps is not on every minimal Debian.
rss_mib() {
  local kb
  kb="$(awk '/^VmRSS:/ {print $2}' "/proc/$(tracked_pid cassandra)/status" 2>/dev/null)" || true
  echo "$((${kb:-0} / 1024))"
}

start() {
  [[ -f $LIBS/.complete ]] || die "not installed: run '$0 install' first"
  if is_running cassandra; then
    log "already running (pid $(tracked_pid cassandra))"
    return 0
  fi
  refuse_taken "$SLUICE_CQL_PORT" "$SLUICE_CASSANDRA_STORAGE_PORT" "$SLUICE_CASSANDRA_JMX_PORT"
  verify_download "$LIBS" cassandra
  write_config
  local opts=(
    -Xms"$CASSANDRA_HEAP" -Xmx"$CASSANDRA_HEAP" -Xss256k
    # A pause stalls every request: aim for short ones (Kafka's own scripts
    # aim for 20 ms), and log each one so a slow step can be checked.
    -XX:+UseG1GC -XX:MaxGCPauseMillis=50 -XX:+ParallelRefProcEnabled
    # A marking cycle only once the old generation is 45 % of the heap. The
    # adaptive threshold counts the young generation (~900 MB of 1536 here)
    # as room marking needs, started a cycle at ~13 % (a live set of ~230 MB)
    # every 10-20 s under load, and each took ~0.8 s of a core plus a remark
    # and mixed pauses: the slowest commands of `sluice bench` latency runs
    # fell on them. Fixed, the old generation grows ~1 MB/s under load.
    -XX:-G1UseAdaptiveIHOP -XX:InitiatingHeapOccupancyPercent=45
    -Xlog:gc:file="$LOG_DIR/gc.log":time,uptime:filecount=3,filesize=10m
    -XX:+ExitOnOutOfMemoryError
    -XX:+PerfDisableSharedMem -XX:-OmitStackTraceInFastThrow
    -Djdk.attach.allowAttachSelf=true
    $(jvm17_module_flags)
    -Dio.netty.tryReflectionSetAccessible=true
    -Djava.net.preferIPv4Stack=true
    -Dcassandra.config="file://$CONF_DIR/cassandra.yaml"
    -Dcassandra-foreground=yes
    -Dcassandra.storagedir="$DATA_DIR"
    -Dcassandra.logdir="$LOG_DIR"
    -Dcassandra.triggers_dir="$RUN_DIR/triggers"
    -Dcassandra.skip_wait_for_gossip_to_settle=0
    # Each time a worker of the shared request pool moves to another stage
    # it renames its thread (a system call): ~1.7 % of Cassandra's CPU in
    # the same profile as the timer slack below. Thread dumps say less.
    -Dcassandra.set_sep_thread_name=false
    -Dlogback.configurationFile="$CONF_DIR/logback.xml"
    # Local JMX (loopback only, no auth) so NodeTool from the same jars works;
    # pinning the RMI port avoids a second, random listening port.
    -Dcassandra.jmx.local.port="$SLUICE_CASSANDRA_JMX_PORT"
    -Dcom.sun.management.jmxremote.rmi.port="$SLUICE_CASSANDRA_JMX_PORT"
    -Djava.rmi.server.hostname=127.0.0.1
    -cp "$LIBS/*"
    org.apache.cassandra.service.CassandraDaemon
  )
  log "starting cassandra $CASSANDRA_VERSION (CQL 127.0.0.1:$SLUICE_CQL_PORT, heap $CASSANDRA_HEAP)"
  # A worker of Cassandra's shared request pool that runs out of work parks
  # for 10 µs to 1 ms at a time, over and over, until ~10 ms pass without a
  # request: under a steady few hundred commands a second one always spins,
  # waking every ~60 µs, and that was ~40 % of Cassandra's CPU in a profile
  # of `sluice bench`'s latency step. A timer slack of 0.5 ms lets the kernel
  # stretch each park to about 0.5 ms: a request may wait up to that much
  # longer for a worker, and the spinning took ~17 % instead. The JVM's
  # threads inherit the slack from this shell.
  { echo 500000 >"/proc/$BASHPID/timerslack_ns"; } 2>/dev/null || log "no timer slack (this kernel has no /proc/<pid>/timerslack_ns)"
  start_bg cassandra "$LOG_DIR/console.log" "$JAVA" "${opts[@]}"
}

wait_ready() {
  # Also returns early when the process has died, to fail fast below.
  _ready_or_dead() { ! is_running cassandra || cql_ready; }
  if ! wait_until 240 "cassandra CQL on 127.0.0.1:$SLUICE_CQL_PORT" _ready_or_dead \
     || ! is_running cassandra; then
    log "cassandra is not answering CQL; last lines of its logs:"
    tail -n 20 "$LOG_DIR/console.log" >&2 2>/dev/null || true
    tail -n 20 "$LOG_DIR/system.log" >&2 2>/dev/null || true
    die "cassandra did not become ready"
  fi
  log "ready (CQL 127.0.0.1:$SLUICE_CQL_PORT, RSS $(rss_mib) MiB)"
}

stop() {
  # Draining on SIGTERM flushes memtables; give it time before SIGKILL.
  if is_running cassandra; then log "stopping"; fi
  stop_bg cassandra 60
  # The launcher can exit before the JVM has released its ports; stopped
  # means they are free, or a start right after finds them taken.
  local port deadline=$((SECONDS + 30))
  for port in "$SLUICE_CQL_PORT" "$SLUICE_CASSANDRA_STORAGE_PORT" "$SLUICE_CASSANDRA_JMX_PORT"; do
    while port_open "$port" && ((SECONDS < deadline)); do sleep 0.2; done
  done
}

status() {
  if ! is_running cassandra; then
    echo "cassandra: down (not running)"
    return 1
  fi
  local pid; pid="$(tracked_pid cassandra)"
  if cql_ready; then
    echo "cassandra: up (pid $pid, CQL 127.0.0.1:$SLUICE_CQL_PORT, RSS $(rss_mib) MiB)"
  else
    echo "cassandra: down (pid $pid running but CQL not answering yet)"
    return 1
  fi
}

# nodetool <args...>: Cassandra's admin tool over the local JMX port. user.home
# points into the state dir because it writes a history file there.
nodetool() {
  [[ -f $LIBS/.complete ]] || die "not installed: run '$0 install' first"
  write_tools_logback
  "$JAVA" -Xmx128m $(jvm17_module_flags) -Duser.home="$RUN_DIR" \
    -Dlogback.configurationFile="$CONF_DIR/logback-tools.xml" -cp "$LIBS/*" \
    org.apache.cassandra.tools.NodeTool -h 127.0.0.1 -p "$SLUICE_CASSANDRA_JMX_PORT" "$@"
}

case "${1:-}" in
  install) install ;;
  start) start ;;
  wait) wait_ready ;;
  stop) stop ;;
  status) status ;;
  cql) shift; (($#)) || die "usage: $0 cql \"<statement>\" ..."; timeout 60 "$SELF" __cql "$@" ;;
  __cql) shift; cql_session "$@" ;;
  nodetool) shift; nodetool "$@" ;;
  *) echo "usage: $0 {install|start|wait|stop|status|cql \"<statement>\"...|nodetool <args>}" >&2; exit 2 ;;
esac
