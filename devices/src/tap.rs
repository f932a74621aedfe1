//! A TAP interface as a virtio-net backend: frames carry the 12-byte
//! virtio-net header (`IFF_VNET_HDR`), so checksum and segmentation offloads
//! pass between the guest and the host kernel untouched.
use std::fs::File;
use std::io;
use std::os::unix::io::{AsRawFd, FromRawFd, RawFd};

/// The virtio-net header size with `num_buffers` (virtio 1.x).
pub const VNET_HDR_LEN: usize = 12;

// TUNSETOFFLOAD flags.
pub const TUN_F_CSUM: u32 = 0x01;
pub const TUN_F_TSO4: u32 = 0x02;
pub const TUN_F_TSO6: u32 = 0x04;
pub const TUN_F_UFO: u32 = 0x10;

#[derive(Debug, thiserror::Error)]
pub enum TapError {
    #[error("interface name '{0}' is empty or longer than 15 bytes")]
    BadName(String),
    #[error("cannot open /dev/net/tun: {0}")]
    OpenTun(io::Error),
    #[error("cannot attach to or create TAP interface {name}: {source}")]
    SetIff { name: String, source: io::Error },
    #[error("TAP interface {name}: {what}: {source}")]
    Configure {
        name: String,
        what: &'static str,
        source: io::Error,
    },
}

pub struct Tap {
    file: File,
    name: String,
}

fn ifreq_for(name: &str, flags: i16) -> libc::ifreq {
    // SAFETY: ifreq is plain data; all-zero is a valid value.
    let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in ifr.ifr_name.iter_mut().zip(name.as_bytes()) {
        *dst = *src as libc::c_char;
    }
    ifr.ifr_ifru.ifru_flags = flags;
    ifr
}

impl Tap {
    /// Attaches to the TAP interface `name`, creating it if it does not
    /// exist (creating needs CAP_NET_ADMIN). The fd is non-blocking.
    pub fn open(name: &str) -> Result<Tap, TapError> {
        if name.is_empty() || name.len() >= libc::IFNAMSIZ {
            return Err(TapError::BadName(name.into()));
        }
        // SAFETY: opening a device node with a NUL-terminated path.
        let fd = unsafe {
            libc::open(
                c"/dev/net/tun".as_ptr(),
                libc::O_RDWR | libc::O_NONBLOCK | libc::O_CLOEXEC,
            )
        };
        if fd < 0 {
            return Err(TapError::OpenTun(io::Error::last_os_error()));
        }
        // SAFETY: `fd` was just opened and is owned by nobody else.
        let file = unsafe { File::from_raw_fd(fd) };
        let flags = (libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR) as i16;
        let mut ifr = ifreq_for(name, flags);
        // SAFETY: TUNSETIFF reads and writes an ifreq we own.
        if unsafe { libc::ioctl(fd, libc::TUNSETIFF, &mut ifr) } < 0 {
            return Err(TapError::SetIff {
                name: name.into(),
                source: io::Error::last_os_error(),
            });
        }
        let tap = Tap {
            file,
            name: name.into(),
        };
        let hdr = VNET_HDR_LEN as libc::c_int;
        // SAFETY: TUNSETVNETHDRSZ reads an int we own.
        if unsafe { libc::ioctl(fd, libc::TUNSETVNETHDRSZ, &hdr) } < 0 {
            return Err(tap.configure_error("set the vnet header size"));
        }
        Ok(tap)
    }

