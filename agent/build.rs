//! Release builds of the binary lay out the code an agent runs once it is ready — the proxy,
//! TLS, h2, the runtime — first and together (`hot-symbols.txt`, one linker symbol per line).
//! The kernel maps code 64 KiB at a time, so code that is hot but scattered among cold code
//! keeps most of the binary resident; together, it keeps only itself (see `residency`).
//!
//! Only lld reads the list: the x86_64 Linux targets link with it by default. A symbol the list
//! names and the build lacks (renamed, inlined) is skipped without a warning, so a stale list
//! costs memory, never a build.

fn main() {
    println!("cargo::rerun-if-changed=hot-symbols.txt");
    println!("cargo::rerun-if-env-changed=AMBIENTD_NO_SYMBOL_ORDER");
    let var = |k: &str| std::env::var(k).unwrap_or_default();
    let lld_by_default = var("CARGO_CFG_TARGET_ARCH") == "x86_64"
        && var("CARGO_CFG_TARGET_OS") == "linux"
        && var("CARGO_CFG_TARGET_ENV") == "gnu";
    if var("PROFILE") != "release" || !lld_by_default || !var("AMBIENTD_NO_SYMBOL_ORDER").is_empty()
    {
        return;
    }
    let list = std::path::Path::new(&var("CARGO_MANIFEST_DIR")).join("hot-symbols.txt");
    println!(
        "cargo::rustc-link-arg-bin=ambientd=-Wl,--symbol-ordering-file={}",
        list.display()
    );
    println!("cargo::rustc-link-arg-bin=ambientd=-Wl,--no-warn-symbol-ordering");
}
