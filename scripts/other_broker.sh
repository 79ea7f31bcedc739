#!/usr/bin/env bash
# The second Kafka-compatible broker `make bench` compares Sluice with (issue 16): Tansu, built from
# crates.io (the only Kafka-compatible broker this machine can obtain: no Maven/Apache downloads, no
# containers). Tansu 0.6.0 with its memory storage engine: nothing is written to disk, nothing is
# fsynced, so any comparison table must say "memory, no fsync".
#
#   scripts/other_broker.sh install              # build once into $SLUICE_BENCH_CACHE (default target/bench-tools)
#   scripts/other_broker.sh bin                  # print the binary's path (non-zero when not installed)
#   pid=$(scripts/other_broker.sh start PORT DATADIR)   # listens and advertises on 127.0.0.1:PORT
#   scripts/other_broker.sh api-versions PORT    # ApiVersions v0 as a table (api key, name, min, max)
#   scripts/other_broker.sh stop PID
#
# `start` returns once the broker answers an ApiVersions request; it prints the broker's PID on stdout
# and the broker logs to DATADIR/tansu.log. Every failure exits non-zero with a message on stderr.
# Run the verbs under `nice -n 19` to lower the build's (or the broker's) priority: children inherit it.
set -euo pipefail

TANSU_VERSION=0.6.0
# The memory engine (memory://) lives behind the `dynostore` feature (it is object_store's InMemory);
# the default features build a broker whose only engines (postgres, sqlite, s3) are all switched off.
TANSU_FEATURES=dynostore
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
CACHE=${SLUICE_BENCH_CACHE:-$REPO/target/bench-tools}
BIN=$CACHE/bin/tansu
START_TIMEOUT_S=${OTHER_BROKER_START_TIMEOUT_S:-30}

die() { echo "other_broker.sh: $*" >&2; exit 1; }

installed() { [ -x "$BIN" ] && "$BIN" --version 2>/dev/null | grep -q "$TANSU_VERSION"; }

# ApiVersions v0 against 127.0.0.1:PORT. `probe` exits 0 when the broker answered with error code 0;
# `table` prints one line per API. Python's socket module: no client library needed.
api_versions() {  # probe|table PORT
    python3 - "$@" <<'EOF'
import socket, struct, sys
mode, port = sys.argv[1], int(sys.argv[2])
NAMES = {0: "Produce", 1: "Fetch", 2: "ListOffsets", 3: "Metadata", 8: "OffsetCommit", 9: "OffsetFetch",
         10: "FindCoordinator", 11: "JoinGroup", 12: "Heartbeat", 13: "LeaveGroup", 14: "SyncGroup",
         15: "DescribeGroups", 16: "ListGroups", 17: "SaslHandshake", 18: "ApiVersions", 19: "CreateTopics",
         20: "DeleteTopics", 21: "DeleteRecords", 22: "InitProducerId", 24: "AddPartitionsToTxn",
         25: "AddOffsetsToTxn", 26: "EndTxn", 28: "TxnOffsetCommit", 29: "DescribeAcls", 30: "CreateAcls", 32: "DescribeConfigs",
         33: "AlterConfigs", 36: "SaslAuthenticate", 37: "CreatePartitions", 42: "DeleteGroups",
         44: "IncrementalAlterConfigs", 46: "ListPartitionReassignments", 47: "OffsetDelete", 50: "DescribeUserScramCredentials",
         51: "AlterUserScramCredentials", 60: "DescribeCluster", 68: "ConsumerGroupHeartbeat",
         69: "ConsumerGroupDescribe", 71: "GetTelemetrySubscriptions", 75: "DescribeTopicPartitions"}
client = b"other_broker.sh"
body = struct.pack(">hhih", 18, 0, 1, len(client)) + client
try:
    with socket.create_connection(("127.0.0.1", port), timeout=2) as s:
        s.sendall(struct.pack(">i", len(body)) + body)
        def read(n):
            buf = b""
            while len(buf) < n:
                chunk = s.recv(n - len(buf))
                if not chunk:
                    raise EOFError("connection closed")
                buf += chunk
            return buf
        (size,) = struct.unpack(">i", read(4))
        resp = read(size)
except (OSError, EOFError) as e:
    if mode == "table":
        print(f"ApiVersions to 127.0.0.1:{port} failed: {e}", file=sys.stderr)
    sys.exit(1)
corr, err, n = struct.unpack(">ihi", resp[:10])
if corr != 1 or err != 0:
    print(f"ApiVersions: correlation id {corr}, error code {err}", file=sys.stderr)
    sys.exit(1)
if mode == "table":
    for key, lo, hi in sorted(struct.unpack(">hhh", resp[10 + 6 * i:16 + 6 * i]) for i in range(n)):
        print(f"{key:3d} {NAMES.get(key, '?'):24s} v{lo}-v{hi}")
EOF
}