    fn configure_error(&self, what: &'static str) -> TapError {
        TapError::Configure {
            name: self.name.clone(),
            what,
            source: io::Error::last_os_error(),
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Another descriptor of the same TAP queue (`F_DUPFD_CLOEXEC`: no
    /// file is opened, so a confined thread may do it). The interface
    /// lives as long as one of them is open.
    pub fn try_clone(&self) -> io::Result<Tap> {
        Ok(Tap {
            file: self.file.try_clone()?,
            name: self.name.clone(),
        })
    }

    /// Makes the TAP a port of Linux bridge `bridge` and brings it up (as
    /// `ip link set NAME master BRIDGE up` does), so the VM is on the
    /// bridge's network from its first frame: a VM arriving by migration
    /// needs no one to attach its new TAP before the switch-over.
    pub fn join_bridge(&self, bridge: &str) -> Result<(), TapError> {
        // linux/sockios.h (not in libc).
        const SIOCBRADDIF: libc::c_ulong = 0x89a2;
        if bridge.is_empty() || bridge.len() >= libc::IFNAMSIZ {
            return Err(TapError::BadName(bridge.into()));
        }
        let err = |what: &'static str| TapError::Configure {
            name: self.name.clone(),
            what,
            source: io::Error::last_os_error(),
        };
        // SAFETY: a plain socket() call; the descriptor is owned below.
        let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
        if fd < 0 {
            return Err(err("open a socket to configure it"));
        }
        // SAFETY: `fd` was just opened and is owned by nobody else.
        let sock = unsafe { File::from_raw_fd(fd) };
        let mut ifr = ifreq_for(&self.name, 0);
        // SAFETY: SIOCGIFINDEX reads the name and writes the index of an
        // ifreq we own.
        if unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFINDEX, &mut ifr) } < 0 {
            return Err(err("find its interface index"));
        }
        // SAFETY: the union field SIOCGIFINDEX just wrote.
        let index = unsafe { ifr.ifr_ifru.ifru_ifindex };
        let mut br = ifreq_for(bridge, 0);
        br.ifr_ifru.ifru_ifindex = index;
        // SAFETY: SIOCBRADDIF reads an ifreq we own (bridge name, port index).
        if unsafe { libc::ioctl(sock.as_raw_fd(), SIOCBRADDIF, &mut br) } < 0 {
            let source = io::Error::last_os_error();
            return Err(TapError::Configure {
                name: self.name.clone(),
                what: if source.raw_os_error() == Some(libc::ENODEV) {
                    "join the bridge (no bridge of that name)"
                } else {
                    "join the bridge"
                },
                source,
            });
        }
        // SAFETY: SIOCGIFFLAGS writes the flags into an ifreq we own.
        if unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFFLAGS, &mut ifr) } < 0 {
            return Err(err("read its flags"));
        }
        // SAFETY: the union field SIOCGIFFLAGS just wrote; then SIOCSIFFLAGS
        // reads the ifreq we own.
        unsafe {
            ifr.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short;
            if libc::ioctl(sock.as_raw_fd(), libc::SIOCSIFFLAGS, &ifr) < 0 {
                return Err(err("bring it up"));
            }
        }
        Ok(())
    }

    /// Which offloads the host kernel may hand us (TUN_F_* flags), matching
    /// what the guest driver accepted.
    pub fn set_offload(&self, flags: u32) -> Result<(), TapError> {
        // SAFETY: TUNSETOFFLOAD takes the flags by value.
        if unsafe {
            libc::ioctl(
                self.file.as_raw_fd(),
                libc::TUNSETOFFLOAD,
                flags as libc::c_ulong,
            )
        } < 0
        {
            return Err(self.configure_error("set offloads"));
        }
        Ok(())
    }

    /// Reads one frame (vnet header first); `WouldBlock` when none is queued.
    pub fn read_frame(&self, buf: &mut [u8]) -> io::Result<usize> {
        // SAFETY: reading into a buffer we own, at most its length.
        let n = unsafe { libc::read(self.file.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(n as usize)
    }

    /// Writes one frame (vnet header first).
    pub fn write_frame(&self, frame: &[u8]) -> io::Result<usize> {
        // SAFETY: writing from a buffer we own.
        let n = unsafe { libc::write(self.file.as_raw_fd(), frame.as_ptr().cast(), frame.len()) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(n as usize)
    }
}

impl AsRawFd for Tap {
    fn as_raw_fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_checked() {
        assert!(matches!(Tap::open(""), Err(TapError::BadName(_))));
        assert!(matches!(
            Tap::open("a-name-that-is-far-too-long"),
            Err(TapError::BadName(_))
        ));
    }

    #[test]
    fn creates_a_tap_and_moves_frames_when_allowed() {
        // Needs CAP_NET_ADMIN; elsewhere the error must be a clear one.
        let name = format!("ffmkt{}", std::process::id() % 100_000);
        let tap = match Tap::open(&name) {
            Ok(t) => t,
            Err(e @ TapError::SetIff { .. }) | Err(e @ TapError::OpenTun(_)) => {
                eprintln!("skipped: {e}");
                return;
            }
            Err(e) => panic!("{e}"),
        };
        assert_eq!(tap.name(), name);
        tap.set_offload(TUN_F_CSUM).unwrap();
        // The interface is down: nothing to read, and reads do not block.
        let mut buf = [0u8; 2048];
        assert_eq!(
            tap.read_frame(&mut buf).unwrap_err().kind(),
            io::ErrorKind::WouldBlock
        );
        // A frame written to a down interface is accepted or dropped, never hangs.
        let mut frame = vec![0u8; VNET_HDR_LEN + 60];
        frame[VNET_HDR_LEN..VNET_HDR_LEN + 6].fill(0xff);
        let _ = tap.write_frame(&frame);
    }
}
