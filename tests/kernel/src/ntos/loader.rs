//! Loads ackvisor.sys as NT's loader would: a PE32+ for x64, its sections mapped at their RVAs
//! in one buffer, its DIR64 base relocations applied for where the buffer is, and every import
//! bound by name to this kernel's exports (`exports`). The file is read with `object`'s PE
//! reader (no allocation), so nothing here parses headers by hand.
//!
//! Every way an image can be unusable is a [`LoadError`] that names what was wrong; the
//! scenario prints it in a `fatal=1` RESULT line.
//!
//! **Runs in:** PASSIVE, BSP, before anything is virtualized.

use core::fmt;

use object::LittleEndian as LE;
use object::pe::{
    IMAGE_DIRECTORY_ENTRY_IAT, IMAGE_FILE_MACHINE_AMD64, IMAGE_NT_OPTIONAL_HDR64_MAGIC,
    IMAGE_REL_BASED_ABSOLUTE, IMAGE_REL_BASED_DIR64,
};
use object::read::pe::{ImageNtHeaders, ImageOptionalHeader, Import, PeFile64};

use super::exports;

/// Why an image was not loaded. Each names the part at fault.
#[derive(Clone, Copy, Debug)]
pub enum LoadError {
    /// `object` rejected the headers or a table (its message: a short, or malformed, part).
    Malformed(object::read::Error),
    /// A section's raw data runs past the end of the file.
    Truncated {
        /// The section's name (up to 8 bytes).
        section: [u8; 8],
        /// Bytes the section needs from the file.
        needs: u32,
        /// Bytes the file has.
        file: usize,
    },
    /// Not a PE32+ image for x64.
    NotAmd64,
    /// `SizeOfImage` exceeds the buffer, or a section lies outside `SizeOfImage`.
    TooLarge(u32),
    /// A base relocation of a type this loader does not apply, or whose target lies outside
    /// the image.
    BadRelocation {
        /// The target RVA.
        rva: u32,
        /// `IMAGE_REL_BASED_*`.
        typ: u16,
    },
    /// An import this kernel does not export.
    UnknownImport {
        /// The DLL named by the import descriptor.
        dll: [u8; 32],
        /// The routine's name (truncated to 64 bytes).
        name: [u8; 64],
    },
    /// An import by ordinal (ackvisor imports only by name).
    OrdinalImport(u16),
}

/// Text of a fixed buffer up to its first NUL, for RESULT lines (no spaces in the value).
pub struct Name<'a>(pub &'a [u8]);

impl fmt::Display for Name<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for &b in self.0.iter().take_while(|&&b| b != 0) {
            let c = if b.is_ascii_graphic() { b as char } else { '_' };
            write!(f, "{c}")?;
        }
        Ok(())
    }
}

impl LoadError {
    /// The RESULT key and value naming the failure.
    pub fn report(&self, line: &mut crate::report::Line) {
        match self {
            LoadError::Malformed(what) => line.kv("malformed", Underscored(what)),
            LoadError::Truncated {
                section,
                needs,
                file,
            } => line
                .kv("truncated", Name(section))
                .kv("needs", needs)
                .kv("file_bytes", file),
            LoadError::NotAmd64 => line.kv("not_amd64", 1),
            LoadError::TooLarge(size) => line.kv("too_large", size),
            LoadError::BadRelocation { rva, typ } => line
                .kv("bad_relocation", format_args!("{rva:#x}"))
                .kv("reloc_type", typ),
            LoadError::UnknownImport { dll, name } => {
                line.kv("unknown_import", Name(name)).kv("dll", Name(dll))
            }
            LoadError::OrdinalImport(n) => line.kv("ordinal_import", n),
        };
    }
}

/// A message with its spaces as underscores (RESULT values are single words).
struct Underscored<'a, T>(&'a T);

