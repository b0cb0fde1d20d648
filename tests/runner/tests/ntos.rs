//! The miniature NT loading the real ackvisor.sys (issue 9): the good image on both CPU models,
//! and each broken copy the runner makes (`ackvisor_runner::driver`) refused with a `fatal=1`
//! line naming the fault, the machine still reaching its end line.
//!
//! Expected figures are read from the same file on the host with `object`, independently of the
//! kernel's loader.

use ackvisor_runner::driver::Profile;
use ackvisor_runner::{MODELS, RunOutput, RunSpec, Verdict, driver, run_shared};
use object::LittleEndian as LE;
use object::pe::IMAGE_REL_BASED_DIR64;
use object::read::pe::{ImageNtHeaders, ImageOptionalHeader, Import, PeFile64};

const SCENARIO: &str = "nt-load";

fn machine(spec: RunSpec) -> std::sync::Arc<RunOutput> {
    match run_shared(&spec) {
        Ok(run) => run,
        Err(e) => panic!("model {}: {} could not run: {e}", spec.model, spec.name()),
    }
}

/// What the host reads from the image: sections, DIR64 relocations, imports, SizeOfImage,
/// entry RVA.
struct Expected {
    sections: u64,
    relocations: u64,
    imports: u64,
    /// FNV-1a over the import names in thunk order (the kernel's `bound_names_hash`).
    names_hash: u64,
    size: u64,
    entry_rva: u64,
}

const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
const FNV_PRIME: u64 = 0x0100_0000_01b3;

fn fnv1a(mut hash: u64, bytes: &[u8]) -> u64 {
    for &b in bytes {
        hash = (hash ^ u64::from(b)).wrapping_mul(FNV_PRIME);
    }
    hash
}

fn expected(bytes: &[u8]) -> Expected {
    let pe = PeFile64::parse(bytes).expect("the host parses ackvisor.sys");
    let sections = pe.section_table();
    let mut relocations = 0;
    let mut blocks = pe
        .data_directories()
        .relocation_blocks(bytes, &sections)
        .expect("relocations")
        .expect("ackvisor.sys has relocations");
    while let Some(block) = blocks.next().expect("relocation block") {
        relocations += block.filter(|r| r.typ == IMAGE_REL_BASED_DIR64).count() as u64;
    }
    let table = pe
        .data_directories()
        .import_table(bytes, &sections)
        .expect("imports")
        .expect("ackvisor.sys has imports");
    let (mut imports, mut names_hash) = (0, FNV_OFFSET);
    let mut descriptors = table.descriptors().expect("descriptors");
    while let Some(d) = descriptors.next().expect("descriptor") {
        let mut thunks = table
            .thunks(d.original_first_thunk.get(LE))
            .expect("thunks");
        while let Some(thunk) = thunks
            .next::<object::pe::ImageNtHeaders64>()
            .expect("thunk")
        {
            imports += 1;
            match table.import::<object::pe::ImageNtHeaders64>(thunk) {
                Ok(Import::Name(_, name)) => names_hash = fnv1a(fnv1a(names_hash, name), &[0]),
                _ => panic!("ackvisor.sys imports only by name"),
            }
        }
    }
    let optional = pe.nt_headers().optional_header();
    Expected {
        sections: sections.len() as u64,
        relocations,
        imports,
        names_hash,
        size: u64::from(optional.size_of_image()),
        entry_rva: u64::from(optional.address_of_entry_point()),
    }
}

fn loads_the_real_image(model: &str, profile: Profile) {
    let bytes = driver::image_bytes_of(profile, "good").expect("ackvisor.sys builds");
    let want = expected(&bytes);
    let run = machine(driver::with_profile(RunSpec::new(model, SCENARIO), profile));
    let mut v = Verdict::new(&run);
    if let Some(l) = v.line(SCENARIO, None) {
        v.eq(l, "loaded", 1)
            .eq(l, "file_bytes", bytes.len() as u64)
            .eq(l, "size", want.size)
            .eq(l, "entry_rva", want.entry_rva)
            .eq(l, "sections", want.sections)
            .eq(l, "imports", want.imports)
            .eq(l, "bound", want.imports)
            .eq(l, "bound_names_hash", want.names_hash)
            .eq(l, "relocations", want.relocations)
            .gt(l, "relocations", 0)
            .eq_field(l, "relocations_inside", "relocations")
            .eq(l, "exports", 41)
            .eq(l, "irql_violations", 0);
    }
    v.finish();
}

