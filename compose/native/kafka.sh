#!/usr/bin/env bash
# Apache Kafka, single-node KRaft (broker and controller in one JVM), run from
# the jars on Maven Central. Usage: kafka.sh install|start|wait|stop|status|topics [args]
COMPONENT=kafka
source "$(dirname "$(readlink -f "${BASH_SOURCE[0]}")")/lib.sh"

# log4j-core comes in through kafka-server; the slf4j bridge must match it.
# Kafka itself declares slf4j-api 1.7, which cannot find an slf4j2 provider,
# so the 2.x API the bridge was built against is pinned too.
KAFKA_VERSION=4.4.0
LOG4J_VERSION=2.25.5
SLF4J_VERSION=2.0.17

KAFKA_CACHE="$CACHE_DIR/kafka"
LIBS="$KAFKA_CACHE/libs"
# Names the exact set of versions, so a version bump refetches on its own.
STAMP="$LIBS/.complete-$KAFKA_VERSION-$LOG4J_VERSION-$SLF4J_VERSION"
HOME_DIR="$STATE_DIR/kafka"
CONF_DIR="$HOME_DIR/config"
DATA_DIR="$HOME_DIR/data"
LOG_DIR="$HOME_DIR/logs"
BOOTSTRAP="127.0.0.1:$SLUICE_KAFKA_PORT"

write_pom() {
  mkdir -p "$KAFKA_CACHE"
  cat >"$KAFKA_CACHE/pom.xml" <<EOF
<project xmlns="http://maven.apache.org/POM/4.0.0">
  <modelVersion>4.0.0</modelVersion>
  <groupId>sluice.native</groupId>
  <artifactId>kafka-runtime</artifactId>
  <version>1</version>
  <packaging>pom</packaging>
  <dependencies>
    <dependency>
      <groupId>org.apache.kafka</groupId>
      <artifactId>kafka_2.13</artifactId>
      <version>$KAFKA_VERSION</version>
    </dependency>
    <!-- Only for TopicCommand (wait/status/topics). Its own dependencies
         drag in Kafka Connect with Jetty and Jersey; everything TopicCommand
         really uses is already on the broker's classpath. -->
    <dependency>
      <groupId>org.apache.kafka</groupId>
      <artifactId>kafka-tools</artifactId>
      <version>$KAFKA_VERSION</version>
      <exclusions>
        <exclusion><groupId>*</groupId><artifactId>*</artifactId></exclusion>
      </exclusions>
    </dependency>
    <dependency>
      <groupId>org.slf4j</groupId>
      <artifactId>slf4j-api</artifactId>
      <version>$SLF4J_VERSION</version>
    </dependency>
    <!-- Without an slf4j provider the broker logs nothing at all. -->
    <dependency>
      <groupId>org.apache.logging.log4j</groupId>
      <artifactId>log4j-slf4j2-impl</artifactId>
      <version>$LOG4J_VERSION</version>
    </dependency>
  </dependencies>
</project>
EOF
}

cmd_install() {
  if [[ -f $STAMP ]]; then
    log "Kafka $KAFKA_VERSION already in $LIBS"
    return 0
  fi
  log "fetching Kafka $KAFKA_VERSION jars from Maven Central"
  write_pom
  # Fetch into a scratch dir so an interrupted run never leaves a half set
  # of jars that looks complete (or old versions mixed with new ones).
  rm -rf "$LIBS.tmp"
  maven_fetch "$LIBS.tmp" "$KAFKA_CACHE/pom.xml"
  [[ -f $LIBS.tmp/kafka_2.13-$KAFKA_VERSION.jar ]] || die "maven did not deliver kafka_2.13-$KAFKA_VERSION.jar"
  # Maven silently settles a version clash, so catch a Kafka bump that moved
  # log4j-core without LOG4J_VERSION following it.
  [[ -f $LIBS.tmp/log4j-core-$LOG4J_VERSION.jar ]] \
    || die "Kafka $KAFKA_VERSION pulls in $(cd "$LIBS.tmp" && ls log4j-core-*.jar), not $LOG4J_VERSION: update LOG4J_VERSION (and SLF4J_VERSION) in $0"
  verify_download "$LIBS.tmp" kafka
  touch "$LIBS.tmp/$(basename "$STAMP")"
  rm -rf "$LIBS"
  mv "$LIBS.tmp" "$LIBS"
  log "installed $(find "$LIBS" -name '*.jar' | wc -l) jars into $LIBS"
}

