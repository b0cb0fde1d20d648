//! The image check: what any `ackvisor.sys` must be to load into, and live on, a Windows x64
//! kernel. It reads the PE with `object`, disassembles with `iced-x86`, and asserts:
//!
//! | rule | why |
//! |---|---|
//! | PE32+, x86-64, `IMAGE_SUBSYSTEM_NATIVE` | an x64 kernel image |
//! | the entry point is the `DriverEntry` export | the I/O manager calls it |
//! | imports only from ntoskrnl.exe and hal.dll, each name in their export lists | anything else fails to load (or is a stand-in slipping through) |
//! | `DYNAMIC_BASE`, `NX_COMPAT`, `FORCE_INTEGRITY` | relocatable, NX pools, signature enforced (wdk-build's flags) |
//! | no section both writable and executable | HVCI refuses W+X |
//! | base relocations present | the kernel loads drivers anywhere |
//! | no `__chkstk`, every frame ≤ 4 KiB | a kernel stack is 24 KiB, shared with NT's frames above ours |
//!
//! Frames come from each function's prologue: the functions are the image's `.pdata` entries
//! (every x64 function that touches the stack has one), the prologue is the first
//! `SizeOfProlog` bytes its unwind info names, and the frame is what its instructions push and
//! subtract from RSP. The per-function disassembly ([`Image::functions`],
//! [`Image::instructions`]) is where a further rule over code goes (for instance "no XMM
//! instruction in root code"): a function of `(&Image, &mut Vec<Violation>)` added to
//! [`RULES`].

pub mod exports;
pub mod names;
pub mod run;

use std::collections::BTreeMap;
use std::fmt;

use iced_x86::{Code, Decoder, DecoderOptions, Instruction, Mnemonic, OpKind, Register};
use object::LittleEndian as LE;
use object::Object;
use object::pe;
use object::read::pe::{ImageNtHeaders, ImageOptionalHeader, PeFile64};

pub use exports::ExportLists;
pub use names::Names;

/// Largest frame a function may have: one page, the size at which MSVC-ABI code probes the
/// stack through `__chkstk`.
pub const MAX_FRAME: u64 = 4096;
/// The modules a kernel driver may import from.
pub const ALLOWED_MODULES: &[&str] = &["ntoskrnl.exe", "hal.dll"];
/// The probe routine a frame over a page calls.
const CHKSTK: &str = "__chkstk";

/// One broken rule.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Violation {
    /// The rule's name (first column of the table above).
    pub rule: &'static str,
    /// What broke it: the function, import, section or field.
    pub detail: String,
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.rule, self.detail)
    }
}

/// One function of the image (a primary `.pdata` entry).
#[derive(Clone, Debug)]
pub struct Function {
    /// RVA of its first instruction.
    pub begin: u32,
    /// RVA past its last instruction.
    pub end: u32,
    /// RVA of its unwind info.
    pub unwind: u32,
    /// Its name from the PDB or the export table, if known.
    pub name: Option<String>,
}

impl Function {
    /// Its name, or where it starts.
    pub fn label(&self) -> String {
        match &self.name {
            Some(n) => format!("{n} (rva {:#x})", self.begin),
            None => format!("function at rva {:#x}", self.begin),
        }
    }
}

/// A function's frame as its prologue builds it.
#[derive(Clone, Debug)]
pub struct Frame {
    /// Bytes below the return address: pushes plus allocations.
    pub bytes: u64,
    /// The prologue probes the stack through a call (`mov eax, N; call __chkstk; sub rsp, rax`).
    pub probed: bool,
}

/// A parsed image with what the rules need.
pub struct Image<'a> {
    data: &'a [u8],
    pe: PeFile64<'a>,
    functions: Vec<Function>,
    exports: ExportLists,
}

