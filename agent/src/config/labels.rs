//! Labels (and Service selectors) as the agent keeps them: one sorted
//! allocation of pairs. A `BTreeMap<String, String>` allocates a 544-byte
//! node even for one label, and a large cluster's tens of thousands of pods
//! and Services each carry a set or two for as long as they exist.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Key-value pairs, sorted by key, each key once.
#[derive(Clone, Default, PartialEq, Eq, Hash)]
pub struct Labels(Box<[(Box<str>, Box<str>)]>);

impl Labels {
    pub fn get(&self, key: &str) -> Option<&str> {
        let at = self.0.binary_search_by(|(k, _)| (**k).cmp(key)).ok()?;
        Some(&self.0[at].1)
    }

    /// Pairs in key order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &str)> {
        self.0.iter().map(|(k, v)| (&**k, &**v))
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Whether every pair of `subset` is here too.
    pub fn contains_all<'a>(&self, mut subset: impl Iterator<Item = (&'a str, &'a str)>) -> bool {
        subset.all(|(k, v)| self.get(k) == Some(v))
    }
}

/// A later pair wins over an earlier one of the same key, as in a map.
impl<K: Into<Box<str>>, V: Into<Box<str>>> FromIterator<(K, V)> for Labels {
    fn from_iter<I: IntoIterator<Item = (K, V)>>(pairs: I) -> Labels {
        let map: BTreeMap<Box<str>, Box<str>> = pairs
            .into_iter()
            .map(|(k, v)| (k.into(), v.into()))
            .collect();
        Labels(map.into_iter().collect())
    }
}

impl From<BTreeMap<String, String>> for Labels {
    fn from(map: BTreeMap<String, String>) -> Labels {
        Labels(map.into_iter().map(|(k, v)| (k.into(), v.into())).collect())
    }
}

impl fmt::Debug for Labels {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_map().entries(self.iter()).finish()
    }
}

impl Serialize for Labels {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_map(self.iter())
    }
}

impl<'de> Deserialize<'de> for Labels {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Labels, D::Error> {
        BTreeMap::<String, String>::deserialize(deserializer).map(Labels::from)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_are_found_by_key_and_a_later_pair_wins() {
        let labels: Labels = [("version", "v1"), ("app", "web"), ("version", "v2")]
            .into_iter()
            .collect();
        assert_eq!(labels.get("app"), Some("web"));
        assert_eq!(labels.get("version"), Some("v2"));
        assert_eq!(labels.get("zone"), None);
        assert_eq!(
            labels.iter().collect::<Vec<_>>(),
            [("app", "web"), ("version", "v2")]
        );
        assert!(labels.contains_all([("app", "web")].into_iter()));
        assert!(!labels.contains_all([("app", "web"), ("zone", "a")].into_iter()));
        assert_eq!(
            serde_json::to_string(&labels).unwrap(),
            r#"{"app":"web","version":"v2"}"#
        );
        let back: Labels = serde_json::from_str(r#"{"version":"v2","app":"web"}"#).unwrap();
        assert_eq!(back, labels);
    }

    #[test]
    fn a_set_of_two_labels_costs_a_fraction_of_a_map() {
        let pairs = [("app", "reviews"), ("version", "v1")];
        let before = crate::counting::live_bytes();
        let labels: Labels = pairs.into_iter().collect();
        let compact = crate::counting::live_bytes() - before;
        let map: BTreeMap<String, String> = pairs
            .into_iter()
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect();
        let as_map = crate::counting::live_bytes() - before - compact;
        assert!(compact * 3 < as_map, "{compact} B against {as_map} B");
        drop((labels, map));
    }
}
