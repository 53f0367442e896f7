//! Kubernetes Events on invalid objects, so that `kubectl describe` and `kubectl get
//! events` show why the mesh ignores an object, and on objects the mesh applies with a
//! warning (a Gateway host claimed by an older Gateway, a VirtualService bound to a
//! Gateway that does not exist...).

use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::Client;
use tokio::sync::mpsc::UnboundedReceiver;

use super::snapshot::{Notice, Problem};

/// Reporting component of the Events.
const CONTROLLER: &str = "nodemesh-agent";
/// The API server refuses longer notes.
const NOTE_MAX: usize = 1024;

/// Publishes a Warning Event for each notice received, until the sender is gone.
pub(super) async fn publish(client: Client, node: String, mut invalid: UnboundedReceiver<Notice>) {
    let reporter = Reporter {
        controller: CONTROLLER.to_owned(),
        instance: Some(node),
    };
    let recorder = Recorder::new(client, reporter);
    while let Some((reference, problem, note)) = invalid.recv().await {
        let (reason, note) = match problem {
            Problem::Invalid => ("InvalidConfig", format!("skipped by the mesh: {note}")),
            Problem::Warning => ("ConfigWarning", note),
        };
        let event = Event {
            type_: EventType::Warning,
            reason: reason.to_owned(),
            note: Some(truncate(note)),
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
