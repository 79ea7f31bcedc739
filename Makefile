# Sluice developer entry points. `make test` is what CI runs (via .ci/run).
SHELL := /usr/bin/env bash
.SHELLFLAGS := -eu -o pipefail -c

PYTHON ?= python3
VENV := .venv
VENV_STAMP := $(VENV)/.stamp
# Pinned loosely: the interop tests use only long-stable confluent-kafka / pytest APIs.
# kafka-python's codecs come from python-snappy, lz4 and zstandard (its snappy/lz4/zstd extras);
# the compression tests use the same three to build batches by hand.
PY_DEPS := confluent-kafka pytest pytest-timeout 'kafka-python>=3,<4' python-snappy lz4 zstandard


.PHONY: all verify venv deps build test test-rust test-interop run lint fmt bench microbench chaos chaos-smoke chaos-long idle cluster cluster-stop clean-venv fuzz fuzz-corpus

all: build

# The stamp makes `make venv` a no-op once the venv is complete; the stamp depends on this
# Makefile so changing PY_DEPS reinstalls.
venv: $(VENV_STAMP)

$(VENV_STAMP): Makefile
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --disable-pip-version-check --upgrade pip
	$(VENV)/bin/pip install --quiet --disable-pip-version-check $(PY_DEPS)
	touch $(VENV_STAMP)

# kcat is a third-party Kafka client the interop tests drive. Debian's kcat 1.7.1 links
# librdkafka 2.0.2, a different librdkafka from the one inside confluent-kafka's wheel,
# so the two clients exercise different protocol versions.
deps:
	@if command -v kcat >/dev/null 2>&1; then \
		echo "kcat present: $$(kcat -V 2>&1 | grep -m1 Version)"; \
	elif [ "$$(id -u)" = "0" ]; then \
		echo "installing kcat with apt-get"; \
		DEBIAN_FRONTEND=noninteractive apt-get update -qq; \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -qq kcat; \
	else \
		echo "kcat is missing and we are not root: install it (apt-get install kcat); kcat tests will fail"; \
	fi

build:
	cargo build --release --workspace

# The one gate CI runs (.ci/run): formatting and lints first (cheap, read-only), then every test.
verify: lint test

# `cargo test --benches` runs each criterion micro-benchmark once, unmeasured, so a bench that no
# longer builds or runs fails here (about 40 s of build and run on this 2-core machine).
test: deps venv build
	cargo test --workspace
	cargo test --workspace --benches
	$(VENV)/bin/pytest -q tests/interop
	$(MAKE) chaos-smoke

# A short chaos run (~80-90 s: kill, isolate and pause the leader, power loss; 4 produce requests
# in flight per producer, half the producers idempotent; the metadata workload; a consumer group
# of three members committing offsets) against real processes.
chaos-smoke: build
	CT_SMOKE=1 cargo test --release -p cluster-tests --test smoke -- --nocapture

test-rust:
	cargo test --workspace
	cargo test --workspace --benches

# Interop suite only, against the current release build.
test-interop: venv build
	$(VENV)/bin/pytest -q tests/interop

# Longer fuzz runs (`make test` runs each target for a few thousand cases, ~20 s or less in a
# debug build): FUZZ_CASES cases per target in a release build, printing executions per second
# and corpus sizes. Targets: kafka_request, record_batch (src/kafka/fuzz_tests.rs), raft_frame
# (raft/src/fuzz_tests.rs); seeds in fuzz/corpus/ (fuzz/README.md).
FUZZ_CASES ?= 3000000
fuzz:
	SLUICE_FUZZ_CASES=$(FUZZ_CASES) cargo test --release -p sluice --lib fuzz_ -- --nocapture
	SLUICE_FUZZ_CASES=$(FUZZ_CASES) cargo test --release -p sluice-raft --lib fuzz_ -- --nocapture

# Re-captures the Kafka request seeds from confluent-kafka and kafka-python through a capturing
# proxy, then derives the record-batch and node-to-node seeds from them.
fuzz-corpus: venv build
	$(VENV)/bin/python scripts/capture_corpus.py --out fuzz/corpus/kafka_request
	cargo test -p sluice --lib write_record_batch_corpus -- --ignored
	cargo test -p sluice-raft --lib write_raft_frame_corpus -- --ignored

run:
	cargo run --release -- server

lint:
	cargo fmt --all -- --check
	cargo clippy --workspace --all-targets -- -D warnings

fmt:
	cargo fmt --all

# The benchmark matrix with its ceilings (scripts/bench_matrix.py, all figures from `sluice bench`):
# the disk's fdatasync ceiling, single node RF 1 and 3 nodes RF 3, latency at half the measured
# maximum, a restart holding BENCH_RESTART_GIB GiB of log, and the same RF 1 rows against Tansu
# (built once into target/bench-tools by scripts/other_broker.sh). Then many small producers
# sharing fsyncs, and kcat's figures for a third-party client. About 20 minutes here.
BENCH_RESTART_GIB ?= 10
bench: deps venv build
	$(VENV)/bin/python scripts/bench_matrix.py --restart-gib $(BENCH_RESTART_GIB)
	$(VENV)/bin/python scripts/hotpath_bench.py small-producers --rf 1
	$(VENV)/bin/python scripts/hotpath_bench.py small-producers --rf 3
	scripts/bench.sh

# Criterion micro-benchmarks of the hot paths (README, "Micro-benchmarks"): partition-log append
# with and without fsync, offset lookup and fetch reads (storage/benches/log.rs), record
# validation per codec and CRC-32C (benches/validate.rs), Produce decode and Fetch encode
# (benches/wire.rs), the leader's Raft append path (raft/benches/append.rs). About 5 minutes;
# reports land in target/criterion. Pass criterion options through BENCH_ARGS, e.g.
# BENCH_ARGS='log_fetch' to run the cases whose name matches.
BENCH_ARGS ?=
microbench:
	cargo bench --workspace -- $(BENCH_ARGS)

# Idle cost of many partitions: a 3-node loopback cluster with PARTITIONS (default 1000) at RF 3.
idle: build
	scripts/idle.sh

# Every nemesis (power loss and disk faults included) against a 3-node cluster for a few minutes,
# 4 produce requests in flight per producer, half the producers plain and half idempotent
# (resending unanswered batches), a consumer group of three members committing offsets;
# replay with SEED=... make chaos.
CT_DURATION ?= 1800
CHAOS_OUT ?= target/chaos
chaos: build
	cargo build --release -p cluster-tests
	target/release/cluster-tests run --duration-secs 240 --nodes 3 --nemesis all --inflight 4 --producer mixed --group-members 3 $${SEED:+--seed $$SEED} --out $(CHAOS_OUT)/run-$$(date +%s)

chaos-long: build
	cargo build --release -p cluster-tests
	target/release/cluster-tests run --duration-secs $(CT_DURATION) --nodes 3 --nemesis all --inflight 4 --producer mixed --group-members 3 $${SEED:+--seed $$SEED} --out $(CHAOS_OUT)/long-$$(date +%s)

# A 3-node loopback cluster (ports 9092/19092/29092); data and logs in .cluster/.
cluster: build
	scripts/cluster.sh start

cluster-stop:
	scripts/cluster.sh stop

clean-venv:
	rm -rf $(VENV)
