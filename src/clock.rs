//! Wall-clock time as Kafka counts it. The one place the node reads the system clock for values
//! it stores or compares with record timestamps (replicated state machines never read it).

/// Milliseconds since the Unix epoch; 0 if the clock is before it.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}