port_open() {  # PORT: is anything listening on 127.0.0.1:PORT?
    python3 -c 'import socket, sys
s = socket.socket(); s.settimeout(1)
sys.exit(0 if s.connect_ex(("127.0.0.1", int(sys.argv[1]))) == 0 else 1)' "$1"
}

cmd_install() {
    if installed; then
        echo "$BIN"
        return 0
    fi
    command -v cargo >/dev/null || die "cargo not found: Tansu is built from crates.io with cargo install"
    mkdir -p "$CACHE" || die "cannot create $CACHE"
    # The build tree (about 1.4 GB) is scratch, removed on every exit: only the binary is kept.
    scratch=$(mktemp -d /tmp/tansu-build.XXXXXX) || die "mktemp failed"
    trap 'rm -rf "$scratch"' EXIT
    echo "other_broker.sh: building tansu $TANSU_VERSION (--features $TANSU_FEATURES) into $CACHE, scratch $scratch" >&2
    local t0=$SECONDS
    if ! CARGO_TARGET_DIR=$scratch nice -n 19 cargo install --locked --quiet tansu --version "$TANSU_VERSION" \
            --no-default-features --features "$TANSU_FEATURES" --root "$CACHE" >&2; then
        die "cargo install tansu $TANSU_VERSION failed"
    fi
    rm -rf "$scratch"
    installed || die "cargo install finished but $BIN --version does not say $TANSU_VERSION"
    echo "other_broker.sh: built in $((SECONDS - t0)) s" >&2
    echo "$BIN"
}

cmd_bin() {
    installed || die "tansu $TANSU_VERSION is not installed in $CACHE: run '$0 install'"
    echo "$BIN"
}

cmd_start() {
    [ $# -eq 2 ] || die "usage: $0 start PORT DATADIR"
    local port=$1 datadir=$2
    [[ "$port" =~ ^[0-9]+$ ]] && [ "$port" -ge 1 ] && [ "$port" -le 65535 ] || die "bad port: $port"
    installed || die "tansu $TANSU_VERSION is not installed in $CACHE: run '$0 install'"
    port_open "$port" && die "something already listens on 127.0.0.1:$port"
    mkdir -p "$datadir" || die "cannot create $datadir"
    datadir=$(cd "$datadir" && pwd)
    local log=$datadir/tansu.log
    # Run from DATADIR (Tansu reads a .env from its working directory), with every setting given as a
    # flag (flags win over Tansu's environment variables). stdin/stdout/stderr are detached so that
    # `pid=$(other_broker.sh start ...)` returns. The binary, with no subcommand, is the broker.
    (
        cd "$datadir"
        exec "$BIN" broker \
            --cluster-id sluice-bench \
            --listener-url "tcp://127.0.0.1:$port" \
            --advertised-listener-url "tcp://127.0.0.1:$port" \
            --storage-engine "memory://tansu/" \
            </dev/null >"$log" 2>&1
    ) &
    local pid=$!
    local deadline=$((SECONDS + START_TIMEOUT_S))
    until api_versions probe "$port"; do
        if ! kill -0 "$pid" 2>/dev/null; then
            echo "other_broker.sh: tansu exited during startup; the end of $log:" >&2
            tail -20 "$log" >&2
            exit 1
        fi
        if [ "$SECONDS" -ge "$deadline" ]; then
            kill -TERM "$pid" 2>/dev/null || true
            echo "other_broker.sh: tansu did not answer ApiVersions on 127.0.0.1:$port within ${START_TIMEOUT_S} s; the end of $log:" >&2
            tail -20 "$log" >&2
            exit 1
        fi
        sleep 0.1
    done
    echo "$pid"
}

cmd_stop() {
    [ $# -eq 1 ] || die "usage: $0 stop PID"
    local pid=$1
    [[ "$pid" =~ ^[0-9]+$ ]] || die "bad pid: $pid"
    kill -0 "$pid" 2>/dev/null || die "no process $pid"
    # Only ever a tansu process: a stale PID may have been reused by something else.
    [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = tansu ] || die "process $pid is not tansu ($(cat "/proc/$pid/comm" 2>/dev/null))"
    kill -TERM "$pid"
    for _ in $(seq 1 100); do
        kill -0 "$pid" 2>/dev/null || return 0
        sleep 0.1
    done
    kill -KILL "$pid" 2>/dev/null || true
    for _ in $(seq 1 50); do
        kill -0 "$pid" 2>/dev/null || return 0
        sleep 0.1
    done
    die "process $pid survived SIGKILL"
}

cmd_api_versions() {
    [ $# -eq 1 ] || die "usage: $0 api-versions PORT"
    api_versions table "$1" || die "no ApiVersions answer from 127.0.0.1:$1"
}

verb=${1:-}
[ $# -gt 0 ] && shift
case "$verb" in
    install) cmd_install "$@" ;;
    bin) cmd_bin "$@" ;;
    start) cmd_start "$@" ;;
    stop) cmd_stop "$@" ;;
    api-versions) cmd_api_versions "$@" ;;
    *) die "usage: $0 install | bin | start PORT DATADIR | stop PID | api-versions PORT" ;;
esac
