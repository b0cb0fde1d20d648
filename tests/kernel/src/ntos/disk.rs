//! Reads the driver image the runner placed on the disk: the primary ATA channel's master in PIO
//! mode (LBA28, polled, no interrupts), which Bochs emulates for the boot disk.
//!
//! Disk layout (the runner's `driver` module writes it): sector [`BLOB_LBA`] holds a header,
//! `ACKSYS01`, the image length as a little-endian u64, then the refusal to inject as text
//! (`Routine:k`, NUL-padded, empty for none); the image follows from the next sector on.
//!
//! **Runs in:** PASSIVE, BSP, before anything is virtualized.

use crate::arch::{inb, outb};

/// The header's sector (1 MiB into the disk, past the kernel's real-mode load limit).
pub const BLOB_LBA: u32 = 2048;
/// The header's tag.
pub const BLOB_MAGIC: &[u8; 8] = b"ACKSYS01";
const SECTOR: usize = 512;

const DATA: u16 = 0x1F0;
const SECTOR_COUNT: u16 = 0x1F2;
const LBA_LOW: u16 = 0x1F3;
const LBA_MID: u16 = 0x1F4;
const LBA_HIGH: u16 = 0x1F5;
const DRIVE_HEAD: u16 = 0x1F6;
const STATUS_COMMAND: u16 = 0x1F7;
/// Drive/head: LBA addressing, master.
const LBA_MASTER: u8 = 0xE0;
const CMD_READ_SECTORS: u8 = 0x20;
const STATUS_BSY: u8 = 0x80;
const STATUS_DRQ: u8 = 0x08;
const STATUS_ERR: u8 = 0x01;
/// Status polls before a sector counts as lost.
const POLL_LIMIT: u32 = 10_000_000;

/// Why the image could not be read.
#[derive(Clone, Copy, Debug)]
pub enum DiskError {
    /// The drive reported an error (or never became ready) at this LBA.
    Io(u32),
    /// The header sector does not start with [`BLOB_MAGIC`]: no image on the disk.
    NoImage,
    /// The header names more bytes than the buffer holds.
    TooLarge(u64),
}

impl DiskError {
    /// The RESULT key and value naming the failure.
    pub fn report(&self, line: &mut crate::report::Line) {
        match self {
            DiskError::Io(lba) => line.kv("disk_error_lba", lba),
            DiskError::NoImage => line.kv("no_image", 1),
            DiskError::TooLarge(len) => line.kv("image_too_large", len),
        };
    }
}

fn read_sector(lba: u32, out: &mut [u8; SECTOR]) -> Result<(), DiskError> {
    let lba_byte = |shift: u32| (lba >> shift) as u8;
    // SAFETY: the primary ATA channel's task-file ports; nothing else in the kernel drives them.
    unsafe { outb(DRIVE_HEAD, LBA_MASTER | (lba_byte(24) & 0x0F)) };
    // SAFETY: as above.
    unsafe { outb(SECTOR_COUNT, 1) };
    // SAFETY: as above.
    unsafe { outb(LBA_LOW, lba_byte(0)) };
    // SAFETY: as above.
    unsafe { outb(LBA_MID, lba_byte(8)) };
    // SAFETY: as above.
    unsafe { outb(LBA_HIGH, lba_byte(16)) };
    // SAFETY: as above.
    unsafe { outb(STATUS_COMMAND, CMD_READ_SECTORS) };
    let mut polls = 0;
    loop {
        // SAFETY: reading the status port has no side effect beyond acknowledging the IRQ.
        let status = unsafe { inb(STATUS_COMMAND) };
        if status & STATUS_ERR != 0 {
            return Err(DiskError::Io(lba));
        }
        if status & STATUS_BSY == 0 && status & STATUS_DRQ != 0 {
            break;
        }
        polls += 1;
        if polls > POLL_LIMIT {
            return Err(DiskError::Io(lba));
        }
    }
    for pair in out.chunks_exact_mut(2) {
        let word: u16;
        // SAFETY: the drive has a sector ready (DRQ); each read takes the next 16-bit word.
        unsafe {
            core::arch::asm!("in ax, dx", out("ax") word, in("dx") DATA,
                options(nomem, nostack, preserves_flags))
        };
        pair.copy_from_slice(&word.to_le_bytes());
    }
    Ok(())
}

/// Where the header keeps the refusal to inject (`Routine:k`, NUL-padded; see `fault`).
const FAULT_OFFSET: usize = 16;
/// Its room.
pub const FAULT_BYTES: usize = 64;

/// Reads the image into `buf` and returns its length; `fault` receives the header's fault text.
pub fn read_image(buf: &mut [u8], fault: &mut [u8; FAULT_BYTES]) -> Result<usize, DiskError> {
    let mut sector = [0u8; SECTOR];
    read_sector(BLOB_LBA, &mut sector)?;
    if &sector[..8] != BLOB_MAGIC {
        return Err(DiskError::NoImage);
    }
    fault.copy_from_slice(&sector[FAULT_OFFSET..FAULT_OFFSET + FAULT_BYTES]);
    let mut len_bytes = [0u8; 8];
    len_bytes.copy_from_slice(&sector[8..16]);
    let len = u64::from_le_bytes(len_bytes);
    let n = usize::try_from(len)
        .ok()
        .filter(|&n| n <= buf.len())
        .ok_or(DiskError::TooLarge(len))?;
    for (i, chunk) in buf[..n].chunks_mut(SECTOR).enumerate() {
        // `n` fits the buffer, so the sector index fits u32.
        read_sector(BLOB_LBA + 1 + i as u32, &mut sector)?;
        let k = chunk.len();
        chunk.copy_from_slice(&sector[..k]);
    }
    Ok(n)
}
