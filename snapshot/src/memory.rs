//! Memory layers: writing guest RAM into a sparse file laid out like RAM,
//! reading it back, and checking it.
//!
//! Cost follows touched memory: a full layer looks only at pages the host
//! has resident (`mincore`), so pages the guest never touched are never
//! read, and it skips all-zero pages; both stay holes in the file.
use crate::PAGE_SIZE;
use std::fs::File;
use std::os::unix::fs::FileExt;
use vm_memory::bitmap::AtomicBitmap;
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion, GuestRegionMmap, MemoryRegionAddress};

pub type GuestMemory = vm_memory::GuestMemoryMmap<AtomicBitmap>;

/// Pages copied per read or write (1 MiB).
pub(crate) const CHUNK_PAGES: u64 = 256;

/// One bit per guest page of the memory file (the regions back to back).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PageBitmap {
    pages: u64,
    words: Vec<u64>,
}

impl PageBitmap {
    pub fn new(pages: u64) -> PageBitmap {
        PageBitmap {
            pages,
            words: vec![0; pages.div_ceil(64) as usize],
        }
    }

    pub fn pages(&self) -> u64 {
        self.pages
    }

    pub fn set(&mut self, page: u64) {
        if page < self.pages {
            self.words[(page / 64) as usize] |= 1 << (page % 64);
        }
    }

    pub fn clear(&mut self, page: u64) {
        if page < self.pages {
            self.words[(page / 64) as usize] &= !(1 << (page % 64));
        }
    }

    pub fn get(&self, page: u64) -> bool {
        page < self.pages && self.words[(page / 64) as usize] & (1 << (page % 64)) != 0
    }

    pub fn count(&self) -> u64 {
        self.words.iter().map(|w| u64::from(w.count_ones())).sum()
    }

    /// ORs `other` (KVM's dirty-log layout: bit i of word i/64 is page i)
    /// into the pages starting at `first_page`.
    pub fn or_words(&mut self, first_page: u64, other: &[u64]) {
        for (w, &bits) in other.iter().enumerate() {
            let mut bits = bits;
            while bits != 0 {
                let b = u64::from(bits.trailing_zeros());
                self.set(first_page + w as u64 * 64 + b);
                bits &= bits - 1;
            }
        }
    }

    pub fn union(&mut self, other: &PageBitmap) {
        for (a, b) in self.words.iter_mut().zip(&other.words) {
            *a |= *b;
        }
    }

    /// Maximal runs of set pages as (first page, count).
    pub fn runs(&self) -> Vec<(u64, u64)> {
        let mut runs = Vec::new();
        let mut page = 0;
        while page < self.pages {
            let word = self.words[(page / 64) as usize];
            if word == 0 && page % 64 == 0 {
                page += 64;
                continue;
            }
            if !self.get(page) {
                page += 1;
                continue;
            }
            let start = page;
            while page < self.pages && self.get(page) {
                page += 1;
            }
            runs.push((start, page - start));
        }
        runs
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        self.words.iter().flat_map(|w| w.to_le_bytes()).collect()
    }

    /// Parses a bitmap file; None if its length does not fit `pages`.
    pub fn from_bytes(pages: u64, bytes: &[u8]) -> Option<PageBitmap> {
        if bytes.len() as u64 != pages.div_ceil(64) * 8 {
            return None;
        }
        let words = bytes
            .chunks_exact(8)
            .map(|c| {
                let mut w = [0u8; 8];
                w.copy_from_slice(c);
                u64::from_le_bytes(w)
            })
            .collect();
        let mut b = PageBitmap { pages, words };
        // Bits past the end would make `runs` and `count` lie.
        if pages % 64 != 0 {
            if let Some(last) = b.words.last_mut() {
                *last &= (1u64 << (pages % 64)) - 1;
            }
        }
        Some(b)
    }
}

/// Which pages a layer takes.
pub enum Selection {
    /// Every page with content: resident and not all zero.
    Full,
    /// These pages (dirtied since the previous layer), zero or not.
    Pages(PageBitmap),
}

/// What writing a layer produced.
#[derive(Debug)]
pub struct Written {
    pub defined: PageBitmap,
    pub data_bytes: u64,
    pub crc32: u32,
}

