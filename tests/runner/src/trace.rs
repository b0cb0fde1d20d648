//! Reads Bochs's instruction trace (debugger `trace on`) and counts what root mode executed
//! per VM exit: every instruction from the exit stub's first one to VMRESUME, leaving out only
//! the OS handler's own instructions (from a gate's first instruction to its IRETQ), and among
//! them the VMCS accesses and the costly instructions, by their disassembled mnemonic.
//!
//! Bochs prints one line per executed instruction:
//! `(1).[10319541] [0x000000014c72] 0010:0000000000014c72 (unk. ctxt): lea rax, ... ; 488d84..`
//! (CPU, tick, physical address, selector:linear RIP, disassembly, bytes). Nothing in the
//! measured code changes for this: the kernel's benchmark only brackets a phase with two magic
//! breakpoints, and the runner's debugger script turns the trace on and off there
//! ([`crate::RunSpec::traced`]).
//!
//! The same reader counts the real ackvisor.sys's exit path (scenario `nt-bench`): its windows
//! open at the image's own exit stub, whose address the runner takes from the image's PDB
//! ([`crate::driver::exit_stub_rva`]) and the load base the scenario prints, and the routines
//! it calls through its import table can be watched ([`Counter::watch`]).
//!
//! **Runs in:** the Linux host.

use std::collections::BTreeMap;

use crate::ResultLine;

/// Mnemonics that touch the VMCS.
pub const VMCS_ACCESS: [&str; 2] = ["vmread", "vmwrite"];
/// Mnemonics that cost far more than their instruction count on real hardware (issue 11's
/// list, plus the XSAVE family should it ever appear).
pub const HEAVY: [&str; 9] = [
    "fxsave", "fxrstor", "rdtsc", "rdtscp", "rdmsr", "wrmsr", "xsave", "xrstor", "xsaveopt",
];

/// The addresses the kernel's `RESULT bench map=1` line gives.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TraceMap {
    /// HOST_RIP: the exit stub's first instruction.
    pub stub: u64,
    /// First device/per-CPU gate stub.
    pub gates_lo: u64,
    /// End of the gate stubs.
    pub gates_hi: u64,
    /// Distance between gate stubs (every gate target is `gates_lo + k * stride`).
    pub stride: u64,
}

impl TraceMap {
    /// From the `map=1` line.
    pub fn from_line(l: &ResultLine) -> Option<TraceMap> {
        Some(TraceMap {
            stub: l.num("stub")?,
            gates_lo: l.num("gates_lo")?,
            gates_hi: l.num("gates_hi")?,
            stride: l.num("gate_stride").filter(|&s| s != 0)?,
        })
    }

    fn is_gate(&self, rip: u64) -> bool {
        (self.gates_lo..self.gates_hi).contains(&rip)
            && (rip - self.gates_lo).is_multiple_of(self.stride)
    }
}

/// One traced instruction.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Instr<'a> {
    /// Bochs CPU number.
    pub cpu: usize,
    /// Linear RIP.
    pub rip: u64,
    /// The disassembly (Intel syntax), without the bytes.
    pub text: &'a str,
}

impl Instr<'_> {
    /// The mnemonic, with a REP/LOCK prefix skipped.
    pub fn mnemonic(&self) -> &str {
        let mut words = self.text.split_whitespace();
        let first = words.next().unwrap_or("");
        match first {
            "rep" | "repe" | "repz" | "repne" | "repnz" | "lock" => words.next().unwrap_or(first),
            _ => first,
        }
    }

    /// Whether an operand names an XMM/YMM/ZMM or mask register.
    pub fn uses_vector_register(&self) -> bool {
        self.text
            .split(|c: char| !c.is_ascii_alphanumeric())
            .any(is_vector_register)
    }
}

/// `xmm0`..`xmm31`, `ymm*`, `zmm*`, `k0`..`k7` (AVX-512 masks) or `mxcsr`.
pub fn is_vector_register(word: &str) -> bool {
    let numbered = |prefix: &str, max: u32| {
        word.strip_prefix(prefix)
            .and_then(|n| n.parse::<u32>().ok())
            .is_some_and(|n| n <= max)
    };
    numbered("xmm", 31) || numbered("ymm", 31) || numbered("zmm", 31) || word == "mxcsr"
}

