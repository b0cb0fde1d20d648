//! Proof that the exit stub's fast path touches no vector register, by disassembling the test
//! kernel's ELF (issue 11).
//!
//! The fast path (`exit::dispatch_fast`, exit reason 1) runs without FXSAVE, so nothing it
//! executes may read or write XMM/YMM/ZMM, AVX-512 mask, MMX or x87 registers, or MXCSR.
//! [`check`] follows the control flow from `vm_exit_entry`'s first instruction with iced-x86:
//! both ways of every conditional branch, every direct jump and call (into the callee, and on
//! after it), and stops at
//! - `ret`, `ud2`, `vmresume` (a failed VMRESUME stops the CPU: the guest's state is moot);
//! - the slow path (`exit_slow`, label `ackvisor_exit_slow`) and `fx_saved_raw` (the platform's
//!   IRQL functions): each runs FXSAVE before it calls anything;
//! - the one indirect call it accepts: `call rdi` in `replay_trampoline`, the OS handler, which
//!   NT's interrupt entry guards by saving the volatile XMM registers itself.
//!
//! Every instruction reached is checked: an operand or memory base/index that is such a
//! register, or an instruction of an SSE/AVX/x87/MMX/FXSR/XSAVE CPUID feature, is a finding.
//! Any other indirect jump or call (a jump table, a `dyn` call) is a finding too, because the
//! walk cannot see where it goes. The walk is of the code as built, so it covers what the
//! compiler made of the Rust (struct copies in XMM registers, inlined `memcpy`), not what the
//! source looks like.
//!
//! **Runs in:** the Linux host.

use std::collections::{BTreeMap, BTreeSet};

use iced_x86::{
    Decoder, DecoderOptions, FlowControl, Formatter, Instruction, IntelFormatter, Mnemonic, OpKind,
    Register,
};
use object::{Object, ObjectSection, ObjectSymbol, SymbolKind};

/// Where the walk starts.
pub const ENTRY: &str = "vm_exit_entry";
/// Symbols the walk does not enter (each saves the vector state first).
pub const SAVING_BOUNDARIES: [&str; 2] = ["ackvisor_exit_slow", "fx_saved_raw"];
/// Functions allowed one indirect call: the OS handler a replay calls.
pub const HANDLER_CALLERS: [&str; 1] = ["replay_trampoline"];

/// A problem found on the fast path.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Finding {
    /// Instruction address.
    pub address: u64,
    /// The function it belongs to.
    pub function: String,
    /// The instruction, Intel syntax.
    pub text: String,
    /// Why it is a problem.
    pub why: &'static str,
}

/// What [`check`] walked and found.
#[derive(Clone, Debug, Default)]
pub struct Report {
    /// Functions reached (demangled-ish names), with the number of instructions checked.
    pub functions: BTreeMap<String, usize>,
    /// Instructions checked.
    pub instructions: usize,
    /// Problems.
    pub findings: Vec<Finding>,
}

impl Report {
    /// Whether a function whose name contains `part` was reached.
    pub fn reached(&self, part: &str) -> bool {
        self.functions.keys().any(|f| f.contains(part))
    }
}

struct Symbols {
    /// start -> (end, name), text symbols only; a sized symbol wins over a label at its start.
    by_start: BTreeMap<u64, (u64, String)>,
    /// Every code symbol's name and address (labels sharing a function's address included).
    by_name: Vec<(String, u64)>,
}

impl Symbols {
    fn function_of(&self, addr: u64) -> String {
        // The innermost sized symbol containing `addr`, else the nearest label below it.
        self.by_start
            .range(..=addr)
            .rev()
            .find(|(start, (end, _))| addr < *end || *start == end)
            .or_else(|| self.by_start.range(..=addr).next_back())
            .map_or_else(|| format!("{addr:#x}"), |(_, (_, n))| short(n))
    }

