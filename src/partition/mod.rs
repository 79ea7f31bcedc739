//! Partition management on this node: the manager that converges local replicas to the
//! controller's desired state, leadership (reports, failover from fenced leaders, preferred
//! leaders, hand-off at shutdown), reassignment, delete retention, and storage health. Each is a
//! loop over `broker::Broker` that the node starts and cancels.

pub mod leadership;
pub mod manager;
pub mod producers;
pub mod reassignment;
pub mod retention;
pub mod storage_health;
