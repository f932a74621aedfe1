/*
 * Ring-0 part of the probe: everything here runs emulated on PVM hosts, so it
 * is kept to the minimum. PVH entry (32-bit, paging off) and the AP trampoline
 * (16-bit) both switch to long mode with static page tables, then every CPU
 * drops to ring 3 (`probe_cpu_main`). Ring 3 re-enters ring 0 only through
 * `syscall` (a handful of privileged operations) and through exceptions, which
 * are recorded and handed to a ring-3 reporter.
 */

.set MAX_CPUS,    64
.set KSTACK_SHIFT, 13          /* 8 KiB ring-0 stack per CPU */
.set USTACK_SHIFT, 15          /* 32 KiB ring-3 stack per CPU */
.set SEL_KCODE64, 0x08
.set SEL_KDATA,   0x10
.set SEL_UDATA,   0x23
.set SEL_UCODE64, 0x2b
.set SEL_KCODE32, 0x30
.set TSS_LIMIT,  104 + 8192      /* TSS + full I/O permission bitmap + terminator */
.set TSS_STRIDE, 0x2100
.set RFLAGS_USER, 0x0002       /* IF=0; IOPL cannot be raised on PVM, the TSS I/O bitmap allows ports */

/* ---------------------------------------------------------------- PVH note */
.section .note.Xen, "a"
.balign 4
.long 4                        /* namesz */
.long 4                        /* descsz */
.long 18                       /* XEN_ELFNOTE_PHYS32_ENTRY */
.asciz "Xen"
.long pvh_entry

/* --------------------------------------------------------- 32-bit entries */
.section .text.entry32, "ax"
.code32
.global pvh_entry
pvh_entry:
    cli
    cld
    movl %ebx, pvh_start_info
    lgdtl gdt_ptr
    movw $SEL_KDATA, %ax
    movw %ax, %ds
    movw %ax, %es
    movw %ax, %ss
    jmp common32

ap_entry32:
    movw $SEL_KDATA, %ax
    movw %ax, %ds
    movw %ax, %es
    movw %ax, %ss
common32:
    movl %cr4, %eax
    orl $0x620, %eax           /* PAE | OSFXSR | OSXMMEXCPT */
    movl %eax, %cr4
    movl $pml4, %eax
    movl %eax, %cr3
    movl $0xC0000080, %ecx     /* EFER */
    rdmsr
    orl $0x101, %eax           /* SCE | LME */
    wrmsr
    movl $0x80000033, %eax     /* PG | NE | ET | MP | PE */
    movl %eax, %cr0
    ljmpl $SEL_KCODE64, $long64

/* AP trampoline: copied by the BSP to a free page below 1 MiB (the SIPI
 * vector), entered in real mode with CS = page >> 4, IP = 0. */
.code16
.global ap_tramp_start
.global ap_tramp_end
ap_tramp_start:
    cli
    cld
    /* lgdtl %cs:(ap_tramp_gdtr - ap_tramp_start) */
    .byte 0x2e, 0x66, 0x0f, 0x01, 0x16
    .word ap_tramp_gdtr - ap_tramp_start
    movl %cr0, %eax
    orl $1, %eax
    movl %eax, %cr0
    /* ljmpl $SEL_KCODE32, $ap_entry32 */
    .byte 0x66, 0xea
    .long ap_entry32
    .word SEL_KCODE32
    .balign 4
ap_tramp_gdtr:
    .word gdt_end - gdt - 1
    .long gdt
ap_tramp_end:

/* ---------------------------------------------------------------- 64-bit */
.code64
.section .text
long64:
    movw $SEL_KDATA, %ax
    movw %ax, %ds
    movw %ax, %es
    movw %ax, %ss
    xorl %eax, %eax
    movw %ax, %fs
    movw %ax, %gs
    movl $1, %eax
    lock xaddl %eax, cpus_entered     /* eax = this CPU's index */
    cmpl $MAX_CPUS, %eax
    jae park
    movl %eax, %ebx
    /* ring-0 stack top: kstacks + (idx + 1) << KSTACK_SHIFT */
    leaq 1(%rbx), %rax
    shlq $KSTACK_SHIFT, %rax
    movabsq $kstacks, %rsp
    addq %rax, %rsp
    /* ring-3 stack top (minus 8: entered like a call) */
    leaq 1(%rbx), %rax
    shlq $USTACK_SHIFT, %rax
    movabsq $ustacks, %r12
    addq %rax, %r12
    subq $8, %r12
    /* syscall: STAR, LSTAR, SFMASK */
    movl $0xC0000081, %ecx
    xorl %eax, %eax
    movl $0x001b0008, %edx
    wrmsr
    movl $0xC0000082, %ecx
    movl $syscall_entry, %eax
    xorl %edx, %edx
    wrmsr
    movl $0xC0000084, %ecx
    movl $0x4700, %eax                /* TF | DF | IF | NT cleared on entry */
    xorl %edx, %edx
    wrmsr
    /* this CPU's TSS (ring-0 stack for exceptions from ring 3) and GDT slot */
    imulq $TSS_STRIDE, %rbx, %rax
    movabsq $tss_area, %rsi
    addq %rax, %rsi
    movq %rsp, 4(%rsi)
    movw $104, 102(%rsi)              /* I/O bitmap right after the TSS: all ports allowed */
    movb $0xff, 104 + 8192(%rsi)      /* bitmap terminator */
    movq %rsi, %rax
    andq $0xffffff, %rax
    shlq $16, %rax
    movq %rsi, %rdx
    shrq $24, %rdx
    andq $0xff, %rdx
    shlq $56, %rdx
    orq %rdx, %rax
    movabsq $0x0000890000000000 + TSS_LIMIT, %rdx
    orq %rdx, %rax
    movq %rbx, %rdx
    shlq $4, %rdx
    movabsq $gdt_tss, %rdi
    addq %rdx, %rdi
    movq %rax, (%rdi)
    movq %rsi, %rax
    shrq $32, %rax
    movq %rax, 8(%rdi)
    movq %rbx, %rax
    shlq $4, %rax
    addq $0x40, %rax
    ltr %ax
    /* the IDT is built once, by the boot CPU, before any AP exists */
    testl %ebx, %ebx
    jnz 2f
    movabsq $isr_stubs, %rsi
    movabsq $idt, %rdi
    movl $256, %ecx
1:  movq %rsi, %rax
    andl $0xffff, %eax
    orq $0x00080000, %rax
    movl %esi, %edx
    andl $0xffff0000, %edx
    shlq $32, %rdx
    orq %rdx, %rax
    movabsq $0x00008e0000000000, %rdx
    orq %rdx, %rax
    movq %rax, (%rdi)
    movq %rsi, %rdx
    shrq $32, %rdx
    movq %rdx, 8(%rdi)
    addq $16, %rsi
    addq $16, %rdi
    decl %ecx
    jnz 1b
2:  lidt idt_ptr
    pushq $SEL_UDATA
    pushq %r12
    pushq $RFLAGS_USER
    pushq $SEL_UCODE64
    pushq $probe_cpu_main
    movq %rbx, %rdi
    iretq

park:
    cli
    hlt
    jmp park

/* syscall: rax = op, rdi/rsi = arguments, result in rax. Runs on the caller's
 * (ring-3) stack: the probe is one trusted address space. */
.global syscall_entry
syscall_entry:
    pushq %rcx
    pushq %r11
    cmpq $0, %rax
    je 10f
    cmpq $1, %rax
    je 11f
    cmpq $2, %rax
    je 12f
    cmpq $3, %rax
    je 13f
    cmpq $4, %rax
    je 14f
    cmpq $5, %rax
    je 15f
    cmpq $6, %rax
    je 16f
    movq $-1, %rax
    jmp 99f
10: /* wrmsr(rdi, rsi) */
    movl %edi, %ecx
    movl %esi, %eax
    movq %rsi, %rdx
    shrq $32, %rdx
    wrmsr
    xorl %eax, %eax
    jmp 99f
11: /* rdmsr(rdi) */
    movl %edi, %ecx
    rdmsr
    shlq $32, %rdx
    orq %rdx, %rax
    jmp 99f
12: /* write32(rdi, rsi) */
    movl %esi, (%rdi)
    xorl %eax, %eax
    jmp 99f
13: /* read32(rdi) */
    movl (%rdi), %eax
    jmp 99f
14: /* lidt(rdi) */
    lidt (%rdi)
    xorl %eax, %eax
    jmp 99f
15: /* ltr(di) */
    ltr %di
    xorl %eax, %eax
    jmp 99f
16: /* interrupts on (rdi != 0) or off for the caller: IF in the saved RFLAGS (r11) */
    andq $~0x200, 0(%rsp)
    testq %rdi, %rdi
    jz 17f
    orq $0x200, 0(%rsp)
17: xorl %eax, %eax
    jmp 99f
99: /* return with iretq: sysretq does not come back on PVM hosts */
    popq %r11
    popq %rcx
    movq %rsp, %rdx
    pushq $SEL_UDATA
    pushq %rdx
    pushq %r11
    pushq $SEL_UCODE64
    pushq %rcx
    iretq

/* Vector stubs: 16 bytes each, stub i at isr_stubs + 16 * i. 0-31 are
 * exceptions; 32-255 are interrupts, which are counted (irq_common). */