write_config() {
  mkdir -p "$CONF_DIR" "$DATA_DIR" "$LOG_DIR"
  # Static voters rather than a dynamic quorum: the voter address then lives
  # only in this file, so changing the controller port later needs no reformat.
  cat >"$CONF_DIR/server.properties" <<EOF
process.roles=broker,controller
node.id=1
controller.quorum.voters=1@127.0.0.1:$SLUICE_KAFKA_CONTROLLER_PORT
listeners=PLAINTEXT://127.0.0.1:$SLUICE_KAFKA_PORT,CONTROLLER://127.0.0.1:$SLUICE_KAFKA_CONTROLLER_PORT
advertised.listeners=PLAINTEXT://127.0.0.1:$SLUICE_KAFKA_PORT
controller.listener.names=CONTROLLER
inter.broker.listener.name=PLAINTEXT
listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT
log.dirs=$DATA_DIR

# One broker: every internal topic must make do with one replica, or its
# creation fails (offsets, transactions, share-group state).
offsets.topic.replication.factor=1
transaction.state.log.replication.factor=1
transaction.state.log.min.isr=1
share.coordinator.state.topic.replication.factor=1
share.coordinator.state.topic.min.isr=1

# Tests start consumers right away; the 3 s default delays every first join.
group.initial.rebalance.delay.ms=0
num.partitions=3
# The platform creates its topics (with their own retention) explicitly; a
# typo must fail rather than silently create a topic.
auto.create.topics.enable=false
EOF

  cat >"$CONF_DIR/log4j2.xml" <<EOF
<?xml version="1.0" encoding="UTF-8"?>
<Configuration status="WARN">
  <Appenders>
    <RollingFile name="server" fileName="$LOG_DIR/server.log"
                 filePattern="$LOG_DIR/server.log.%i">
      <PatternLayout pattern="[%d] %p %m (%c)%n"/>
      <SizeBasedTriggeringPolicy size="50MB"/>
      <DefaultRolloverStrategy max="3"/>
    </RollingFile>
  </Appenders>
  <Loggers>
    <Root level="INFO"><AppenderRef ref="server"/></Root>
    <!-- Per-request and per-segment chatter that buries the useful lines. -->
    <Logger name="kafka.request.logger" level="WARN"/>
    <Logger name="org.apache.kafka.storage.internals.log" level="WARN"/>
    <Logger name="kafka.log.LogCleaner" level="WARN"/>
  </Loggers>
</Configuration>
EOF

  # The admin tools only need to say what went wrong, on stderr.
  cat >"$CONF_DIR/tools-log4j2.xml" <<'EOF'
<?xml version="1.0" encoding="UTF-8"?>
<Configuration status="WARN">
  <Appenders>
    <Console name="stderr" target="SYSTEM_ERR">
      <PatternLayout pattern="[%d] %p %m (%c)%n"/>
    </Console>
  </Appenders>
  <Loggers>
    <Root level="ERROR"><AppenderRef ref="stderr"/></Root>
  </Loggers>
</Configuration>
EOF

  # Short timeouts: the tool's default is to retry for a minute, far too long
  # for a probe that wait_until repeats every half second.
  cat >"$CONF_DIR/admin.properties" <<'EOF'
request.timeout.ms=5000
default.api.timeout.ms=8000
socket.connection.setup.timeout.ms=2000
socket.connection.setup.timeout.max.ms=2000
EOF
}

# A short-lived JVM for Kafka's command-line tools: small heap, C1 only.
tool_java() {
  "$JAVA" -Xmx256m -XX:+UseSerialGC -XX:TieredStopAtLevel=1 -Xshare:auto \
    -Dlog4j2.configurationFile="$CONF_DIR/tools-log4j2.xml" \
    -cp "$LIBS/*" "$@"
}

format_storage() {
  [[ -f $DATA_DIR/meta.properties ]] && return 0
  local id_file="$HOME_DIR/cluster.id" cluster_id
  if [[ ! -s $id_file ]]; then
    tool_java kafka.tools.StorageTool random-uuid >"$id_file.tmp"
    mv "$id_file.tmp" "$id_file"
  fi
  cluster_id="$(tr -d '[:space:]' <"$id_file")"
  log "formatting $DATA_DIR (cluster id $cluster_id)"
  tool_java kafka.tools.StorageTool format -t "$cluster_id" \
    -c "$CONF_DIR/server.properties" >>"$LOG_DIR/format.log" 2>&1 \
    || { tail -n 20 "$LOG_DIR/format.log" >&2; die "kafka-storage format failed"; }
}

# The same admin-client call serves wait, status and topics: a Metadata
# round trip to the broker, so "up" means it really serves clients.
# kafka_tool <class> [args]: one of Kafka's command-line tools, against the
# broker this stack runs.
kafka_tool() {
  local class=$1; shift
  timeout 40 "$JAVA" -Xmx256m -XX:+UseSerialGC -XX:TieredStopAtLevel=1 -Xshare:auto \
    -Dlog4j2.configurationFile="$CONF_DIR/tools-log4j2.xml" \
    -cp "$LIBS/*" "org.apache.kafka.tools.$class" \
    --bootstrap-server "$BOOTSTRAP" --command-config "$CONF_DIR/admin.properties" "$@"
}