/// A broken image: one `fatal=1` line with `field=value`, and the machine still ends.
fn refuses(model: &str, variant: &str, field: &str, value: &str) {
    let run = machine(RunSpec::new(model, SCENARIO).param("image", variant));
    let fatal: Vec<_> = run
        .lines(SCENARIO, None)
        .filter(|l| l.get("fatal").is_some())
        .collect();
    let ended = run.lines(SCENARIO, None).any(|l| l.num("end") == Some(1));
    let named = fatal
        .iter()
        .any(|l| l.get(field) == Some(value) && l.num("loaded") == Some(0));
    assert!(
        fatal.len() == 1 && named && ended && !run.console.contains("PANIC"),
        "model {model}: image={variant}: expected one fatal line with {field}={value} and an end \
         line; got {} fatal line(s), end={ended}\nconsole tail:\n{}",
        fatal.len(),
        run.tail(15)
    );
}

fn refuses_each_broken_image(model: &str) {
    refuses(model, "unknown-import", "unknown_import", "KeBugCheckXx");
    let bytes = driver::image_bytes("good").expect("ackvisor.sys builds");
    let (_, rva) = driver::first_relocation(&bytes).expect("a relocation");
    refuses(model, "bad-reloc", "bad_relocation", &format!("{rva:#x}"));
    refuses(
        model,
        "bad-reloc",
        "reloc_type",
        &driver::BAD_RELOC_TYPE.to_string(),
    );
    let half = (bytes.len() / 2).to_string();
    refuses(model, "truncated", "file_bytes", &half);
}

#[test]
fn nt_load_haswell() {
    loads_the_real_image(MODELS[0], Profile::Debug);
}

#[test]
fn nt_load_skylake() {
    loads_the_real_image(MODELS[1], Profile::Debug);
}

#[test]
fn nt_load_refusals_haswell() {
    refuses_each_broken_image(MODELS[0]);
}

/// The `nt-driver` line that has `key`, or a failure.
fn line_with<'a>(
    v: &mut Verdict<'_>,
    run: &'a RunOutput,
    key: &str,
) -> Option<&'a ackvisor_runner::ResultLine> {
    let l = run
        .lines("nt-driver", None)
        .find(|l| l.get(key).is_some() && l.get("fatal").is_none());
    if l.is_none() {
        v.fail(format!("no RESULT nt-driver line with {key}"));
    }
    l
}