    fn address_of(&self, part: &str) -> Option<u64> {
        self.by_name
            .iter()
            .find(|(n, _)| n.contains(part))
            .map(|(_, a)| *a)
    }
}

/// The readable part of a mangled Rust name (`_ZN12ackvisor_vmm4exit8dispatch17h…E`).
fn short(name: &str) -> String {
    let Some(rest) = name.strip_prefix("_ZN") else {
        return name.to_string();
    };
    let mut parts = Vec::new();
    let mut s = rest;
    while let Some(len_end) = s.find(|c: char| !c.is_ascii_digit()) {
        let Ok(len) = s[..len_end].parse::<usize>() else {
            break;
        };
        let start = len_end;
        let Some(part) = s.get(start..start + len) else {
            break;
        };
        if !(part.starts_with('h') && part.len() == 17) {
            parts.push(part.to_string());
        }
        s = &s[start + len..];
    }
    if parts.is_empty() {
        name.to_string()
    } else {
        parts.join("::")
    }
}

fn is_vector_or_x87(r: Register) -> bool {
    r.is_xmm() || r.is_ymm() || r.is_zmm() || r.is_k() || r.is_mm() || r.is_st()
}

/// CPUID features whose instructions use vector or x87 state.
fn uses_vector_feature(i: &Instruction) -> bool {
    i.cpuid_features().iter().any(|f| {
        let name = format!("{f:?}");
        [
            "SSE", "AVX", "FXSR", "XSAVE", "MMX", "FPU", "FMA", "F16C", "AES", "PCLMUL", "SHA",
            "GFNI", "VAES", "VPCLMUL", "AMX", "KNC", "3DNOW",
        ]
        .iter()
        .any(|p| name.starts_with(p))
    })
}

fn vector_use(i: &Instruction) -> bool {
    (0..i.op_count())
        .any(|k| i.op_kind(k) == OpKind::Register && is_vector_or_x87(i.op_register(k)))
        || is_vector_or_x87(i.memory_base())
        || is_vector_or_x87(i.memory_index())
        || uses_vector_feature(i)
}

/// Walks the fast exit path of the ELF in `elf` (see the module docs).
pub fn check(elf: &[u8]) -> Result<Report, String> {
    let file = object::File::parse(elf).map_err(|e| format!("not an ELF: {e}"))?;
    let mut by_start = BTreeMap::new();
    let mut by_name = Vec::new();
    for s in file.symbols() {
        // Labels from assembly (`ackvisor_exit_slow`) come as untyped symbols.
        let code = matches!(
            s.kind(),
            SymbolKind::Text | SymbolKind::Label | SymbolKind::Unknown
        );
        if code
            && s.address() != 0
            && let Ok(name) = s.name()
        {
            by_name.push((name.to_string(), s.address()));
            let end = s.address() + s.size();
            by_start
                .entry(s.address())
                .and_modify(|e: &mut (u64, String)| {
                    if s.size() > 0 && e.0 == s.address() {
                        *e = (end, name.to_string());
                    }
                })
                .or_insert((end, name.to_string()));
        }
    }
    let syms = Symbols { by_start, by_name };
    let text = file
        .sections()
        .filter(|s| s.kind() == object::SectionKind::Text)
        .map(|s| Ok((s.address(), s.data().map_err(|e| e.to_string())?)))
        .collect::<Result<Vec<(u64, &[u8])>, String>>()?;
    walk(&syms, &text)
}

