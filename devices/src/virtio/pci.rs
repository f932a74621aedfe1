//! The virtio 1.x modern PCI transport (virtio spec 4.1).
//!
//! BAR 0 (64-bit, 32 KiB) holds every structure the capabilities point at:
//!
//! ```text
//! 0x0000 common configuration   0x3000 notifications (4 bytes per queue)
//! 0x1000 ISR status             0x4000 MSI-X table
//! 0x2000 device configuration   0x6000 MSI-X pending bits
//! ```
//!
//! Queue notifications reach the queue's eventfd either through a KVM
//! ioeventfd the monitor registers on the notify address (no exit to user
//! space) or, if the guest moved the BAR, through a write here.
use super::ActivateError;
use super::{
    Activation, ActiveQueue, GuestMemory, QueueProgress, VirtioDevice, VirtioInterrupt, NO_VECTOR,
    VIRTIO_F_VERSION_1,
};
use crate::interrupt::MsiVectors;
use crate::pci::config::{Bar, BarKind, ConfigError, PciIds};
use crate::pci::msix::MsixState;
use crate::pci::{ConfigSpace, Msix, PciDevice};
use crate::persist::{Persist, StateError};
use serde::{Deserialize, Serialize};
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use virtio_queue::{Queue, QueueT};
use vmm_sys_util::eventfd::EventFd;

pub const BAR_SIZE: u64 = 0x8000;
pub const COMMON_OFFSET: u64 = 0x0000;
pub const ISR_OFFSET: u64 = 0x1000;
pub const DEVICE_OFFSET: u64 = 0x2000;
pub const NOTIFY_OFFSET: u64 = 0x3000;
pub const NOTIFY_MULTIPLIER: u32 = 4;
pub const MSIX_TABLE_OFFSET: u64 = 0x4000;
pub const MSIX_PBA_OFFSET: u64 = 0x6000;
const REGION_SIZE: u64 = 0x1000;
const COMMON_SIZE: u64 = 0x38;

const VENDOR_VIRTIO: u16 = 0x1af4;
const CAP_VENDOR: u8 = 0x09;
const CFG_COMMON: u8 = 1;
const CFG_NOTIFY: u8 = 2;
const CFG_ISR: u8 = 3;
const CFG_DEVICE: u8 = 4;

pub const STATUS_ACKNOWLEDGE: u8 = 1;
pub const STATUS_DRIVER: u8 = 2;
pub const STATUS_DRIVER_OK: u8 = 4;
pub const STATUS_FEATURES_OK: u8 = 8;
pub const STATUS_NEEDS_RESET: u8 = 0x40;
pub const STATUS_FAILED: u8 = 0x80;

struct QueueSlot {
    queue: Queue,
    vector: u16,
    notify: EventFd,
    /// Published by the queue's handler while the device is active.
    progress: Arc<QueueProgress>,
}

/// One queue in a snapshot: what the driver set up and where the device
/// stands in the rings.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueState {
    pub size: u16,
    pub ready: bool,
    pub desc_table: u64,
    pub avail_ring: u64,
    pub used_ring: u64,
    pub vector: u16,
    pub next_avail: u16,
    pub next_used: u16,
}

/// The transport in a snapshot: feature negotiation, status, queues and
/// MSI-X (configuration space is saved with the PCI bus). Taken while the
/// I/O thread is frozen ([`super::IoThread::freeze`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VirtioPciState {
    pub device_type: u16,
    pub device_feature_select: u32,
    pub driver_feature_select: u32,
    pub driver_features: u64,
    pub status: u8,
    pub config_generation: u8,
    pub config_vector: u16,
    pub queue_select: u16,
    pub isr: u8,
    pub active: bool,
    pub queues: Vec<QueueState>,
    pub msix: MsixState,
}

pub struct VirtioPci {
    config: ConfigSpace,
    device: Box<dyn VirtioDevice>,
    msix: Arc<Mutex<Msix>>,
    isr: Arc<AtomicU8>,
    mem: GuestMemory,
    device_feature_select: u32,
    driver_feature_select: u32,
    driver_features: u64,
    status: u8,
    config_generation: u8,
    config_vector: u16,
    queue_select: u16,
    queues: Vec<QueueSlot>,
    active: bool,
}

