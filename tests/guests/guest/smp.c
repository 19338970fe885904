/* smp: brings up the application processors with INIT/SIPI/SIPI and counts them. */
#include "guest.h"

const char guest_name[] = "smp";

#define TRAMPOLINE_ADDR 0x8000u
#define LAPIC_ID 0x20
#define LAPIC_ICR_LO 0x300
#define LAPIC_ICR_HI 0x310
#define ICR_ALL_BUT_SELF (3u << 18)
#define ICR_ASSERT (1u << 14)
#define ICR_INIT (5u << 8)
#define ICR_STARTUP (6u << 8)
#define EXIT_TIMEOUT 2

extern const char smp_tramp_start[], smp_tramp_end[];
NORETURN void ap_main(void);

static volatile u32 print_lock;
static volatile u32 ap_count;

static void lock(void)
{
    while (__atomic_exchange_n(&print_lock, 1, __ATOMIC_ACQUIRE))
        while (print_lock)
            cpu_relax();
}

static void unlock(void) { __atomic_store_n(&print_lock, 0, __ATOMIC_RELEASE); }

static u32 apic_id(void) { return mmio_read32(LAPIC_BASE + LAPIC_ID) >> 24; }

NORETURN void ap_main(void)
{
    idt_load();
    u32 id = apic_id();
    lock();
    puts("smp: cpu apic=");
    put_dec(id);
    puts(" up\n");
    __atomic_add_fetch(&ap_count, 1, __ATOMIC_SEQ_CST);
    unlock();
    halt_forever();
}

static void delay_ticks(u32 ticks)
{
    u64 end = pit_clock_poll() + ticks;
    while (pit_clock_poll() < end)
        ;
}

static void send_ipi(u32 icr)
{
    mmio_write32(LAPIC_BASE + LAPIC_ICR_HI, 0);
    mmio_write32(LAPIC_BASE + LAPIC_ICR_LO, icr);
}

void guest_main(void)
{
    u32 cpus = 2, timeout_s = 10;
    cmdline_u32("cpus", &cpus);
    cmdline_u32("timeout", &timeout_s);
    if (cpus == 0)
        cpus = 1;
    puts("smp: booted cpus=");
    put_dec(cpus);
    puts(" timeout=");
    put_dec(timeout_s);
    puts("\nsmp: bsp apic=");
    put_dec(apic_id());
    putc('\n');

    /* Mask the 8259s; the PIT is used only as a clock here. */
    outb(0x21, 0xff);
    outb(0xa1, 0xff);
    pit_clock_start();

    if (cpus > 1) {
        memcpy((void *)(uptr)TRAMPOLINE_ADDR, smp_tramp_start, (uptr)(smp_tramp_end - smp_tramp_start));
        send_ipi(ICR_ALL_BUT_SELF | ICR_ASSERT | ICR_INIT);
        delay_ticks(PIT_HZ / 100); /* 10 ms */
        send_ipi(ICR_ALL_BUT_SELF | ICR_ASSERT | ICR_STARTUP | (TRAMPOLINE_ADDR >> 12));
        delay_ticks(PIT_HZ / 5000); /* 200 us */
        send_ipi(ICR_ALL_BUT_SELF | ICR_ASSERT | ICR_STARTUP | (TRAMPOLINE_ADDR >> 12));

        u64 deadline = pit_clock_poll() + (u64)timeout_s * PIT_HZ;
        while (__atomic_load_n(&ap_count, __ATOMIC_ACQUIRE) < cpus - 1) {
            if (pit_clock_poll() >= deadline) {
                lock();
                puts("smp: timeout ");
                put_dec(ap_count + 1);
                puts(" of ");
                put_dec(cpus);
                putc('\n');
                debug_exit(EXIT_TIMEOUT);
            }
        }
    }
    lock();
    puts("smp: all ");
    put_dec(cpus);
    puts(" cpus up\n");
    debug_exit(0);
}
