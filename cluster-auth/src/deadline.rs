//! A deadline for a whole exchange on a connection (not per read): once it
//! passes, the socket is shut down, so whatever the serving side waits
//! for fails and a stalled peer cannot hold it.
use std::net::TcpStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

/// Armed on a socket; dropping it (or [`Deadline::disarm`]) ends the watch.
pub struct Deadline {
    done: Arc<(Mutex<bool>, Condvar)>,
    expired: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Deadline {
    /// Shuts `tcp` (both ways) `after` from now unless disarmed first.
    pub fn arm(tcp: &TcpStream, after: Duration) -> Deadline {
        let done = Arc::new((Mutex::new(false), Condvar::new()));
        let expired = Arc::new(AtomicBool::new(false));
        let (d, e, tcp) = (done.clone(), expired.clone(), tcp.try_clone());
        let thread = std::thread::Builder::new()
            .name("deadline".into())
            .spawn(move || {
                let (lock, cv) = &*d;
                let Ok(g) = lock.lock() else { return };
                if let Ok((g, t)) = cv.wait_timeout_while(g, after, |done| !*done) {
                    if !*g && t.timed_out() {
                        e.store(true, Ordering::Release);
                        if let Ok(tcp) = &tcp {
                            let _ = tcp.shutdown(std::net::Shutdown::Both);
                        }
                    }
                }
            })
            .ok();
        Deadline {
            done,
            expired,
            thread,
        }
    }

    /// Whether the deadline passed (and the socket was shut).
    pub fn expired(&self) -> bool {
        self.expired.load(Ordering::Acquire)
    }

    /// Ends the watch; true if the deadline had passed.
    pub fn disarm(mut self) -> bool {
        self.stop();
        self.expired()
    }

    fn stop(&mut self) {
        if let Ok(mut d) = self.done.0.lock() {
            *d = true;
        }
        self.done.1.notify_all();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Deadline {
    fn drop(&mut self) {
        self.stop();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;
    use std::net::TcpListener;

    #[test]
    fn a_passed_deadline_shuts_the_socket_and_a_disarmed_one_does_not() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let _c = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (mut s, _) = l.accept().unwrap();
        let d = Deadline::arm(&s, Duration::from_millis(200));
        let t0 = std::time::Instant::now();
        let mut b = [0u8; 1];
        assert_eq!(s.read(&mut b).unwrap_or(0), 0);
        assert!(t0.elapsed() < Duration::from_secs(5));
        assert!(d.disarm());
        let _c2 = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (s2, _) = l.accept().unwrap();
        let d = Deadline::arm(&s2, Duration::from_secs(60));
        assert!(!d.disarm());
    }
}
