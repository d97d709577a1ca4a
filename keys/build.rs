//! Embeds the trust root into the crate (see `src/embedded.rs`).
//!
//! When the embedded root is the checked-in development root (no
//! `CAIRN_TRUST_ROOT`, or one naming a file with the same bytes), this
//! emits the cfg `cairn_dev_root`. Only then does `embedded.rs` compile in
//! the development release key for `cairn demo`: a binary built for an
//! organisation's root does not contain the development private key at
//! all (conditional compilation, not the optimizer's dead-code removal).

use std::path::PathBuf;

fn main() {
    println!("cargo::rustc-check-cfg=cfg(cairn_dev_root)");
    println!("cargo:rerun-if-env-changed=CAIRN_TRUST_ROOT");
    let manifest_dir = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").unwrap_or_default());
    let dev_root = manifest_dir.join("trust").join("root.v1");
    println!("cargo:rerun-if-changed={}", dev_root.display());
    let src = match std::env::var("CAIRN_TRUST_ROOT") {
        Ok(p) if !p.is_empty() => PathBuf::from(&p),
        _ => dev_root.clone(),
    };
    println!("cargo:rerun-if-changed={}", src.display());
    let read = |p: &PathBuf| match std::fs::read(p) {
        Ok(b) => b,
        Err(e) => {
            // A build script has no other way to fail with a message.
            eprintln!("cairn-keys: cannot read trust root {}: {e}", p.display());
            std::process::exit(1);
        }
    };
    let bytes = read(&src);
    // The same bytes under another name are still the development root.
    let development = bytes == read(&dev_root);
    let origin = if development {
        "development".to_owned()
    } else {
        src.display().to_string()
    };
    let out = PathBuf::from(std::env::var("OUT_DIR").unwrap_or_default()).join("embedded-root");
    if let Err(e) = std::fs::write(&out, bytes) {
        eprintln!("cairn-keys: cannot write {}: {e}", out.display());
        std::process::exit(1);
    }
    println!("cargo:rustc-env=CAIRN_EMBEDDED_ROOT_ORIGIN={origin}");
    if development {
        println!("cargo:rustc-cfg=cairn_dev_root");
    }
}