/// (first page in the memory file, region) for each RAM region in order.
fn regions(mem: &GuestMemory) -> Vec<(u64, &GuestRegionMmap<AtomicBitmap>)> {
    let mut first = 0;
    mem.iter()
        .map(|r| {
            let at = first;
            first += r.len() / PAGE_SIZE;
            (at, r)
        })
        .collect()
}

/// Pages of `region` the host has resident (None: mincore failed, so
/// assume all of them).
fn resident(region: &GuestRegionMmap<AtomicBitmap>) -> Option<Vec<u8>> {
    let pages = (region.len() / PAGE_SIZE) as usize;
    let mut vec = vec![0u8; pages];
    // SAFETY: the region is a live page-aligned mapping of `len` bytes and
    // `vec` has one byte per page of it, as mincore requires.
    let r = unsafe {
        libc::mincore(
            region.as_ptr().cast(),
            region.len() as libc::size_t,
            vec.as_mut_ptr(),
        )
    };
    (r == 0).then_some(vec)
}

/// Guest RAM in pages (the regions back to back).
pub fn total_pages(mem: &GuestMemory) -> u64 {
    mem.iter().map(|r| r.len() / PAGE_SIZE).sum()
}

/// The pages (memory-file numbering) the host has resident: the only ones
/// that can hold anything but zeros. All pages where `mincore` fails.
pub fn resident_pages(mem: &GuestMemory) -> PageBitmap {
    let mut bits = PageBitmap::new(total_pages(mem));
    for (first, region) in regions(mem) {
        match resident(region) {
            Some(v) => v
                .iter()
                .enumerate()
                .filter(|(_, r)| *r & 1 != 0)
                .for_each(|(i, _)| bits.set(first + i as u64)),
            None => (0..region.len() / PAGE_SIZE).for_each(|i| bits.set(first + i)),
        }
    }
    bits
}

/// The region holding page `page` (memory-file numbering) and the page's
/// index in it.
fn locate(mem: &GuestMemory, page: u64) -> Option<(&GuestRegionMmap<AtomicBitmap>, u64)> {
    let mut first = 0;
    for r in mem.iter() {
        let n = r.len() / PAGE_SIZE;
        if page < first + n {
            return Some((r, page - first));
        }
        first += n;
    }
    None
}

/// Copies page `page` (memory-file numbering) into `buf` (PAGE_SIZE bytes).
pub fn read_page(mem: &GuestMemory, page: u64, buf: &mut [u8]) -> std::io::Result<()> {
    let (region, at) = locate(mem, page)
        .ok_or_else(|| std::io::Error::other(format!("page {page} is past guest RAM")))?;
    read_guest(region, at, 1, buf)
}

/// Writes `data` (PAGE_SIZE bytes) to page `page` (memory-file numbering).
pub fn write_page(mem: &GuestMemory, page: u64, data: &[u8]) -> std::io::Result<()> {
    let (region, at) = locate(mem, page)
        .ok_or_else(|| std::io::Error::other(format!("page {page} is past guest RAM")))?;
    let slice = region
        .get_slice(MemoryRegionAddress(at * PAGE_SIZE), PAGE_SIZE as usize)
        .map_err(|e| std::io::Error::other(format!("guest memory: {e}")))?;
    slice.copy_from(&data[..PAGE_SIZE as usize]);
    Ok(())
}

/// Whether `page` is all zero bytes.
pub fn is_zero(page: &[u8]) -> bool {
    // SAFETY: reinterpreting initialised bytes as u64 words is valid for any
    // bit pattern; align_to puts misaligned ends into prefix/suffix.
    let (pre, words, post) = unsafe { page.align_to::<u64>() };
    pre.iter().all(|&b| b == 0) && words.iter().all(|&w| w == 0) && post.iter().all(|&b| b == 0)
}

/// Copies `count` pages starting at region page `page` into `buf`.
fn read_guest(
    region: &GuestRegionMmap<AtomicBitmap>,
    page: u64,
    count: u64,
    buf: &mut [u8],
) -> std::io::Result<()> {
    let len = (count * PAGE_SIZE) as usize;
    let slice = region
        .get_slice(MemoryRegionAddress(page * PAGE_SIZE), len)
        .map_err(|e| std::io::Error::other(format!("guest memory: {e}")))?;
    slice.copy_to(&mut buf[..len]);
    Ok(())
}

