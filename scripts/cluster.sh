#!/usr/bin/env bash
# Starts (or stops) a 3-node Sluice cluster on loopback: `scripts/cluster.sh start|stop|status`.
# Data, logs and PIDs live in .cluster/ at the repo root. Only processes started here are stopped.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${SLUICE_BIN:-target/release/sluice}
DIR=.cluster
PEERS="1@127.0.0.1:9093,2@127.0.0.1:19093,3@127.0.0.1:29093"

start() {
  [ -x "$BIN" ] || { echo "missing $BIN: run cargo build --release first" >&2; exit 1; }
  mkdir -p "$DIR"
  for i in 1 2 3; do
    pidf="$DIR/n$i.pid"
    if [ -f "$pidf" ] && kill -0 "$(cat "$pidf")" 2>/dev/null; then
      echo "node $i already running (pid $(cat "$pidf"))"; continue
    fi
    p=$(( (i - 1) * 10000 ))
    "$BIN" server --node-id "$i" --data-dir "$DIR/n$i" \
      --kafka-addr "127.0.0.1:$((9092 + p))" --raft-addr "127.0.0.1:$((9093 + p))" \
      --admin-addr "127.0.0.1:$((9644 + p))" --peers "$PEERS" >"$DIR/n$i.log" 2>&1 &
    echo $! >"$pidf"
    echo "node $i: pid $!, kafka 127.0.0.1:$((9092 + p)), admin 127.0.0.1:$((9644 + p)), log $DIR/n$i.log"
  done
  for _ in $(seq 1 60); do
    if curl -sf http://127.0.0.1:9644/v1/health >/dev/null 2>&1 \
      && curl -sf http://127.0.0.1:19644/v1/health >/dev/null 2>&1 \
      && curl -sf http://127.0.0.1:29644/v1/health >/dev/null 2>&1; then
      echo "cluster ready; bootstrap servers: 127.0.0.1:9092,127.0.0.1:19092,127.0.0.1:29092"
      return 0
    fi
    sleep 0.5
  done
  echo "cluster did not become healthy within 30 s; see $DIR/n*.log" >&2
  exit 1
}

stop() {
  for i in 1 2 3; do
    pidf="$DIR/n$i.pid"
    [ -f "$pidf" ] || continue
    pid=$(cat "$pidf")
    if kill -0 "$pid" 2>/dev/null; then
      kill -TERM "$pid"
      for _ in $(seq 1 40); do kill -0 "$pid" 2>/dev/null || break; sleep 0.25; done
      kill -0 "$pid" 2>/dev/null && kill -KILL "$pid"
      echo "node $i stopped"
    fi
    rm -f "$pidf"
  done
}

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  status) "$BIN" cluster status --admin-addr 127.0.0.1:9644 ;;
  *) echo "usage: $0 start|stop|status" >&2; exit 2 ;;
esac
