//! Generates the Rust code for every `.proto` under the workspace's `proto/`
//! directory, with the `protoc` binary from the `protoc-bin-vendored` crate so
//! that a fresh machine needs no system protoc. Also writes the encoded file
//! descriptor set that gRPC server reflection serves.

use std::path::PathBuf;

const PROTOS: &[&str] = &[
    "gpuscale/v1/common.proto",
    "gpuscale/v1/agent.proto",
    "gpuscale/v1/serving.proto",
    "gpuscale/v1/scaler.proto",
    "gpuscale/v1/activator.proto",
    "kubelet/podresources/v1/api.proto",
    "externalscaler/externalscaler.proto",
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let root = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR")?).join("../../proto");
    let out_dir = PathBuf::from(std::env::var("OUT_DIR")?);
    let protos: Vec<PathBuf> = PROTOS.iter().map(|p| root.join(p)).collect();
    for p in &protos {
        println!("cargo:rerun-if-changed={}", p.display());
    }

    let mut config = tonic_prost_build::Config::new();
    config.protoc_executable(protoc_bin_vendored::protoc_bin_path()?);
    tonic_prost_build::configure()
        .file_descriptor_set_path(out_dir.join("gpuscale_descriptor.bin"))
        .compile_with_config(config, &protos, &[root])?;
    Ok(())
}