/// A rule: looks at the image, adds what breaks it.
pub type Rule = fn(&Image<'_>, &mut Vec<Violation>);

/// Every rule, in the order of the table above.
pub const RULES: &[Rule] = &[
    rule_machine,
    rule_entry,
    rule_imports,
    rule_dll_characteristics,
    rule_sections,
    rule_relocations,
    rule_chkstk,
    rule_frames,
];

/// What the check found.
pub struct Report {
    /// Imports by module, in the image's order.
    pub imports: Vec<(String, Vec<String>)>,
    /// Every function with its frame, largest first.
    pub frames: Vec<(Function, Frame)>,
    /// Broken rules; empty when the image passes.
    pub violations: Vec<Violation>,
    /// Size of the image file.
    pub file_size: usize,
}

impl<'a> Image<'a> {
    /// Parses `data` as a PE32+ image; `names` labels its functions.
    pub fn parse(data: &'a [u8], exports: ExportLists, names: &Names) -> Result<Self, String> {
        let pe = PeFile64::parse(data).map_err(|e| format!("not a PE32+ image: {e}"))?;
        let mut image = Image {
            data,
            pe,
            functions: Vec::new(),
            exports,
        };
        image.functions = image.read_functions(names)?;
        Ok(image)
    }

    /// The parsed PE.
    pub fn pe(&self) -> &PeFile64<'a> {
        &self.pe
    }

    /// The image's functions (primary `.pdata` entries), by address.
    pub fn functions(&self) -> &[Function] {
        &self.functions
    }

    /// Bytes at an RVA up to the end of its section.
    pub fn bytes_at(&self, rva: u32) -> Option<&'a [u8]> {
        self.pe.section_table().pe_data_at(self.data, rva)
    }

    /// The instructions of `f`, decoded in order.
    pub fn instructions(&self, f: &Function) -> Vec<Instruction> {
        let len = f.end.saturating_sub(f.begin) as usize;
        let Some(code) = self.bytes_at(f.begin).and_then(|b| b.get(..len)) else {
            return Vec::new();
        };
        let base = self.pe.relative_address_base();
        Decoder::with_ip(64, code, base + u64::from(f.begin), DecoderOptions::NONE)
            .into_iter()
            .collect()
    }

    /// The frame `f`'s prologue builds.
    pub fn frame(&self, f: &Function) -> Frame {
        // UNWIND_INFO byte 1: SizeOfProlog.
        let prolog_len = self
            .bytes_at(f.unwind)
            .and_then(|u| u.get(1))
            .map_or(0, |b| usize::from(*b));
        let base = self.pe.relative_address_base();
        let Some(code) = self.bytes_at(f.begin).and_then(|b| b.get(..prolog_len)) else {
            return Frame {
                bytes: 0,
                probed: false,
            };
        };
        let mut frame = Frame {
            bytes: 0,
            probed: false,
        };
        let mut probe_size: Option<u64> = None;
        let mut after_call = false;
        for ins in Decoder::with_ip(64, code, base + u64::from(f.begin), DecoderOptions::NONE) {
            match ins.mnemonic() {
                Mnemonic::Push => frame.bytes += 8,
                Mnemonic::Sub if ins.op0_register() == Register::RSP => {
                    if ins.op1_kind() == OpKind::Register && ins.op1_register() == Register::RAX {
                        // sub rsp, rax after the probe call: the size loaded into eax.
                        frame.bytes += probe_size.unwrap_or(0);
                        frame.probed |= after_call;
                    } else if is_immediate(ins.op1_kind()) {
                        frame.bytes += ins.immediate(1);
                    }
                }
                Mnemonic::Mov
                    if ins.code() == Code::Mov_r32_imm32 && ins.op0_register() == Register::EAX =>
                {
                    probe_size = Some(ins.immediate(1));
                }
                Mnemonic::Call => after_call = true,
                _ => {}
            }
        }
        frame
    }

    fn read_functions(&self, names: &Names) -> Result<Vec<Function>, String> {
        let dir = self
            .pe
            .data_directory(pe::IMAGE_DIRECTORY_ENTRY_EXCEPTION)
            .ok_or("no exception directory (.pdata): the image has no unwind information")?;
        let bytes = dir
            .data(self.data, &self.pe.section_table())
            .map_err(|e| format!("exception directory: {e}"))?;
        let entries: &[pe::ImageRuntimeFunctionEntry] =
            object::pod::slice_from_all_bytes(bytes).map_err(|()| "exception directory size")?;
        let exported: BTreeMap<u32, String> = self
            .exports()?
            .into_iter()
            .map(|(name, rva)| (rva, name))
            .collect();
        let mut out = Vec::new();
        for e in entries {
            let unwind = e.unwind_info_address_or_data.get(LE);
            // UNWIND_INFO byte 0: version (bits 0-2) and flags (bits 3-7); a chained entry
            // (UNW_FLAG_CHAININFO) continues a function whose prologue is elsewhere.
            let flags = self
                .bytes_at(unwind)
                .and_then(|u| u.first())
                .map_or(0, |b| b >> 3);
            if flags & UNW_FLAG_CHAININFO != 0 {
                continue;
            }
            let begin = e.begin_address.get(LE);
            let name = names
                .get(begin)
                .map(str::to_string)
                .or_else(|| exported.get(&begin).cloned());
            out.push(Function {
                begin,
                end: e.end_address.get(LE),
                unwind,
                name,
            });
        }
        Ok(out)
    }

    /// The named exports and their RVAs (forwarders left out: a driver has none).
    pub fn exports(&self) -> Result<Vec<(String, u32)>, String> {
        let Some(dir) = self.pe.data_directory(pe::IMAGE_DIRECTORY_ENTRY_EXPORT) else {
            return Ok(Vec::new());
        };
        // A copy: lld-link may place the export directory at an odd RVA inside .rdata, and
        // the reader wants its structures aligned as in memory.
        let data = dir
            .data(self.data, &self.pe.section_table())
            .map_err(|e| format!("export directory: {e}"))?
            .to_vec();
        let table = object::read::pe::ExportTable::parse(&data, dir.virtual_address.get(LE))
            .map_err(|e| format!("export directory: {e}"))?;
        let mut out = Vec::new();
        for e in table.exports().map_err(|e| format!("export table: {e}"))? {
            if let (Some(name), object::read::pe::ExportTarget::Address(rva)) = (e.name, e.target) {
                out.push((String::from_utf8_lossy(name).into_owned(), rva));
            }
        }
        Ok(out)
    }

    fn imports(&self) -> Vec<(String, Vec<String>)> {
        let mut by_module: Vec<(String, Vec<String>)> = Vec::new();
        for i in self.pe.imports().unwrap_or_default() {
            let module = String::from_utf8_lossy(i.library()).into_owned();
            let name = String::from_utf8_lossy(i.name()).into_owned();
            match by_module.iter_mut().find(|(m, _)| *m == module) {
                Some((_, names)) => names.push(name),
                None => by_module.push((module, vec![name])),
            }
        }
        by_module
    }
}

