//! The policy crate's one error type.
//!
//! Everything a user hands the policy can be wrong in a way that deserves a
//! clear message: the workload spec (field path, value, allowed range), a
//! performance-model preset name, a profile file (line and column). Running
//! the policy never fails: "not enough data" is a decision (hold), not an
//! error.

use thiserror::Error;

/// What is wrong with a workload spec or the performance model it names.
#[derive(Debug, Clone, PartialEq, Error)]
pub enum SpecError {
    /// A field holds a value outside its allowed range or set.
    #[error("{path}: {value} is not allowed; {allowed}")]
    InvalidField {
        /// Field path from the custom resource root, e.g.
        /// `spec.behavior.scaleDown.policies[1].periodSeconds`.
        path: String,
        /// The offending value as the user wrote it.
        value: String,
        /// What would have been accepted.
        allowed: String,
    },
    /// The spec names a performance-model preset gpuscale does not ship.
    #[error("{path}: unknown performance-model preset {name:?}; known presets: {known}")]
    UnknownPreset {
        path: String,
        name: String,
        known: String,
    },
    /// A profile file could not be read: the line (1-based) and column
    /// (1-based CSV column; 0 for the whole line) say where.
    #[error("profile line {line}, column {column}: {message}")]
    Profile {
        line: usize,
        column: usize,
        message: String,
    },
    /// A profile was read but does not determine a usable model (too few
    /// points, degenerate data).
    #[error("profile: {0}")]
    ProfileFit(String),
    /// The spec's performance model is a profile file, and the caller did
    /// not supply its contents.
    #[error("{path}: the profile file {file:?} must be read by the caller and passed in")]
    ProfileNotSupplied { path: String, file: String },
}

impl SpecError {
    pub(crate) fn invalid(
        path: impl Into<String>,
        value: impl ToString,
        allowed: impl Into<String>,
    ) -> Self {
        SpecError::InvalidField {
            path: path.into(),
            value: value.to_string(),
            allowed: allowed.into(),
        }
    }
}