/// Parses one trace line; anything else (console text, debugger chatter) is `None`.
pub fn parse_line(line: &str) -> Option<Instr<'_>> {
    let rest = line.strip_prefix('(')?;
    let (cpu, rest) = rest.split_once(").[")?;
    let cpu = cpu.parse().ok()?;
    let (_tick, rest) = rest.split_once("] [0x")?;
    let (_phys, rest) = rest.split_once("] ")?;
    let (_selector, rest) = rest.split_once(':')?;
    let (linear, rest) = rest.split_once(' ')?;
    let rip = u64::from_str_radix(linear, 16).ok()?;
    let (_ctxt, rest) = rest.split_once("): ")?;
    let text = rest.rsplit_once(" ; ").map_or(rest, |(t, _bytes)| t).trim();
    Some(Instr { cpu, rip, text })
}

/// What root mode executed over a phase, summed over CPUs.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RootCount {
    /// Exit-to-VMRESUME windows closed.
    pub exits: u64,
    /// Instructions counted (handler excluded, VMRESUME included).
    pub instructions: u64,
    /// Instructions left out as the OS handler's (gate entry to its IRETQ, both included).
    pub handler_instructions: u64,
    /// OS handler runs (outermost gate entries), in root or in the guest.
    pub handler_runs: u64,
    /// Instructions of those runs, wherever they ran (gate entry to IRETQ, nested ones
    /// included): the handler's own cost, which `guest_overhead` contains and `e2e` does not.
    pub handler_total: u64,
    /// Counted instructions by mnemonic.
    pub by_mnemonic: BTreeMap<String, u64>,
    /// Counted instructions that name a vector register (XMM/YMM/ZMM/MXCSR).
    pub vector_register_uses: u64,
    /// A first example of such an instruction, with its address.
    pub first_vector_use: Option<String>,
    /// Of those, the ones outside an FXSAVE..FXRSTOR bracket: each changes or reads a register
    /// of the guest's vector state that root has not saved (the exit stub's fast path saves
    /// none, DESIGN §5).
    pub unsaved_vector_uses: u64,
    /// A first example of such an instruction, with its address.
    pub first_unsaved_vector_use: Option<String>,
    /// Traces that did not fit the model: an exit stub entered inside a window, an IRETQ
    /// outside a handler, or a window still open at the end of the phase.
    pub irregular: u64,
    /// Per watched routine ([`Counter::watch`]): calls (its first instruction executed inside
    /// a window) and its instructions there, which are part of [`RootCount::instructions`].
    pub watched: BTreeMap<String, Watched>,
}

/// What a watched routine cost inside the windows of a phase.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Watched {
    /// Times its first instruction ran.
    pub calls: u64,
    /// Instructions inside it.
    pub instructions: u64,
}

/// A routine whose calls and instructions a [`Counter`] tallies apart.
#[derive(Clone, Debug)]
struct Watch {
    name: String,
    start: u64,
    end: u64,
}

impl RootCount {
    /// Counted instructions with one of these mnemonics.
    pub fn of(&self, mnemonics: &[&str]) -> u64 {
        mnemonics
            .iter()
            .map(|m| self.by_mnemonic.get(*m).copied().unwrap_or(0))
            .sum()
    }

    /// Mean per exit.
    pub fn per_exit(&self, n: u64) -> f64 {
        if self.exits == 0 {
            0.0
        } else {
            n as f64 / self.exits as f64
        }
    }
}

#[derive(Clone, Copy, Debug, Default)]
struct CpuState {
    in_window: bool,
    /// Nesting depth of OS handlers inside the window.
    depth: u32,
    /// The CPU delivered an interrupt: its next instruction is a gate's first.
    delivered: bool,
    /// Handler depth of the guest when the window opened (a VM exit inside a guest handler).
    guest_depth: u32,
    /// FXSAVEs not yet matched by an FXRSTOR in the window: the vector state is saved.
    fx_saved: u32,
}

/// Bochs's debugger line for an event delivered through the IDT: `CPU 1: Interrupt 0xd1
/// occurred (error_code=0x0000)`. Bochs prints the first traced line after it with the
/// interrupted instruction's text and address (the tick is right), so the gate entry is
/// recognized by this line, not by the address. A VM exit prints no such line.
pub fn parse_delivery(line: &str) -> Option<usize> {
    let rest = line.strip_prefix("CPU ")?;
    let (cpu, rest) = rest.split_once(": ")?;
    rest.starts_with("Interrupt 0x").then_some(())?;
    cpu.parse().ok()
}

/// Counts root-mode instructions phase by phase. A phase ends at each `RESULT bench mode=M`
/// line (the kernel prints it after the traced ticks of mode M).
pub struct Counter {
    map: TraceMap,
    cpus: Vec<CpuState>,
    current: RootCount,
    watches: Vec<Watch>,
}