fn pci_class(device_type: u16) -> (u8, u8, u8) {
    match device_type {
        1 => (0x02, 0x00, 0x00), // network controller
        2 => (0x01, 0x00, 0x00), // mass storage
        _ => (0xff, 0x00, 0x00),
    }
}

/// A virtio PCI capability: (cfg_type, offset in BAR 0, length) plus extra bytes.
fn virtio_cap(cfg_type: u8, offset: u64, length: u64, extra: &[u8]) -> Vec<u8> {
    let len = 16 + extra.len();
    let mut c = vec![CAP_VENDOR, 0, len as u8, cfg_type, 0, 0, 0, 0];
    c.extend_from_slice(&(offset as u32).to_le_bytes());
    c.extend_from_slice(&(length as u32).to_le_bytes());
    c.extend_from_slice(extra);
    c
}

impl VirtioPci {
    /// Wraps `device` in the transport. `vectors` needs one vector per
    /// queue plus one for configuration changes.
    pub fn new(
        device: Box<dyn VirtioDevice>,
        vectors: Arc<dyn MsiVectors>,
        mem: GuestMemory,
    ) -> Result<Self, ConfigError> {
        let device_type = device.device_type();
        let mut config = ConfigSpace::new(PciIds {
            vendor: VENDOR_VIRTIO,
            device: 0x1040 + device_type,
            class: pci_class(device_type),
            revision: 1,
            subsystem_vendor: VENDOR_VIRTIO,
            subsystem: 0x40,
        });
        config.add_bar(
            0,
            Bar {
                kind: BarKind::Mem64 {
                    prefetchable: false,
                },
                size: BAR_SIZE,
            },
        )?;
        let ro = |n: usize| vec![0u8; n];
        for cap in [
            virtio_cap(CFG_COMMON, COMMON_OFFSET, COMMON_SIZE, &[]),
            virtio_cap(
                CFG_NOTIFY,
                NOTIFY_OFFSET,
                REGION_SIZE,
                &NOTIFY_MULTIPLIER.to_le_bytes(),
            ),
            virtio_cap(CFG_ISR, ISR_OFFSET, 1, &[]),
            virtio_cap(CFG_DEVICE, DEVICE_OFFSET, REGION_SIZE, &[]),
        ] {
            config.add_capability(&cap, &ro(cap.len()))?;
        }
        let msix = Msix::new(
            &mut config,
            vectors,
            0,
            MSIX_TABLE_OFFSET as u32,
            MSIX_PBA_OFFSET as u32,
        )?;
        let queues = device
            .queue_max_sizes()
            .into_iter()
            .map(|max| {
                Ok(QueueSlot {
                    queue: Queue::new(max).map_err(|_| ConfigError::BarSize(u64::from(max)))?,
                    vector: NO_VECTOR,
                    notify: EventFd::new(libc::EFD_NONBLOCK)
                        .map_err(|_| ConfigError::NoCapabilityRoom(0))?,
                    progress: QueueProgress::new(0, 0),
                })
            })
            .collect::<Result<Vec<_>, ConfigError>>()?;
        Ok(VirtioPci {
            config,
            device,
            msix: Arc::new(Mutex::new(msix)),
            isr: Arc::new(AtomicU8::new(0)),
            mem,
            device_feature_select: 0,
            driver_feature_select: 0,
            driver_features: 0,
            status: 0,
            config_generation: 0,
            config_vector: NO_VECTOR,
            queue_select: 0,
            queues,
            active: false,
        })
    }

    /// (offset in BAR 0, eventfd) of every queue's notification, for KVM
    /// ioeventfds.
    pub fn notifiers(&self) -> Vec<(u64, &EventFd)> {
        self.queues
            .iter()
            .enumerate()
            .map(|(i, q)| {
                (
                    NOTIFY_OFFSET + i as u64 * u64::from(NOTIFY_MULTIPLIER),
                    &q.notify,
                )
            })
            .collect()
    }

    pub fn status(&self) -> u8 {
        self.status
    }

    fn selected(&mut self) -> Option<&mut QueueSlot> {
        self.queues.get_mut(usize::from(self.queue_select))
    }

