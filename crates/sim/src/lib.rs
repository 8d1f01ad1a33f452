//! The gpuscale simulator.
//!
//! Replays a request trace against a simulated fleet of GPU replicas
//! (continuous batching, KV capacity, cold starts), driven by gpuscale's own
//! policy or by faithful re-implementations of the autoscalers users would
//! otherwise pick, and reports SLO attainment and GPU-hours for each.
