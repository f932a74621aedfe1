//! COM1 output (8250 at 0x3f8). Each byte is one port write, i.e. one exit.
use crate::arch::outb;
use core::fmt;
use core::sync::atomic::{AtomicBool, Ordering};

const COM1: u16 = 0x3f8;
static LOCK: AtomicBool = AtomicBool::new(false);

pub struct Serial;

impl fmt::Write for Serial {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        for b in s.bytes() {
            outb(COM1, b);
        }
        Ok(())
    }
}

/// For the fault and panic reports: a fault can strike while this CPU
/// holds the lock (in the middle of a line), and the probe ends after the
/// report anyway, so the lock is taken over instead of waited for.
pub fn print_fatal(args: fmt::Arguments) {
    LOCK.store(true, Ordering::Release);
    let _ = fmt::write(&mut Serial, args);
    LOCK.store(false, Ordering::Release);
}

pub fn print(args: fmt::Arguments) {
    while LOCK
        .compare_exchange_weak(false, true, Ordering::Acquire, Ordering::Relaxed)
        .is_err()
    {
        core::hint::spin_loop();
    }
    let _ = fmt::write(&mut Serial, args);
    LOCK.store(false, Ordering::Release);
}

#[macro_export]
macro_rules! println {
    ($($arg:tt)*) => {
        $crate::serial::print(format_args!("{}\n", format_args!($($arg)*)))
    };
}

#[macro_export]
macro_rules! print {
    ($($arg:tt)*) => {
        $crate::serial::print(format_args!($($arg)*))
    };
}