    fn common_bytes(&self) -> [u8; COMMON_SIZE as usize] {
        let mut b = [0u8; COMMON_SIZE as usize];
        let features = self.device.features();
        let word = |v: u64, sel: u32| if sel < 2 { (v >> (32 * sel)) as u32 } else { 0 };
        b[0x00..0x04].copy_from_slice(&self.device_feature_select.to_le_bytes());
        b[0x04..0x08].copy_from_slice(&word(features, self.device_feature_select).to_le_bytes());
        b[0x08..0x0c].copy_from_slice(&self.driver_feature_select.to_le_bytes());
        b[0x0c..0x10]
            .copy_from_slice(&word(self.driver_features, self.driver_feature_select).to_le_bytes());
        b[0x10..0x12].copy_from_slice(&self.config_vector.to_le_bytes());
        b[0x12..0x14].copy_from_slice(&(self.queues.len() as u16).to_le_bytes());
        b[0x14] = self.status;
        b[0x15] = self.config_generation;
        b[0x16..0x18].copy_from_slice(&self.queue_select.to_le_bytes());
        if let Some(q) = self.queues.get(usize::from(self.queue_select)) {
            b[0x18..0x1a].copy_from_slice(&q.queue.size().to_le_bytes());
            b[0x1a..0x1c].copy_from_slice(&q.vector.to_le_bytes());
            b[0x1c..0x1e].copy_from_slice(&u16::from(q.queue.ready()).to_le_bytes());
            b[0x1e..0x20].copy_from_slice(&self.queue_select.to_le_bytes());
            b[0x20..0x28].copy_from_slice(&q.queue.desc_table().to_le_bytes());
            b[0x28..0x30].copy_from_slice(&q.queue.avail_ring().to_le_bytes());
            b[0x30..0x38].copy_from_slice(&q.queue.used_ring().to_le_bytes());
        }
        b
    }

    fn common_write(&mut self, offset: u64, data: &[u8]) {
        let mut v = [0u8; 8];
        let n = data.len().min(8);
        v[..n].copy_from_slice(&data[..n]);
        let value = u64::from_le_bytes(v);
        let lo = Some(value as u32);
        // Queue and feature setup is frozen once the driver is running.
        let setup_allowed = self.status & STATUS_DRIVER_OK == 0;
        let nvec = self.msix.lock().map(|m| m.vector_count()).unwrap_or(0);
        let valid_vector = |v: u16| if v < nvec { v } else { NO_VECTOR };
        match (offset, data.len()) {
            (0x00, 4) => self.device_feature_select = value as u32,
            (0x08, 4) => self.driver_feature_select = value as u32,
            (0x0c, 4) if setup_allowed && self.status & STATUS_FEATURES_OK == 0 => {
                let shift = 32 * u64::from(self.driver_feature_select.min(2));
                if shift < 64 {
                    self.driver_features = (self.driver_features & !(0xffff_ffff << shift))
                        | ((value & 0xffff_ffff) << shift);
                }
            }
            (0x10, 2) => self.config_vector = valid_vector(value as u16),
            (0x14, 1) => self.write_status(value as u8),
            (0x16, 2) => self.queue_select = value as u16,
            (0x18, 2) if setup_allowed => {
                if let Some(q) = self.selected() {
                    q.queue.set_size(value as u16);
                }
            }
            (0x1a, 2) => {
                let v = valid_vector(value as u16);
                if let Some(q) = self.selected() {
                    q.vector = v;
                }
            }
            (0x1c, 2) if setup_allowed => self.enable_queue(value == 1),
            (0x20, 4) | (0x24, 4) | (0x28, 4) | (0x2c, 4) | (0x30, 4) | (0x34, 4)
                if setup_allowed =>
            {
                let high = offset % 8 == 4;
                let (l, h) = if high { (None, lo) } else { (lo, None) };
                if let Some(q) = self.selected() {
                    match offset & !7 {
                        0x20 => q.queue.set_desc_table_address(l, h),
                        0x28 => q.queue.set_avail_ring_address(l, h),
                        _ => q.queue.set_used_ring_address(l, h),
                    }
                }
            }
            _ => tracing::debug!(
                "virtio: ignored common config write at {offset:#x} ({} bytes)",
                data.len()
            ),
        }
    }

