//! [`GroupId`]: the name of a Raft group inside a process, `"meta"` or `"p/{topic_id}/{partition}"`.
//! Cloned into every map, task and log line that concerns the group, so it is a shared string;
//! it is a plain string on the wire and in JSON (ping replies, admin output).

use std::borrow::Borrow;
use std::fmt;
use std::ops::Deref;
use std::sync::Arc;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Identifies a Raft group inside a process: [`crate::META_GROUP`] or
/// `"p/{topic_id}/{partition}"`. Dereferences to `str`; build one with `From`/`Into`.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct GroupId(Arc<str>);

impl GroupId {
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Whether this is the metadata group.
    pub fn is_meta(&self) -> bool {
        &*self.0 == crate::META_GROUP
    }
}

impl fmt::Display for GroupId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for GroupId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&*self.0, f)
    }
}

impl Deref for GroupId {
    type Target = str;

    fn deref(&self) -> &str {
        &self.0
    }
}

impl AsRef<str> for GroupId {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

/// Lets maps keyed by `GroupId` be looked up with a `&str` (hash and order are the string's).
impl Borrow<str> for GroupId {
    fn borrow(&self) -> &str {
        &self.0
    }
}

impl From<&str> for GroupId {
    fn from(s: &str) -> Self {
        GroupId(Arc::from(s))
    }
}

impl From<String> for GroupId {
    fn from(s: String) -> Self {
        GroupId(Arc::from(s))
    }
}

impl From<&String> for GroupId {
    fn from(s: &String) -> Self {
        GroupId(Arc::from(s.as_str()))
    }
}

impl From<GroupId> for String {
    fn from(g: GroupId) -> Self {
        g.0.to_string()
    }
}

impl PartialEq<str> for GroupId {
    fn eq(&self, other: &str) -> bool {
        &*self.0 == other
    }
}

impl PartialEq<&str> for GroupId {
    fn eq(&self, other: &&str) -> bool {
        &*self.0 == *other
    }
}

impl PartialEq<String> for GroupId {
    fn eq(&self, other: &String) -> bool {
        *self.0 == **other
    }
}

impl Serialize for GroupId {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for GroupId {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d).map(GroupId::from)
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    #[test]
    fn a_group_id_is_a_string_on_the_wire_and_in_maps() -> anyhow::Result<()> {
        let g = GroupId::from("p/t/0");
        assert_eq!(serde_json::to_string(&g)?, "\"p/t/0\"");
        assert_eq!(serde_json::from_str::<GroupId>("\"p/t/0\"")?, g);
        let mut m = HashMap::new();
        m.insert(g.clone(), 1);
        assert_eq!(m.get("p/t/0"), Some(&1));
        assert_eq!(g, "p/t/0");
        assert_eq!(g.to_string(), "p/t/0");
        assert!(GroupId::from(crate::META_GROUP).is_meta());
        Ok(())
    }
}
