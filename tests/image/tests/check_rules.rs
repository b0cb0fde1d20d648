//! Tests of the image check itself, on fixture images kept out of the product: a few functions
//! of assembly (with SEH directives, so the assembler writes their .pdata/.xdata) linked by
//! lld-link with the driver's flags against a two-routine ntoskrnl import library. One fixture
//! passes; each other breaks one rule, and the check must name the function or import.

use std::path::{Path, PathBuf};
use std::process::Command;

use ackvisor_image::build::{self, packages};
use ackvisor_image::check::{self, ExportLists, Names, Report};

const LLVM_MC: &str = "/usr/bin/llvm-mc-14";
const DLLTOOL: &str = "/usr/bin/llvm-dlltool-14";
const LLD_LINK: &str = "/usr/bin/lld-link-14";

/// The export list the check holds fixtures to: `UnknownRoutine` is in the import library (so
/// the fixture links) but not in the list.
const EXPORT_LIST: &str = "LIBRARY ntoskrnl.exe\nEXPORTS\n  KeBugCheckEx\n";
const IMPORT_LIBRARY: &str = "LIBRARY ntoskrnl.exe\nEXPORTS\n  KeBugCheckEx\n  UnknownRoutine\n";

/// A well-formed driver: DriverEntry with a 56-byte frame, an import, an absolute address
/// (so there is a base relocation).
const DRIVER_ENTRY: &str = r#"
    .text
    .globl DriverEntry
    .p2align 4
DriverEntry:
.seh_proc DriverEntry
    pushq %rbx
    .seh_pushreg %rbx
    subq $48, %rsp
    .seh_stackalloc 48
    .seh_endprologue
    movq table(%rip), %rax
    callq *__imp_KeBugCheckEx(%rip)
    addq $48, %rsp
    popq %rbx
    retq
    .seh_endproc

    .data
    .p2align 3
table:
    .quad DriverEntry
"#;

/// A function whose frame is two pages.
const BIG_FRAME: &str = r#"
    .text
    .globl big_frame
    .p2align 4
big_frame:
.seh_proc big_frame
    pushq %rsi
    .seh_pushreg %rsi
    subq $8192, %rsp
    .seh_stackalloc 8192
    .seh_endprologue
    addq $8192, %rsp
    popq %rsi
    retq
    .seh_endproc
"#;

/// A function that calls an import the export list does not have.
const UNKNOWN_IMPORT: &str = r#"
    .text
    .globl calls_unknown
    .p2align 4
calls_unknown:
.seh_proc calls_unknown
    subq $40, %rsp
    .seh_stackalloc 40
    .seh_endprologue
    callq *__imp_UnknownRoutine(%rip)
    addq $40, %rsp
    retq
    .seh_endproc
"#;

/// A frame of three pages probed through __chkstk, as MSVC-ABI code allocates one (the probe
/// itself is a local stand-in, so the fixture links).
const CHKSTK: &str = r#"
    .text
    .globl probed
    .p2align 4
probed:
.seh_proc probed
    movl $12288, %eax
    callq __chkstk
    subq %rax, %rsp
    .seh_stackalloc 12288
    .seh_endprologue
    addq $12288, %rsp
    retq
    .seh_endproc

    .globl __chkstk
__chkstk:
    retq
"#;