    fn enable_queue(&mut self, enable: bool) {
        let mem = self.mem.clone();
        if let Some(q) = self.selected() {
            // is_valid() looks at the ready flag too: set it, then check.
            q.queue.set_ready(enable);
            if enable && !q.queue.is_valid(&mem) {
                q.queue.set_ready(false);
                tracing::warn!("virtio: driver enabled an invalid queue; ignored");
            }
        }
    }

    fn write_status(&mut self, status: u8) {
        if status == 0 {
            self.reset();
            return;
        }
        let mut status = status;
        if status & STATUS_FEATURES_OK != 0 && self.status & STATUS_FEATURES_OK == 0 {
            let offered = self.device.features();
            let ok = self.driver_features & !offered == 0
                && self.driver_features & VIRTIO_F_VERSION_1 != 0;
            if !ok {
                tracing::warn!(
                    "virtio: driver features {:#x} refused (offered {offered:#x})",
                    self.driver_features
                );
                status &= !STATUS_FEATURES_OK;
            }
        }
        let newly_ok = status & STATUS_DRIVER_OK != 0 && self.status & STATUS_DRIVER_OK == 0;
        self.status = status;
        if newly_ok && status & STATUS_FEATURES_OK != 0 && !self.active {
            if let Err(e) = self.activate(false) {
                tracing::error!("virtio: {}: activation failed: {e}", self.device.describe());
                self.status |= STATUS_NEEDS_RESET;
                self.interrupt().signal_config();
            }
        }
    }

    fn activate(&mut self, restored: bool) -> Result<(), ActivateError> {
        let event_idx = self.driver_features & super::VIRTIO_F_RING_EVENT_IDX != 0;
        let mut queues = Vec::new();
        for (i, slot) in self.queues.iter_mut().enumerate() {
            if !slot.queue.ready() {
                continue;
            }
            slot.queue.set_event_idx(event_idx);
            let notify = slot
                .notify
                .try_clone()
                .map_err(|source| ActivateError::Host {
                    what: "clone a queue eventfd",
                    source,
                })?;
            let queue = Queue::try_from(slot.queue.state()).map_err(|e| ActivateError::Queue {
                index: i,
                why: format!("{e:?}"),
            })?;
            slot.progress = QueueProgress::new(queue.next_avail(), queue.next_used());
            queues.push(ActiveQueue {
                index: i as u16,
                queue,
                notify,
                vector: slot.vector,
                progress: slot.progress.clone(),
            });
        }
        let activation = Activation {
            mem: self.mem.clone(),
            features: self.driver_features,
            queues,
            interrupt: Arc::new(self.interrupt()),
            restored,
        };
        self.device.activate(activation)?;
        self.active = true;
        Ok(())
    }

    /// The transport's state. Call with the I/O thread frozen so that the
    /// queue positions match guest memory.
    fn state(&self) -> VirtioPciState {
        let queues = self
            .queues
            .iter()
            .map(|slot| {
                let q = &slot.queue;
                let (next_avail, next_used) = if self.active && q.ready() {
                    slot.progress.get()
                } else {
                    (q.next_avail(), q.next_used())
                };
                QueueState {
                    size: q.size(),
                    ready: q.ready(),
                    desc_table: q.desc_table(),
                    avail_ring: q.avail_ring(),
                    used_ring: q.used_ring(),
                    vector: slot.vector,
                    next_avail,
                    next_used,
                }
            })
            .collect();
        VirtioPciState {
            device_type: self.device.device_type(),
            device_feature_select: self.device_feature_select,
            driver_feature_select: self.driver_feature_select,
            driver_features: self.driver_features,
            status: self.status,
            config_generation: self.config_generation,
            config_vector: self.config_vector,
            queue_select: self.queue_select,
            isr: self.isr.load(Ordering::Acquire),
            active: self.active,
            queues,
            msix: match self.msix.lock() {
                Ok(m) => m.save(),
                Err(p) => p.into_inner().save(),
            },
        }
    }

