//! ackvisor's test machine: a bare-metal x86-64 kernel that plays NT where NT's behaviour
//! decides correctness (DESIGN §7) and runs the portable core `ackvisor-vmm` under Bochs.
//!
//! Boot (`boot`) → per-CPU tables (`percpu`, `interrupts`) → LAPIC → optional APs (`smp`) →
//! the scenario named in the params sector (`params`, `scenarios`, `control` for `serve`) →
//! power off. Output goes to
//! port 0xE9 (`console`) as `RESULT` lines (`report`) that `tests/runner` judges.
//!
//! **Runs in:** bare metal, CPL 0 (and briefly CPL 3, `user`).
#![no_std]
#![no_main]

mod apic;
mod arch;
mod bench;
mod books;
mod boot;
mod console;
mod control;
mod debug_regs;
mod interrupts;
mod mem;
mod misdirected;
mod ntos;
mod params;
mod percpu;
mod platform;
mod pool;
mod report;
mod scenarios;
mod smp;
mod uart;
mod user;
mod watchdog;
mod workload;

use core::panic::PanicInfo;

#[panic_handler]
fn panic(info: &PanicInfo<'_>) -> ! {
    kprintln!("PANIC: {info}");
    report::fatal_result(format_args!("panic=1"))
}

/// The prebuilt `core` (panic=unwind) references this symbol; with panic=abort it is never
/// called.
#[unsafe(no_mangle)]
pub extern "C" fn rust_eh_personality() {}

/// BSP entry from boot.rs: boot stack, IF=0, SSE on, .bss zeroed.
#[unsafe(no_mangle)]
extern "C" fn kmain() -> ! {
    // SAFETY: first thing on the BSP, IF=0, nothing can interrupt before the IDT is loaded.
    unsafe { percpu::CPUS[0].init(0, interrupts::install_gates) };
    interrupts::mask_pic();
    apic::enable();
    let p = params::Params::read();
    let scenario: &'static str = match p.scenario() {
        "boot" => "boot",
        "modes" => "modes",
        "demo" => "demo",
        "vmcall" => "vmcall",
        "cycles" => "cycles",
        "rejected" => "rejected",
        "bench" => "bench",
        "serve" => "serve",
        "nt-load" => "nt-load",
        "nt-driver" => "nt-driver",
        "nt-serve" => "nt-serve",
        "nt-bench" => "nt-bench",
        "misdirected-eoi" => "misdirected-eoi",
        "debug-regs" => "debug-regs",
        _ => "unknown",
    };
    report::set_scenario(scenario);
    interrupts::HANDLER_BODY_TICKS.store(p.handler_body, core::sync::atomic::Ordering::Relaxed);
    kprintln!(
        "ackvisor test machine: scenario={} rounds={} clock_period={} stretch={} tsc={}",
        scenario,
        p.rounds,
        p.clock_period,
        p.stretch,
        arch::rdtsc()
    );
    if p.smp > 1 {
        let online = smp::start_aps(p.smp);
        kprintln!("smp: {online} of {} CPUs online", p.smp);
    }
    // SAFETY: the IDT, the per-CPU state and the LAPIC are ready for interrupts.
    unsafe { arch::sti() };
    if p.rejected != 0 {
        // A param the kernel does not know would otherwise run the scenario with a default and
        // let a test pass on something it never asked for.
        report::Line::new(scenario)
            .kv("fatal", 1)
            .kv("params_rejected", p.rejected)
            .kv("first_rejected", p.first_rejected())
            .print();
        report::Line::new(scenario).kv("end", 1).print();
        console::shutdown()
    }
    match scenario {
        "boot" => scenarios::boot(&p),
        "modes" => scenarios::modes(&p, false),
        "demo" => scenarios::modes(&p, true),
        "vmcall" => scenarios::vmcall(&p),
        "cycles" => scenarios::cycles(&p),
        "rejected" => scenarios::rejected(&p),
        "bench" => bench::run(&p),
        "serve" => control::serve_scenario(&p),
        "nt-load" => ntos::load_scenario(&p),
        "nt-driver" => ntos::driver::scenario(&p),
        "nt-serve" => ntos::serve::scenario(&p),
        "nt-bench" => ntos::bench::run(&p),
        "misdirected-eoi" => misdirected::scenario(&p),
        "debug-regs" => debug_regs::run(),
        _ => report::Line::new("unknown")
            .kv("fatal", 1)
            .kv("scenario", p.scenario())
            .print(),
    }
    report::Line::new(scenario)
        .kv("end", 1)
        .kv("tsc", arch::rdtsc())
        .print();
    console::shutdown()
}
