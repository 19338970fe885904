/*
 * smp: real-mode AP trampoline (copied to TRAMPOLINE_ADDR by the BSP; the SIPI vector is
 * TRAMPOLINE_ADDR >> 12) and the AP entry, which switches to long mode like the BSP did.
 */
#include "guest.h"

#define MAX_APS 64
#define AP_STACK_SIZE 4096

	.section .rodata
	.code16
	.globl smp_tramp_start, smp_tramp_end
smp_tramp_start:
	cli
	cld
	mov %cs, %ax
	mov %ax, %ds
	lgdtl tramp_gdtr - smp_tramp_start
	mov %cr0, %eax
	or $1, %eax
	mov %eax, %cr0
	ljmpl $SEL_CODE32, $ap_entry32
	.p2align 2
tramp_gdtr:
	.word GDT_ENTRIES * 8 - 1
	.long gdt
smp_tramp_end:

	.text
	.code32
ap_entry32:
	mov $SEL_DATA0, %eax
	mov %eax, %ds
	mov %eax, %es
	mov %eax, %ss
	mov %eax, %fs
	mov %eax, %gs
	ENTER_LONG_MODE
	ljmp $SEL_CODE64, $ap_entry64

	.code64
ap_entry64:
	mov $1, %eax
	lock xadd %eax, ap_next_stack
	cmp $MAX_APS, %eax
	jae 2f
	inc %eax
	shl $12, %eax		/* AP_STACK_SIZE */
	add $ap_stacks, %rax
	mov %rax, %rsp
	call ap_main
2:	cli
	hlt
	jmp 2b

	.data
	.p2align 2
ap_next_stack:
	.long 0

	.section .stack, "aw", @nobits
	.p2align 12
ap_stacks:
	.skip MAX_APS * AP_STACK_SIZE

	.section .note.GNU-stack, "", @progbits
