fn main() -> Result<(), Box<dyn std::error::Error>> {
    // A vendored protoc keeps the build free of system packages; PROTOC still wins if set.
    if std::env::var_os("PROTOC").is_none() {
        std::env::set_var("PROTOC", protoc_bin_vendored::protoc_bin_path()?);
    }
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    tonic_prost_build::configure()
        .file_descriptor_set_path(out.join("roe_descriptor.bin"))
        .compile_protos(&["../proto/roe/v1/roe.proto"], &["../proto"])?;
    println!("cargo:rerun-if-changed=../proto/roe/v1/roe.proto");
    Ok(())
}
