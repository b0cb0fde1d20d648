//! The real `ackvisor.sys` on the test machine's disk, for the miniature NT's scenarios (`nt-*`,
//! `tests/kernel/src/ntos`).
//!
//! The image is the project's own Linux build (`tests/image`), built once per process and
//! profile: the debug image unless the run's `profile` param says `release` (the profile users
//! ship; `.ci/run`'s `ackimage build-check --release` builds the same file from the same cargo
//! state, so neither build repeats the other's work). [`attach`] writes it at sector
//! [`BLOB_LBA`] behind a one-sector header (`ACKSYS01`, length as u64 LE) that the kernel's
//! `ntos::disk` reads back over ATA PIO.
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

pub use ackvisor_image::build::{Image, Profile};
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
    built(Profile::Debug).map(|i| i.sys)
}

/// Builds `ackvisor.sys` in `profile` (once per process and profile): the image and its PDB.
pub fn built(profile: Profile) -> Result<Image, String> {
    static DEBUG: OnceLock<Result<Image, String>> = OnceLock::new();
    static RELEASE: OnceLock<Result<Image, String>> = OnceLock::new();
    let slot = match profile {
        Profile::Debug => &DEBUG,
        Profile::Release => &RELEASE,
    };
    slot.get_or_init(|| ackvisor_image::build::build(profile))
        .clone()
}

/// The run param that picks the image's profile (`profile=release`; absent: debug).
pub const PROFILE_PARAM: &str = "profile";

/// The profile a run's `profile` param names.
pub fn profile_of(spec: &RunSpec) -> Result<Profile, String> {
    match spec
        .params
        .iter()
        .find(|(k, _)| k == PROFILE_PARAM)
        .map(|(_, v)| v.as_str())
    {
        None | Some("debug") => Ok(Profile::Debug),
        Some("release") => Ok(Profile::Release),
        Some(other) => Err(format!("unknown image profile {other}")),
    }
}

/// `spec` with the image in `profile` (the debug image's runs keep their spec unchanged).
pub fn with_profile(spec: RunSpec, profile: Profile) -> RunSpec {
    match profile {
        Profile::Debug => spec,
        Profile::Release => spec.param(PROFILE_PARAM, profile.dir()),
    }
}

/// The debug image's bytes as the run's `image` param asks for them.
pub fn image_bytes(variant: &str) -> Result<Vec<u8>, String> {
    image_bytes_of(Profile::Debug, variant)
}

/// The bytes of the image in `profile` as the run's `image` param asks for them.
pub fn image_bytes_of(profile: Profile, variant: &str) -> Result<Vec<u8>, String> {
    let path = built(profile)?.sys;
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
    let bytes = image_bytes_of(profile_of(spec)?, variant)?;
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

/// The name the exit stub has in the image's PDB: the core's `exit::stub::vm_exit_entry`, the
/// function whose address root writes into HOST_RIP. A naked function gets no procedure
/// record, only its public symbol, whose name is mangled (Rust's v0 scheme: each path segment
/// is its length and its text).
pub const EXIT_STUB: &str = "4exit4stub13vm_exit_entry";

/// The RVA of the image's exit stub (HOST_RIP) from the PDB linked with it ([`pdb_names`]).
pub fn exit_stub_rva(profile: Profile) -> Result<u32, String> {
    let (image, names) = pdb_names(profile)?;
    let pdb = image.pdb.unwrap_or_default();
    match names.rvas_ending_with(EXIT_STUB)[..] {
        [rva] => Ok(rva),
        ref found => Err(format!(
            "{}: {} functions named {EXIT_STUB}",
            pdb.display(),
            found.len()
        )),
    }
}

/// The image in `profile` and its functions' names from the PDB linked with it (the image's
/// CodeView GUID must match the PDB's: a PDB left from another link would name other
/// addresses).
pub fn pdb_names(profile: Profile) -> Result<(Image, ackvisor_image::check::Names), String> {
    let image = built(profile)?;
    let pdb = image
        .pdb
        .clone()
        .ok_or_else(|| format!("{}: no PDB beside it", image.sys.display()))?;
    let bytes =
        std::fs::read(&image.sys).map_err(|e| format!("read {}: {e}", image.sys.display()))?;
    let pe = PeFile64::parse(&*bytes).map_err(|e| format!("parse ackvisor.sys: {e}"))?;
    let guid = object::Object::pdb_info(&pe)
        .map_err(|e| format!("ackvisor.sys CodeView record: {e}"))?
        .ok_or("ackvisor.sys has no CodeView record")?
        .guid();
    let names = ackvisor_image::check::Names::from_pdb_matching(&pdb, Some(guid))?;
    if names.is_empty() {
        return Err(format!("{} does not match the image", pdb.display()));
    }
    Ok((image, names))
}
