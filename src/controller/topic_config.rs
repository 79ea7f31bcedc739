//! Topic configs: the keys Sluice accepts, how each is validated, and [`TopicConfig`], a topic's
//! configs parsed once with the broker's defaults filled in. Everything that acts on a topic
//! config (produce, retention, the partition manager, DescribeConfigs) reads this one type.

use std::collections::BTreeMap;

use crate::config::ServerConfig;

/// The topic configs Sluice accepts, in Kafka's names.
pub const TOPIC_CONFIG_KEYS: &[&str] = &[
    "cleanup.policy",
    "max.message.bytes",
    "message.timestamp.type",
    "retention.bytes",
    "retention.ms",
    "segment.bytes",
];

/// Checks one `key=value` as CreateTopics gets it; the message says what is allowed.
pub fn validate(key: &str, value: &str) -> Result<(), String> {
    let num = |min: i64| -> Result<(), String> {
        match value.parse::<i64>() {
            Ok(n) if n >= min => Ok(()),
            _ => Err(format!(
                "invalid value '{value}' for {key}: must be an integer >= {min}"
            )),
        }
    };
    match key {
        "cleanup.policy" => match value {
            "delete" => Ok(()),
            "compact" | "compact,delete" | "delete,compact" => {
                Err("cleanup.policy=compact is not supported by Sluice; use delete".to_string())
            }
            _ => Err(format!("invalid value '{value}' for cleanup.policy")),
        },
        "max.message.bytes" => num(0),
        "message.timestamp.type" => match value {
            "CreateTime" => Ok(()),
            _ => Err(format!(
                "message.timestamp.type={value} is not supported; only CreateTime"
            )),
        },
        "retention.bytes" | "retention.ms" => num(-1),
        "segment.bytes" => num(1024),
        _ => Err(format!("unknown topic config '{key}'")),
    }
}

/// A topic's effective configs: its own value where it set one, else the broker's default.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopicConfig {
    /// `retention.ms`; -1 keeps records forever.
    pub retention_ms: i64,
    /// `retention.bytes` per partition; -1 is unbounded.
    pub retention_bytes: i64,
    pub segment_bytes: u64,
    pub max_message_bytes: usize,
}

impl TopicConfig {
    /// Configs are validated on create, so a value that does not parse can only come from an
    /// older or foreign writer: it falls back to the default rather than, say, disabling
    /// retention.
    pub fn resolve(explicit: Option<&BTreeMap<String, String>>, broker: &ServerConfig) -> Self {
        fn get<T: std::str::FromStr>(
            explicit: Option<&BTreeMap<String, String>>,
            key: &str,
            default: T,
        ) -> T {
            explicit
                .and_then(|c| c.get(key))
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or(default)
        }
        TopicConfig {
            retention_ms: get(explicit, "retention.ms", broker.log_retention_ms),
            retention_bytes: get(explicit, "retention.bytes", broker.log_retention_bytes),
            segment_bytes: get(explicit, "segment.bytes", broker.log_segment_bytes),
            max_message_bytes: get(
                explicit,
                "max.message.bytes",
                broker.message_max_bytes as usize,
            ),
        }
    }

    /// The effective value of `key` as DescribeConfigs shows it.
    pub fn value(&self, key: &str) -> String {
        match key {
            "cleanup.policy" => "delete".into(),
            "max.message.bytes" => self.max_message_bytes.to_string(),
            "message.timestamp.type" => "CreateTime".into(),
            "retention.bytes" => self.retention_bytes.to_string(),
            "retention.ms" => self.retention_ms.to_string(),
            "segment.bytes" => self.segment_bytes.to_string(),
            _ => String::new(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topic_overrides_win_over_broker_defaults() {
        let broker = ServerConfig {
            log_retention_ms: 7,
            log_retention_bytes: -1,
            ..ServerConfig::default()
        };
        let limits = |c: Option<&BTreeMap<String, String>>| {
            let t = TopicConfig::resolve(c, &broker);
            (t.retention_ms, t.retention_bytes)
        };
        let mut c = BTreeMap::new();
        assert_eq!(limits(None), (7, -1));
        assert_eq!(limits(Some(&c)), (7, -1));
        c.insert("retention.bytes".to_string(), "65536".to_string());
        assert_eq!(limits(Some(&c)), (7, 65536));
        c.insert("retention.ms".to_string(), "-1".to_string());
        assert_eq!(limits(Some(&c)), (-1, 65536));
        c.insert("retention.ms".to_string(), "soon".to_string());
        assert_eq!(limits(Some(&c)), (7, 65536));
        assert_eq!(
            TopicConfig::resolve(Some(&c), &broker).value("retention.ms"),
            "7"
        );
    }

    #[test]
    fn validation_names_what_is_allowed() {
        assert!(validate("retention.ms", "-1").is_ok());
        assert!(validate("retention.ms", "abc").is_err());
        assert!(validate("segment.bytes", "10").is_err());
        assert!(validate("cleanup.policy", "compact").is_err());
        assert!(validate("no.such.key", "1").is_err());
        for k in TOPIC_CONFIG_KEYS {
            assert!(
                validate(k, "x").is_err() || *k == "cleanup.policy",
                "{k} accepts garbage"
            );
        }
    }
}
