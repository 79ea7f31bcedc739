"""scripts/other_broker_check.py PORT [N] [CASE...]: compatibility checks of a Kafka broker on 127.0.0.1:PORT with confluent-kafka and kafka-python.

Each case: create a topic, produce N 100-byte records, consume them back, compare. Prints one line per
case. Written to check the comparison broker (scripts/other_broker.sh, Tansu) for issue 16; run it with
.venv/bin/python (confluent-kafka, kafka-python 3.x). Client-bound rates: not a benchmark.
"""
import sys, time, traceback
from confluent_kafka import Producer, Consumer, TopicPartition, KafkaException
from confluent_kafka.admin import AdminClient, NewTopic

PORT = int(sys.argv[1])
N = int(sys.argv[2]) if len(sys.argv) > 2 else 100_000
ONLY = sys.argv[3:]
BOOT = f"127.0.0.1:{PORT}"
VALUE = b"x" * 100
results = []


def create(topic, partitions=1):
    a = AdminClient({"bootstrap.servers": BOOT})
    fs = a.create_topics([NewTopic(topic, num_partitions=partitions, replication_factor=1)], request_timeout=15)
    for t, f in fs.items():
        f.result(timeout=20)
    md = a.list_topics(topic, timeout=10)
    return len(md.topics[topic].partitions)


def ck_produce(topic, n, acks, partitions=1, **extra):
    conf = {"bootstrap.servers": BOOT, "acks": acks, "linger.ms": 5, "batch.num.messages": 10000,
            "queue.buffering.max.messages": 1_000_000}
    conf.update(extra)
    p = Producer(conf)
    errs = []
    def dr(err, msg):
        if err is not None:
            errs.append(err)
    t0 = time.time()
    for i in range(n):
        while True:
            try:
                p.produce(topic, value=VALUE, key=str(i).encode(), partition=i % partitions, on_delivery=dr)
                break
            except BufferError:
                p.poll(0.05)
        if i % 10000 == 0:
            p.poll(0)
    left = p.flush(120)
    dt = time.time() - t0
    if left or errs:
        raise RuntimeError(f"{left} undelivered, {len(errs)} errors, first {errs[:1]}")
    return dt


def ck_consume(topic, n, partitions=1):
    c = Consumer({"bootstrap.servers": BOOT, "group.id": f"g-{topic}", "enable.auto.commit": False,
                  "auto.offset.reset": "earliest"})
    c.assign([TopicPartition(topic, p, 0) for p in range(partitions)])
    got = 0
    t0 = time.time()
    deadline = t0 + 120
    bad = 0
    while got < n and time.time() < deadline:
        for m in c.consume(10000, 1.0):
            if m.error():
                raise KafkaException(m.error())
            if m.value() != VALUE:
                bad += 1
            got += 1
    dt = time.time() - t0
    c.close()
    if got != n or bad:
        raise RuntimeError(f"consumed {got}/{n}, {bad} bad values")
    return dt


def case(name, fn):
    if ONLY and name not in ONLY:
        return
    try:
        detail = fn()
        results.append((name, "ok", detail))
    except Exception as e:
        results.append((name, "FAIL", f"{type(e).__name__}: {e}"))
    print(f"{results[-1][1]:4s} {name}: {results[-1][2]}", flush=True)


def ck(name, acks, partitions=1, **extra):
    topic = name.replace(" ", "-").replace("=", "").replace(",", "") + f"-{N}"
    def run():
        np = create(topic, partitions)
        if np != partitions:
            raise RuntimeError(f"topic has {np} partitions, asked {partitions}")
        tp = ck_produce(topic, N, acks, partitions, **extra)
        tc = ck_consume(topic, N, partitions)
        return f"{N} produced in {tp:.2f} s ({N / tp:,.0f}/s), consumed in {tc:.2f} s ({N / tc:,.0f}/s)"
    case(name, run)