/// Writes the selected pages of `mem` into `file` (laid out like RAM; the
/// file is sized to all of RAM and stays sparse) and returns the pages it
/// defines, the data written and the checksum of the defined pages. The
/// file is not synced here (the guest may be paused): `Pending::commit`
/// syncs it.
pub fn write_layer(
    mem: &GuestMemory,
    selection: &Selection,
    file: &File,
) -> std::io::Result<Written> {
    let total_pages: u64 = mem.iter().map(|r| r.len() / PAGE_SIZE).sum();
    file.set_len(total_pages * PAGE_SIZE)?;
    let mut defined = PageBitmap::new(total_pages);
    let mut crc = crc32fast::Hasher::new();
    let mut data_bytes = 0;
    let mut buf = vec![0u8; (CHUNK_PAGES * PAGE_SIZE) as usize];
    for (first, region) in regions(mem) {
        let region_pages = region.len() / PAGE_SIZE;
        let candidates: Vec<(u64, u64)> = match selection {
            Selection::Full => {
                let res = resident(region);
                let mut runs = Vec::new();
                let mut p = 0;
                while p < region_pages {
                    let on = |p: u64| res.as_ref().is_none_or(|v| v[p as usize] & 1 != 0);
                    if !on(p) {
                        p += 1;
                        continue;
                    }
                    let s = p;
                    while p < region_pages && on(p) {
                        p += 1;
                    }
                    runs.push((s, p - s));
                }
                runs
            }
            Selection::Pages(bits) => bits
                .runs()
                .into_iter()
                .filter_map(|(s, n)| {
                    let lo = s.max(first);
                    let hi = (s + n).min(first + region_pages);
                    (lo < hi).then(|| (lo - first, hi - lo))
                })
                .collect(),
        };
        for (start, count) in candidates {
            let mut done = 0;
            while done < count {
                let n = (count - done).min(CHUNK_PAGES);
                let page0 = start + done;
                read_guest(region, page0, n, &mut buf)?;
                // Write maximal runs of non-zero pages of this chunk.
                let mut i = 0;
                while i < n {
                    let page = &buf[(i * PAGE_SIZE) as usize..((i + 1) * PAGE_SIZE) as usize];
                    let zero = is_zero(page);
                    if zero && matches!(selection, Selection::Full) {
                        i += 1;
                        continue;
                    }
                    defined.set(first + page0 + i);
                    crc.update(page);
                    if zero {
                        // A page that became zero: a hole, also where an
                        // earlier round of a live snapshot wrote data.
                        punch_page(file, (first + page0 + i) * PAGE_SIZE)?;
                        i += 1;
                        continue;
                    }
                    let run_start = i;
                    i += 1;
                    while i < n {
                        let p = &buf[(i * PAGE_SIZE) as usize..((i + 1) * PAGE_SIZE) as usize];
                        if is_zero(p) {
                            break;
                        }
                        defined.set(first + page0 + i);
                        crc.update(p);
                        i += 1;
                    }
                    let bytes = &buf[(run_start * PAGE_SIZE) as usize..(i * PAGE_SIZE) as usize];
                    file.write_all_at(bytes, (first + page0 + run_start) * PAGE_SIZE)?;
                    data_bytes += bytes.len() as u64;
                }
                done += n;
            }
        }
    }
    Ok(Written {
        defined,
        data_bytes,
        crc32: crc.finalize(),
    })
}

/// Makes the page at `offset` a hole (or zeros where holes are not supported).
pub(crate) fn punch_page(file: &File, offset: u64) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    // SAFETY: fallocate on our own descriptor, one page inside the file.
    let r = unsafe {
        libc::fallocate(
            file.as_raw_fd(),
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            offset as libc::off_t,
            PAGE_SIZE as libc::off_t,
        )
    };
    if r == 0 {
        return Ok(());
    }
    // No hole punching on this filesystem: write the zeros.
    file.write_all_at(&[0u8; PAGE_SIZE as usize], offset)
}

/// CRC-32 of the pages `defined` selects in `file` (holes read as zero).
pub fn checksum_layer(file: &File, defined: &PageBitmap) -> std::io::Result<u32> {
    let mut crc = crc32fast::Hasher::new();
    let mut buf = vec![0u8; (CHUNK_PAGES * PAGE_SIZE) as usize];
    for (start, count) in defined.runs() {
        let mut done = 0;
        while done < count {
            let n = (count - done).min(CHUNK_PAGES);
            let len = (n * PAGE_SIZE) as usize;
            file.read_exact_at(&mut buf[..len], (start + done) * PAGE_SIZE)?;
            crc.update(&buf[..len]);
            done += n;
        }
    }
    Ok(crc.finalize())
}

