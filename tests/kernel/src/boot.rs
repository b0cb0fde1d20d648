//! From the BIOS to Rust: MBR (real mode) → INT 13h load → protected mode → long mode with an
//! identity map of the low 4 GiB → `kmain` (BSP) or `ap_main` (APs, after INIT-SIPI-SIPI).
//!
//! Physical layout:
//! - 0x1000 PML4, 0x2000 PDPT, 0x3000..0x6FFF four PDs of 2 MiB pages (U=1 everywhere, so the
//!   ring-3 probe of `user` can run kernel text; the top GiB, LAPIC and IOAPIC, is PCD|PWT).
//! - 0x7C00 MBR, 0x7E00 params sector, 0x8000 AP trampoline + stage 2, then the kernel.
//! - 0x200000 .bss (zeroed here): stacks, per-CPU tables, page pool.
//!
//! Boot GDT: 0x08 code32, 0x10 data, 0x18 code64. `percpu` replaces it with per-CPU GDTs.
//!
//! **Runs in:** real mode, protected mode, then long mode at CPL 0 with IF=0.
//!
//! AT&T syntax because the 16/32-bit parts need `.code16`/`.code32`; the block ends in `.code64`
//! and `.text` since every `global_asm!` of the crate is assembled as one module.

/// Bytes of each AP's boot stack (the stack `ap_main` and its scenarios run on).
pub const AP_STACK_BYTES: usize = 64 * 1024;
/// Bytes of the BSP's boot stack.
pub const BSP_STACK_BYTES: usize = 128 * 1024;

