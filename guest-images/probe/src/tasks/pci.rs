//! `task=pci`: lists bus 0 through ports 0xCF8/0xCFC and through ECAM and
//! checks that both mechanisms see the same functions.
use crate::boot::BootInfo;
use crate::pci::{scan, Function};
use crate::{println, STATUS_PROBE_ERROR};

pub fn run(info: &BootInfo) -> u8 {
    let ecam = info.ecam_base();
    match ecam {
        Some(base) => println!("pci_ecam={base:#x}"),
        None => println!("pci_ecam=none"),
    }
    let mut count = 0;
    let mut agree = true;
    for f in scan(None) {
        let id = f.io_read32(0);
        let class = f.io_read32(8) >> 8;
        println!(
            "pci=00:{:02x}.0 id={:04x}:{:04x} class={class:06x}",
            f.dev,
            id & 0xffff,
            id >> 16
        );
        if let Some(base) = ecam {
            let e = Function {
                dev: f.dev,
                ecam: Some(base),
            };
            // The whole standard header must read the same both ways.
            agree &= (0..64u16).step_by(4).all(|r| e.read32(r) == f.io_read32(r));
        }
        count += 1;
    }
    // ECAM must not show functions the ports do not.
    if let Some(base) = ecam {
        agree &= scan(Some(base)).count() == count;
    }
    // Writes go through too: the host bridge's command register, set through
    // one mechanism and read back through the other.
    let host = Function { dev: 0, ecam };
    host.write32(4, 0x2);
    let set = host.io_read32(4) & 0xffff;
    host.io_write32(4, 0);
    let cleared = host.read32(4) & 0xffff;
    let writes_ok = set == 0x2 && cleared == 0;
    println!("pci_config_writes={}", u8::from(writes_ok));
    agree &= writes_ok;
    println!("pci_devices={count}");
    println!("pci_ecam_agrees={}", u8::from(agree && ecam.is_some()));
    if count == 0 || !agree {
        return STATUS_PROBE_ERROR;
    }
    0
}
