//! Deliberate bugs for proving that the chaos harness can fail. Compiled only with
//! `--features chaos-bugs` (never in a normal build) and switched on per process with
//! `SLUICE_CHAOS_BUG=<name>`.

/// Whether bug `name` is switched on for this process.
pub fn enabled(name: &str) -> bool {
    std::env::var("SLUICE_CHAOS_BUG").is_ok_and(|v| v.split(',').any(|b| b.trim() == name))
}
