//! The PC's CMOS real-time clock (MC146818) at ports 0x70 (index) and 0x71
//! (data): the guest reads the wall-clock time at boot (Linux's `rtc_cmos`,
//! `hwclock`), and without it a stock kernel spends seconds probing an RTC
//! that never answers. The time is the host's UTC clock plus an offset the
//! guest sets by writing the time registers; the other bytes are CMOS RAM.
//! No alarm, periodic or update interrupts (status C reads 0): the DSDT
//! describes the device without an IRQ.
use crate::bus::BusDevice;
use crate::persist::{Persist, StateError};
use std::time::{SystemTime, UNIX_EPOCH};

/// Index and data ports.
pub const RTC_BASE: u16 = 0x70;

const SECONDS: u8 = 0x00;
const MINUTES: u8 = 0x02;
const HOURS: u8 = 0x04;
const WEEKDAY: u8 = 0x06;
const DAY: u8 = 0x07;
const MONTH: u8 = 0x08;
const YEAR: u8 = 0x09;
const STATUS_A: u8 = 0x0a;
const STATUS_B: u8 = 0x0b;
const STATUS_C: u8 = 0x0c;
const STATUS_D: u8 = 0x0d;
const CENTURY: u8 = 0x32;
/// Status B: data mode binary (else BCD), 24-hour mode (else 12-hour).
const B_BINARY: u8 = 1 << 2;
const B_24H: u8 = 1 << 1;
/// Status D: the battery is good (valid RAM and time).
const D_VRT: u8 = 1 << 7;
const UIP: u8 = 1 << 7;

/// Saved RTC state: the selected register, CMOS RAM and status registers,
/// and the guest's offset from the host clock.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct RtcSnapshot {
    pub index: u8,
    pub ram: Vec<u8>,
    pub offset_secs: i64,
}

pub struct CmosRtc {
    index: u8,
    ram: [u8; 128],
    offset_secs: i64,
    now: fn() -> i64,
}

fn host_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

/// A broken-down UTC time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Civil {
    year: i64,
    month: u32,
    day: u32,
    hour: u32,
    minute: u32,
    second: u32,
    weekday: u32, // 1 = Sunday, as the RTC counts
}

/// Days since 1970-01-01 to a date (proleptic Gregorian).
fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (i64::from(m) + 9) % 12;
    let doy = (153 * mp + 2) / 5 + i64::from(d) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

fn civil(t: i64) -> Civil {
    let days = t.div_euclid(86_400);
    let secs = t.rem_euclid(86_400) as u32;
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    Civil {
        year,
        month,
        day,
        hour: secs / 3600,
        minute: secs / 60 % 60,
        second: secs % 60,
        weekday: ((days + 4).rem_euclid(7) + 1) as u32, // 1970-01-01 was a Thursday
    }
}

fn seconds(c: &Civil) -> i64 {
    days_from_civil(c.year, c.month, c.day) * 86_400
        + i64::from(c.hour) * 3600
        + i64::from(c.minute) * 60
        + i64::from(c.second)
}

impl Default for CmosRtc {
    fn default() -> Self {
        Self::new()
    }
}

impl CmosRtc {
    pub fn new() -> Self {
        Self::with_clock(host_now)
    }

    fn with_clock(now: fn() -> i64) -> Self {
        let mut ram = [0u8; 128];
        ram[usize::from(STATUS_A)] = 0x26; // 32.768 kHz time base, 1024 Hz rate
        ram[usize::from(STATUS_B)] = B_24H;
        CmosRtc {
            index: 0,
            ram,
            offset_secs: 0,
            now,
        }
    }

    fn state(&self) -> RtcSnapshot {
        RtcSnapshot {
            index: self.index,
            ram: self.ram.to_vec(),
            offset_secs: self.offset_secs,
        }
    }

    /// An RTC in a saved state; RAM of the wrong size is refused.
    fn from_state(s: &RtcSnapshot) -> Result<Self, StateError> {
        let mut rtc = Self::new();
        rtc.ram = s.ram.as_slice().try_into().map_err(|_| {
            StateError::Invalid(format!(
                "rtc state: {} bytes of CMOS RAM, want 128",
                s.ram.len()
            ))
        })?;
        rtc.index = s.index & 0x7f;
        rtc.offset_secs = s.offset_secs;
        Ok(rtc)
    }

    fn binary(&self) -> bool {
        self.ram[usize::from(STATUS_B)] & B_BINARY != 0
    }

    fn encode(&self, v: u32) -> u8 {
        let v = (v % 100) as u8;
        if self.binary() {
            v
        } else {
            (v / 10) << 4 | (v % 10)
        }
    }

    fn decode(&self, b: u8) -> u32 {
        if self.binary() {
            u32::from(b)
        } else {
            u32::from(b >> 4) * 10 + u32::from(b & 0x0f)
        }
    }

    fn guest_time(&self) -> Civil {
        civil((self.now)().saturating_add(self.offset_secs))
    }

    fn read_register(&self, reg: u8) -> u8 {
        let t = self.guest_time();
        match reg {
            SECONDS => self.encode(t.second),
            MINUTES => self.encode(t.minute),
            HOURS if self.ram[usize::from(STATUS_B)] & B_24H != 0 => self.encode(t.hour),
            HOURS => {
                let h12 = if t.hour % 12 == 0 { 12 } else { t.hour % 12 };
                self.encode(h12) | if t.hour >= 12 { 0x80 } else { 0 }
            }
            WEEKDAY => self.encode(t.weekday),
            DAY => self.encode(t.day),
            MONTH => self.encode(t.month),
            YEAR => self.encode(t.year.rem_euclid(100) as u32),
            CENTURY => self.encode(t.year.div_euclid(100).rem_euclid(100) as u32),
            // Never in an update cycle: a read always sees a stable time.
            STATUS_A => self.ram[usize::from(STATUS_A)] & !UIP,
            STATUS_C => 0,
            STATUS_D => D_VRT,
            r => self.ram[usize::from(r)],
        }
    }

