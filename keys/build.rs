//! Embeds the trust root into the crate (see `src/embedded.rs`).

use std::path::PathBuf;

fn main() {
    println!("cargo:rerun-if-env-changed=CAIRN_TRUST_ROOT");
    let manifest_dir = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").unwrap_or_default());
    let (src, origin) = match std::env::var("CAIRN_TRUST_ROOT") {
        Ok(p) if !p.is_empty() => (PathBuf::from(&p), p),
        _ => (
            manifest_dir.join("trust").join("root.v1"),
            "development".to_owned(),
        ),
    };
    println!("cargo:rerun-if-changed={}", src.display());
    let bytes = match std::fs::read(&src) {
        Ok(b) => b,
        Err(e) => {
            // A build script has no other way to fail with a message.
            eprintln!("cairn-keys: cannot read trust root {}: {e}", src.display());
            std::process::exit(1);
        }
    };
    let out = PathBuf::from(std::env::var("OUT_DIR").unwrap_or_default()).join("embedded-root");
    if let Err(e) = std::fs::write(&out, bytes) {
        eprintln!("cairn-keys: cannot write {}: {e}", out.display());
        std::process::exit(1);
    }
    println!("cargo:rustc-env=CAIRN_EMBEDDED_ROOT_ORIGIN={origin}");
}
