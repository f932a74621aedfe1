//! `ffmk-stream`: STREAM's triad (`a[i] = b[i] + s * c[i]`) with its three
//! arrays bound to one NUMA node (mbind) and its thread on the CPUs of
//! another: the memory bandwidth a rank gets from local and from remote
//! memory. In a guest it measures what the guest's nodes give (their
//! memory is bound to host nodes by ffmk-vmm), on a host what the host's
//! nodes give. Prints one line:
//! `stream mem_node=N cpu_node=K mib=M runs=R triad_mib_s=X` (the best
//! run, as STREAM reports), or JSON with `--json`.
use clap::Parser;
use std::path::Path;
use std::time::Instant;

/// STREAM-style memory bandwidth from one NUMA node's memory.
#[derive(Parser)]
#[command(name = "ffmk-stream", version)]
struct Args {
    /// The node whose memory holds the arrays.
    #[arg(long, default_value_t = 0)]
    node: u32,
    /// The node whose CPUs run the loop [default: --node].
    #[arg(long)]
    cpu_node: Option<u32>,
    /// MiB per array (three arrays).
    #[arg(long, default_value_t = 64)]
    mib: usize,
    /// Timed runs (the best counts).
    #[arg(long, default_value_t = 5)]
    runs: u32,
    /// One JSON line instead of text.
    #[arg(long)]
    json: bool,
}

/// An anonymous mapping bound to a node before anything touches it.
struct Array {
    ptr: *mut f64,
    len: usize,
}

impl Array {
    fn new(len: usize, node: u32) -> Result<Array, String> {
        let bytes = len * std::mem::size_of::<f64>();
        // SAFETY: a fresh private anonymous mapping, owned by the Array
        // and unmapped in Drop.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                bytes,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(format!(
                "cannot map {} MiB: {}",
                bytes >> 20,
                std::io::Error::last_os_error()
            ));
        }
        let a = Array { ptr: p.cast(), len };
        numa::host::bind(p as usize, bytes, node).map_err(|e| e.to_string())?;
        Ok(a)
    }

    fn slice(&mut self) -> &mut [f64] {
        // SAFETY: `ptr` maps `len` f64s for the Array's life, and the
        // &mut self borrow keeps the slice unique.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.len) }
    }
}

impl Drop for Array {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `new`, unmapped once.
        unsafe { libc::munmap(self.ptr.cast(), self.len * std::mem::size_of::<f64>()) };
    }
}

fn run(args: &Args) -> Result<f64, String> {
    let cpu_node = args.cpu_node.unwrap_or(args.node);
    let cpus = numa::host::node_cpus(Path::new("/"), cpu_node).map_err(|e| e.to_string())?;
    vcpu_decouple::affinity::pin_current_thread(&cpus, "ffmk-stream").map_err(|e| e.to_string())?;
    let len = args
        .mib
        .checked_mul(1 << 20)
        .filter(|b| *b > 0)
        .ok_or("--mib must be at least 1 and fit this machine's address space")?
        / std::mem::size_of::<f64>();
    let (mut a, mut b, mut c) = (
        Array::new(len, args.node)?,
        Array::new(len, args.node)?,
        Array::new(len, args.node)?,
    );
    // Touch everything once (the pages come from the bound node).
    a.slice().fill(1.0);
    b.slice().fill(2.0);
    c.slice().fill(0.5);
    let scalar = 3.0;
    let mut best = f64::MAX;
    for _ in 0..args.runs.max(1) {
        let t = Instant::now();
        let (a, b, c) = (a.slice(), b.slice(), c.slice());
        for ((x, y), z) in a.iter_mut().zip(b.iter()).zip(c.iter()) {
            *x = *y + scalar * *z;
        }
        std::hint::black_box(&a);
        best = best.min(t.elapsed().as_secs_f64());
    }
    if a.slice().iter().step_by(4096).any(|&x| x != 3.5) {
        return Err("the triad computed wrong values".into());
    }
    Ok(3.0 * args.mib as f64 / best)
}

fn main() -> std::process::ExitCode {
    let args = Args::parse();
    match run(&args) {
        Ok(mib_s) => {
            let cpu_node = args.cpu_node.unwrap_or(args.node);
            if args.json {
                println!(
                    "{{\"mem_node\":{},\"cpu_node\":{cpu_node},\"mib\":{},\"runs\":{},\"triad_mib_s\":{mib_s:.0}}}",
                    args.node, args.mib, args.runs
                );
            } else {
                println!(
                    "stream mem_node={} cpu_node={cpu_node} mib={} runs={} triad_mib_s={mib_s:.0}",
                    args.node, args.mib, args.runs
                );
            }
            std::process::ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("ffmk-stream: {e}");
            std::process::ExitCode::from(1)
        }
    }
}
