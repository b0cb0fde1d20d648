//! The stand-in WDK the image is built against, made from mingw-w64 (Debian's
//! `mingw-w64-x86-64-dev`):
//!
//! - `wdk/Include/<ver>/{km,km/crt,shared,um}`: mingw-w64's DDK and Windows headers, laid out
//!   where wdk-build looks for a WDK's, for wdk-sys's bindgen;
//! - `wdk/Lib/<ver>/km/x64`: `ntoskrnl.lib` and `hal.lib`, import libraries written by
//!   llvm-dlltool from export lists read out of mingw-w64's own import archives (code and data
//!   exports told apart, since only a code export has a callable thunk), and empty archives for
//!   the WDK libraries wdk-sys names but the image takes nothing from;
//! - `exports/{ntoskrnl,hal}.def`: those export lists, which the image check holds the image's
//!   imports to;
//! - `trap_stubs.obj`: `fma`/`fmaf` that execute `ud2`. The `compiler_builtins` that
//!   `-Zbuild-std` compiles refers to them from float code the driver never runs; no kernel
//!   library provides them.
//! - `compat.h`: declarations the real WDK has and mingw-w64 10's headers lack.
//!
//! Rebuilt when its inputs or [`KIT_REVISION`] change.

use std::collections::BTreeSet;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use object::read::archive::ArchiveFile;
use object::{Object, ObjectSection, ObjectSymbol};

use super::run;

/// The WDK version the tree pretends to be (any 10.0.x layout works for wdk-build).
pub const SDK_VERSION: &str = "10.0.22621.0";
/// Bump when the kit's recipe changes, so caches are rebuilt.
const KIT_REVISION: &str = "ackvisor-kit 2";
const MINGW: &str = "/usr/x86_64-w64-mingw32";
const DLLTOOL: &str = "/usr/bin/llvm-dlltool-14";

/// ntoskrnl.exe exports newer than the Windows version mingw-w64's list was taken from, that
/// this project (or the wdk crate) imports. Each name with the first Windows that exports it.
pub const NTOSKRNL_NEWER_EXPORTS: &[(&str, &str)] = &[
    ("MmMapIoSpaceEx", "Windows 10"),
    ("ExAllocatePool2", "Windows 10 version 2004"),
    ("ExFreePool2", "Windows 10 version 2004"),
    // Not an ntoskrnl export: the WDK's static wdmsec.lib holds this routine's code, which is
    // not available on Linux. The Linux image imports it from ntoskrnl.exe instead, so it links
    // and the check can name it; this is the one import by which it differs from a WDK build.
    ("WdmlibIoCreateDeviceSecure", "stand-in for wdmsec.lib"),
];

/// Declarations for bindgen that the real WDK's headers have and mingw-w64 10's lack.
const COMPAT_HEADER: &str = "\
/* Stand-in declarations for wdk-sys's bindgen: present in the WDK's wdm.h since Windows 10
   version 2004, absent from mingw-w64 10's ddk/wdm.h. Included before every other header, so
   only basic C types are used. */
typedef unsigned long long POOL_FLAGS;
__declspec(dllimport) void *__stdcall ExAllocatePool2(POOL_FLAGS Flags,
                                                      unsigned long long NumberOfBytes,
                                                      unsigned long Tag);
";

/// WDK libraries wdk-sys asks the linker for (and wdmsec, which build.rs names on Windows) that
/// the image takes no symbol from: empty archives satisfy the request.
const EMPTY_LIBRARIES: &[&str] = &["wmilib", "BufferOverflowFastFailK", "wdmsec"];

/// The prepared kit.
pub struct Kit {
    /// `WDKContentRoot` for wdk-build.
    pub wdk_root: PathBuf,
    /// The directory of `ntoskrnl.def` and `hal.def`.
    pub exports: PathBuf,
    /// The import libraries (wdk-sys names them; wdk-build adds their directory to the search
    /// path only in a driver's own build script, which on Linux does nothing).
    pub lib_dir: PathBuf,
    /// The `fma`/`fmaf` trap stubs object.
    pub trap_stubs: PathBuf,
    /// The header bindgen includes first.
    pub compat_header: PathBuf,
}