fn fixture_dir() -> PathBuf {
    let dir = build::cache_dir().join("fixtures");
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn run(cmd: &mut Command) {
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{cmd:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Assembles and links a fixture image named `name` from `parts`; `exports` are exported by
/// name (besides DriverEntry). Returns the image path (its PDB beside it).
fn link(name: &str, parts: &[&str], exports: &[&str]) -> PathBuf {
    packages::ensure_installed().unwrap();
    let dir = fixture_dir().join(name);
    std::fs::create_dir_all(&dir).unwrap();
    let asm = dir.join("fixture.s");
    std::fs::write(&asm, parts.concat()).unwrap();
    let obj = dir.join("fixture.obj");
    run(Command::new(LLVM_MC)
        .args(["-filetype=obj", "-triple=x86_64-pc-windows-msvc", "-o"])
        .arg(&obj)
        .arg(&asm));
    let def = dir.join("ntoskrnl.def");
    std::fs::write(&def, IMPORT_LIBRARY).unwrap();
    let lib = dir.join("ntoskrnl.lib");
    run(Command::new(DLLTOOL)
        .args(["-m", "i386:x86-64", "-d"])
        .arg(&def)
        .arg("-l")
        .arg(&lib));
    let image = dir.join(format!("{name}.sys"));
    let mut cmd = Command::new(LLD_LINK);
    cmd.args(build::WDM_LINK_FLAGS)
        .args(["/DLL", "/DEBUG", "/EXPORT:DriverEntry"])
        .args(exports.iter().map(|e| format!("/EXPORT:{e}")))
        .arg(format!("/OUT:{}", image.display()))
        .arg(format!("/PDB:{}", image.with_extension("pdb").display()))
        .arg(&obj)
        .arg(&lib);
    run(&mut cmd);
    image
}

fn check(image: &Path) -> Report {
    let mut lists = ExportLists::default();
    lists.add_def(EXPORT_LIST);
    let names = Names::from_pdb(&image.with_extension("pdb")).unwrap();
    let report = check::check(&std::fs::read(image).unwrap(), lists, &names);
    println!("{report}");
    report
}

#[test]
fn a_well_formed_fixture_passes_every_rule() {
    let report = check(&link("good", &[DRIVER_ENTRY], &[]));
    assert!(report.passed(), "{:?}", report.violations);
    assert_eq!(
        report.imports,
        vec![("ntoskrnl.exe".to_string(), vec!["KeBugCheckEx".to_string()])]
    );
    let (f, frame) = &report.frames[0];
    assert_eq!(f.name.as_deref(), Some("DriverEntry"));
    assert_eq!(frame.bytes, 56, "push rbx (8) + sub rsp, 48");
}

#[test]
fn a_frame_over_4_kib_fails_naming_the_function() {
    let report = check(&link(
        "big-frame",
        &[DRIVER_ENTRY, BIG_FRAME],
        &["big_frame"],
    ));
    let frames: Vec<_> = report
        .violations
        .iter()
        .filter(|v| v.rule == "frame <= 4 KiB")
        .collect();
    assert_eq!(frames.len(), 1, "{:?}", report.violations);
    assert!(frames[0].detail.contains("big_frame"), "{}", frames[0]);
    assert!(frames[0].detail.contains("8200-byte"), "{}", frames[0]);
    assert_eq!(report.violations.len(), 1, "{:?}", report.violations);
}

#[test]
fn an_import_missing_from_the_export_list_fails_naming_it() {
    let report = check(&link(
        "unknown-import",
        &[DRIVER_ENTRY, UNKNOWN_IMPORT],
        &["calls_unknown"],
    ));
    assert_eq!(report.violations.len(), 1, "{:?}", report.violations);
    let v = &report.violations[0];
    assert_eq!(v.rule, "imports");
    assert!(v.detail.contains("ntoskrnl.exe!UnknownRoutine"), "{v}");
}

#[test]
fn a_chkstk_probe_fails_naming_the_function_and_its_frame() {
    let report = check(&link("chkstk", &[DRIVER_ENTRY, CHKSTK], &["probed"]));
    let rules: Vec<_> = report.violations.iter().map(|v| v.rule).collect();
    assert_eq!(
        rules,
        ["no __chkstk", "frame <= 4 KiB"],
        "{:?}",
        report.violations
    );
    assert!(
        report
            .violations
            .iter()
            .all(|v| v.detail.contains("probed"))
    );
    assert!(report.violations[1].detail.contains("12288-byte"));
}
