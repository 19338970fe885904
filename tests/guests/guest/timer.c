/* timer: counts LAPIC timer and PIT (through IOAPIC pin 2) interrupts. */
#include "guest.h"

const char guest_name[] = "timer";

#define VEC_PIT 0x30
#define VEC_LAPIC 0x40
#define VEC_SPURIOUS 0xff

#define LAPIC_ID 0x20
#define LAPIC_TPR 0x80
#define LAPIC_EOI 0xb0
#define LAPIC_SVR 0xf0
#define LAPIC_LVT_TIMER 0x320
#define LAPIC_TIMER_INIT 0x380
#define LAPIC_TIMER_DIV 0x3e0
/* 1 GHz APIC bus (KVM and QEMU) / 16 = 62.5 MHz: 625000 counts = 10 ms. */
#define LAPIC_INIT_COUNT 625000u
#define LAPIC_PERIOD_MS 10u

#define PIT_GSI 2
#define PIT_RELOAD 11932u /* 1193182 / 11932 = 100 Hz */
#define PIT_PERIOD_MS 10u

#define TIMEOUT_BASE_MS 5000u
#define EXIT_TIMEOUT 2

volatile u32 lapic_count, pit_count;

/*
 * Interrupts are only ever enabled inside wait_for_interrupt (`sti; hlt`). The handlers do
 * not IRETQ: the nested KVM's instruction emulator, which runs all CPL0 code there, does not
 * implement protected-mode IRET. Instead each handler restores the stack pointer saved by
 * wait_for_interrupt (dropping the interrupt frame) and jumps to wait_resume, which clears IF
 * and returns to the C loop. The handlers clobber only RAX, which the caller of
 * wait_for_interrupt does not expect preserved.
 */
void wait_for_interrupt(void);
void lapic_isr(void);
void pit_isr(void);
void spurious_isr(void);
u64 wait_rsp;
__asm__(".text\n"
        ".globl wait_for_interrupt, lapic_isr, pit_isr, spurious_isr\n"
        "wait_for_interrupt:\n"
        "  mov %rsp, wait_rsp(%rip)\n"
        "  sti\n"
        "  hlt\n"
        "wait_resume:\n"
        "  cli\n"
        "  ret\n"
        "lapic_isr:\n"
        "  incl lapic_count(%rip)\n"
        "  mov $0xfee000b0, %eax\n" /* LAPIC EOI */
        "  movl $0, (%rax)\n"
        "  mov wait_rsp(%rip), %rsp\n"
        "  jmp wait_resume\n"
        "pit_isr:\n"
        "  incl pit_count(%rip)\n"
        "  mov $0xfee000b0, %eax\n"
        "  movl $0, (%rax)\n"
        "  mov wait_rsp(%rip), %rsp\n"
        "  jmp wait_resume\n"
        "spurious_isr:\n" /* no EOI for the spurious vector */
        "  mov wait_rsp(%rip), %rsp\n"
        "  jmp wait_resume\n");

static void ioapic_write(u32 reg, u32 v)
{
    mmio_write32(IOAPIC_BASE, reg);
    mmio_write32(IOAPIC_BASE + 0x10, v);
}

static u32 max_u32(u32 a, u32 b) { return a > b ? a : b; }

void guest_main(void)
{
    u32 lapic_target = 10, pit_target = 10;
    cmdline_u32("lapic", &lapic_target);
    cmdline_u32("pit", &pit_target);
    puts("timer: booted lapic=");
    put_dec(lapic_target);
    puts(" pit=");
    put_dec(pit_target);
    putc('\n');

    idt_set(VEC_PIT, pit_isr, 0);
    idt_set(VEC_LAPIC, lapic_isr, 0);
    idt_set(VEC_SPURIOUS, spurious_isr, 0);

    /* Mask both 8259s: the PIT must arrive through the IOAPIC. */
    outb(0x21, 0xff);
    outb(0xa1, 0xff);

    u32 bsp = mmio_read32(LAPIC_BASE + LAPIC_ID) >> 24;
    mmio_write32(LAPIC_BASE + LAPIC_SVR, 0x100 | VEC_SPURIOUS);
    mmio_write32(LAPIC_BASE + LAPIC_TPR, 0);
    mmio_write32(LAPIC_BASE + LAPIC_TIMER_DIV, 0x3); /* divide by 16 */
    mmio_write32(LAPIC_BASE + LAPIC_LVT_TIMER, (1u << 17) | VEC_LAPIC); /* periodic */
    mmio_write32(LAPIC_BASE + LAPIC_TIMER_INIT, LAPIC_INIT_COUNT);

    /* IOAPIC redirection entry for GSI 2: fixed, physical, edge, active high, unmasked. */
    ioapic_write(0x10 + 2 * PIT_GSI + 1, bsp << 24);
    ioapic_write(0x10 + 2 * PIT_GSI, VEC_PIT);

    outb(0x43, 0x34); /* channel 0, lobyte/hibyte, mode 2 (rate generator) */
    outb(0x40, PIT_RELOAD & 0xff);
    outb(0x40, PIT_RELOAD >> 8);

    /* Elapsed time is estimated from whichever source is firing; the timeout is 5 s plus
     * twice the expected run time. */
    u32 limit_ms = TIMEOUT_BASE_MS +
                   2 * max_u32(lapic_target * LAPIC_PERIOD_MS, pit_target * PIT_PERIOD_MS);
    for (;;) {
        wait_for_interrupt();
        u32 l = lapic_count, p = pit_count;
        if (l >= lapic_target && p >= pit_target)
            break;
        if (max_u32(l * LAPIC_PERIOD_MS, p * PIT_PERIOD_MS) >= limit_ms) {
            mmio_write32(LAPIC_BASE + LAPIC_TIMER_INIT, 0);
            if (l < lapic_target) {
                puts("timer: timeout waiting for lapic (");
                put_dec(l);
                puts(" of ");
                put_dec(lapic_target);
                puts(")\n");
            }
            if (p < pit_target) {
                puts("timer: timeout waiting for pit (");
                put_dec(p);
                puts(" of ");
                put_dec(pit_target);
                puts(")\n");
            }
            debug_exit(EXIT_TIMEOUT);
        }
    }
    /* Stop both sources before printing. */
    mmio_write32(LAPIC_BASE + LAPIC_TIMER_INIT, 0);
    ioapic_write(0x10 + 2 * PIT_GSI, 1u << 16);
    puts("timer: lapic=");
    put_dec(lapic_target);
    puts(" pit=");
    put_dec(pit_target);
    putc('\n');
    debug_exit(0);
}