/// Prepares the kit under `cache/kit`, reusing it when its inputs are unchanged.
pub fn prepare(cache: &Path) -> Result<Kit, String> {
    let dir = cache.join("kit");
    let wdk_root = dir.join("wdk");
    let kit = Kit {
        lib_dir: wdk_root
            .join("Lib")
            .join(SDK_VERSION)
            .join("km")
            .join("x64"),
        wdk_root,
        exports: dir.join("exports"),
        trap_stubs: dir.join("trap_stubs.obj"),
        compat_header: dir.join("compat.h"),
    };
    let stamp_path = dir.join("stamp");
    let stamp = stamp()?;
    if fs::read_to_string(&stamp_path).ok().as_deref() == Some(stamp.as_str()) {
        return Ok(kit);
    }
    if dir.exists() {
        fs::remove_dir_all(&dir).map_err(|e| format!("remove {}: {e}", dir.display()))?;
    }
    let include = kit.wdk_root.join("Include").join(SDK_VERSION);
    let lib = kit.lib_dir.clone();
    for d in [&include.join("km").join("crt"), &lib, &kit.exports] {
        fs::create_dir_all(d).map_err(|e| format!("create {}: {e}", d.display()))?;
    }
    // km: mingw's DDK headers one by one (km/crt must be a directory of ours inside it);
    // shared and um: mingw's Windows headers.
    let mingw_include = Path::new(MINGW).join("include");
    let ddk = mingw_include.join("ddk");
    for entry in fs::read_dir(&ddk).map_err(|e| format!("read {}: {e}", ddk.display()))? {
        let entry = entry.map_err(|e| format!("read {}: {e}", ddk.display()))?;
        symlink(&entry.path(), &include.join("km").join(entry.file_name()))?;
    }
    symlink(&mingw_include, &include.join("shared"))?;
    symlink(&mingw_include, &include.join("um"))?;
    write(&kit.compat_header, COMPAT_HEADER.as_bytes())?;

    let lib_dir = Path::new(MINGW).join("lib");
    let mut ntoskrnl = read_exports(&lib_dir.join("libntoskrnl.a"))?;
    for (name, _) in NTOSKRNL_NEWER_EXPORTS {
        ntoskrnl.code.insert((*name).to_string());
    }
    let hal = read_exports(&lib_dir.join("libhal.a"))?;
    for (module, exports) in [("ntoskrnl", &ntoskrnl), ("hal", &hal)] {
        let def = kit.exports.join(format!("{module}.def"));
        write(
            &def,
            exports
                .def(&format!("{module}.{}", extension(module)))
                .as_bytes(),
        )?;
        let mut cmd = Command::new(DLLTOOL);
        cmd.args(["-m", "i386:x86-64", "-d"])
            .arg(&def)
            .arg("-l")
            .arg(lib.join(format!("{module}.lib")));
        run(&mut cmd, &format!("llvm-dlltool for {module}.lib"))?;
    }
    for name in EMPTY_LIBRARIES {
        write(&lib.join(format!("{name}.lib")), b"!<arch>\n")?;
    }
    write(&kit.trap_stubs, &trap_stubs()?)?;
    write(&stamp_path, stamp.as_bytes())?;
    Ok(kit)
}

fn extension(module: &str) -> &'static str {
    if module == "hal" { "dll" } else { "exe" }
}

/// What the kit is made from: its recipe revision and the mingw-w64 files it reads.
fn stamp() -> Result<String, String> {
    let mut s = String::from(KIT_REVISION);
    for (name, why) in NTOSKRNL_NEWER_EXPORTS {
        s.push_str(&format!("\n{name} {why}"));
    }
    for f in ["lib/libntoskrnl.a", "lib/libhal.a", "include/ddk/wdm.h"] {
        let p = Path::new(MINGW).join(f);
        let m = fs::metadata(&p).map_err(|e| format!("{}: {e}", p.display()))?;
        let modified = m
            .modified()
            .ok()
            .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
            .map_or(0, |d| d.as_secs());
        s.push_str(&format!("\n{f} {} {modified}", m.len()));
    }
    Ok(s)
}

