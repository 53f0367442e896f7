//! Istio networking.istio.io VirtualService and DestinationRule (to be written).