core::arch::global_asm!(
    r#"
.section .boot, "ax", @progbits
.code16
.global boot_entry
boot_entry:
    cli
    xorw %ax, %ax
    movw %ax, %ds
    movw %ax, %es
    movw %ax, %ss
    movw $0x7c00, %sp
    ljmp $0, $1f                 # canonical CS:IP = 0:7C00+
1:  movb %dl, boot_drive         # BIOS passes the boot drive in DL
    movw $__load_sectors, %cx    # sectors after the MBR: params, stage 2, kernel
    movl $1, %ebx                # next LBA
    movw $0x07e0, %di            # next destination segment (0x7E00)
2:  testw %cx, %cx
    jz 4f
    movw %cx, %ax
    cmpw $64, %ax                # INT 13h extensions: at most 64 sectors (32 KiB) per call here
    jbe 3f
    movw $64, %ax
3:  movw %ax, dap_count
    movw $0, dap_off
    movw %di, dap_seg
    movl %ebx, dap_lba
    movl $0, dap_lba+4
    pushal
    movw $dap, %si
    movb $0x42, %ah              # extended read
    movb boot_drive, %dl
    int $0x13
    popal
    jc 5f
    subw %ax, %cx
    movzwl %ax, %eax
    addl %eax, %ebx
    shlw $5, %ax                 # sectors * 512 / 16 = paragraphs
    addw %ax, %di
    jmp 2b
4:  jmp stage2
5:  movb $'E', %al               # disk error: say so on port 0xE9 and stop
    outb %al, $0xe9
6:  hlt
    jmp 6b
.balign 4
dap:       .byte 16, 0
dap_count: .word 0
dap_off:   .word 0
dap_seg:   .word 0
dap_lba:   .quad 0
boot_drive: .byte 0
.org 510                         # lld treats `. =` in the script as absolute: place it here
.word 0xAA55

.section .boot2, "ax", @progbits
.code16
# AP trampoline, first in the section so it sits at 0x8000: SIPI vector 8 starts it at 0800:0000.
.global ap_trampoline
ap_trampoline:
    cli
    ljmp $0, $1f                 # CS=0 so the offsets below are linear addresses
1:  xorw %ax, %ax
    movw %ax, %ds
    movw %ax, %es
    movw %ax, %ss
    lgdtl boot_gdt_ptr
    movl %cr0, %eax
    orl $1, %eax
    movl %eax, %cr0
    ljmpl $0x08, $ap_pm32

stage2:
    inb $0x92, %al               # fast A20
    orb $2, %al
    andb $0xfe, %al
    outb %al, $0x92
    lgdtl boot_gdt_ptr
    movl %cr0, %eax
    orl $1, %eax
    movl %eax, %cr0
    ljmpl $0x08, $bsp_pm32

.code32
bsp_pm32:
    movw $0x10, %ax
    movw %ax, %ds
    movw %ax, %es
    movw %ax, %ss
    movw %ax, %fs
    movw %ax, %gs
    movl $0x7c00, %esp
    cld
    movl $0x1000, %edi           # clear PML4, PDPT and the four PDs
    xorl %eax, %eax
    movl $(0x6000 / 4), %ecx
    rep stosl
    movl $0x2007, 0x1000         # PML4[0] -> PDPT (P|RW|US)
    movl $0x3007, 0x2000         # PDPT[0..3] -> PD0..PD3
    movl $0x4007, 0x2008
    movl $0x5007, 0x2010
    movl $0x6007, 0x2018
    movl $0x3000, %edi           # 2048 PDEs of 2 MiB: identity map of 4 GiB
    movl $0x87, %eax             # P|RW|US|PS
    xorl %edx, %edx
    movl $2048, %ecx
1:  movl %eax, (%edi)
    movl %edx, 4(%edi)
    addl $0x200000, %eax
    adcl $0, %edx
    addl $8, %edi
    loop 1b
    movl $0x6000, %edi           # top GiB holds the LAPIC/IOAPIC MMIO: uncached
    movl $512, %ecx
2:  orl $0x18, (%edi)
    addl $8, %edi
    loop 2b
    jmp enter_long_mode

ap_pm32:
    movw $0x10, %ax
    movw %ax, %ds
    movw %ax, %es
    movw %ax, %ss
    jmp enter_long_mode          # the BSP built the page tables already

enter_long_mode:                 # shared by BSP and APs
    movl %cr4, %eax
    orl $(1 << 5), %eax          # PAE
    movl %eax, %cr4
    movl $0x1000, %eax
    movl %eax, %cr3
    movl $0xC0000080, %ecx       # EFER.LME
    rdmsr
    orl $(1 << 8), %eax
    wrmsr
    movl %cr0, %eax
    orl $0x80000000, %eax        # PG
    movl %eax, %cr0
    ljmpl $0x18, $lm64

.code64
lm64:
    movw $0x10, %ax
    movw %ax, %ds
    movw %ax, %es
    movw %ax, %ss
    movw %ax, %fs
    movw %ax, %gs
    movl $0x1B, %ecx             # IA32_APIC_BASE bit 8: bootstrap processor
    rdmsr
    testl $0x100, %eax
    jz 3f
    movabsq $__bss_start, %rdi   # BSP: zero .bss, take the boot stack, run kmain
    movabsq $__bss_end, %rcx
    subq %rdi, %rcx
    xorl %eax, %eax
    rep stosb
    movabsq $BSP_STACK_TOP, %rsp
    call enable_sse              # the prebuilt core uses XMM registers everywhere
    call kmain
    jmp 4f
3:  movl $1, %eax                # AP: CPU index = 1 + atomic ap_count++ (one stack each)
    lock xaddl %eax, ap_count
    incl %eax
    movl %eax, %edi              # ap_main(index)
    movl %eax, %ecx
    imul ${ap_stack_bytes}, %rcx
    movabsq $AP_STACKS, %rsp
    addq %rcx, %rsp              # top of stack (index-1) = AP_STACKS + index * size
    pushq %rdi
    call enable_sse              # needs a stack: APs arrive with RSP = 0
    popq %rdi
    call ap_main
4:  cli
    hlt
    jmp 4b

enable_sse:                      # CR0: EM=0, MP=1, NE=1; CR4: OSFXSR|OSXMMEXCPT
    movq %cr0, %rax
    andq $~(1 << 2), %rax
    orq $((1 << 1) | (1 << 5)), %rax
    movq %rax, %cr0
    movq %cr4, %rax
    orq $((1 << 9) | (1 << 10)), %rax
    movq %rax, %cr4
    ret

.balign 16
boot_gdt:
    .quad 0
    .quad 0x00CF9A000000FFFF     # 0x08 code32
    .quad 0x00CF92000000FFFF     # 0x10 data
    .quad 0x00AF9A000000FFFF     # 0x18 code64
boot_gdt_end:
boot_gdt_ptr:
    .word boot_gdt_end - boot_gdt - 1
    .long boot_gdt
.balign 4
.global ap_count
ap_count: .long 0

.section .bss.boot_stacks, "aw", @nobits
.balign 16
    .skip {bsp_stack_bytes}
BSP_STACK_TOP:
.balign 16
.global AP_STACKS
AP_STACKS:
    .skip {ap_stack_bytes} * ({max_cpus} - 1)

.code64
.text
"#,
    ap_stack_bytes = const AP_STACK_BYTES,
    bsp_stack_bytes = const BSP_STACK_BYTES,
    max_cpus = const crate::percpu::MAX_CPUS,
    options(att_syntax)
);

unsafe extern "C" {
    /// First byte of the AP trampoline (linker-placed at 0x8000).
    pub static ap_trampoline: u8;
}