/// Walks the fast exit path of a PE image (`ackvisor.sys`) the same way, with the functions
/// and labels named by `names`, RVA and name each (the image's PDB:
/// `ackvisor_image::check::Names`; names outside the code are ignored). The image has no
/// symbol table; the PDB's names give every function's start, not its end, so an address
/// belongs to the nearest name below it.
pub fn check_pe(image: &[u8], names: &[(u32, String)]) -> Result<Report, String> {
    let file = object::File::parse(image).map_err(|e| format!("not a PE image: {e}"))?;
    let base = file.relative_address_base();
    let text = file
        .sections()
        .filter(|s| s.kind() == object::SectionKind::Text)
        .map(|s| Ok((s.address(), s.data().map_err(|e| e.to_string())?)))
        .collect::<Result<Vec<(u64, &[u8])>, String>>()?;
    let in_code = |a: u64| {
        text.iter()
            .any(|(at, d)| a >= *at && a < at + d.len() as u64)
    };
    let mut by_start = BTreeMap::new();
    let mut by_name = Vec::new();
    for (rva, name) in names {
        let address = base + u64::from(*rva);
        if in_code(address) {
            by_name.push((name.clone(), address));
            by_start.insert(address, (address, name.clone()));
        }
    }
    let syms = Symbols { by_start, by_name };
    walk(&syms, &text)
}

/// The walk itself, over `text` (address and bytes of each code section).
fn walk(syms: &Symbols, text: &[(u64, &[u8])]) -> Result<Report, String> {
    let entry = syms
        .address_of(ENTRY)
        .ok_or_else(|| format!("no symbol {ENTRY} in the image"))?;
    let boundaries: BTreeSet<u64> = SAVING_BOUNDARIES
        .iter()
        .map(|b| {
            syms.address_of(b)
                .ok_or_else(|| format!("no symbol {b} in the image"))
        })
        .collect::<Result<_, _>>()?;
    let bytes_at = |addr: u64| {
        text.iter()
            .find(|(a, d)| addr >= *a && addr < a + d.len() as u64)
            .map(|(a, d)| (&d[(addr - a) as usize..], addr))
    };

    let mut report = Report::default();
    let mut seen = BTreeSet::new();
    let mut work = vec![entry];
    let mut formatter = IntelFormatter::new();
    let mut finding = |report: &mut Report, i: &Instruction, why: &'static str| {
        let mut text = String::new();
        formatter.format(i, &mut text);
        report.findings.push(Finding {
            address: i.ip(),
            function: syms.function_of(i.ip()),
            text,
            why,
        });
    };
    while let Some(start) = work.pop() {
        if boundaries.contains(&start) || !seen.insert(start) {
            continue;
        }
        let Some((bytes, ip)) = bytes_at(start) else {
            return Err(format!("{start:#x} is outside the code"));
        };
        let mut decoder = Decoder::with_ip(64, bytes, ip, DecoderOptions::NONE);
        let mut i = Instruction::default();
        while decoder.can_decode() {
            decoder.decode_out(&mut i);
            if i.ip() != start && (boundaries.contains(&i.ip()) || !seen.insert(i.ip())) {
                break; // another walk covers the rest
            }
            let function = syms.function_of(i.ip());
            *report.functions.entry(function.clone()).or_default() += 1;
            report.instructions += 1;
            if i.is_invalid() {
                finding(&mut report, &i, "undecodable");
                break;
            }
            if vector_use(&i) {
                finding(&mut report, &i, "vector or x87 register");
            }
            if i.mnemonic() == Mnemonic::Vmresume {
                break;
            }
            match i.flow_control() {
                FlowControl::Next | FlowControl::Interrupt => {}
                FlowControl::ConditionalBranch => work.push(i.near_branch_target()),
                FlowControl::UnconditionalBranch => {
                    work.push(i.near_branch_target());
                    break;
                }
                FlowControl::Call => work.push(i.near_branch_target()),
                FlowControl::IndirectCall
                    if HANDLER_CALLERS.iter().any(|h| function.contains(h)) => {}
                FlowControl::IndirectCall | FlowControl::IndirectBranch => {
                    finding(&mut report, &i, "indirect branch the walk cannot follow");
                    break;
                }
                FlowControl::Return | FlowControl::Exception => break,
                FlowControl::XbeginXabortXend => {
                    finding(&mut report, &i, "transactional instruction");
                    break;
                }
            }
        }
    }
    Ok(report)
}
