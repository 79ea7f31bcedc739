//! Sluice: a Kafka-compatible streaming log coordinated by Raft. This crate is the broker and the
//! `sluice` CLI's client verbs; ARCHITECTURE.md has the code map and the rules between modules.
//! From the bottom up: `config`, `errors`, `acl_types`, `clock`, `metrics`, `identity` · `controller` (the
//! replicated metadata) · `rpc` (node-to-node messages) · `broker` (what handlers and loops
//! share), `session` · `membership`, `partition`, `coordinator` (consumer groups), `kafka`, `admin` · `net` · `node` (the composition root) ·
//! `server`, `testkit`. `cli` stands apart: it speaks only the Kafka protocol.

pub mod acl_types;
pub mod admin;
pub mod alloc_guard;
pub mod broker;
#[cfg(feature = "chaos-bugs")]
pub mod chaos_bugs;
pub mod cli;
pub mod clock;
pub mod config;
pub mod controller;
pub mod coordinator;
pub mod errors;
pub mod identity;
pub mod kafka;
pub mod membership;
pub mod metrics;
pub mod net;
pub mod node;
pub mod partition;
pub mod rpc;
pub mod scram;
pub mod server;
pub mod session;
pub mod testkit;

// The binary installs the guarded allocator (src/main.rs); this crate's own tests drive hostile
// frames against in-process nodes, so they need it too. Dependents choose for themselves.
#[cfg(test)]
#[global_allocator]
static GLOBAL: alloc_guard::GuardedAlloc = alloc_guard::GuardedAlloc;