impl Counter {
    /// A counter for the addresses in `map`.
    pub fn new(map: TraceMap) -> Counter {
        Counter {
            map,
            cpus: Vec::new(),
            current: RootCount::default(),
            watches: Vec::new(),
        }
    }

    /// Tallies the routine at `start..start + len` apart (its instructions still count as
    /// root's): e.g. the NT routines the image calls on its exit path.
    pub fn watch(&mut self, name: &str, start: u64, len: u64) {
        self.watches.push(Watch {
            name: name.to_string(),
            start,
            end: start + len,
        });
    }

    fn cpu(&mut self, cpu: usize) -> Option<&mut CpuState> {
        if self.cpus.len() <= cpu {
            self.cpus.resize(cpu + 1, CpuState::default());
        }
        self.cpus.get_mut(cpu)
    }

    /// Feeds an interrupt delivery through the IDT ([`parse_delivery`]).
    pub fn delivered(&mut self, cpu: usize) {
        if let Some(s) = self.cpu(cpu) {
            s.delivered = true;
        }
    }

    /// Feeds one traced instruction.
    pub fn feed(&mut self, i: &Instr<'_>) {
        self.cpu(i.cpu);
        let (map, c) = (self.map, &mut self.current);
        let Some(s) = self.cpus.get_mut(i.cpu) else {
            return;
        };
        if i.rip == map.stub {
            if s.in_window {
                c.irregular += 1;
            }
            *s = CpuState {
                in_window: true,
                guest_depth: if s.in_window { 0 } else { s.depth },
                ..CpuState::default()
            };
        }
        let mnemonic = i.mnemonic();
        let iret = mnemonic == "iret" || mnemonic == "iretq";
        // Outside a window only deliveries announce a handler (the guest's code may sit at
        // any address); inside, a CALL to a gate target does too (replay).
        if s.delivered || (s.in_window && map.is_gate(i.rip)) {
            if s.depth == 0 {
                c.handler_runs += 1;
            }
            s.depth += 1;
            s.delivered = false;
        }
        if s.depth > 0 {
            c.handler_total += 1;
            if s.in_window {
                c.handler_instructions += 1;
            }
            if iret {
                s.depth -= 1;
            }
            return;
        }
        if !s.in_window {
            return;
        }
        if iret {
            c.irregular += 1;
        }
        c.instructions += 1;
        *c.by_mnemonic.entry(mnemonic.to_string()).or_insert(0) += 1;
        if let Some(w) = self
            .watches
            .iter()
            .find(|w| (w.start..w.end).contains(&i.rip))
        {
            let t = c.watched.entry(w.name.clone()).or_default();
            t.instructions += 1;
            t.calls += u64::from(i.rip == w.start);
        }
        match mnemonic {
            "fxsave" | "fxsave64" => s.fx_saved += 1,
            "fxrstor" | "fxrstor64" => s.fx_saved = s.fx_saved.saturating_sub(1),
            _ => {}
        }
        if i.uses_vector_register() {
            c.vector_register_uses += 1;
            c.first_vector_use
                .get_or_insert_with(|| format!("{:#x}: {}", i.rip, i.text));
            if s.fx_saved == 0 {
                c.unsaved_vector_uses += 1;
                c.first_unsaved_vector_use
                    .get_or_insert_with(|| format!("{:#x}: {}", i.rip, i.text));
            }
        }
        if mnemonic == "vmresume" {
            s.in_window = false;
            s.depth = s.guest_depth;
            c.exits += 1;
        }
    }

    /// Ends the current phase and returns its count.
    pub fn finish_phase(&mut self) -> RootCount {
        for s in &mut self.cpus {
            if s.in_window {
                self.current.irregular += 1;
            }
            // A guest handler may straddle the phase's end: the next phase starts clean.
            *s = CpuState::default();
        }
        std::mem::take(&mut self.current)
    }
}

/// Root counts per mode from a bench run's console: `mode -> count`. `None` without a map line.
pub fn root_counts_by_mode(console: &str) -> Option<BTreeMap<String, RootCount>> {
    root_counts_by_mode_in(console, "bench", |l| {
        TraceMap::from_line(l).map(Counter::new)
    })
}