/// DriverEntry, requests as IRPs, a sleep through the power callback, DriverUnload, on `cpus`
/// CPUs (4 are two processor groups): the image virtualizes every CPU (CPUID costs an exit on
/// each, probed by the machine on each CPU), each mode set by IOCTL keeps the machine's books on
/// every CPU and agrees with the image's per-CPU statistics, the sleep devirtualizes every CPU
/// while the interrupts are still counted natively, the log-drain worker runs on its own before
/// unload, seven malformed requests each get their precise NTSTATUS and Information, and the
/// verifier's books are clean at the end. The image is the debug or the release build
/// (`profile`).
fn drives_the_real_image(model: &str, cpus: u64, profile: Profile) {
    let run = machine(driver::with_profile(
        RunSpec::new(model, "nt-driver").cpus(cpus as u32),
        profile,
    ));
    let mut v = Verdict::new(&run);
    if let Some(l) = line_with(&mut v, &run, "entry_status") {
        v.eq(l, "loaded", 1)
            .eq(l, "cpus", cpus)
            .eq(l, "entry_status", 0)
            .eq(l, "devices", 1)
            .eq(l, "links", 1)
            .eq(l, "callbacks", 1)
            .eq(l, "threads", 1)
            .gt(l, "contiguous_pages", 0)
            .eq(l, "unload_set", 1)
            .eq(l, "virtualized_by_cpuid", cpus)
            .eq(l, "refusal_lines", 0)
            .eq(l, "injected", 0);
    }
    if let Some(l) = line_with(&mut v, &run, "create_status") {
        v.eq(l, "create_status", 0)
            .eq(l, "virtualized", cpus)
            .eq(l, "modes_applied", 4)
            .eq(l, "cpuid_exits", 100)
            .eq(l, "sleep_notified", 1)
            .eq(l, "virtualized_asleep", 0)
            .eq(l, "virtualized_by_cpuid_asleep", 0)
            .eq(l, "virtualized_awake", cpus)
            .eq(l, "virtualized_by_cpuid_awake", cpus)
            .eq(l, "malformed_cases", 7)
            .eq(l, "malformed_precise", 7)
            .eq(l, "close_status", 0);
    }
    // The machine's own books on each CPU while the image's hypervisor runs each mode, and the
    // image's per-CPU statistics: no exit in passthrough; in ack-inject one acknowledged exit
    // per handler run (plus wake-up IPIs and spurious interrupts, which exit but are not in the
    // tally's runs); some, never
    // more than the runs, in exit-sti and ack-replay; no vector with more exits than runs.
    for mode in ["exit-sti", "ack-replay", "ack-inject", "passthrough"] {
        let lines: Vec<_> = run.lines("nt-driver", Some(mode)).collect();
        if lines.len() as u64 != cpus {
            v.fail(format!(
                "mode {mode}: {} per-CPU lines, want {cpus}",
                lines.len()
            ));
        }
        for (cpu, l) in lines.into_iter().enumerate() {
            v.eq(l, "cpu", cpu as u64)
                .eq(l, "stats_reset", 1)
                .eq(l, "stats_mode_matches", 1)
                .eq(l, "extint_vectors_over", 0);
            books_hold(&mut v, l);
            let ran = l.num("ran").unwrap_or(0);
            // Wake-up IPIs and spurious interrupts (vector 0xFF) exit too, but are not in `ran`.
            let with_wakes = ran + l.num("wakes").unwrap_or(0) + l.num("spurious").unwrap_or(0);
            match mode {
                "passthrough" => v.eq(l, "extint_exits", 0).eq(l, "extint_acked", 0),
                "ack-inject" => {
                    v.eq_field(l, "extint_acked", "ran")
                        .eq(l, "extint_exits", with_wakes)
                }
                "ack-replay" => v.gt(l, "extint_acked", 0).le(l, "extint_acked", ran).le(
                    l,
                    "extint_exits",
                    with_wakes,
                ),
                _ => v.gt(l, "extint_exits", 0).le(l, "extint_exits", with_wakes),
            };
        }
    }
    // During the sleep: every CPU takes its interrupts natively (the machine's books hold, and
    // they ran), while the image keeps no statistics at all (refused: nothing virtualized).
    let asleep: Vec<_> = run
        .lines("nt-driver", None)
        .filter(|l| l.get("asleep").is_some())
        .collect();
    if asleep.len() as u64 != cpus {
        v.fail(format!("{} per-CPU sleep lines, want {cpus}", asleep.len()));
    }
    for (cpu, l) in asleep.into_iter().enumerate() {
        v.eq(l, "cpu", cpu as u64)
            .eq(l, "stats_refused_before", 1)
            .eq(l, "stats_refused_after", 1);
        books_hold(&mut v, l);
    }
    if let Some(l) = line_with(&mut v, &run, "sched_checks") {
        v.eq(l, "sched_checks", 9).eq(l, "sched_failed", 0);
    }
    if let Some(l) = line_with(&mut v, &run, "worker_wakeups") {
        v.gt(l, "worker_wakeups", 0)
            .gt(l, "worker_lines", 0)
            .gt(l, "affinity_group0", 0);
        if cpus == 1 {
            v.eq(l, "thread_moves", 0);
        } else {
            v.gt(l, "thread_moves", 0);
        }
        // The image's every-group loop meets group 1 only when the CPUs are split (4 CPUs).
        if cpus > 2 {
            v.gt(l, "affinity_group1", 0);
        } else {
            v.eq(l, "affinity_group1", 0);
        }
    }
    if let Some(l) = line_with(&mut v, &run, "unloaded") {
        v.eq(l, "unloaded", 1)
            .eq(l, "virtualized_after", 0)
            .nt_books_clean(l);
    }
    v.finish();
}

/// One CPU's books of one workload: everything raised ran, nothing left in the ISR, no broken
/// frame or context.
fn books_hold(v: &mut Verdict<'_>, l: &ackvisor_runner::ResultLine) {
    v.eq(l, "undrained", 0)
        .eq(l, "lost", 0)
        .eq(l, "isr_left", 0)
        .eq(l, "canary_broken", 0)
        .eq(l, "ctx_violations", 0)
        .eq(l, "wrong_idt", 0)
        .eq(l, "unexpected", 0)
        .gt(l, "ran", 0)
        .eq_field(l, "ran", "raised");
}

#[test]
fn nt_driver_haswell() {
    drives_the_real_image(MODELS[0], 1, Profile::Debug);
}

#[test]
fn nt_driver_skylake() {
    drives_the_real_image(MODELS[1], 1, Profile::Debug);
}

