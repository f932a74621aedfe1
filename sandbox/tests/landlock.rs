//! Landlock rules for real: a child process (this test binary again)
//! restricts itself, then tries what the VMM would, inside and outside the
//! paths it named.
use sandbox::landlock::{restrict, Enforced, Paths};
use std::path::{Path, PathBuf};
use std::process::Command;

const CASE: &str = "FFMK_LANDLOCK_DIR";

fn denied(r: std::io::Result<impl Sized>) -> bool {
    matches!(r, Err(e) if e.raw_os_error() == Some(libc::EACCES))
}

/// In the child: the rules for a VMM whose configuration names a kernel,
/// a disk, a socket directory and a snapshot tree under `root`.
fn child(root: &Path) -> ! {
    let paths = Paths {
        read: vec![root.join("kernel")],
        read_write: vec![root.join("disk.img")],
        devices: vec![],
        socket_dirs: vec![root.join("run")],
        trees: vec![root.join("bb")],
    };
    let enforced = restrict(&paths).unwrap();
    println!("enforced={enforced:?}");
    if enforced == Enforced::Not {
        std::process::exit(0);
    }
    // Named: usable as named.
    std::fs::read(root.join("kernel")).unwrap();
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(root.join("disk.img"))
        .unwrap();
    std::fs::create_dir_all(root.join("bb/snap1")).unwrap();
    std::fs::write(root.join("bb/snap1/manifest.json"), b"{}").unwrap();
    std::fs::rename(root.join("bb/snap1"), root.join("bb/snap2")).unwrap();
    let sock = std::os::unix::net::UnixListener::bind(root.join("run/v.sock")).unwrap();
    drop(sock);
    std::fs::remove_file(root.join("run/v.sock")).unwrap();
    // Not named, or not that way: refused.
    assert!(denied(std::fs::read(root.join("secret"))));
    assert!(denied(std::fs::read("/etc/hostname")));
    assert!(denied(std::fs::write(root.join("kernel"), b"x")));
    assert!(denied(std::fs::write(root.join("run/file"), b"x")));
    assert!(denied(std::fs::create_dir(root.join("elsewhere"))));
    assert!(denied(std::fs::remove_file(root.join("secret"))));
    println!("all checks passed");
    std::process::exit(0)
}

#[test]
fn dispatch() {
    if let Some(dir) = std::env::var_os(CASE) {
        child(Path::new(&dir));
    }
}

#[test]
fn only_what_the_configuration_names_is_reachable_and_only_as_named() {
    let root: PathBuf = std::env::temp_dir().join(format!("ffmk-landlock-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&root);
    for d in ["run", "bb"] {
        std::fs::create_dir_all(root.join(d)).unwrap();
    }
    for f in ["kernel", "disk.img", "secret"] {
        std::fs::write(root.join(f), f).unwrap();
    }
    let out = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "dispatch", "--nocapture"])
        .env(CASE, &root)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    if !text.contains("enforced=Not") {
        assert!(text.contains("all checks passed"), "{text}");
    }
    assert!(root.join("secret").exists());
    std::fs::remove_dir_all(root).unwrap();
}