/// The first page that `defined` leaves out but `file` holds data for
/// (anything but a hole or zeros), if any. A full layer is mapped as guest
/// memory as it is, so such bytes would reach the guest unchecked: the
/// checksum covers defined pages only. Walks the file's data extents
/// (SEEK_DATA/SEEK_HOLE): cost follows the data stored; where the file
/// system reports no holes, every undefined page is read.
pub fn stray_data(file: &File, defined: &PageBitmap) -> std::io::Result<Option<u64>> {
    use std::os::fd::AsRawFd;
    let len = file.metadata()?.len();
    let seek = |from: u64, whence: libc::c_int| -> std::io::Result<Option<u64>> {
        // SAFETY: lseek on a descriptor this File owns; no memory involved.
        let r = unsafe { libc::lseek(file.as_raw_fd(), from as libc::off_t, whence) };
        if r >= 0 {
            return Ok(Some(r as u64));
        }
        let e = std::io::Error::last_os_error();
        match e.raw_os_error() {
            // No data after `from`.
            Some(libc::ENXIO) => Ok(None),
            _ => Err(e),
        }
    };
    let mut buf = vec![0u8; PAGE_SIZE as usize];
    let mut at = 0;
    while at < len {
        let Some(data) = seek(at, libc::SEEK_DATA)? else {
            break;
        };
        let end = seek(data, libc::SEEK_HOLE)?.unwrap_or(len).min(len);
        let mut page = data / PAGE_SIZE;
        while page * PAGE_SIZE < end {
            if !defined.get(page) {
                let n = file.read_at(&mut buf, page * PAGE_SIZE)?;
                if !is_zero(&buf[..n]) {
                    return Ok(Some(page));
                }
            }
            page += 1;
        }
        at = end.max(data + 1);
    }
    Ok(None)
}

