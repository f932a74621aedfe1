//! Lays out `ffmk-vmm`'s start-up code together: the functions a VM's
//! start runs, listed in `startup.order` (made by `ci/startup-order`), go
//! first in the binary's text, in that order, so that starting a VM maps
//! a few hundred KiB of the binary instead of pages all over its 7 MiB
//! (docs/perf.md, "Footprint"). Only the link changes; a name the file
//! lists that the binary lacks (the code changed since) is skipped.
//!
//! Needs LLD (`--symbol-ordering-file`), the default linker of Rust's
//! x86_64-unknown-linux-gnu target since 1.90. `FFMK_LINK_ORDER=off`
//! leaves the layout to the linker (for a build with another linker).

use std::env;
use std::path::Path;

fn main() {
    let order = Path::new("startup.order");
    println!("cargo:rerun-if-changed=startup.order");
    println!("cargo:rerun-if-env-changed=FFMK_LINK_ORDER");
    let wanted = env::var("FFMK_LINK_ORDER").map_or(true, |v| v != "off");
    let lld_target = env::var("TARGET").is_ok_and(|t| t == "x86_64-unknown-linux-gnu");
    if !(wanted && lld_target && order.exists()) {
        return;
    }
    let Ok(path) = order.canonicalize() else {
        return;
    };
    println!(
        "cargo:rustc-link-arg-bin=ffmk-vmm=-Wl,--symbol-ordering-file={}",
        path.display()
    );
    println!("cargo:rustc-link-arg-bin=ffmk-vmm=-Wl,--no-warn-symbol-ordering");
    // Relative relocations packed (DT_RELR, glibc 2.36 and newer): the
    // dynamic loader reads a few KiB at start instead of 300 KiB of them.
    println!("cargo:rustc-link-arg-bin=ffmk-vmm=-Wl,-z,pack-relative-relocs");
}
