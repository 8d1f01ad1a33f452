//! The gpuscale scaler.
//!
//! Ingests the agents' streams (handlers validate, convert and hand over to
//! one task that owns all state), keeps short windows per node, GPU, pod and
//! model, asks the policy for a decision per workload every tick, and
//! publishes decisions on its gRPC APIs and as Prometheus metrics.