    /// Continues from a saved transport state on a freshly built device
    /// (configuration space restored first). Everything is checked before
    /// anything changes; then MSI-X routes are set up again and, if the
    /// driver was running, the device is activated with its queues where
    /// they stood.
    fn restore_state(&mut self, s: &VirtioPciState) -> Result<(), StateError> {
        if self.active || self.status != 0 {
            return Err(StateError::Mismatch("the device is already in use".into()));
        }
        let kind = self.device.device_type();
        if s.device_type != kind {
            return Err(StateError::Mismatch(format!(
                "saved virtio device type {}, this one is {kind}",
                s.device_type
            )));
        }
        // Fewer saved queues than slots: a state saved before the device
        // gained a queue (virtio-net's control queue, 2026-12-07). Its
        // driver could not have used the feature that brought the queue
        // (checked below with the offered features), so the rest stay off.
        if s.queues.len() > self.queues.len() {
            return Err(StateError::Mismatch(format!(
                "{} queues saved, this device has {}",
                s.queues.len(),
                self.queues.len()
            )));
        }
        let offered = self.device.features();
        if s.driver_features & !offered != 0 {
            return Err(StateError::Mismatch(format!(
                "the driver uses features {:#x} this device does not offer",
                s.driver_features & !offered
            )));
        }
        let nvec = self.msix.lock().map(|m| m.vector_count()).unwrap_or(0);
        let vector_ok = |v: u16| v == NO_VECTOR || v < nvec;
        if !vector_ok(s.config_vector) || s.queues.iter().any(|q| !vector_ok(q.vector)) {
            return Err(StateError::Mismatch(
                "a saved MSI-X vector is out of range".into(),
            ));
        }
        let mut rebuilt = Vec::new();
        for (i, (slot, q)) in self.queues.iter().zip(&s.queues).enumerate() {
            let mut queue = Queue::new(slot.queue.max_size())
                .map_err(|e| StateError::Invalid(format!("queue {i}: {e:?}")))?;
            queue.set_size(q.size);
            if queue.size() != q.size {
                return Err(StateError::Mismatch(format!(
                    "queue {i}: size {} is not allowed",
                    q.size
                )));
            }
            let split = |a: u64| (Some(a as u32), Some((a >> 32) as u32));
            let (l, h) = split(q.desc_table);
            queue.set_desc_table_address(l, h);
            let (l, h) = split(q.avail_ring);
            queue.set_avail_ring_address(l, h);
            let (l, h) = split(q.used_ring);
            queue.set_used_ring_address(l, h);
            queue.set_next_avail(q.next_avail);
            queue.set_next_used(q.next_used);
            queue.set_ready(q.ready);
            if q.ready && !queue.is_valid(&self.mem) {
                return Err(StateError::Mismatch(format!(
                    "queue {i}: its rings do not fit in guest memory"
                )));
            }
            rebuilt.push(queue);
        }
        match self.msix.lock() {
            Ok(mut m) => m.restore(&s.msix, &self.config)?,
            Err(_) => return Err(StateError::Poisoned("MSI-X state")),
        }
        for ((slot, q), queue) in self.queues.iter_mut().zip(&s.queues).zip(rebuilt) {
            slot.queue = queue;
            slot.vector = q.vector;
            slot.progress = QueueProgress::new(q.next_avail, q.next_used);
        }
        self.device_feature_select = s.device_feature_select;
        self.driver_feature_select = s.driver_feature_select;
        self.driver_features = s.driver_features;
        self.status = s.status;
        self.config_generation = s.config_generation;
        self.config_vector = s.config_vector;
        self.queue_select = s.queue_select;
        self.isr.store(s.isr, Ordering::Release);
        if s.active {
            self.activate(true)
                .map_err(|e| StateError::Mismatch(format!("activation failed: {e}")))?;
        }
        Ok(())
    }

    /// The device's configuration changed on the host side (a disk grew):
    /// bumps `config_generation` so the driver re-reads it and, once the
    /// driver is running, raises the configuration-change interrupt (ISR
    /// bit 1 plus the config MSI-X vector).
    pub fn config_changed(&mut self) {
        self.config_generation = self.config_generation.wrapping_add(1);
        if self.status & STATUS_DRIVER_OK != 0 {
            self.interrupt().signal_config();
        }
    }

    fn interrupt(&self) -> VirtioInterrupt {
        VirtioInterrupt {
            msix: self.msix.clone(),
            isr: self.isr.clone(),
            config_vector: self.config_vector,
        }
    }

