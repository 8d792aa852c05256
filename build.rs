//! Generates the prost types from `proto/` with the vendored `protoc`, so a
//! fresh machine needs no system protoc.
fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    std::env::set_var("PROTOC", protoc);
    println!("cargo:rerun-if-changed=proto/sessionizer.proto");
    prost_build::Config::new()
        .btree_map(["."])
        .compile_protos(&["proto/sessionizer.proto"], &["proto"])?;
    Ok(())
}