fn is_immediate(kind: OpKind) -> bool {
    matches!(
        kind,
        OpKind::Immediate8
            | OpKind::Immediate8to32
            | OpKind::Immediate8to64
            | OpKind::Immediate32
            | OpKind::Immediate32to64
    )
}

/// UNWIND_INFO flag: this entry chains to another function's unwind info.
const UNW_FLAG_CHAININFO: u8 = 4;

/// Checks an image: every rule, the import table, every frame.
pub fn check(data: &[u8], exports: ExportLists, names: &Names) -> Report {
    let image = match Image::parse(data, exports, names) {
        Ok(i) => i,
        Err(e) => {
            return Report {
                imports: Vec::new(),
                frames: Vec::new(),
                violations: vec![Violation {
                    rule: "PE32+ x86-64 native",
                    detail: e,
                }],
                file_size: data.len(),
            };
        }
    };
    let mut violations = Vec::new();
    for rule in RULES {
        rule(&image, &mut violations);
    }
    let mut frames: Vec<(Function, Frame)> = image
        .functions()
        .iter()
        .map(|f| (f.clone(), image.frame(f)))
        .collect();
    frames.sort_by(|a, b| b.1.bytes.cmp(&a.1.bytes).then(a.0.begin.cmp(&b.0.begin)));
    Report {
        imports: image.imports(),
        frames,
        violations,
        file_size: data.len(),
    }
}

fn rule_machine(image: &Image<'_>, v: &mut Vec<Violation>) {
    const RULE: &str = "PE32+ x86-64 native";
    let nt = image.pe.nt_headers();
    let machine = nt.file_header().machine.get(LE);
    if machine != pe::IMAGE_FILE_MACHINE_AMD64 {
        v.push(Violation {
            rule: RULE,
            detail: format!("machine {machine:#x}, not IMAGE_FILE_MACHINE_AMD64"),
        });
    }
    let subsystem = nt.optional_header().subsystem();
    if subsystem != pe::IMAGE_SUBSYSTEM_NATIVE {
        v.push(Violation {
            rule: RULE,
            detail: format!("subsystem {subsystem}, not IMAGE_SUBSYSTEM_NATIVE (1)"),
        });
    }
}

fn rule_entry(image: &Image<'_>, v: &mut Vec<Violation>) {
    const RULE: &str = "entry is DriverEntry";
    let entry = image
        .pe
        .nt_headers()
        .optional_header()
        .address_of_entry_point();
    let driver_entry = match image.exports() {
        Ok(e) => e
            .into_iter()
            .find(|(n, _)| n == "DriverEntry")
            .map(|(_, a)| a),
        Err(e) => {
            v.push(Violation {
                rule: RULE,
                detail: e,
            });
            return;
        }
    };
    match driver_entry {
        None => v.push(Violation {
            rule: RULE,
            detail: "no DriverEntry export".into(),
        }),
        Some(a) if a != entry => v.push(Violation {
            rule: RULE,
            detail: format!("entry point rva {entry:#x} is not DriverEntry (rva {a:#x})"),
        }),
        Some(_) => {}
    }
}