topic_command() { kafka_tool TopicCommand "$@"; }

answers() {
  port_open "$SLUICE_KAFKA_PORT" && topic_command --list >/dev/null 2>&1
}

cmd_start() {
  [[ -f $STAMP ]] || die "Kafka is not installed; run: $0 install"
  if is_running kafka; then
    log "already running (pid $(tracked_pid kafka))"
    return 0
  fi
  refuse_taken "$SLUICE_KAFKA_PORT" "$SLUICE_KAFKA_CONTROLLER_PORT"
  verify_download "$LIBS" kafka
  write_config
  format_storage
  log "starting Kafka $KAFKA_VERSION on $BOOTSTRAP (controller 127.0.0.1:$SLUICE_KAFKA_CONTROLLER_PORT)"
  # GC settings are those of Kafka's own start scripts; each pause is logged
  # (wall-clock time) so a slow command of `sluice bench` can be lined up.
  start_bg kafka "$LOG_DIR/kafka.out" \
    "$JAVA" -Xms512m -Xmx1g \
    -XX:+UseG1GC -XX:MaxGCPauseMillis=20 -XX:InitiatingHeapOccupancyPercent=35 \
    -XX:+ExplicitGCInvokesConcurrent -XX:+ExitOnOutOfMemoryError \
    -Xlog:gc:file="$LOG_DIR/gc.log":time,uptime:filecount=3,filesize=10m \
    -Djava.awt.headless=true \
    -Dkafka.logs.dir="$LOG_DIR" \
    -Dlog4j2.configurationFile="$CONF_DIR/log4j2.xml" \
    -cp "$LIBS/*" kafka.Kafka "$CONF_DIR/server.properties"
}

cmd_wait() {
  local died=0
  probe() {
    if ! is_running kafka; then died=1; return 0; fi
    answers
  }
  log "waiting for Kafka to serve metadata on $BOOTSTRAP"
  if wait_until 180 "Kafka metadata on $BOOTSTRAP" probe && ((died == 0)); then
    log "Kafka is up on $BOOTSTRAP"
    return 0
  fi
  ((died)) && log "the Kafka process is not running"
  for f in "$LOG_DIR/kafka.out" "$LOG_DIR/server.log"; do
    [[ -f $f ]] || continue
    log "last lines of $f:"
    tail -n 20 "$f" >&2
  done
  die "Kafka did not come up"
}

cmd_stop() {
  if is_running kafka; then
    log "stopping Kafka"
    # A clean shutdown flushes and closes logs; give it time before SIGKILL.
    stop_bg kafka 60
  else
    stop_bg kafka 0
  fi
}

cmd_status() {
  if ! is_running kafka; then
    echo "kafka: down (not running)"
    return 1
  fi
  local pid; pid="$(tracked_pid kafka)"
  if answers; then
    echo "kafka: up (pid $pid, $BOOTSTRAP, Kafka $KAFKA_VERSION)"
  else
    echo "kafka: down (pid $pid running, but $BOOTSTRAP does not serve metadata)"
    return 1
  fi
}

# topics [TopicCommand args]: lists topics by default; any other arguments go
# to TopicCommand as they are (e.g. --describe --topic NAME).
cmd_topics() {
  [[ -f $STAMP ]] || die "Kafka is not installed; run: $0 install"
  [[ -f $CONF_DIR/admin.properties ]] || write_config
  if (($# == 0)); then set -- --list; fi
  topic_command "$@"
}

# transactions [TransactionsCommand args]: Kafka's transaction tool: `list`,
# `find-hanging --broker-id 1` (a transaction whose coordinator has forgotten
# it holds read_committed consumers of its partition back for good),
# `describe-producers --topic T --partition P`, and `abort --topic T
# --partition P --start-offset O` to end a hanging one.
cmd_transactions() {
  [[ -f $STAMP ]] || die "Kafka is not installed; run: $0 install"
  [[ -f $CONF_DIR/admin.properties ]] || write_config
  if (($# == 0)); then set -- list; fi
  kafka_tool TransactionsCommand "$@"
}

case "${1:-}" in
  install) cmd_install ;;
  start) cmd_start ;;
  wait) cmd_wait ;;
  stop) cmd_stop ;;
  status) cmd_status ;;
  topics) shift; cmd_topics "$@" ;;
  transactions) shift; cmd_transactions "$@" ;;
  *) echo "usage: $0 install|start|wait|stop|status|topics [TopicCommand args]|transactions [TransactionsCommand args]" >&2; exit 2 ;;
esac
