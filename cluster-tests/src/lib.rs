//! Black-box chaos tests for Sluice: real `sluice server` processes, a fault-injecting TCP proxy
//! on every link, a nemesis that partitions, kills and pauses nodes, a workload that records
//! every operation, and a checker in the style of Jepsen's Kafka checker. See README.md.

pub mod checker;
pub mod cluster;
pub mod groupcheck;
pub mod groupload;
pub mod history;
pub mod kclient;
pub mod logcmp;
pub mod metacheck;
pub mod metaload;
pub mod nemesis;
pub mod powerloss;
pub mod proxy;
pub mod run;
pub mod workload;
