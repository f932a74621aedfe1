//! A forbidden call stops the process with one line naming the thread and
//! the call; a refused open fails with EACCES and the thread goes on. Each
//! case runs in a child process (this test binary again, told which case by
//! the environment), since the real filters of ffmk-vmm's thread kinds are
//! installed for real and a stopped child is the expected outcome.
use sandbox::{seccomp, Mode, ThreadKind};
use std::process::Command;

const CASE: &str = "FFMK_SANDBOX_CASE";

/// In the child: confine a thread as `kind`, then make the call `case`
/// names. Exits 0 if the process is still alive afterwards.
fn child(case: &str) -> ! {
    let (kind, what) = case.split_once(':').expect("case is KIND:CALL");
    let kind = match kind {
        "vcpu" => ThreadKind::Vcpu,
        "io" => ThreadKind::Io,
        "api" => ThreadKind::Api,
        _ => panic!("unknown kind {kind}"),
    };
    let what = what.to_string();
    let t = std::thread::Builder::new()
        .name(format!("{}0", kind.name()))
        .spawn(move || {
            seccomp::install(kind, Mode::On, &format!("{}0", kind.name())).unwrap();
            match what.as_str() {
                // SAFETY: plain system calls with valid arguments.
                "socket" => unsafe {
                    libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0);
                },
                "execve" => {
                    let prog = c"/bin/true";
                    let argv = [prog.as_ptr(), std::ptr::null()];
                    let envp = [std::ptr::null()];
                    // SAFETY: NUL-terminated program, argument and
                    // environment lists that outlive the call.
                    unsafe { libc::execve(prog.as_ptr(), argv.as_ptr(), envp.as_ptr()) };
                }
                "open" => {
                    let e = std::fs::File::open("/etc/hostname").unwrap_err();
                    assert_eq!(e.raw_os_error(), Some(libc::EACCES), "{e}");
                    println!("open refused: {e}");
                }
                "allowed" => println!("still here"),
                // A KVM-type ioctl (on a descriptor that does not exist).
                "kvm-ioctl" => {
                    // SAFETY: the kernel rejects the descriptor.
                    let r = unsafe { libc::ioctl(-1, 0xAE80 as _) };
                    assert_eq!(r, -1);
                    println!("still here");
                }
                // An ioctl of a type the vCPU list does not name.
                "ioctl" => unsafe {
                    // SAFETY: as above; the filter stops it first.
                    libc::ioctl(-1, 0x8912 as _); // SIOCGIFCONF
                },
                _ => panic!("unknown call {what}"),
            }
        })
        .unwrap();
    t.join().unwrap();
    std::process::exit(0)
}

fn run_case(case: &str) -> (Option<i32>, String, String) {
    let out = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "dispatch", "--nocapture"])
        .env(CASE, case)
        .output()
        .unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The child's entry point (does nothing in a normal test run).
#[test]
fn dispatch() {
    if let Ok(case) = std::env::var(CASE) {
        child(&case);
    }
}

#[test]
fn a_vcpu_thread_opening_a_socket_stops_the_process_with_one_line() {
    let (code, _, err) = run_case("vcpu:socket");
    assert_eq!(code, Some(seccomp::EXIT_FORBIDDEN), "{err}");
    assert!(
        err.contains(
            "ffmk-vmm: seccomp: the vcpu0 thread made system call 41 (socket), which its \
             filter forbids: stopping the VMM (exit 159"
        ),
        "{err}"
    );
}

#[test]
fn an_io_thread_starting_a_program_stops_the_process() {
    let (code, _, err) = run_case("io:execve");
    assert_eq!(code, Some(seccomp::EXIT_FORBIDDEN), "{err}");
    assert!(
        err.contains("the io0 thread made system call 59 (execve)"),
        "{err}"
    );
}

#[test]
fn an_ioctl_outside_the_vcpu_types_is_forbidden() {
    let (code, _, err) = run_case("vcpu:ioctl");
    assert_eq!(code, Some(seccomp::EXIT_FORBIDDEN), "{err}");
    assert!(err.contains("system call 16 (ioctl)"), "{err}");
}

#[test]
fn opens_are_refused_with_eacces_and_allowed_calls_go_through() {
    let (code, out, err) = run_case("vcpu:open");
    assert_eq!(code, Some(0), "{err}");
    assert!(out.contains("open refused"), "{out}");
    let (code, out, err) = run_case("api:allowed");
    assert_eq!(code, Some(0), "{err}");
    assert!(out.contains("still here"), "{out}");
    let (code, out, err) = run_case("vcpu:kvm-ioctl");
    assert_eq!(code, Some(0), "{err}");
    assert!(out.contains("still here"), "{out}");
}