.balign 16
.global isr_stubs
isr_stubs:
.set vec, 0
.rept 256
    .balign 16
    .if vec < 32
    .if ((0x60227d00 >> vec) & 1) == 0
    pushq $0
    .endif
    pushq $vec
    jmp isr_common
    .else
    pushq $vec
    jmp irq_common
    .endif
    .set vec, vec + 1
.endr

/* An interrupt: count it for (this CPU, vector), EOI the local APIC, and
 * return. Kept to a handful of instructions: on PVM hosts ring 0 is
 * emulated. The CPU index comes from which ring-0 stack we are on. */
irq_common:
    pushq %rax
    pushq %rdx
    movq %rsp, %rax
    movabsq $kstacks, %rdx
    subq %rdx, %rax
    shrq $KSTACK_SHIFT, %rax          /* CPU index */
    shlq $8, %rax
    addq 16(%rsp), %rax               /* + vector */
    movabsq $irq_counts, %rdx
    lock incl (%rdx,%rax,4)
    movl $0xfee000b0, %eax            /* local APIC EOI */
    movl $0, (%rax)
    popq %rdx
    popq %rax
    addq $8, %rsp
    iretq

/* Record the first exception and continue in ring 3 at `probe_fault_report`. */
isr_common:
    lock btsq $0, fault_taken
    jc park
    movabsq $fault_record, %rbx
    movq 0(%rsp), %rax
    movq %rax, 0(%rbx)                /* vector */
    movq 8(%rsp), %rax
    movq %rax, 8(%rbx)                /* error code */
    movq 16(%rsp), %rax
    movq %rax, 16(%rbx)               /* rip */
    movq 24(%rsp), %rax
    movq %rax, 24(%rbx)               /* cs */
    movq 40(%rsp), %rax
    movq %rax, 32(%rbx)               /* rsp */
    movq %cr2, %rax
    movq %rax, 40(%rbx)               /* cr2 */
    pushq $SEL_UDATA
    movabsq $fault_stack_top, %rax
    subq $8, %rax
    pushq %rax
    pushq $RFLAGS_USER
    pushq $SEL_UCODE64
    pushq $probe_fault_report
    iretq

/* ------------------------------------------------------------------ data */
.section .data.pagetables, "aw"
/* Identity map of the first 16 GiB with 2 MiB pages, user-accessible (the
 * probe's ring-3 code owns the machine). Static, so ring 0 builds nothing. */
.balign 4096
pml4:
    .quad pdpt + 0x7
    .fill 511, 8, 0
.balign 4096
pdpt:
.set i, 0
.rept 16
    .quad pds + i * 4096 + 0x7
    .set i, i + 1
.endr
    .fill 496, 8, 0
.balign 4096
pds:
.set i, 0
.rept 16 * 512
    .quad (i << 21) | 0x87
    .set i, i + 1
.endr

.section .data
.balign 16
.global gdt
gdt:
    .quad 0
    .quad 0x00af9a000000ffff          /* 0x08 kernel code 64 */
    .quad 0x00cf92000000ffff          /* 0x10 kernel data */
    .quad 0x00cffa000000ffff          /* 0x18 user code 32 (sysret layout) */
    .quad 0x00cff2000000ffff          /* 0x20 user data */
    .quad 0x00affa000000ffff          /* 0x28 user code 64 */
    .quad 0x00cf9a000000ffff          /* 0x30 kernel code 32 */
    .quad 0
.global gdt_tss
gdt_tss:                              /* 0x40: one TSS descriptor per CPU */
    .fill MAX_CPUS * 2, 8, 0
gdt_end:
.balign 8
gdt_ptr:
    .word gdt_end - gdt - 1
    .long gdt
.balign 8
idt_ptr:
    .word 256 * 16 - 1
    .quad idt
.global pvh_start_info
pvh_start_info:
    .long 0
.global cpus_entered
cpus_entered:
    .long 0
.balign 8
fault_taken:
    .quad 0
.global fault_record
fault_record:
    .fill 6, 8, 0

.section .bss
.balign 4096
.global idt
idt:
    .fill 256 * 16, 1, 0
/* Interrupts taken: a u32 per (CPU, vector), CPU-major. */
.global irq_counts
irq_counts:
    .fill MAX_CPUS * 256 * 4, 1, 0
tss_area:
    .fill MAX_CPUS * TSS_STRIDE, 1, 0
.balign 4096
.global kstacks
kstacks:
    .fill MAX_CPUS << KSTACK_SHIFT, 1, 0
.global ustacks
ustacks:
    .fill MAX_CPUS << USTACK_SHIFT, 1, 0
fault_stack:
    .fill 16384, 1, 0
fault_stack_top:
