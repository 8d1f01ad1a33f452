//! `Policy::decide` for 1, 100 and 10,000 workloads: time and heap
//! allocations per decision. The body lives with the policy crate
//! (`crates/policy/benches/decide.rs`) so the crate can be benchmarked on
//! its own; see there for what each workload does.
//!
//! Run: `cargo bench --bench decide`.

include!("../crates/policy/benches/decide.rs");
