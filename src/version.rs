//! Build metadata embedded by the root `build.rs`.

/// The crate version, for `--version`.
pub const SHORT: &str = env!("CARGO_PKG_VERSION");

/// Commit the binary was built from, or `unknown`.
pub const GIT_COMMIT: &str = env!("GPUSCALE_GIT_COMMIT");

/// Fingerprint of the `.proto` files the binary was built with.
pub const PROTO_FINGERPRINT: &str = env!("GPUSCALE_PROTO_FINGERPRINT");

/// Multi-line description for `gpuscale version`.
pub fn long() -> String {
    format!(
        "gpuscale {SHORT}\ncommit: {GIT_COMMIT}\ntarget: {}\nprofile: {}\nprotocol: gpuscale.v1 ({PROTO_FINGERPRINT})",
        env!("GPUSCALE_BUILD_TARGET"),
        env!("GPUSCALE_BUILD_PROFILE"),
    )
}
