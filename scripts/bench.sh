#!/usr/bin/env bash
# Single-node throughput with a third-party client: kcat produces RECORDS records of RECORD_BYTES bytes
# to a 1-partition topic with acks=all (librdkafka's default linger/batching), then consumes them back.
# Prints messages/s and MB/s for each direction. Starts and stops its own release broker in a temp dir.
#
#   scripts/bench.sh                       # 1,000,000 x 100 B
#   RECORDS=200000 scripts/bench.sh        # smaller run
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
RECORDS=${RECORDS:-1000000}
RECORD_BYTES=${RECORD_BYTES:-100}
SLUICE=${SLUICE_BIN:-target/release/sluice}
KCAT=$(command -v kcat || command -v kafkacat || true)
STEP_TIMEOUT_S=${STEP_TIMEOUT_S:-600}

[ -x "$SLUICE" ] || { echo "bench: $SLUICE missing: run 'make build'" >&2; exit 1; }
[ -n "$KCAT" ] || { echo "bench: kcat missing: run 'make deps'" >&2; exit 1; }

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
now_ns() { date +%s%N; }

WORK=$(mktemp -d -t sluice-bench.XXXXXX)
KAFKA_PORT=$(free_port)
RAFT_PORT=$(free_port)
ADMIN_PORT=$(free_port)
BOOTSTRAP=127.0.0.1:$KAFKA_PORT
BROKER_PID=""

cleanup() {
    if [ -n "$BROKER_PID" ] && kill -0 "$BROKER_PID" 2>/dev/null; then
        kill -TERM "$BROKER_PID" 2>/dev/null || true
        for _ in $(seq 1 100); do kill -0 "$BROKER_PID" 2>/dev/null || break; sleep 0.2; done
        kill -KILL "$BROKER_PID" 2>/dev/null || true
        wait "$BROKER_PID" 2>/dev/null || true
    fi
    rm -rf "$WORK"
}
trap cleanup EXIT

echo "bench: broker log $WORK/broker.log"
NO_COLOR=1 "$SLUICE" server --node-id 1 --data-dir "$WORK/data" \
    --kafka-addr "$BOOTSTRAP" --raft-addr "127.0.0.1:$RAFT_PORT" --admin-addr "127.0.0.1:$ADMIN_PORT" \
    >"$WORK/broker.log" 2>&1 &
BROKER_PID=$!

for i in $(seq 1 300); do
    if curl -fsS -o /dev/null --max-time 1 "http://127.0.0.1:$ADMIN_PORT/v1/health" 2>/dev/null; then break; fi
    if ! kill -0 "$BROKER_PID" 2>/dev/null; then echo "bench: broker exited during startup:" >&2; tail -30 "$WORK/broker.log" >&2; exit 1; fi
    if [ "$i" = 300 ]; then echo "bench: broker not healthy after 30 s" >&2; tail -30 "$WORK/broker.log" >&2; exit 1; fi
    sleep 0.1
done

timeout 60 "$SLUICE" topics create bench --partitions 1 --replication-factor 1 --bootstrap-server "$BOOTSTRAP"

# RECORD_BYTES-byte values (the newline is the delimiter, not part of the record).
python3 - "$RECORDS" "$RECORD_BYTES" >"$WORK/input" <<'EOF'
import sys
n, size = int(sys.argv[1]), int(sys.argv[2])
out = sys.stdout
for i in range(n):
    head = f"{i:012d}-"
    out.write(head + "x" * (size - len(head)) + "\n")
EOF

report() {  # name count bytes elapsed_ns
    python3 -c 'import sys
name, n, b, ns = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
s = ns / 1e9
print(f"{name:8s} {n:>9,d} msgs in {s:7.2f} s: {n / s:>11,.0f} msg/s  {b / s / 1e6:8.2f} MB/s")' "$@"
}

echo "bench: producing $RECORDS x $RECORD_BYTES B with kcat (acks=all)"
start=$(now_ns)
timeout "$STEP_TIMEOUT_S" "$KCAT" -P -b "$BOOTSTRAP" -t bench -p 0 -X acks=all <"$WORK/input" 2>"$WORK/produce.err"
end=$(now_ns)
if grep -q -i "error\|fail" "$WORK/produce.err"; then echo "bench: kcat -P reported errors:" >&2; head -20 "$WORK/produce.err" >&2; exit 1; fi
PRODUCE_NS=$((end - start))

echo "bench: consuming with kcat"
start=$(now_ns)
got=$(timeout "$STEP_TIMEOUT_S" "$KCAT" -C -b "$BOOTSTRAP" -t bench -p 0 -o beginning -c "$RECORDS" -e -q -f '\n' | wc -l)
end=$(now_ns)
CONSUME_NS=$((end - start))
if [ "$got" != "$RECORDS" ]; then echo "bench: consumed $got records, want $RECORDS" >&2; exit 1; fi

echo
report produce "$RECORDS" $((RECORDS * RECORD_BYTES)) "$PRODUCE_NS"
report consume "$RECORDS" $((RECORDS * RECORD_BYTES)) "$CONSUME_NS"
