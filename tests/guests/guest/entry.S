/*
 * Common entry code for the tiny test guests: the PVH ELF note, the 32-bit entry point,
 * the GDT and the exception stubs.
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
	lgdt gdt_desc
	ljmp $SEL_CODE0, $1f
1:	mov $SEL_DATA0, %eax
	mov %eax, %ds
	mov %eax, %es
	mov %eax, %ss
	mov %eax, %fs
	mov %eax, %gs
	mov $bsp_stack_top, %esp
	push %ebx
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
	mov $SEL_DATA0, %eax
	mov %eax, %ds
	mov %eax, %es
	push %esp		/* pointer to {vector, error, eip, cs, eflags, ...} */
	call exception_handler
3:	cli
	hlt
	jmp 3b

	.section .rodata
	.p2align 2
	.globl exc_stub_table
exc_stub_table:
	.irp n, 0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17,18,19,20,21,22,23,24,25,26,27,28,29,30,31
	.long exc_stub_\n
	.endr

	.data
	.p2align 3
	.globl gdt
gdt:
	.quad 0				/* 0x00 null */
	.quad 0x00cf9a000000ffff	/* 0x08 code, DPL0, 32-bit, flat */
	.quad 0x00cf92000000ffff	/* 0x10 data, DPL0, flat */
	.quad 0x00cffa000000ffff	/* 0x18 code, DPL3, 32-bit, flat */
	.quad 0x00cff2000000ffff	/* 0x20 data, DPL3, flat */
	.quad 0				/* 0x28 TSS (filled at run time by guests that use it) */
	.quad 0				/* 0x30 spare */
gdt_end:
	.p2align 2
	.word 0
	.globl gdt_desc
gdt_desc:
	.word gdt_end - gdt - 1
	.long gdt

	.section .stack, "aw", @nobits
	.p2align 12
	.skip 16384
	.globl bsp_stack_top
bsp_stack_top:

	.section .note.GNU-stack, "", @progbits