/// Copies the pages `defined` selects from `file` into guest memory.
pub fn apply_layer(file: &File, defined: &PageBitmap, mem: &GuestMemory) -> std::io::Result<()> {
    let mut buf = vec![0u8; (CHUNK_PAGES * PAGE_SIZE) as usize];
    let regions = regions(mem);
    for (start, count) in defined.runs() {
        let mut done = 0;
        while done < count {
            let page = start + done;
            let Some((first, region)) = regions
                .iter()
                .rev()
                .find(|(first, _)| *first <= page)
                .copied()
            else {
                return Err(std::io::Error::other("page outside guest memory"));
            };
            let region_pages = region.len() / PAGE_SIZE;
            if page - first >= region_pages {
                return Err(std::io::Error::other("page outside guest memory"));
            }
            let n = (count - done)
                .min(CHUNK_PAGES)
                .min(first + region_pages - page);
            let len = (n * PAGE_SIZE) as usize;
            file.read_exact_at(&mut buf[..len], page * PAGE_SIZE)?;
            region
                .get_slice(MemoryRegionAddress((page - first) * PAGE_SIZE), len)
                .map_err(|e| std::io::Error::other(format!("guest memory: {e}")))?
                .copy_from(&buf[..len]);
            done += n;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::{Bytes, GuestAddress};

    fn mem(mib: usize) -> GuestMemory {
        GuestMemory::from_ranges(&[
            (GuestAddress(0), mib << 20),
            (GuestAddress(1 << 32), 1 << 20),
        ])
        .unwrap()
    }

    fn tmp(name: &str) -> std::path::PathBuf {
        std::env::temp_dir().join(format!("ffmk-snapmem-{}-{name}", std::process::id()))
    }

    fn fresh_file(p: &std::path::Path) -> File {
        File::options()
            .create(true)
            .truncate(true)
            .read(true)
            .write(true)
            .open(p)
            .unwrap()
    }

    #[test]
    fn bitmaps_round_trip_and_list_runs() {
        let mut b = PageBitmap::new(130);
        for p in [0, 1, 2, 63, 64, 65, 129, 500] {
            b.set(p);
        }
        assert_eq!(b.count(), 7);
        assert_eq!(b.runs(), vec![(0, 3), (63, 3), (129, 1)]);
        let back = PageBitmap::from_bytes(130, &b.to_bytes()).unwrap();
        assert_eq!(back, b);
        assert!(PageBitmap::from_bytes(131, &b.to_bytes()[..8]).is_none());
        let mut k = PageBitmap::new(200);
        k.or_words(64, &[0b101, 1 << 63]);
        assert_eq!(k.runs(), vec![(64, 1), (66, 1), (191, 1)]);
    }

    #[test]
    fn full_layers_skip_zero_pages_and_restore_exactly() {
        let m = mem(4);
        m.write_obj(0x1122_3344u32, GuestAddress(0x3000)).unwrap();
        m.write_slice(&[7u8; 8192], GuestAddress(0x10_0000))
            .unwrap();
        m.write_obj(0x55u8, GuestAddress((1 << 32) + 0x1fff))
            .unwrap();
        let p = tmp("full");
        let f = fresh_file(&p);
        let w = write_layer(&m, &Selection::Full, &f).unwrap();
        assert_eq!(w.defined.count(), 4, "{:?}", w.defined.runs());
        assert_eq!(w.data_bytes, 4 * PAGE_SIZE);
        assert_eq!(f.metadata().unwrap().len(), (5 << 20) as u64);
        assert_eq!(checksum_layer(&f, &w.defined).unwrap(), w.crc32);
        let back = mem(4);
        apply_layer(&f, &w.defined, &back).unwrap();
        let mut a = vec![0u8; 4 << 20];
        let mut b = vec![0u8; 4 << 20];
        m.read_slice(&mut a, GuestAddress(0)).unwrap();
        back.read_slice(&mut b, GuestAddress(0)).unwrap();
        assert!(a == b);
        assert_eq!(
            back.read_obj::<u8>(GuestAddress((1 << 32) + 0x1fff))
                .unwrap(),
            0x55
        );
        std::fs::remove_file(p).unwrap();
    }

    #[test]
    fn bytes_in_undefined_pages_are_found_and_zeros_or_holes_are_not() {
        let m = mem(2);
        m.write_obj(0xabu8, GuestAddress(0x5000)).unwrap();
        let p = tmp("stray");
        let f = fresh_file(&p);
        let w = write_layer(&m, &Selection::Full, &f).unwrap();
        assert_eq!(stray_data(&f, &w.defined).unwrap(), None);
        // Zeros written over a hole reach the guest as zeros: allowed.
        f.write_all_at(&[0u8; 4096], 0x9000).unwrap();
        assert_eq!(stray_data(&f, &w.defined).unwrap(), None);
        // One byte in a page the layer leaves out (a hole): found, though
        // the checksum of the defined pages still matches.
        f.write_all_at(&[1u8], (1 << 20) + 17).unwrap();
        assert_eq!(checksum_layer(&f, &w.defined).unwrap(), w.crc32);
        assert_eq!(stray_data(&f, &w.defined).unwrap(), Some(256));
        // Next to a defined page, in the same data extent.
        f.write_all_at(&[0u8], (1 << 20) + 17).unwrap();
        f.write_all_at(&[2u8], 0x6000).unwrap();
        assert_eq!(stray_data(&f, &w.defined).unwrap(), Some(6));
        std::fs::remove_file(p).unwrap();
    }

    #[test]
    fn incremental_layers_define_dirty_pages_even_when_zero() {
        let m = mem(4);
        m.write_obj(9u64, GuestAddress(0x5000)).unwrap();
        let mut dirty = PageBitmap::new(5 * 256);
        dirty.set(5); // non-zero
        dirty.set(6); // zero: defined, a hole
        let p = tmp("incr");
        let f = fresh_file(&p);
        let w = write_layer(&m, &Selection::Pages(dirty), &f).unwrap();
        assert_eq!(w.defined.count(), 2);
        assert_eq!(w.data_bytes, PAGE_SIZE);
        // Applying over a memory where page 6 had data zeroes it.
        let back = mem(4);
        back.write_obj(1u64, GuestAddress(0x6000)).unwrap();
        apply_layer(&f, &w.defined, &back).unwrap();
        assert_eq!(back.read_obj::<u64>(GuestAddress(0x5000)).unwrap(), 9);
        assert_eq!(back.read_obj::<u64>(GuestAddress(0x6000)).unwrap(), 0);
        // A flipped byte changes the checksum.
        f.write_all_at(&[1], 0x5001).unwrap();
        assert_ne!(checksum_layer(&f, &w.defined).unwrap(), w.crc32);
        std::fs::remove_file(p).unwrap();
    }
}
