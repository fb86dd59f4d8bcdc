//! Compiles the wire contract. protoc comes from `protoc-bin-vendored`, so the
//! build needs no system package.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    #[allow(unsafe_code)]
    // SAFETY: build scripts run single-threaded, so no other thread reads the environment.
    unsafe {
        std::env::set_var("PROTOC", protoc);
    }
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        // Small first buffers per stream (`codec.rs`).
        .codec_path("crate::codec::WireCodec")
        .compile_protos(
            &[
                "outpost/agent/v1/agent.proto",
                "outpost/admin/v1/admin.proto",
                "outpost/iac/v1/iac.proto",
                "outpost/identity/v1/identity.proto",
            ],
            &["."],
        )?;
    println!("cargo:rerun-if-changed=outpost");
    Ok(())
}
