#!/usr/bin/env bash
# RabbitMQ from Debian's rabbitmq-server package (3.10), run as a plain
# detached node without systemd. Its own node name, ports and folders keep it
# apart from a system-wide RabbitMQ the package may have set up.
COMPONENT=rabbitmq
source "$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/lib.sh"

HOME_DIR="$STATE_DIR/rabbitmq"
export RABBITMQ_NODENAME="${SLUICE_RABBITMQ_NODENAME:-sluice@localhost}"
export RABBITMQ_NODE_IP_ADDRESS=127.0.0.1
export RABBITMQ_NODE_PORT="$SLUICE_RABBITMQ_PORT"
export RABBITMQ_DIST_PORT=$((SLUICE_RABBITMQ_PORT + 20000))
export RABBITMQ_MNESIA_BASE="$HOME_DIR/mnesia"
export RABBITMQ_LOG_BASE="$HOME_DIR/logs"
export RABBITMQ_CONFIG_FILE="$HOME_DIR/rabbitmq.conf"
export RABBITMQ_ENABLED_PLUGINS_FILE="$HOME_DIR/enabled_plugins"
export RABBITMQ_PID_FILE="$HOME_DIR/rabbitmq.pid"
# Erlang's port mapper (started by the first node) and the node's
# distribution port listen on loopback too, like the AMQP and HTTP ports.
export ERL_EPMD_ADDRESS=127.0.0.1
export RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS="-kernel inet_dist_use_interface {127,0,0,1}"
MGMT="http://127.0.0.1:$SLUICE_RABBITMQ_MGMT_PORT/api"

ctl() { rabbitmqctl -q -n "$RABBITMQ_NODENAME" "$@"; }

install() {
  if ! command -v rabbitmq-server >/dev/null; then
    log "installing rabbitmq-server from Debian"
    # policy-rc.d (containers) or a missing systemd keep the package from
    # starting its own node; we start ours below.
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq rabbitmq-server curl >/dev/null
  fi
  command -v curl >/dev/null || DEBIAN_FRONTEND=noninteractive apt-get install -y -qq curl >/dev/null
}

write_config() {
  mkdir -p "$RABBITMQ_MNESIA_BASE" "$RABBITMQ_LOG_BASE"
  cat >"$RABBITMQ_CONFIG_FILE" <<CONF
listeners.tcp.default = 127.0.0.1:$SLUICE_RABBITMQ_PORT
management.tcp.ip = 127.0.0.1
management.tcp.port = $SLUICE_RABBITMQ_MGMT_PORT
# guest may log in from loopback only, which is all we listen on.
loopback_users.guest = true
# Queue counts in the management API refresh every second, not every 5.
collect_statistics_interval = 1000
# A small dev machine: do not block publishers at the default 40 % of RAM.
vm_memory_high_watermark.relative = 0.6
disk_free_limit.absolute = 500MB
log.file.level = info
CONF
  echo '[rabbitmq_management,rabbitmq_shovel,rabbitmq_shovel_management].' >"$RABBITMQ_ENABLED_PLUGINS_FILE"
  # Debian's wrapper scripts drop from root to the rabbitmq user, which must
  # own the node's folders.
  chown -R rabbitmq:rabbitmq "$HOME_DIR"
}

# Our node answers its management API (a broker this stack did not start
# may answer on the same port: it is not taken for ours).
answering() {
  node_pid >/dev/null && curl -sf -u guest:guest "$MGMT/overview" | grep -qF "\"node\":\"$RABBITMQ_NODENAME\""
}

# The AMQP listener answers a protocol header with connection.start (a method
# frame, first byte 1). The management API can answer while AMQP does not
# (e.g. out of file descriptors), so both are checked.
amqp_answers() {
  local first
  first=$(exec 3<>"/dev/tcp/127.0.0.1/$SLUICE_RABBITMQ_PORT" && printf 'AMQP\x00\x00\x09\x01' >&3 && timeout 3 head -c 1 <&3 | od -An -tu1 | tr -d ' ')
  [[ $first == 1 ]]
}

# The node's own pid (written by rabbitmq-server), if it is alive: a pid the
# kernel has given to another program since is not our node.
node_pid() {
  local pid
  pid="$(cat "$RABBITMQ_PID_FILE" 2>/dev/null)" || return 1
  [[ -n $pid && "$(cat "/proc/$pid/comm" 2>/dev/null)" == beam.smp ]] && echo "$pid"
}

