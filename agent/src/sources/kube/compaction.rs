//! Rebuilds a watch store once most of its objects are gone.
//!
//! kube-runtime's store is a hash map: its capacity never shrinks, and the entries that
//! survive a mass deletion stay scattered over the memory the deleted ones shared with
//! them. A cluster that shrank from 50 000 pods to 500 would keep paying for 50 000.
//! Rebuilding the store the way a re-list does (a fresh map, fresh copies of the
//! objects) hands that memory back; readers see the old store until the new one is
//! complete. Rebuilding at a quarter of the peak keeps the total cost linear in the
//! deletions.

use std::hash::Hash;

use kube::runtime::reflector::store::Writer;
use kube::runtime::reflector::{Lookup, Store};
use kube::runtime::watcher::Event;

/// Smaller stores are not worth rebuilding.
const MIN_PEAK: usize = 1024;

/// The size a store reached since it was last built from scratch.
#[derive(Default)]
pub(super) struct Compaction {
    peak: usize,
}

impl Compaction {
    /// Records the store's size after a change; true when it should be rebuilt.
    pub fn due(&mut self, len: usize) -> bool {
        self.peak = self.peak.max(len);
        self.peak >= MIN_PEAK && len <= self.peak / 4
    }

    /// The store was built from scratch (a re-list, a rebuild) with `len` objects.
    pub fn rebuilt(&mut self, len: usize) {
        self.peak = len;
    }
}

/// Replaces the store behind `writer` by a fresh one holding copies of its objects.
pub(super) fn rebuild<K>(writer: &mut Writer<K>, store: &Store<K>)
where
    K: Lookup + Clone + 'static,
    K::DynamicType: Eq + Hash + Clone,
{
    writer.apply_watcher_event(&Event::Init);
    for object in store.state() {
        writer.apply_watcher_event(&Event::InitApply(K::clone(&object)));
    }
    writer.apply_watcher_event(&Event::InitDone);
}

#[cfg(test)]
mod tests {
    use k8s_openapi::api::core::v1::ConfigMap;
    use kube::api::ObjectMeta;

    use super::*;
    use crate::counting::live_bytes;

    fn config_map(i: usize) -> ConfigMap {
        ConfigMap {
            metadata: ObjectMeta {
                name: Some(format!("cm-{i}")),
                namespace: Some("scale".to_owned()),
                ..ObjectMeta::default()
            },
            ..ConfigMap::default()
        }
    }

    #[test]
    fn is_due_at_a_quarter_of_the_peak_and_only_for_large_stores() {
        let mut compaction = Compaction::default();
        assert!(!compaction.due(100));
        assert!(!compaction.due(10), "a small store is never rebuilt");
        assert!(!compaction.due(4000));
        assert!(!compaction.due(1001));
        assert!(compaction.due(1000));
        compaction.rebuilt(1000);
        assert!(
            !compaction.due(251),
            "the peak restarts at the rebuilt size"
        );
        assert!(!compaction.due(250), "below the minimum peak");
    }

    #[test]
    fn a_rebuilt_store_holds_the_same_objects_as_new_copies() {
        let mut writer = Writer::<ConfigMap>::default();
        let store = writer.as_reader();
        for i in 0..2000 {
            writer.apply_watcher_event(&Event::Apply(config_map(i)));
        }
        for i in 10..2000 {
            writer.apply_watcher_event(&Event::Delete(config_map(i)));
        }
        let before = store.state();
        let held = live_bytes();
        rebuild(&mut writer, &store);
        let freed = held - live_bytes();
        // A map sized for 2 000 entries of about 100 bytes, replaced by one for 10.
        assert!(freed > 150_000, "rebuilding freed only {freed} bytes");
        let mut names: Vec<_> = store
            .state()
            .iter()
            .map(|c| c.metadata.name.clone())
            .collect();
        names.sort();
        let mut expected: Vec<_> = (0..10).map(|i| Some(format!("cm-{i}"))).collect();
        expected.sort();
        assert_eq!(names, expected);
        let after = store.state();
        assert!(
            after
                .iter()
                .all(|a| !before.iter().any(|b| std::sync::Arc::ptr_eq(a, b))),
            "the rebuilt store must not keep the old allocations"
        );
    }
}