ck("ck acks=all", "all")
ck("ck acks=1", "1")
ck("ck acks=all idempotent", "all", **{"enable.idempotence": True})
for codec in ("gzip", "snappy", "lz4", "zstd"):
    ck(f"ck acks=all {codec}", "all", **{"compression.type": codec})
ck("ck acks=all 6 partitions", "all", 6)


def kp(acks, name):
    import kafka
    from kafka.admin import KafkaAdminClient, NewTopic as KNewTopic
    topic = name.replace(" ", "-").replace("=", "")
    def run():
        adm = KafkaAdminClient(bootstrap_servers=BOOT, request_timeout_ms=15000)
        adm.create_topics([KNewTopic(topic, 1, 1)])
        adm.close()
        pr = kafka.KafkaProducer(bootstrap_servers=BOOT, acks=acks, linger_ms=5, batch_size=65536)
        t0 = time.time()
        futs = [pr.send(topic, VALUE) for _ in range(N)]
        pr.flush(120)
        for f in futs[-10:]:
            f.get(timeout=10)
        tp = time.time() - t0
        pr.close()
        co = kafka.KafkaConsumer(bootstrap_servers=BOOT, auto_offset_reset="earliest", enable_auto_commit=False,
                                 consumer_timeout_ms=10000)
        co.assign([kafka.TopicPartition(topic, 0)])
        co.seek_to_beginning()
        t0 = time.time()
        got = 0
        for m in co:
            if m.value != VALUE:
                raise RuntimeError(f"bad value at {m.offset}")
            got += 1
            if got == N:
                break
        tc = time.time() - t0
        co.close()
        if got != N:
            raise RuntimeError(f"consumed {got}/{N}")
        return f"{N} produced in {tp:.2f} s ({N / tp:,.0f}/s), consumed in {tc:.2f} s ({N / tc:,.0f}/s)"
    case(name, run)


kp("all", "kp acks=all")
kp(1, "kp acks=1")


def kp_group():
    # consumer group: subscribe + commit, then a second consumer resumes from the commit
    import kafka
    topic = f"ck-acksall-{N}"
    def run():
        co = kafka.KafkaConsumer(topic, bootstrap_servers=BOOT, group_id="kp-group", auto_offset_reset="earliest",
                                 enable_auto_commit=False, consumer_timeout_ms=10000)
        got = 0
        for m in co:
            got += 1
            if got == 1000:
                break
        co.commit()
        co.close()
        co = kafka.KafkaConsumer(topic, bootstrap_servers=BOOT, group_id="kp-group", auto_offset_reset="earliest",
                                 enable_auto_commit=False, consumer_timeout_ms=10000)
        m = next(iter(co))
        co.close()
        if m.offset != 1000:
            raise RuntimeError(f"resumed at {m.offset}, want 1000")
        return "subscribe, commit at 1000, second member resumed at 1000"
    case("kp group commit", run)


kp_group()


def fetch_mid_batch():
    # Fetch at an offset inside a record batch: Kafka returns that batch and the client skips the
    # records before the offset asked; the first record seen must be the one asked for.
    def run():
        seen = []
        for off in (1, N // 2):
            c = Consumer({"bootstrap.servers": BOOT, "group.id": "mid", "enable.auto.commit": False})
            c.assign([TopicPartition(f"ck-acksall-{N}", 0, off)])
            m = None
            for _ in range(20):
                m = c.poll(1.0)
                if m is not None and not m.error():
                    break
            c.close()
            seen.append((off, m.offset() if m else None))
        if any(a != b for a, b in seen):
            raise RuntimeError(", ".join(f"fetch at {a} returned first record {b}" for a, b in seen))
        return "first record is the one asked for"
    case("ck fetch mid-batch", run)


fetch_mid_batch()
print(f"{sum(r[1] == 'ok' for r in results)} passed, {sum(r[1] != 'ok' for r in results)} failed")