/// [`root_counts_by_mode`] for `scenario`'s lines, with the counter made from its `map=1` line
/// by `counter_of` (which knows where that scenario's exit stub is).
pub fn root_counts_by_mode_in(
    console: &str,
    scenario: &str,
    counter_of: impl Fn(&ResultLine) -> Option<Counter>,
) -> Option<BTreeMap<String, RootCount>> {
    let mut counter: Option<Counter> = None;
    let mut out = BTreeMap::new();
    for line in console.lines() {
        if let Some(i) = parse_line(line) {
            if let Some(c) = counter.as_mut() {
                c.feed(&i);
            }
            continue;
        }
        if let Some(cpu) = parse_delivery(line) {
            if let Some(c) = counter.as_mut() {
                c.delivered(cpu);
            }
            continue;
        }
        let Some(r) = ResultLine::parse(line) else {
            continue;
        };
        if r.scenario != scenario {
            continue;
        }
        if r.get("map").is_some() {
            counter = counter_of(&r);
        } else if let (Some(mode), Some(c)) = (r.get("mode"), counter.as_mut()) {
            out.insert(mode.to_string(), c.finish_phase());
        }
    }
    counter.map(|_| out)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAP: TraceMap = TraceMap {
        stub: 0x1000,
        gates_lo: 0x8000,
        gates_hi: 0x9000,
        stride: 16,
    };

    fn line(cpu: usize, rip: u64, text: &str) -> String {
        format!("({cpu}).[42] [0x{rip:012x}] 0010:{rip:016x} (unk. ctxt): {text} ; 90")
    }

    #[test]
    fn parses_a_bochs_trace_line() {
        let l = "(1).[10319541] [0x000000014c72] 0010:0000000000014c72 (unk. ctxt): fxsave ss:[rsp]           ; 480fae0424";
        let i = parse_line(l).unwrap();
        assert_eq!((i.cpu, i.rip, i.text), (1, 0x14c72, "fxsave ss:[rsp]"));
        assert_eq!(i.mnemonic(), "fxsave");
        assert!(parse_line("RESULT bench mode=x").is_none());
        assert!(parse_line("(0) Magic breakpoint").is_none());
    }

    #[test]
    fn vector_registers_are_recognized_and_others_not() {
        let i = |t| Instr {
            cpu: 0,
            rip: 0,
            text: t,
        };
        assert!(i("movups xmmword ptr ds:[rbx], xmm0").uses_vector_register());
        assert!(i("vpxor ymm3, ymm3, ymm3").uses_vector_register());
        assert!(!i("mov rax, qword ptr ds:[rbx]").uses_vector_register());
        assert!(!i("movups xmmword ptr ds:[rbx], rax").uses_vector_register());
    }

    /// An exit with a replayed handler (nested once) in the middle: only root's own count.
    #[test]
    fn counts_stub_to_vmresume_without_the_handler() {
        let trace = [
            line(0, 0x500, "mov rax, rbx"), // guest: not counted
            line(0, 0x1000, "sub rsp, 16"), // stub
            line(0, 0x1004, "vmread rax, rdx"),
            line(0, 0x1008, "fxsave ss:[rsp]"),
            line(0, 0x1010, "call rdi"),
            line(0, 0x8020, "push 0x22"), // gate: handler begins
            line(0, 0x8104, "mov rax, rbx"),
            line(0, 0x8040, "push 0x24"), // nested gate
            line(0, 0x8104, "iret"),      // nested IRETQ
            line(0, 0x8104, "iret"),      // the handler's IRETQ
            line(0, 0x1020, "vmwrite rcx, rax"),
            line(0, 0x1024, "rdtsc"),
            line(0, 0x1028, "vmresume"),
            line(0, 0x500, "mov rax, rbx"), // guest again
        ];
        let mut c = Counter::new(MAP);
        for l in &trace {
            c.feed(&parse_line(l).unwrap());
        }
        let r = c.finish_phase();
        assert_eq!(r.exits, 1);
        assert_eq!(r.instructions, 7);
        assert_eq!(r.handler_instructions, 5);
        assert_eq!((r.handler_runs, r.handler_total), (1, 5));
        assert_eq!(r.of(&VMCS_ACCESS), 2);
        assert_eq!(r.of(&HEAVY), 2);
        assert_eq!(r.irregular, 0);
    }

    /// exit-sti: the CPU delivers in root; Bochs announces it and misprints the gate's first
    /// instruction as the interrupted one.
    #[test]
    fn a_delivery_in_root_starts_the_handler() {
        let mut c = Counter::new(MAP);
        let feed = |c: &mut Counter, l: String| c.feed(&parse_line(&l).unwrap());
        feed(&mut c, line(0, 0x1000, "sub rsp, 16"));
        feed(&mut c, line(0, 0x1010, "sti"));
        feed(&mut c, line(0, 0x1011, "nop"));
        c.delivered(parse_delivery("CPU 0: Interrupt 0xd1 occurred (error_code=0x0000)").unwrap());
        feed(&mut c, line(0, 0x1012, "cli")); // really the gate's `push 0xd1`
        feed(&mut c, line(0, 0x8025, "jmp .+834"));
        feed(&mut c, line(0, 0x8104, "iret"));
        feed(&mut c, line(0, 0x1012, "cli"));
        feed(&mut c, line(0, 0x1020, "vmresume"));
        let r = c.finish_phase();
        assert_eq!((r.exits, r.instructions, r.handler_instructions), (1, 5, 3));
        assert_eq!(r.irregular, 0);
        assert_eq!(parse_delivery("CPU 0: HALTED"), None);
    }

    /// Passthrough: the guest's own handler is counted as a handler run, never as root's.
    #[test]
    fn a_guest_delivery_counts_only_as_handler() {
        let mut c = Counter::new(MAP);
        let feed = |c: &mut Counter, l: String| c.feed(&parse_line(&l).unwrap());
        feed(&mut c, line(0, 0x500, "pause"));
        c.delivered(0);
        feed(&mut c, line(0, 0x501, "jmp .-2")); // really the gate's `push 0xd1`
        feed(&mut c, line(0, 0x8025, "jmp .+834"));
        feed(&mut c, line(0, 0x8104, "iret"));
        feed(&mut c, line(0, 0x501, "jmp .-2"));
        let r = c.finish_phase();
        assert_eq!((r.exits, r.instructions, r.handler_instructions), (0, 0, 0));
        assert_eq!((r.handler_runs, r.handler_total), (1, 3));
    }

    /// A watched routine: its calls and instructions inside windows, and still root's count;
    /// the same addresses outside a window (the guest's own calls) are not tallied.
    #[test]
    fn watched_routines_are_tallied_apart_inside_windows_only() {
        let mut c = Counter::new(MAP);
        c.watch("KfRaiseIrql", 0x3000, 0x10);
        let feed = |c: &mut Counter, l: String| c.feed(&parse_line(&l).unwrap());
        feed(&mut c, line(0, 0x3000, "mov rax, cr8")); // the guest calls it: not tallied
        feed(&mut c, line(0, 0x1000, "sub rsp, 16"));
        feed(&mut c, line(0, 0x1004, "call qword ptr ds:[rip+8]"));
        feed(&mut c, line(0, 0x3000, "mov rax, cr8"));
        feed(&mut c, line(0, 0x3004, "mov cr8, rcx"));
        feed(&mut c, line(0, 0x3008, "ret"));
        feed(&mut c, line(0, 0x1010, "vmresume"));
        let r = c.finish_phase();
        assert_eq!(r.instructions, 6);
        assert_eq!(
            r.watched.get("KfRaiseIrql"),
            Some(&Watched {
                calls: 1,
                instructions: 3
            })
        );
    }

    /// Vector registers inside FXSAVE..FXRSTOR are saved; outside they are the guest's.
    #[test]
    fn vector_uses_outside_an_fxsave_bracket_are_unsaved() {
        let mut c = Counter::new(MAP);
        let feed = |c: &mut Counter, l: String| c.feed(&parse_line(&l).unwrap());
        feed(&mut c, line(0, 0x1000, "sub rsp, 16"));
        feed(&mut c, line(0, 0x1004, "pxor xmm0, xmm0"));
        feed(&mut c, line(0, 0x1008, "fxsave ss:[rsp]"));
        feed(&mut c, line(0, 0x100c, "movdqu xmm1, xmmword ptr ds:[rdi]"));
        feed(&mut c, line(0, 0x1010, "fxrstor ss:[rsp]"));
        feed(&mut c, line(0, 0x1014, "vmresume"));
        let r = c.finish_phase();
        assert_eq!((r.vector_register_uses, r.unsaved_vector_uses), (2, 1));
        assert_eq!(
            r.first_unsaved_vector_use.as_deref(),
            Some("0x1004: pxor xmm0, xmm0")
        );
    }

    #[test]
    fn an_unclosed_window_is_irregular() {
        let mut c = Counter::new(MAP);
        c.feed(&parse_line(&line(1, 0x1000, "sub rsp, 16")).unwrap());
        let r = c.finish_phase();
        assert_eq!((r.exits, r.irregular), (0, 1));
    }
}
