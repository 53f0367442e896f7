//! Gateway API HTTPRoute (to be written).
