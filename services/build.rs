fn main() -> Result<(), Box<dyn std::error::Error>> {
    // A vendored protoc keeps the build free of system packages; PROTOC still wins if set.
    if std::env::var_os("PROTOC").is_none() {
        std::env::set_var("PROTOC", protoc_bin_vendored::protoc_bin_path()?);
    }
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    let descriptors = out.join("roe_descriptor.bin");
    tonic_prost_build::configure()
        .file_descriptor_set_path(&descriptors)
        .compile_protos(&["../proto/roe/v1/roe.proto"], &["../proto"])?;
    // The proto3 JSON mapping of every message, for the HTTP API's roe endpoints: one
    // source of truth for their field names (lowerCamelCase out, either spelling in).
    pbjson_build::Builder::new()
        .register_descriptors(&std::fs::read(&descriptors)?)?
        .build(&[".roe.v1"])?;
    println!("cargo:rerun-if-changed=../proto/roe/v1/roe.proto");
    Ok(())
}