impl<T: fmt::Display> fmt::Display for Underscored<'_, T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        struct Spaceless<'a, 'b>(&'a mut fmt::Formatter<'b>);
        impl fmt::Write for Spaceless<'_, '_> {
            fn write_str(&mut self, s: &str) -> fmt::Result {
                for c in s.chars() {
                    fmt::Write::write_char(self.0, if c == ' ' { '_' } else { c })?;
                }
                Ok(())
            }
        }
        fmt::write(&mut Spaceless(f), format_args!("{}", self.0))
    }
}

impl From<object::read::Error> for LoadError {
    fn from(e: object::read::Error) -> Self {
        LoadError::Malformed(e)
    }
}

/// What a successful load produced.
#[derive(Clone, Copy, Debug)]
pub struct Loaded {
    /// Where the image lives.
    pub base: usize,
    /// `SizeOfImage`.
    pub size: u32,
    /// `AddressOfEntryPoint` (DriverEntry) as an address.
    pub entry: usize,
    /// Sections mapped.
    pub sections: u32,
    /// DIR64 relocations applied.
    pub relocations: u32,
    /// Relocated values that now point inside the loaded image.
    pub relocations_inside: u32,
    /// Import slots bound.
    pub imports: u32,
    /// Slots of the import address table (its own data directory, read back from the mapped
    /// image) that hold an address of this kernel's exports.
    pub bound: u32,
    /// FNV-1a over the names of the exports those slots hold, in slot order, each name
    /// followed by a NUL; a slot holding anything else adds `?`. The runner computes the same
    /// over the image's import names: a slot bound to the wrong routine changes it.
    pub bound_names_hash: u64,
}

fn copy_name<const N: usize>(src: &[u8]) -> [u8; N] {
    let mut out = [0u8; N];
    let n = src.len().min(N);
    out[..n].copy_from_slice(&src[..n]);
    out
}

const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
const FNV_PRIME: u64 = 0x0100_0000_01b3;

fn fnv1a(mut hash: u64, bytes: &[u8]) -> u64 {
    for &b in bytes {
        hash = (hash ^ u64::from(b)).wrapping_mul(FNV_PRIME);
    }
    hash
}

fn read_u64(image: &[u8], at: usize) -> Option<u64> {
    let bytes = image.get(at..at.checked_add(8)?)?;
    let mut b = [0u8; 8];
    b.copy_from_slice(bytes);
    Some(u64::from_le_bytes(b))
}

fn write_u64(image: &mut [u8], at: usize, value: u64) -> Option<()> {
    image
        .get_mut(at..at.checked_add(8)?)?
        .copy_from_slice(&value.to_le_bytes());
    Some(())
}