    /// A write to a time register sets the guest's clock: the field changes,
    /// the others keep their current value, and the offset follows.
    fn write_register(&mut self, reg: u8, v: u8) {
        let mut t = self.guest_time();
        let field = self.decode(v & if reg == HOURS { 0x7f } else { 0xff });
        match reg {
            SECONDS => t.second = field.min(59),
            MINUTES => t.minute = field.min(59),
            HOURS => {
                t.hour = if self.ram[usize::from(STATUS_B)] & B_24H != 0 {
                    field.min(23)
                } else {
                    field % 12 + if v & 0x80 != 0 { 12 } else { 0 }
                }
            }
            DAY => t.day = field.clamp(1, 31),
            MONTH => t.month = field.clamp(1, 12),
            YEAR => t.year = t.year.div_euclid(100) * 100 + i64::from(field % 100),
            CENTURY => t.year = i64::from(field) * 100 + t.year.rem_euclid(100),
            WEEKDAY => return,             // derived from the date
            STATUS_C | STATUS_D => return, // read-only
            STATUS_A => {
                self.ram[usize::from(STATUS_A)] = v & !UIP;
                return;
            }
            r => {
                self.ram[usize::from(r)] = v;
                return;
            }
        }
        self.offset_secs = seconds(&t) - (self.now)();
    }
}

impl Persist for CmosRtc {
    type State = RtcSnapshot;
    type ConstructorArgs = ();
    type Error = StateError;

    fn save(&self) -> Result<RtcSnapshot, StateError> {
        Ok(self.state())
    }

    fn restore((): (), state: &RtcSnapshot) -> Result<Self, StateError> {
        Self::from_state(state)
    }
}

impl BusDevice for CmosRtc {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let v = match offset {
            0 => self.index,
            _ => self.read_register(self.index),
        };
        data.fill(0);
        if let Some(b) = data.first_mut() {
            *b = v;
        }
    }
    fn write(&mut self, offset: u64, data: &[u8]) {
        let Some(&v) = data.first() else { return };
        match offset {
            0 => self.index = v & 0x7f, // bit 7 masks NMIs on a PC
            _ => self.write_register(self.index, v),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // 2026-12-02 14:30:05 UTC, a Wednesday.
    const T: i64 = 1_796_221_805;

    fn rtc() -> CmosRtc {
        CmosRtc::with_clock(|| T)
    }

    fn get(r: &mut CmosRtc, reg: u8) -> u8 {
        r.write(0, &[reg]);
        let mut b = [0u8];
        r.read(1, &mut b);
        b[0]
    }

    fn set(r: &mut CmosRtc, reg: u8, v: u8) {
        r.write(0, &[reg]);
        r.write(1, &[v]);
    }

    #[test]
    fn reads_the_host_time_in_bcd_and_binary() {
        let mut r = rtc();
        let bcd: Vec<u8> = [SECONDS, MINUTES, HOURS, WEEKDAY, DAY, MONTH, YEAR, CENTURY]
            .iter()
            .map(|&reg| get(&mut r, reg))
            .collect();
        assert_eq!(bcd, vec![0x05, 0x30, 0x14, 0x04, 0x02, 0x12, 0x26, 0x20]);
        set(&mut r, STATUS_B, B_24H | B_BINARY);
        assert_eq!(get(&mut r, HOURS), 14);
        assert_eq!(get(&mut r, YEAR), 26);
        assert_eq!(get(&mut r, STATUS_D), D_VRT);
        assert_eq!(get(&mut r, STATUS_A) & UIP, 0);
        set(&mut r, STATUS_B, 0); // 12-hour BCD: 2 pm
        assert_eq!(get(&mut r, HOURS), 0x82);
    }

    #[test]
    fn civil_dates_round_trip() {
        for t in [0, 951_782_400, T, 4_102_444_800, 253_402_300_799] {
            assert_eq!(seconds(&civil(t)), t, "{t}");
        }
        let leap = civil(951_782_400); // 2000-02-29
        assert_eq!((leap.year, leap.month, leap.day), (2000, 2, 29));
    }

    #[test]
    fn setting_the_time_moves_the_offset_and_ram_keeps_bytes() {
        let mut r = rtc();
        set(&mut r, YEAR, 0x27);
        set(&mut r, HOURS, 0x09);
        assert_eq!(get(&mut r, YEAR), 0x27);
        assert_eq!(get(&mut r, HOURS), 0x09);
        assert_eq!(r.offset_secs, 365 * 86_400 - 5 * 3600);
        set(&mut r, 0x40, 0xab);
        assert_eq!(get(&mut r, 0x40), 0xab);
        let again = CmosRtc::restore((), &r.save().unwrap()).unwrap();
        assert_eq!(again.save().unwrap(), r.save().unwrap());
        assert!(CmosRtc::restore(
            (),
            &RtcSnapshot {
                index: 0,
                ram: vec![0; 3],
                offset_secs: 0
            }
        )
        .is_err());
    }
}
