//! A fake Kubernetes API server for tests and the demo.
//!
//! Speaks the real HTTP API for the verbs gpuscale uses, so the code under
//! test is the same kube-rs code that runs against a real cluster.