start() {
  install
  # One start at a time (tests restart the broker while others call `up`);
  # the lock is held until the new node has written its pid file.
  mkdir -p "$HOME_DIR"
  exec 9>"$STATE_DIR/rabbitmq.start.lock"
  flock 9
  # A node that is alive but slow to answer (booting, or busy) must not get
  # a twin: a second node with the same name never boots and wedges the first.
  if node_pid >/dev/null; then log "already running (pid $(node_pid))"; return 0; fi
  refuse_taken "$SLUICE_RABBITMQ_PORT" "$SLUICE_RABBITMQ_MGMT_PORT" "$RABBITMQ_DIST_PORT"
  write_config
  # An epmd left from before this script bound it to loopback listens on
  # every interface: with no node registered, it goes (the node starts one).
  if ss -ltnH 'sport = :4369' 2>/dev/null | awk '{print $4}' | grep -qv '^127\.0\.0\.1:' &&
    ! epmd -names 2>/dev/null | grep -q '^name '; then
    epmd -kill >/dev/null 2>&1 || true
  fi
  log "starting node $RABBITMQ_NODENAME on 127.0.0.1:$SLUICE_RABBITMQ_PORT"
  # Every quorum queue keeps files open; with the default 1024 descriptors a
  # few hundred queues leave none for client sockets, and new AMQP
  # connections hang while the management API still answers.
  # Debian's wrapper switches to the rabbitmq user through su, whose PAM
  # session resets the limit to 1024; raise it inside that session instead.
  # `9>&-`: the node must not inherit the lock, or it holds it for its whole
  # life and the next `start` (after a crash or a kill) waits forever.
  (cd /var/lib/rabbitmq && su rabbitmq -s /bin/sh -c \
    'ulimit -n "$(ulimit -Hn)"; exec /usr/lib/rabbitmq/bin/rabbitmq-server -detached' >/dev/null 2>&1 9>&-)
  wait_until 60 "the node's pid file" node_pid || die "RabbitMQ did not start (see $RABBITMQ_LOG_BASE)"
}

wait_ready() {
  # await_startup returns once the node booted; the management API answering
  # is the check that matters to clients and the CLI.
  if ! wait_until 180 "RabbitMQ management API" answering; then
    tail -n 30 "$RABBITMQ_LOG_BASE"/*.log >&2 2>/dev/null || true
    die "RabbitMQ did not come up"
  fi
  ctl await_startup >/dev/null
  wait_until 60 "RabbitMQ AMQP listener" amqp_answers || die "RabbitMQ's AMQP port does not answer (see $RABBITMQ_LOG_BASE)"
  demo_vhost
  log "ready (amqp://127.0.0.1:$SLUICE_RABBITMQ_PORT, management :$SLUICE_RABBITMQ_MGMT_PORT)"
}

# The demo tenant globex lives on a vhost of its own with a user of its own
# (config/dev.toml: amqp://globex:globex-dev@127.0.0.1:5672/globex). The
# user may manage its vhost (policymaker: the CLI's dlq shovels) and nothing
# else. Idempotent: PUTs of what already exists change nothing.
demo_vhost() {
  local api=(curl -sf -u guest:guest -H 'content-type: application/json' -X PUT)
  "${api[@]}" "$MGMT/vhosts/globex" -d '{"description":"sluice demo tenant globex"}' >/dev/null &&
    "${api[@]}" "$MGMT/users/globex" -d '{"password":"globex-dev","tags":"policymaker"}' >/dev/null &&
    "${api[@]}" "$MGMT/permissions/globex/globex" -d '{"configure":".*","write":".*","read":".*"}' >/dev/null ||
    die "could not create the demo vhost globex"
}

stop() {
  local pid
  pid="$(node_pid)" || return 0
  log "stopping"
  # `rabbitmqctl stop <pidfile>` returns once the node's process has exited.
  timeout 60 rabbitmqctl -q -n "$RABBITMQ_NODENAME" stop "$RABBITMQ_PID_FILE" >/dev/null 2>&1 || true
  local deadline=$((SECONDS + 30))
  while kill -0 "$pid" 2>/dev/null && ((SECONDS < deadline)); do sleep 0.5; done
  if kill -0 "$pid" 2>/dev/null; then
    log "node did not stop; killing it"
    kill -KILL "$pid" 2>/dev/null || true
    while kill -0 "$pid" 2>/dev/null; do sleep 0.2; done
  fi
  rm -f "$RABBITMQ_PID_FILE"
}

status() {
  if answering; then
    local v; v=$(curl -sf -u guest:guest "$MGMT/overview" | sed -n 's/.*"rabbitmq_version":"\([^"]*\)".*/\1/p')
    echo "rabbitmq: up (version $v, amqp 127.0.0.1:$SLUICE_RABBITMQ_PORT)"
  else
    echo "rabbitmq: down"; return 1
  fi
}

case "${1:-}" in
  install) install ;;
  start) start ;;
  wait) wait_ready ;;
  stop) stop ;;
  status) status ;;
  *) echo "usage: $0 install|start|wait|stop|status" >&2; exit 2 ;;
esac