fn rule_imports(image: &Image<'_>, v: &mut Vec<Violation>) {
    const RULE: &str = "imports";
    for (module, names) in image.imports() {
        let lower = module.to_ascii_lowercase();
        if !ALLOWED_MODULES.contains(&lower.as_str()) {
            v.push(Violation {
                rule: RULE,
                detail: format!(
                    "{module} ({}) is not ntoskrnl.exe or hal.dll",
                    names.join(", ")
                ),
            });
            continue;
        }
        for name in names {
            if !image.exports.contains(&lower, &name) {
                v.push(Violation {
                    rule: RULE,
                    detail: format!("{module}!{name} is not in {module}'s export list"),
                });
            }
        }
    }
}

fn rule_dll_characteristics(image: &Image<'_>, v: &mut Vec<Violation>) {
    const RULE: &str = "DYNAMIC_BASE, NX_COMPAT, FORCE_INTEGRITY";
    let chars = image
        .pe
        .nt_headers()
        .optional_header()
        .dll_characteristics();
    for (bit, name) in [
        (pe::IMAGE_DLLCHARACTERISTICS_DYNAMIC_BASE, "DYNAMIC_BASE"),
        (pe::IMAGE_DLLCHARACTERISTICS_NX_COMPAT, "NX_COMPAT"),
        (
            pe::IMAGE_DLLCHARACTERISTICS_FORCE_INTEGRITY,
            "FORCE_INTEGRITY",
        ),
    ] {
        if chars & bit == 0 {
            v.push(Violation {
                rule: RULE,
                detail: format!("IMAGE_DLLCHARACTERISTICS_{name} not set ({chars:#06x})"),
            });
        }
    }
}

fn rule_sections(image: &Image<'_>, v: &mut Vec<Violation>) {
    const RULE: &str = "no W+X section";
    for s in image.pe.section_table().iter() {
        let c = s.characteristics.get(LE);
        if c & pe::IMAGE_SCN_MEM_WRITE != 0 && c & pe::IMAGE_SCN_MEM_EXECUTE != 0 {
            v.push(Violation {
                rule: RULE,
                detail: format!(
                    "section {} is writable and executable",
                    String::from_utf8_lossy(s.raw_name())
                ),
            });
        }
    }
}

fn rule_relocations(image: &Image<'_>, v: &mut Vec<Violation>) {
    const RULE: &str = "base relocations";
    let blocks = image
        .pe
        .data_directories()
        .relocation_blocks(image.data, &image.pe.section_table());
    let count = match blocks {
        Ok(Some(mut blocks)) => {
            let mut n = 0usize;
            while let Ok(Some(block)) = blocks.next() {
                n += block.count();
            }
            n
        }
        _ => 0,
    };
    if count == 0 {
        v.push(Violation {
            rule: RULE,
            detail: "no base relocations: the image could only load at its preferred base".into(),
        });
    }
}

fn rule_chkstk(image: &Image<'_>, v: &mut Vec<Violation>) {
    const RULE: &str = "no __chkstk";
    for (module, names) in image.imports() {
        if names.iter().any(|n| n == CHKSTK) {
            v.push(Violation {
                rule: RULE,
                detail: format!("{module}!{CHKSTK} is imported"),
            });
        }
    }
    for f in image.functions() {
        if image.frame(f).probed {
            v.push(Violation {
                rule: RULE,
                detail: format!("{} probes its stack (a frame over a page)", f.label()),
            });
        }
    }
}

fn rule_frames(image: &Image<'_>, v: &mut Vec<Violation>) {
    const RULE: &str = "frame <= 4 KiB";
    for f in image.functions() {
        let frame = image.frame(f);
        if frame.bytes > MAX_FRAME {
            v.push(Violation {
                rule: RULE,
                detail: format!("{} has a {}-byte frame", f.label(), frame.bytes),
            });
        }
    }
}

impl Report {
    /// Whether every rule held.
    pub fn passed(&self) -> bool {
        self.violations.is_empty()
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "image size: {} bytes", self.file_size)?;
        writeln!(f, "imports:")?;
        for (module, names) in &self.imports {
            writeln!(f, "  {module} ({}): {}", names.len(), names.join(" "))?;
        }
        writeln!(
            f,
            "largest frames ({} functions, limit {MAX_FRAME}):",
            self.frames.len()
        )?;
        for (func, frame) in self.frames.iter().take(10) {
            writeln!(f, "  {:>6}  {}", frame.bytes, func.label())?;
        }
        if self.violations.is_empty() {
            writeln!(f, "image check: passed")
        } else {
            for v in &self.violations {
                writeln!(f, "FAIL {v}")?;
            }
            writeln!(f, "image check: {} rule(s) broken", self.violations.len())
        }
    }
}