/// The routines `ntos::fault` can make fail.
const REFUSABLE: [&str; 6] = [
    "MmAllocateContiguousMemorySpecifyCache",
    "MmMapIoSpaceEx",
    "WdmlibIoCreateDeviceSecure",
    "IoCreateSymbolicLink",
    "PsCreateSystemThread",
    "ExCreateCallback",
];
/// STATUS_INSUFFICIENT_RESOURCES: what each injected failure returns, and what DriverEntry
/// returns for each (its own status for a null from the Mm routines, the routine's otherwise).
const STATUS_INSUFFICIENT_RESOURCES: u64 = 0xC000_009A;

/// Every injectable routine fails on each of its calls in turn (the call counts come from a
/// clean run): DriverEntry refuses with the status, prints its refusal line, leaves the CPU
/// unvirtualized (CPUID costs what it costs natively) and nothing in the books.
fn every_refusal_is_clean(model: &str, cpus: u32, profile: Profile) {
    let clean = machine(driver::with_profile(
        RunSpec::new(model, "nt-driver").cpus(cpus),
        profile,
    ));
    let calls: Vec<(&str, u64)> = {
        let l = clean
            .lines("nt-driver", None)
            .find(|l| l.get("entry_status").is_some())
            .expect("the clean run has its DriverEntry line");
        REFUSABLE
            .iter()
            .map(|r| (*r, l.num(&format!("calls_{r}")).unwrap_or(0)))
            .collect()
    };
    let mut refusals = 0;
    for (routine, n) in calls {
        assert!(n > 0, "model {model}: DriverEntry never calls {routine}");
        for k in 1..=n {
            let spec = RunSpec::new(model, "nt-driver")
                .cpus(cpus)
                .param("fault", format!("{routine}:{k}"));
            let run = machine(driver::with_profile(spec, profile));
            let mut v = Verdict::new(&run);
            if let Some(l) = line_with(&mut v, &run, "entry_status") {
                v.eq(l, "injected", 1)
                    .eq(l, "loaded", 0)
                    .eq(l, "entry_status", STATUS_INSUFFICIENT_RESOURCES)
                    .eq(l, "refusal_lines", 1)
                    .eq(l, "virtualized_by_cpuid", 0)
                    .eq(l, "unload_set", 0);
            }
            if let Some(l) = line_with(&mut v, &run, "unloaded") {
                v.eq(l, "virtualized_after", 0).nt_books_clean(l);
            }
            v.finish();
            refusals += 1;
        }
    }
    assert!(
        refusals >= REFUSABLE.len(),
        "model {model}: {refusals} refusals"
    );
}

#[test]
fn nt_refusals_haswell() {
    every_refusal_is_clean(MODELS[0], 1, Profile::Debug);
}

// The release ackvisor.sys (the profile users ship), the same checks: code the optimizer
// changes (inlining, vectorizing, frame layout) runs here and nowhere else in the tests.

#[test]
fn nt_load_release_haswell() {
    loads_the_real_image(MODELS[0], Profile::Release);
}

#[test]
fn nt_load_release_skylake() {
    loads_the_real_image(MODELS[1], Profile::Release);
}

#[test]
fn nt_driver_release_haswell() {
    drives_the_real_image(MODELS[0], 1, Profile::Release);
}

#[test]
fn nt_driver_release_skylake() {
    drives_the_real_image(MODELS[1], 1, Profile::Release);
}

#[test]
fn nt_refusals_release_haswell() {
    every_refusal_is_clean(MODELS[0], 1, Profile::Release);
}

/// The release image on 4 CPUs (two processor groups): its per-CPU and every-group loops as
/// the optimizer built them.
#[test]
fn nt_driver_release_4_cpus_haswell() {
    drives_the_real_image(MODELS[0], 4, Profile::Release);
}

/// nt-driver on 2 CPUs (one group).
fn nt_driver_2_cpus(model: &str) {
    drives_the_real_image(model, 2, Profile::Debug);
}

/// nt-driver on 4 CPUs (two processor groups of 2).
fn nt_driver_4_cpus(model: &str) {
    drives_the_real_image(model, 4, Profile::Debug);
}

/// Every refusal on 2 CPUs: each CPU's contiguous memory is allocated inside the image's
/// per-CPU loop, so a refusal there comes with one CPU already virtualized, which the image
/// must take back (the probe finds no CPU virtualized, the books nothing held).
fn nt_refusals_2_cpus(model: &str) {
    every_refusal_is_clean(model, 2, Profile::Debug);
}

ackvisor_runner::per_model!(nt_driver_2_cpus, nt_driver_4_cpus, nt_refusals_2_cpus);