/// Loads `file` into `image` (zeroed here; its address is the load base).
pub fn load(file: &[u8], image: &mut [u8]) -> Result<Loaded, LoadError> {
    let pe = PeFile64::parse(file)?;
    let nt = pe.nt_headers();
    let optional = nt.optional_header();
    if nt.file_header().machine.get(LE) != IMAGE_FILE_MACHINE_AMD64
        || optional.magic() != IMAGE_NT_OPTIONAL_HDR64_MAGIC
    {
        return Err(LoadError::NotAmd64);
    }
    let size = optional.size_of_image();
    let size_usize = size as usize;
    if size_usize > image.len() {
        return Err(LoadError::TooLarge(size));
    }
    image[..size_usize].fill(0);
    let base = image.as_ptr() as usize;

    // Headers, then each section at its RVA (the rest of its virtual size stays zero).
    let headers = (optional.size_of_headers() as usize)
        .min(file.len())
        .min(size_usize);
    image[..headers].copy_from_slice(&file[..headers]);
    let sections = pe.section_table();
    let mut mapped = 0;
    for section in sections.iter() {
        let (raw_offset, raw_size) = section.pe_file_range();
        let end = raw_offset as usize + raw_size as usize;
        if end > file.len() {
            return Err(LoadError::Truncated {
                section: section.name,
                needs: raw_offset.saturating_add(raw_size),
                file: file.len(),
            });
        }
        let rva = section.virtual_address.get(LE) as usize;
        let virtual_size = section.virtual_size.get(LE) as usize;
        let copy = match virtual_size {
            0 => raw_size as usize,
            v => v.min(raw_size as usize),
        };
        let target = image
            .get_mut(rva..rva + copy)
            .filter(|_| rva + virtual_size.max(copy) <= size_usize)
            .ok_or(LoadError::TooLarge(size))?;
        target.copy_from_slice(&file[raw_offset as usize..raw_offset as usize + copy]);
        mapped += 1;
    }

    // Base relocations: add the distance from the preferred base to every DIR64 slot.
    let delta = (base as u64).wrapping_sub(optional.image_base());
    let limit = (base as u64)..(base as u64 + u64::from(size));
    let (mut relocations, mut inside) = (0, 0);
    if let Some(mut blocks) = pe.data_directories().relocation_blocks(file, &sections)? {
        while let Some(block) = blocks.next()? {
            for reloc in block {
                match reloc.typ {
                    IMAGE_REL_BASED_ABSOLUTE => {}
                    IMAGE_REL_BASED_DIR64 => {
                        let at = reloc.virtual_address as usize;
                        let bad = LoadError::BadRelocation {
                            rva: reloc.virtual_address,
                            typ: reloc.typ,
                        };
                        let value = read_u64(image, at).ok_or(bad)?.wrapping_add(delta);
                        write_u64(image, at, value).ok_or(bad)?;
                        relocations += 1;
                        if limit.contains(&value) {
                            inside += 1;
                        }
                    }
                    typ => {
                        return Err(LoadError::BadRelocation {
                            rva: reloc.virtual_address,
                            typ,
                        });
                    }
                }
            }
        }
    }

    // Imports, bound by name into the import address table of the mapped image.
    let mut imports = 0;
    if let Some(table) = pe.data_directories().import_table(file, &sections)? {
        let mut descriptors = table.descriptors()?;
        while let Some(descriptor) = descriptors.next()? {
            let dll = table.name(descriptor.name.get(LE))?;
            let first_thunk = descriptor.first_thunk.get(LE);
            let lookup = match descriptor.original_first_thunk.get(LE) {
                0 => first_thunk,
                rva => rva,
            };
            let mut thunks = table.thunks(lookup)?;
            let mut slot = first_thunk as usize;
            while let Some(thunk) = thunks.next::<object::pe::ImageNtHeaders64>()? {
                let name = match table.import::<object::pe::ImageNtHeaders64>(thunk)? {
                    Import::Name(_hint, name) => name,
                    Import::Ordinal(n) => return Err(LoadError::OrdinalImport(n)),
                };
                let address = exports::find(dll, name).ok_or(LoadError::UnknownImport {
                    dll: copy_name(dll),
                    name: copy_name(name),
                })?;
                write_u64(image, slot, address as u64).ok_or(LoadError::TooLarge(size))?;
                slot += 8;
                imports += 1;
            }
        }
    }

    let (mut bound, mut hash) = (0, FNV_OFFSET);
    if let Some(iat) = pe.data_directory(IMAGE_DIRECTORY_ENTRY_IAT) {
        let (rva, len) = iat.address_range();
        let slots = image
            .get(rva as usize..rva as usize + len as usize)
            .ok_or(LoadError::TooLarge(size))?;
        for slot in slots.chunks_exact(8) {
            match read_u64(slot, 0).unwrap_or(0) {
                0 => {}
                value => match exports::name_of(value as usize) {
                    Some(name) => {
                        bound += 1;
                        hash = fnv1a(fnv1a(hash, name), &[0]);
                    }
                    None => hash = fnv1a(hash, b"?"),
                },
            }
        }
    }

    Ok(Loaded {
        base,
        size,
        entry: base + optional.address_of_entry_point() as usize,
        sections: mapped,
        relocations,
        relocations_inside: inside,
        imports,
        bound,
        bound_names_hash: hash,
    })
}