    fn reset(&mut self) {
        if self.active {
            self.device.reset();
            self.active = false;
        }
        for q in &mut self.queues {
            q.queue.reset();
            q.vector = NO_VECTOR;
            q.progress = QueueProgress::new(0, 0);
            let _ = q.notify.read(); // drop a stale notification
        }
        self.status = 0;
        self.driver_features = 0;
        self.device_feature_select = 0;
        self.driver_feature_select = 0;
        self.config_vector = NO_VECTOR;
        self.queue_select = 0;
        self.isr.store(0, Ordering::Release);
    }
}

/// A virtio transport is restored where it was wired for boot (on the
/// PCI bus, its notifications registered with KVM): the constructor
/// arguments are that transport, still unused by any driver.
impl Persist for Arc<Mutex<VirtioPci>> {
    type State = VirtioPciState;
    type ConstructorArgs = Arc<Mutex<VirtioPci>>;
    type Error = StateError;

    fn save(&self) -> Result<VirtioPciState, StateError> {
        let t = self
            .lock()
            .map_err(|_| StateError::Poisoned("virtio transport"))?;
        Ok(t.state())
    }

    fn restore(wired: Self, state: &VirtioPciState) -> Result<Self, StateError> {
        wired
            .lock()
            .map_err(|_| StateError::Poisoned("virtio transport"))?
            .restore_state(state)?;
        Ok(wired)
    }
}

impl PciDevice for VirtioPci {
    fn config(&self) -> &ConfigSpace {
        &self.config
    }

    fn config_mut(&mut self) -> &mut ConfigSpace {
        &mut self.config
    }

    fn config_written(&mut self, _offset: usize, _data: &[u8]) {
        if let Ok(mut m) = self.msix.lock() {
            m.config_written(&self.config);
        }
    }

    fn bar_read(&mut self, bar: usize, offset: u64, data: &mut [u8]) {
        data.fill(0);
        if bar != 0 {
            return;
        }
        match offset {
            o if o < COMMON_SIZE => {
                let b = self.common_bytes();
                let o = o as usize;
                let end = (o + data.len()).min(b.len());
                data[..end - o].copy_from_slice(&b[o..end]);
            }
            ISR_OFFSET => {
                if let Some(d) = data.first_mut() {
                    *d = self.isr.swap(0, Ordering::AcqRel);
                }
            }
            o if (DEVICE_OFFSET..DEVICE_OFFSET + REGION_SIZE).contains(&o) => {
                self.device.config_read(o - DEVICE_OFFSET, data)
            }
            o if (MSIX_TABLE_OFFSET..MSIX_PBA_OFFSET).contains(&o) => {
                if let Ok(m) = self.msix.lock() {
                    m.table_read(o - MSIX_TABLE_OFFSET, data);
                }
            }
            o if (MSIX_PBA_OFFSET..BAR_SIZE).contains(&o) => {
                if let Ok(m) = self.msix.lock() {
                    m.pba_read(o - MSIX_PBA_OFFSET, data);
                }
            }
            _ => {}
        }
    }

    fn bar_write(&mut self, bar: usize, offset: u64, data: &[u8]) {
        if bar != 0 {
            return;
        }
        match offset {
            o if o < COMMON_SIZE => self.common_write(o, data),
            o if (DEVICE_OFFSET..DEVICE_OFFSET + REGION_SIZE).contains(&o) => {
                self.device.config_write(o - DEVICE_OFFSET, data);
                self.config_generation = self.config_generation.wrapping_add(1);
            }
            o if (NOTIFY_OFFSET..NOTIFY_OFFSET + REGION_SIZE).contains(&o) => {
                let q = ((o - NOTIFY_OFFSET) / u64::from(NOTIFY_MULTIPLIER)) as usize;
                match self.queues.get(q) {
                    Some(slot) => {
                        let _ = slot.notify.write(1);
                    }
                    None => tracing::debug!("virtio: notification of missing queue {q}"),
                }
            }
            o if (MSIX_TABLE_OFFSET..MSIX_PBA_OFFSET).contains(&o) => {
                if let Ok(mut m) = self.msix.lock() {
                    m.table_write(o - MSIX_TABLE_OFFSET, data);
                }
            }
            _ => {}
        }
    }

    fn name(&self) -> String {
        self.device.describe()
    }

    fn counters(&self) -> Vec<(&'static str, u64)> {
        let mut c = vec![("status", u64::from(self.status))];
        c.extend(self.device.counters());
        c
    }
}
