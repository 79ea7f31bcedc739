//! What a data directory belongs to: `meta.properties` (as in Kafka's log dirs) records the node
//! id and, once known, the cluster id, so a directory can never be used by another node or
//! cluster by mistake. Also mints cluster ids.

use std::path::Path;

/// The node id and cluster id a data directory was created for.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct DirIdentity {
    pub node_id: Option<u64>,
    pub cluster_id: Option<String>,
}

impl DirIdentity {
    pub fn load(dir: &Path) -> std::io::Result<DirIdentity> {
        let path = dir.join("meta.properties");
        let Some(bytes) = sluice_storage::file::read_optional(&path)? else {
            return Ok(DirIdentity::default());
        };
        let text = String::from_utf8_lossy(&bytes);
        let mut id = DirIdentity::default();
        for line in text.lines() {
            match line.split_once('=') {
                Some(("node.id", v)) => {
                    id.node_id = Some(v.trim().parse().map_err(|_| {
                        std::io::Error::new(
                            std::io::ErrorKind::InvalidData,
                            format!("{}: bad node.id '{v}'", path.display()),
                        )
                    })?)
                }
                Some(("cluster.id", v)) if !v.trim().is_empty() => {
                    id.cluster_id = Some(v.trim().to_string())
                }
                _ => {}
            }
        }
        Ok(id)
    }

    /// Writes `meta.properties` atomically (a crash leaves the old or the new file).
    pub fn store(dir: &Path, node_id: u64, cluster_id: Option<&str>) -> std::io::Result<()> {
        let text = format!(
            "# written by sluice; ties this data directory to one node of one cluster\nversion=1\nnode.id={node_id}\ncluster.id={}\n",
            cluster_id.unwrap_or("")
        );
        sluice_storage::file::write_atomic(&dir.join("meta.properties"), text.as_bytes())
    }
}

/// Kafka cluster ids are 22-character URL-safe base64 of 16 random bytes.
pub fn new_cluster_id() -> String {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let bytes: [u8; 16] = rand::random();
    let mut bits: u128 = u128::from_be_bytes(bytes);
    let mut s = String::with_capacity(22);
    for _ in 0..22 {
        s.push(ALPHABET[(bits & 63) as usize] as char);
        bits >>= 6;
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dir_identity_roundtrip() {
        let d = tempfile::tempdir().unwrap();
        assert_eq!(DirIdentity::load(d.path()).unwrap(), DirIdentity::default());
        DirIdentity::store(d.path(), 3, None).unwrap();
        assert_eq!(DirIdentity::load(d.path()).unwrap().node_id, Some(3));
        DirIdentity::store(d.path(), 3, Some("abc")).unwrap();
        let id = DirIdentity::load(d.path()).unwrap();
        assert_eq!(id.cluster_id.as_deref(), Some("abc"));
        std::fs::write(d.path().join("meta.properties"), "node.id=x\n").unwrap();
        assert!(DirIdentity::load(d.path()).is_err());
    }

    #[test]
    fn cluster_ids_look_like_kafkas() {
        let a = new_cluster_id();
        assert_eq!(a.len(), 22);
        assert_ne!(a, new_cluster_id());
    }
}
