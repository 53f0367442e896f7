//! What `nodemesh status` shows of the Kubernetes source.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::SystemTime;

use serde::Serialize;
use serde_json::{json, Value};

use crate::identity::x509::rfc3339;

/// Shared by the watches, the snapshot builder and the admin socket (never by the
/// request path).
pub struct Status {
    api_server: String,
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    watches: BTreeMap<&'static str, Watch>,
    last_sync: Option<SystemTime>,
    /// Objects skipped by the last snapshot, with why.
    invalid_objects: Vec<String>,
}

#[derive(Default, Serialize)]
struct Watch {
    /// A full list of the kind has completed at least once.
    listed: bool,
    /// The last list or watch worked (false from an error until the next success).
    healthy: bool,
    errors: u64,
    last_error: Option<String>,
    /// Objects held (after the last list or event).
    objects: usize,
}

impl Status {
    pub(super) fn new(api_server: String, kinds: impl Iterator<Item = &'static str>) -> Self {
        let watches = kinds.map(|k| (k, Watch::default())).collect();
        Status {
            api_server,
            inner: Mutex::new(Inner {
                watches,
                ..Inner::default()
            }),
        }
    }

    fn update<T>(&self, f: impl FnOnce(&mut Inner) -> T) -> T {
        f(&mut self.inner.lock().unwrap_or_else(|e| e.into_inner()))
    }

    pub(super) fn listed(&self, kind: &'static str, objects: usize) {
        self.update(|inner| {
            let watch = inner.watches.entry(kind).or_default();
            watch.listed = true;
            watch.healthy = true;
            watch.objects = objects;
        });
    }

    pub(super) fn healthy(&self, kind: &'static str, objects: usize) {
        self.update(|inner| {
            let watch = inner.watches.entry(kind).or_default();
            watch.healthy = true;
            watch.objects = objects;
        });
    }

    /// Records a failed list or watch; true if the kind had never been listed (its first
    /// attempt is over, even though it failed).
    pub(super) fn failed(&self, kind: &'static str, error: String) -> bool {
        self.update(|inner| {
            let watch = inner.watches.entry(kind).or_default();
            let first = watch.errors == 0 && !watch.listed;
            watch.healthy = false;
            watch.errors += 1;
            watch.last_error = Some(error);
            first
        })
    }

    /// Every kind has been listed, or tried and failed: a first snapshot can be built.
    pub(super) fn all_tried(&self) -> bool {
        self.update(|inner| inner.watches.values().all(|w| w.listed || w.errors > 0))
    }

    /// `Err(why)` until every kind has been listed once: a watch that cannot list (the
    /// role lacks a rule, a CRD is missing) leaves the agent serving an incomplete view.
    pub fn readiness(&self) -> Result<(), String> {
        self.update(|inner| {
            let unlisted = inner.watches.iter().find(|(_, w)| !w.listed);
            match unlisted {
                None => Ok(()),
                Some((kind, w)) => Err(match &w.last_error {
                    Some(error) => {
                        format!("{kind} objects not listed from the API server: {error}")
                    }
                    None => format!("{kind} objects not listed from the API server yet"),
                }),
            }
        })
    }

    pub(super) fn synced(&self, invalid_objects: Vec<String>) {
        self.update(|inner| {
            inner.last_sync = Some(SystemTime::now());
            inner.invalid_objects = invalid_objects;
        });
    }

    pub fn json(&self) -> Value {
        self.update(|inner| {
            let errors: u64 = inner.watches.values().map(|w| w.errors).sum();
            json!({
                "kind": "kubernetes",
                "api_server": self.api_server,
                "last_sync": inner.last_sync.map(rfc3339),
                "watch_errors": errors,
                "watches": inner.watches,
                "invalid_objects": inner.invalid_objects,
            })
        })
    }
}
