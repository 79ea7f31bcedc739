//! Sluice: a Kafka-compatible streaming log coordinated by Raft. This crate is the node — Kafka
//! listener and per-API handlers, the replicated metadata state (the controller), the partition
//! manager, admin HTTP, configuration — and the `sluice` CLI's client verbs.

pub mod admin;
pub mod alloc_guard;
#[cfg(feature = "chaos-bugs")]
pub mod chaos_bugs;
pub mod cli;
pub mod cluster;
pub mod config;
pub mod errors;
pub mod kafka;
pub mod metadata;
pub mod metrics;
pub mod node;
pub mod retention;
pub mod server;

#[global_allocator]
static GLOBAL: alloc_guard::GuardedAlloc = alloc_guard::GuardedAlloc;
