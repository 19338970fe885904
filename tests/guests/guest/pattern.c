/*
 * pattern: the live-migration test guest (modelled on QEMU's migration-test guest).
 *
 * CPL0 part (emulated on the nested KVM, so it is kept short): parse the command line, check
 * the region, set up a TSS with an I/O permission bitmap and SYSEXIT to CPL3 with IF=0.
 * CPL3 part (native speed): zero the first dword of every 4 KiB page of the region, then for
 * pass p = 1, 2, ... increment the first dword of every page and verify it equals p.
 */
#include "guest.h"

const char guest_name[] = "pattern";

/* Fixed status block, see README.md and test_guests::PATTERN_STATUS_ADDR. */
#define STATUS_ADDR 0x3000u
#define STATUS_MAGIC 0x50415454u /* "PATT" */
struct status {
    u32 magic;     /* STATUS_MAGIC once the guest has parsed its configuration */
    u32 pass;      /* pass in progress (0 while zeroing) */
    u32 start_mib; /* region start, MiB */
    u32 mib;       /* region size, MiB */
};

#define PAGE 4096u
#define EXIT_STALE 3
#define EXIT_BAD_CONFIG 2

static u32 region_start, region_end, every;

/* 32-bit TSS followed by the I/O permission bitmap (ports 0 to 0x60f). Ports past the end of
 * the bitmap (beyond the TSS limit) are denied. */
struct tss {
    u32 link, esp0, ss0, esp1, ss1, esp2, ss2, cr3, eip, eflags;
    u32 eax, ecx, edx, ebx, esp, ebp, esi, edi;
    u32 es, cs, ss, ds, fs, gs, ldt;
    u16 trap, iomap_base;
    u8 iomap[0x610 / 8 + 1];
} __attribute__((packed));

static u8 kstack[4096] __attribute__((aligned(16), section(".stack")));
static u8 ustack[8192] __attribute__((aligned(16), section(".stack")));

static struct tss tss __attribute__((aligned(128))) = {
    .esp0 = (u32)(kstack + sizeof(kstack)),
    .ss0 = SEL_DATA0,
    .iomap_base = __builtin_offsetof(struct tss, iomap),
    .iomap =
        {
            [0 ... 0x610 / 8] = 0xff,
            [0xf4 / 8] = 0xff & ~(1 << (0xf4 % 8)),  /* debug exit */
            [0x3f8 / 8] = 0x00,                      /* COM1 0x3f8-0x3ff */
            [0x604 / 8] = 0xff & ~(3 << (0x604 % 8)), /* PM1a_CNT (16-bit: 0x604, 0x605) */
        },
};

extern u64 gdt[];
void user_entry(void);
NORETURN void pattern_user_main(void);

NORETURN static void stale(u32 addr, u32 expected, u32 got)
{
    puts("\nSTALE page=");
    put_hex(addr);
    puts(" expected=");
    put_dec(expected);
    puts(" got=");
    put_dec(got);
    putc('\n');
    debug_exit(EXIT_STALE);
}

NORETURN void pattern_user_main(void)
{
    volatile struct status *st = (volatile struct status *)STATUS_ADDR;
    const u32 start = region_start, end = region_end, k = every;
    u32 a;

    for (a = start; a != end; a += PAGE)
        *(volatile u32 *)a = 0;
    for (u32 p = 1;; p++) {
        st->pass = p;
        for (a = start; a != end; a += PAGE)
            (*(volatile u32 *)a)++;
        for (a = start; a != end; a += PAGE) {
            u32 v = *(volatile u32 *)a;
            if (__builtin_expect(v != p, 0))
                stale(a, p, v);
        }
        putc('B');
        if (k && p % k == 0) {
            puts("\npass=");
            put_dec(p);
            putc('\n');
        }
    }
}

__asm__(".text\n"
        ".globl user_entry\n"
        "user_entry:\n"
        "  mov $0x23, %eax\n"
        "  mov %eax, %ds\n"
        "  mov %eax, %es\n"
        "  mov %eax, %fs\n"
        "  mov %eax, %gs\n"
        "  call pattern_user_main\n");

void guest_main(void)
{
    u32 mib = 32, start = 4, k = 100;
    cmdline_u32("mib", &mib);
    cmdline_u32("start", &start);
    cmdline_u32("every", &k);
    puts("pattern: booted mib=");
    put_dec(mib);
    puts(" start=");
    put_dec(start);
    puts(" every=");
    put_dec(k);
    putc('\n');

    u64 s = (u64)start << 20, len = (u64)mib << 20;
    u32 image_end = ((u32)_end + 0xfffff) & ~0xfffffu;
    if (mib == 0 || s < image_end || s + len > 0xfec00000ull || !range_is_ram(s, len)) {
        puts("pattern: bad region start=");
        put_dec(start);
        puts(" mib=");
        put_dec(mib);
        puts(" (must be RAM above the guest image)\n");
        debug_exit(EXIT_BAD_CONFIG);
    }
    region_start = (u32)s;
    region_end = (u32)(s + len);
    every = k;

    volatile struct status *st = (volatile struct status *)STATUS_ADDR;
    st->pass = 0;
    st->start_mib = start;
    st->mib = mib;
    st->magic = STATUS_MAGIC;

    /* TSS descriptor: base, limit, present, DPL0, 32-bit available TSS. */
    u32 base = (u32)&tss, limit = sizeof(tss) - 1;
    gdt[SEL_TSS / 8] = (u64)(limit & 0xffff) | ((u64)(base & 0xffffff) << 16) | (0x89ull << 40) |
                       ((u64)((limit >> 16) & 0xf) << 48) | ((u64)(base >> 24) << 56);
    __asm__ volatile("ltr %w0" : : "r"(SEL_TSS));

    /* Drop to CPL3 with IF=0. SYSEXIT rather than IRET: the nested KVM's instruction
     * emulator (all CPL0 code is emulated there) does not implement protected-mode IRET.
     * SYSEXIT loads CS = SYSENTER_CS + 16 = 0x1b and SS = SYSENTER_CS + 24 = 0x23
     * (flat, DPL3, matching the GDT), EIP = EDX, ESP = ECX; EFLAGS is unchanged (IF=0). */
    __asm__ volatile("wrmsr" : : "c"(0x174), "a"(SEL_CODE0), "d"(0)); /* IA32_SYSENTER_CS */
    __asm__ volatile("sysexit"
                     :
                     : "c"((u32)(ustack + sizeof(ustack))), "d"((u32)user_entry)
                     : "memory");
    __builtin_unreachable();
}
