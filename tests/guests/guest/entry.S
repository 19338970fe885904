/*
 * Common entry code for the tiny test guests: the PVH ELF note, the 32-bit entry point and
 * the switch to 64-bit long mode, the GDT, the identity page tables and the exception stubs.
 *
 * PVH entry state: 32-bit protected mode, paging off, interrupts off,
 * %ebx = physical address of struct hvm_start_info.
 */
#include "guest.h"

/*
 * XEN_ELFNOTE_PHYS32_ENTRY (type 18), name "Xen". The descriptor is 8 bytes (entry address,
 * then 0): QEMU reads a 64-bit value from the note of an ELF64 file, linux-loader reads the
 * low 32 bits.
 */
	.section .note.Xen, "a"
	.p2align 2
	.long 4			/* namesz */
	.long 8			/* descsz */
	.long 18		/* type: XEN_ELFNOTE_PHYS32_ENTRY */
	.asciz "Xen"
	.p2align 2
	.long _start
	.long 0

	.section .text.entry, "ax"
	.code32
	.globl _start
_start:
	cli
	cld
	mov %ebx, %esi		/* hvm_start_info, kept across the mode switch */
	lgdt gdt_desc
	ljmp $SEL_CODE32, $1f
1:	mov $SEL_DATA0, %eax
	mov %eax, %ds
	mov %eax, %es
	mov %eax, %ss
	mov %eax, %fs
	mov %eax, %gs
	ENTER_LONG_MODE
	ljmp $SEL_CODE64, $start64

	.code64
start64:
	mov $bsp_stack_top, %esp
	mov %esi, %edi		/* zero-extends: first argument */
	call boot_main
	/* not reached */
2:	cli
	hlt
	jmp 2b

/* Exception stubs: push a dummy error code where the CPU does not, then the vector. */
	.macro EXC_STUB n
exc_stub_\n:
	.if (\n == 8) || ((\n >= 10) && (\n <= 14)) || (\n == 17) || (\n == 21) || (\n == 29) || (\n == 30)
	.else
	push $0
	.endif
	push $\n
	jmp exc_common
	.endm

	.irp n, 0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17,18,19,20,21,22,23,24,25,26,27,28,29,30,31
	EXC_STUB \n
	.endr

exc_common:
	mov %rsp, %rdi		/* {vector, error, rip, cs, rflags, rsp, ss} */
	and $-16, %rsp
	call exception_handler
3:	cli
	hlt
	jmp 3b

	.section .rodata
	.p2align 3
	.globl exc_stub_table
exc_stub_table:
	.irp n, 0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17,18,19,20,21,22,23,24,25,26,27,28,29,30,31
	.quad exc_stub_\n
	.endr

	.data
	.p2align 3
	.globl gdt
gdt:
	.quad 0				/* 0x00 null */
	.quad 0x00cf9a000000ffff	/* 0x08 code, DPL0, 32-bit, flat */
	.quad 0x00cf92000000ffff	/* 0x10 data, DPL0, flat */
	.quad 0x00af9a000000ffff	/* 0x18 code, DPL0, 64-bit */
	.quad 0				/* 0x20 unused */
	.quad 0x00affa000000ffff	/* 0x28 code, DPL3, 64-bit (SYSENTER_CS + 32) */
	.quad 0x00cff2000000ffff	/* 0x30 data, DPL3, flat (SYSENTER_CS + 40) */
	.quad 0, 0			/* 0x38 64-bit TSS (filled by guests that use one) */
	.quad 0				/* 0x48 spare */
gdt_end:
	.p2align 2
	.word 0
	.globl gdt_desc
gdt_desc:
	.word gdt_end - gdt - 1
	.long gdt

/*
 * Identity map of the first 4 GiB with 2 MiB pages (present, writable, user), so that CPL3
 * code can reach every address including the LAPIC/IOAPIC. Static, so the (emulated) CPL0
 * code does not spend time building it.
 */
	.p2align 12
	.globl pml4
pml4:
	.quad pdpt + 7
	.fill 511, 8, 0
pdpt:
	.quad pd + 0x0000 + 7
	.quad pd + 0x1000 + 7
	.quad pd + 0x2000 + 7
	.quad pd + 0x3000 + 7
	.fill 508, 8, 0
pd:
	.set i, 0
	.rept 2048
	.quad (i << 21) | 0x87	/* present, writable, user, 2 MiB */
	.set i, i + 1
	.endr

	.section .stack, "aw", @nobits
	.p2align 12
	.skip 16384
	.globl bsp_stack_top
bsp_stack_top:

	.section .note.GNU-stack, "", @progbits
