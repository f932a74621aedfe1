//! Which VM exits KVM may skip for this VM, and halt polling.
//!
//! `KVM_CAP_X86_DISABLE_EXITS` lets a vCPU execute HLT, PAUSE, MWAIT and
//! C-state entry without leaving the guest. KVM takes it per VM, before any
//! vCPU exists, so it reaches service vCPUs too: only worth it where every
//! vCPU has a core to itself. `KVM_CAP_HALT_POLL` sets how long a halted
//! vCPU spins on the host before sleeping.
use kvm_bindings::kvm_enable_cap;
use kvm_ioctls::{Kvm, VmFd};

pub const KVM_CAP_X86_DISABLE_EXITS: u32 = 143;
pub const KVM_CAP_HALT_POLL: u32 = 182;

/// The exits KVM can be told not to take (bits of `KVM_CAP_X86_DISABLE_EXITS`).
pub const EXITS: [(&str, u64); 4] = [("mwait", 1), ("hlt", 2), ("pause", 4), ("cstate", 8)];

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ExitsRequest {
    /// PAUSE for decoupled VMs (spin-waiting compute threads stay in the
    /// guest), nothing otherwise; HLT stays, because service vCPUs share
    /// cores with the VMM's own threads.
    #[default]
    Auto,
    None,
    /// Exactly these exits (bits as in [`EXITS`]).
    Mask(u64),
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    #[error("invalid --exits '{0}': use auto, none, or a list of {names}", names = names(15))]
    Spec(String),
    #[error(
        "the host's KVM cannot let the guest run {wanted} without exits (it offers: {offered})"
    )]
    NotOffered { wanted: String, offered: String },
    #[error("KVM refused to disable exits ({what}): {errno}")]
    Refused { what: String, errno: i32 },
    #[error("KVM refused halt polling of {ns} ns: {errno}")]
    HaltPoll { ns: u64, errno: i32 },
    #[error("the host's KVM has no per-VM halt polling (KVM_CAP_HALT_POLL)")]
    NoHaltPoll,
}

/// `hlt,pause` for a bit mask.
pub fn names(mask: u64) -> String {
    let v: Vec<&str> = EXITS
        .iter()
        .filter(|(_, b)| mask & b != 0)
        .map(|(n, _)| *n)
        .collect();
    if v.is_empty() {
        "none".into()
    } else {
        v.join(",")
    }
}

/// `auto`, `none` or `hlt,pause`, as `--exits` takes it.
impl std::fmt::Display for ExitsRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ExitsRequest::Auto => f.write_str("auto"),
            ExitsRequest::None => f.write_str("none"),
            ExitsRequest::Mask(m) => f.write_str(&names(*m)),
        }
    }
}

impl std::str::FromStr for ExitsRequest {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self, Error> {
        match s.trim() {
            "auto" => return Ok(ExitsRequest::Auto),
            "none" => return Ok(ExitsRequest::None),
            _ => {}
        }
        let mut mask = 0;
        for part in s.split(',') {
            let bit = EXITS
                .iter()
                .find(|(n, _)| *n == part.trim())
                .ok_or_else(|| Error::Spec(s.into()))?
                .1;
            mask |= bit;
        }
        Ok(ExitsRequest::Mask(mask))
    }
}

/// What the host offers (0 when it offers nothing).
pub fn offered(kvm: &Kvm) -> u64 {
    let r = kvm.check_extension_raw(u64::from(KVM_CAP_X86_DISABLE_EXITS));
    if r > 0 {
        r as u64
    } else {
        0
    }
}

/// The mask to apply: `Auto` takes what is offered of its choice; an
/// explicit list that the host cannot honour is an error.
pub fn resolve(req: ExitsRequest, decoupled: bool, offered: u64) -> Result<u64, Error> {
    match req {
        ExitsRequest::None => Ok(0),
        ExitsRequest::Auto if decoupled => Ok(4 & offered),
        ExitsRequest::Auto => Ok(0),
        ExitsRequest::Mask(m) if m & !offered != 0 => Err(Error::NotOffered {
            wanted: names(m & !offered),
            offered: names(offered),
        }),
        ExitsRequest::Mask(m) => Ok(m),
    }
}

fn enable(vm: &VmFd, cap: u32, arg: u64) -> Result<(), i32> {
    let mut c = kvm_enable_cap {
        cap,
        ..Default::default()
    };
    c.args[0] = arg;
    vm.enable_cap(&c).map_err(|e| e.errno())
}

/// Applies `mask`; must run before the first vCPU is created.
pub fn disable_exits(vm: &VmFd, mask: u64) -> Result<(), Error> {
    if mask == 0 {
        return Ok(());
    }
    enable(vm, KVM_CAP_X86_DISABLE_EXITS, mask).map_err(|errno| Error::Refused {
        what: names(mask),
        errno,
    })
}

pub fn set_halt_poll(kvm: &Kvm, vm: &VmFd, ns: u64) -> Result<(), Error> {
    if kvm.check_extension_raw(u64::from(KVM_CAP_HALT_POLL)) <= 0 {
        return Err(Error::NoHaltPoll);
    }
    enable(vm, KVM_CAP_HALT_POLL, ns).map_err(|errno| Error::HaltPoll { ns, errno })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_requests() {
        assert_eq!("auto".parse::<ExitsRequest>().unwrap(), ExitsRequest::Auto);
        assert_eq!("none".parse::<ExitsRequest>().unwrap(), ExitsRequest::None);
        assert_eq!(
            "hlt,pause".parse::<ExitsRequest>().unwrap(),
            ExitsRequest::Mask(6)
        );
        let e = "hlt,halt".parse::<ExitsRequest>().unwrap_err().to_string();
        assert!(e.contains("mwait,hlt,pause,cstate"), "{e}");
    }

    #[test]
    fn resolves_against_the_offer() {
        assert_eq!(resolve(ExitsRequest::Auto, true, 0b1110), Ok(4));
        assert_eq!(resolve(ExitsRequest::Auto, false, 0b1110), Ok(0));
        assert_eq!(resolve(ExitsRequest::Auto, true, 0), Ok(0));
        assert_eq!(resolve(ExitsRequest::Mask(6), false, 0b1110), Ok(6));
        let e = resolve(ExitsRequest::Mask(3), true, 0b1110).unwrap_err();
        assert_eq!(e.to_string(), "the host's KVM cannot let the guest run mwait without exits (it offers: hlt,pause,cstate)");
    }

    #[test]
    fn applies_to_a_real_vm() {
        let kvm = Kvm::new().expect("/dev/kvm");
        let vm = kvm.create_vm().unwrap();
        let mask = offered(&kvm) & 4;
        disable_exits(&vm, mask).unwrap();
        if kvm.check_extension_raw(u64::from(KVM_CAP_HALT_POLL)) > 0 {
            set_halt_poll(&kvm, &vm, 50_000).unwrap();
        }
    }
}
