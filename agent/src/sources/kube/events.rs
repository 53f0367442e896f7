//! Kubernetes Events on invalid objects, so that `kubectl describe` and `kubectl get
//! events` show why the mesh ignores an object.

use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::Client;
use tokio::sync::mpsc::UnboundedReceiver;

use super::snapshot::Invalid;

/// Reporting component of the Events.
const CONTROLLER: &str = "nodemesh-agent";
/// The API server refuses longer notes.
const NOTE_MAX: usize = 1024;

/// Publishes a Warning Event for each invalid object received, until the sender is gone.
pub(super) async fn publish(client: Client, node: String, mut invalid: UnboundedReceiver<Invalid>) {
    let reporter = Reporter {
        controller: CONTROLLER.to_owned(),
        instance: Some(node),
    };
    let recorder = Recorder::new(client, reporter);
    while let Some((reference, note)) = invalid.recv().await {
        let event = Event {
            type_: EventType::Warning,
            reason: "InvalidConfig".to_owned(),
            note: Some(truncate(format!("skipped by the mesh: {note}"))),
            action: "Validate".to_owned(),
            secondary: None,
        };
        if let Err(e) = recorder.publish(&event, &reference).await {
            let name = reference.name.unwrap_or_default();
            log::warn!("cannot publish an Event on {name}: {e}");
        }
    }
}

fn truncate(mut note: String) -> String {
    if note.len() > NOTE_MAX {
        let mut end = NOTE_MAX - 3;
        while !note.is_char_boundary(end) {
            end -= 1;
        }
        note.truncate(end);
        note.push_str("...");
    }
    note
}
