//! gpuscale on Kubernetes.
//!
//! The `InferenceAutoscaler` custom resource, the controller that watches it
//! and the pods of its target, acts through the target's `/scale`
//! subresource with readiness gating and drain-before-delete, and leader
//! election over a `coordination.k8s.io/v1` Lease.
