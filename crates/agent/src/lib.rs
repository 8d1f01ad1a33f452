//! The gpuscale node agent.
//!
//! Samples its telemetry sources every interval, streams a snapshot and then
//! deltas to the scaler over one long-lived gRPC stream (reconnecting with
//! jittered backoff and coalescing while disconnected), writes the pods'
//! readiness-gate condition, serves the node-local ServingService and exports
//! its own Prometheus metrics.
