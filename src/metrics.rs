//! Process-wide counters and histograms, rendered as Prometheus text by the admin server.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

/// Upper bounds (ms) of the latency histogram buckets.
const LATENCY_BUCKETS_MS: [f64; 12] = [
    0.5, 1.0, 2.5, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 5000.0,
];

#[derive(Default)]
pub struct Histogram {
    buckets: [AtomicU64; 12],
    count: AtomicU64,
    sum_us: AtomicU64,
}

impl Histogram {
    pub fn observe_ms(&self, ms: f64) {
        for (i, b) in LATENCY_BUCKETS_MS.iter().enumerate() {
            if ms <= *b {
                self.buckets[i].fetch_add(1, Ordering::Relaxed);
            }
        }
        self.count.fetch_add(1, Ordering::Relaxed);
        self.sum_us
            .fetch_add((ms * 1000.0) as u64, Ordering::Relaxed);
    }

    fn render(&self, name: &str, out: &mut String) {
        use std::fmt::Write;
        let _ = writeln!(out, "# TYPE {name} histogram");
        for (i, b) in LATENCY_BUCKETS_MS.iter().enumerate() {
            let _ = writeln!(
                out,
                "{name}_bucket{{le=\"{}\"}} {}",
                b / 1000.0,
                self.buckets[i].load(Ordering::Relaxed)
            );
        }
        let count = self.count.load(Ordering::Relaxed);
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {count}");
        let _ = writeln!(
            out,
            "{name}_sum {}",
            self.sum_us.load(Ordering::Relaxed) as f64 / 1e6
        );
        let _ = writeln!(out, "{name}_count {count}");
    }
}

#[derive(Default)]
pub struct Metrics {
    /// (api name, error code) -> count
    requests: Mutex<BTreeMap<(String, i16), u64>>,
    pub bytes_in: AtomicU64,
    pub bytes_out: AtomicU64,
    pub produce_latency: Histogram,
    pub fetch_latency: Histogram,
    /// Segments (and their bytes) deleted by retention on this node, all partitions.
    pub retention_segments_deleted: AtomicU64,
    pub retention_bytes_deleted: AtomicU64,
    /// Partition replicas whose Raft core stopped on a storage error (each failure once).
    pub storage_failures: AtomicU64,
    /// Idempotent producers' resends answered with the original batch's offsets.
    pub produce_duplicates: AtomicU64,
    /// Consumer-group operations proposed by this node as coordinator, and the metadata entries
    /// that carried them (their ratio is the batching the commit path gets).
    pub group_ops: AtomicU64,
    pub group_proposals: AtomicU64,
}

impl Metrics {
    pub fn count_request(&self, api: &str, error_code: i16) {
        let mut m = self.requests.lock().unwrap_or_else(|p| p.into_inner());
        match m.get_mut(&(api.to_string(), error_code)) {
            Some(n) => *n += 1,
            None => {
                m.insert((api.to_string(), error_code), 1);
            }
        }
    }

    /// How many `api` requests were answered with `error_code` (their worst partition's).
    pub fn requests_answered(&self, api: &str, error_code: i16) -> u64 {
        let m = self.requests.lock().unwrap_or_else(|p| p.into_inner());
        m.get(&(api.to_string(), error_code)).copied().unwrap_or(0)
    }

    pub fn group_ops_proposed(&self, n: usize) {
        self.group_ops.fetch_add(n as u64, Ordering::Relaxed);
        self.group_proposals.fetch_add(1, Ordering::Relaxed);
    }

    pub fn render(&self, out: &mut String) {
        use std::fmt::Write;
        let _ = writeln!(out, "# TYPE sluice_requests_total counter");
        let m = self.requests.lock().unwrap_or_else(|p| p.into_inner());
        for ((api, code), n) in m.iter() {
            let _ = writeln!(
                out,
                "sluice_requests_total{{api=\"{api}\",error_code=\"{code}\"}} {n}"
            );
        }
        drop(m);
        let _ = writeln!(out, "# TYPE sluice_bytes_in_total counter");
        let _ = writeln!(
            out,
            "sluice_bytes_in_total {}",
            self.bytes_in.load(Ordering::Relaxed)
        );
        let _ = writeln!(out, "# TYPE sluice_bytes_out_total counter");
        let _ = writeln!(
            out,
            "sluice_bytes_out_total {}",
            self.bytes_out.load(Ordering::Relaxed)
        );
        for (name, v) in [
            (
                "sluice_retention_segments_deleted_total",
                &self.retention_segments_deleted,
            ),
            (
                "sluice_retention_bytes_deleted_total",
                &self.retention_bytes_deleted,
            ),
            (
                "sluice_partition_storage_failures_total",
                &self.storage_failures,
            ),
            (
                "sluice_produce_duplicate_batches_total",
                &self.produce_duplicates,
            ),
            ("sluice_group_operations_total", &self.group_ops),
            ("sluice_group_proposals_total", &self.group_proposals),
        ] {
            let _ = writeln!(out, "# TYPE {name} counter");
            let _ = writeln!(out, "{name} {}", v.load(Ordering::Relaxed));
        }
        self.produce_latency
            .render("sluice_produce_latency_seconds", out);
        self.fetch_latency
            .render("sluice_fetch_latency_seconds", out);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_counts_and_buckets() {
        let m = Metrics::default();
        m.count_request("Produce", 0);
        m.count_request("Produce", 0);
        m.count_request("Fetch", 3);
        m.produce_latency.observe_ms(3.0);
        let mut s = String::new();
        m.render(&mut s);
        assert!(s.contains("sluice_requests_total{api=\"Produce\",error_code=\"0\"} 2"));
        assert!(s.contains("sluice_requests_total{api=\"Fetch\",error_code=\"3\"} 1"));
        assert!(s.contains("sluice_produce_latency_seconds_bucket{le=\"0.0025\"} 0"));
        assert!(s.contains("sluice_produce_latency_seconds_bucket{le=\"0.005\"} 1"));
        assert!(s.contains("sluice_produce_latency_seconds_count 1"));
        m.retention_segments_deleted.fetch_add(3, Ordering::Relaxed);
        let mut s = String::new();
        m.render(&mut s);
        assert!(s.contains("sluice_retention_segments_deleted_total 3"));
        assert!(s.contains("sluice_retention_bytes_deleted_total 0"));
    }
}