/// The exports of one module, as its mingw-w64 import archive describes them.
#[derive(Debug, Default)]
pub struct Exports {
    /// Exports with a callable thunk in the archive: routines.
    pub code: BTreeSet<String>,
    /// Exports with only an import slot: variables (`DATA` in a .def).
    pub data: BTreeSet<String>,
}

impl Exports {
    /// A module definition file for llvm-dlltool.
    pub fn def(&self, library: &str) -> String {
        let mut s = format!("LIBRARY {library}\nEXPORTS\n");
        for n in &self.code {
            s.push_str(&format!("  {n}\n"));
        }
        for n in self.data.difference(&self.code) {
            s.push_str(&format!("  {n} DATA\n"));
        }
        s
    }
}

/// Reads the exports out of a GNU-dlltool import archive: each member defines `__imp_<name>`
/// (the import slot), and a routine's member also defines `<name>` in `.text` (its jump thunk).
pub fn read_exports(archive: &Path) -> Result<Exports, String> {
    let data = fs::read(archive).map_err(|e| format!("read {}: {e}", archive.display()))?;
    let ar = ArchiveFile::parse(&*data).map_err(|e| format!("{}: {e}", archive.display()))?;
    let mut slots = BTreeSet::new();
    let mut code = BTreeSet::new();
    for member in ar.members() {
        let member = member.map_err(|e| format!("{}: {e}", archive.display()))?;
        // A copy: archive members are only 2-byte aligned, and the COFF reader wants its
        // headers aligned as in memory (an allocation is).
        let bytes = member
            .data(&*data)
            .map_err(|e| format!("{}: {e}", archive.display()))?
            .to_vec();
        let obj = object::File::parse(&*bytes).map_err(|e| {
            let name = String::from_utf8_lossy(member.name());
            format!("{} member {name}: {e}", archive.display())
        })?;
        for sym in obj.symbols().filter(|s| s.is_definition() && s.is_global()) {
            let Ok(name) = sym.name() else { continue };
            if let Some(export) = name.strip_prefix("__imp_") {
                slots.insert(export.to_string());
            } else if let Some(index) = sym.section_index()
                && obj
                    .section_by_index(index)
                    .and_then(|s| s.name().map(|n| n == ".text"))
                    .unwrap_or(false)
            {
                code.insert(name.to_string());
            }
        }
    }
    if slots.is_empty() {
        return Err(format!("{}: no import slots found", archive.display()));
    }
    let data = slots.difference(&code).cloned().collect();
    let code = code.intersection(&slots).cloned().collect();
    Ok(Exports { code, data })
}

/// A COFF object defining `fma` and `fmaf` as `ud2`.
fn trap_stubs() -> Result<Vec<u8>, String> {
    use object::write::{Object as WriteObject, Symbol, SymbolSection};
    use object::{Architecture, BinaryFormat, Endianness, SymbolFlags, SymbolKind};
    const UD2: [u8; 2] = [0x0f, 0x0b];
    let mut obj = WriteObject::new(BinaryFormat::Coff, Architecture::X86_64, Endianness::Little);
    let text = obj.section_id(object::write::StandardSection::Text);
    for name in ["fma", "fmaf"] {
        let offset = obj.append_section_data(text, &UD2, 16);
        obj.add_symbol(Symbol {
            name: name.as_bytes().to_vec(),
            value: offset,
            size: UD2.len() as u64,
            kind: SymbolKind::Text,
            scope: object::SymbolScope::Linkage,
            weak: false,
            section: SymbolSection::Section(text),
            flags: SymbolFlags::None,
        });
    }
    obj.write().map_err(|e| format!("write trap stubs: {e}"))
}

fn symlink(target: &Path, link: &Path) -> Result<(), String> {
    std::os::unix::fs::symlink(target, link)
        .map_err(|e| format!("link {} -> {}: {e}", link.display(), target.display()))
}

fn write(path: &Path, bytes: &[u8]) -> Result<(), String> {
    fs::write(path, bytes).map_err(|e| format!("write {}: {e}", path.display()))
}
