//! [`PartitionId`]: a partition's index within its topic, one type everywhere. The wire carries
//! it as an i32 (where -1 and other negatives mean "none" or are garbage), storage as a u32, and
//! vectors index it as a usize; the conversions live here, once.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct PartitionId(u32);

impl PartitionId {
    pub const ZERO: PartitionId = PartitionId(0);

    pub const fn new(p: u32) -> PartitionId {
        PartitionId(p)
    }

    /// From a request's partition field; `None` for a negative one, which names no partition.
    pub fn from_wire(p: i32) -> Option<PartitionId> {
        u32::try_from(p).ok().map(PartitionId)
    }

    /// From a position in a topic's partition list.
    pub fn from_index(i: usize) -> PartitionId {
        // Topics have at most i32::MAX partitions (CreatePartitions counts are i32).
        PartitionId(u32::try_from(i).unwrap_or(u32::MAX))
    }

    /// As Kafka's wire carries it.
    pub fn wire(self) -> i32 {
        i32::try_from(self.0).unwrap_or(i32::MAX)
    }

    /// Its position in the topic's partition list.
    pub fn index(self) -> usize {
        self.0 as usize
    }
}

impl std::fmt::Display for PartitionId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wire_values_convert_both_ways_and_negatives_name_nothing() {
        assert_eq!(PartitionId::from_wire(-1), None);
        let p = PartitionId::from_wire(7).unwrap();
        assert_eq!(
            (p.wire(), p.index(), p.to_string()),
            (7, 7, "7".to_string())
        );
        assert_eq!(PartitionId::from_index(3).wire(), 3);
        // The metadata snapshot keeps its old number format.
        assert_eq!(serde_json::to_string(&p).unwrap(), "7");
        // As a map key too (leaders, reassignments): the old `{"7": ...}`.
        let m: std::collections::BTreeMap<PartitionId, u8> = [(p, 1)].into_iter().collect();
        let json = serde_json::to_string(&m).unwrap();
        assert_eq!(json, r#"{"7":1}"#);
        let back: std::collections::BTreeMap<PartitionId, u8> =
            serde_json::from_str(&json).unwrap();
        assert_eq!(back, m);
    }
}
