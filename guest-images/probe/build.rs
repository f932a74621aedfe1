// Links the probe as a bare-metal image: no C runtime, no libc, our own linker
// script that places it at 1 MiB and emits the PVH ELF note in a PT_NOTE segment.
fn main() {
    let dir = std::env::var("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR");
    println!("cargo:rerun-if-changed=probe.ld");
    for arg in [
        "-nostartfiles",
        "-nostdlib",
        "-static",
        "-no-pie",
        "-Wl,--build-id=none",
        "-Wl,-n",
        &format!("-Wl,-T,{dir}/probe.ld"),
    ] {
        println!("cargo:rustc-link-arg-bins={arg}");
    }
}
