//! The real `ackvisor.sys` on the test machine's disk, for the miniature NT's scenarios (`nt-*`,
//! `tests/kernel/src/ntos`).
//!
//! The image is the project's own Linux build (`tests/image`, debug profile), built once per
//! process. [`attach`] writes it at sector [`BLOB_LBA`] behind a one-sector header (`ACKSYS01`,
//! length as u64 LE) that the kernel's `ntos::disk` reads back over ATA PIO.
//!
//! The `fault` param (`Routine:k`) goes into the header: the kernel's `ntos::fault` makes that
//! routine fail on its k-th call.
//!
//! The `image` param picks a deliberately broken copy, so the loader's refusals are tested on
//! the real file: `truncated` (the file cut in half), `unknown-import` (`KeBugCheckEx` renamed
//! `KeBugCheckXx` in the import names), `bad-reloc` (the first base relocation's type made
//! [`BAD_RELOC_TYPE`]).
//!
//! **Runs in:** the Linux host.

use std::path::PathBuf;
use std::sync::OnceLock;

use object::read::pe::PeFile64;

use crate::RunSpec;

/// The header's sector (the kernel's `ntos::disk::BLOB_LBA`).
pub const BLOB_LBA: usize = 2048;
const SECTOR: usize = 512;
const BLOB_MAGIC: &[u8; 8] = b"ACKSYS01";
/// Where the header keeps the refusal to inject (the kernel's `ntos::disk`).
const FAULT_OFFSET: usize = 16;
const FAULT_BYTES: usize = 64;
/// The relocation type `bad-reloc` writes: `IMAGE_REL_BASED_ARM_MOV32`, not an x64 type.
pub const BAD_RELOC_TYPE: u16 = 5;

/// Builds the debug `ackvisor.sys` (once per process) and returns its path.
pub fn sys_image() -> Result<PathBuf, String> {
    static IMAGE: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    IMAGE
        .get_or_init(|| {
            ackvisor_image::build::build(ackvisor_image::build::Profile::Debug).map(|i| i.sys)
        })
        .clone()
}

/// The image's bytes as the run's `image` param asks for them.
pub fn image_bytes(variant: &str) -> Result<Vec<u8>, String> {
    let path = sys_image()?;
    let mut bytes = std::fs::read(&path).map_err(|e| format!("read {}: {e}", path.display()))?;
    match variant {
        "good" => {}
        "truncated" => bytes.truncate(bytes.len() / 2),
        "unknown-import" => {
            let at = find(&bytes, b"KeBugCheckEx\0")
                .ok_or("no KeBugCheckEx import name in the image")?;
            bytes[at + "KeBugCheck".len()] = b'X';
        }
        "bad-reloc" => {
            let (at, _) = first_relocation(&bytes)?;
            let entry = u16::from_le_bytes([bytes[at], bytes[at + 1]]);
            let bad = (BAD_RELOC_TYPE << 12) | (entry & 0x0FFF);
            bytes[at..at + 2].copy_from_slice(&bad.to_le_bytes());
        }
        other => return Err(format!("unknown image variant {other}")),
    }
    Ok(bytes)
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// The file offset of the first base relocation entry and the RVA it relocates.
pub fn first_relocation(bytes: &[u8]) -> Result<(usize, u32), String> {
    let pe = PeFile64::parse(bytes).map_err(|e| format!("parse ackvisor.sys: {e}"))?;
    let dir = pe
        .data_directory(object::pe::IMAGE_DIRECTORY_ENTRY_BASERELOC)
        .ok_or("ackvisor.sys has no base relocations")?;
    let (offset, size) = dir
        .file_range(&pe.section_table())
        .map_err(|e| format!("base relocations: {e}"))?;
    let offset = offset as usize;
    if size < 10 || offset + 10 > bytes.len() {
        return Err("base relocation directory too small".into());
    }
    let block_rva = u32::from_le_bytes(
        bytes[offset..offset + 4]
            .try_into()
            .map_err(|_| "block header")?,
    );
    let entry = u16::from_le_bytes([bytes[offset + 8], bytes[offset + 9]]);
    Ok((offset + 8, block_rva + u32::from(entry & 0x0FFF)))
}

/// Puts the driver image on `disk` for scenarios of the miniature NT (`nt-*`); other runs are
/// left alone.
pub fn attach(spec: &RunSpec, disk: &mut [u8]) -> Result<(), String> {
    if !spec.scenario().starts_with("nt-") {
        return Ok(());
    }
    let variant = spec
        .params
        .iter()
        .find(|(k, _)| k == "image")
        .map_or("good", |(_, v)| v.as_str());
    let bytes = image_bytes(variant)?;
    let start = BLOB_LBA * SECTOR;
    let end = start + SECTOR + bytes.len();
    if end > disk.len() {
        return Err(format!(
            "ackvisor.sys ({} bytes) does not fit the disk",
            bytes.len()
        ));
    }
    disk[start..start + SECTOR].fill(0);
    disk[start..start + 8].copy_from_slice(BLOB_MAGIC);
    disk[start + 8..start + 16].copy_from_slice(&(bytes.len() as u64).to_le_bytes());
    let fault = spec
        .params
        .iter()
        .find(|(k, _)| k == "fault")
        .map_or("", |(_, v)| v.as_str());
    if fault.len() > FAULT_BYTES {
        return Err(format!("fault {fault} longer than {FAULT_BYTES} bytes"));
    }
    disk[start + FAULT_OFFSET..start + FAULT_OFFSET + fault.len()]
        .copy_from_slice(fault.as_bytes());
    disk[start + SECTOR..end].copy_from_slice(&bytes);
    Ok(())
}
