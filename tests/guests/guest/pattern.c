/*
 * pattern: the live-migration test guest (modelled on QEMU's migration-test guest).
 *
 * CPL0 part (emulated on the nested KVM, so it is kept short): parse the command line, check
 * the region, set up a TSS with an I/O permission bitmap and SYSEXIT to 64-bit CPL3 with
 * IF=0. CPL3 part (native speed): zero the first dword of every 4 KiB page of the region,
 * then for pass p = 1, 2, ... increment the first dword of every page and verify it equals p.
 * With fill=1 it first fills every byte of the region with non-zero data (the memory of a
 * busy guest, for the bulk-copy benchmark), and each pass also checks the second qword of
 * every page it rewrites; busy=N limits the passes to the region's first N MiB.
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

static uptr region_start, region_end, busy_end;
static u32 every, fill;

/* The fill value of the qword at `a`: never zero, different on every qword. */
static inline u64 fill_value(uptr a)
{
    return ((u64)a * 0x9e3779b97f4a7c15ull) | 1;
}

/* 64-bit TSS followed by the I/O permission bitmap (ports 0 to 0x60f). Ports past the end of
 * the bitmap (beyond the TSS limit) are denied. */

static u8 kstack[4096] __attribute__((aligned(16), section(".stack")));
static u8 ustack[8192] __attribute__((aligned(16), section(".stack")));

static struct tss tss __attribute__((aligned(128))) = {
    .rsp0 = (u64)(uptr)(kstack + sizeof(kstack)),
    .iomap_base = __builtin_offsetof(struct tss, iomap),
    .iomap =
        {
            [0 ... IOMAP_BYTES - 1] = 0xff,
            [0xf4 / 8] = 0xff & ~(1 << (0xf4 % 8)),   /* debug exit */
            [0x3f8 / 8] = 0x00,                       /* COM1 0x3f8-0x3ff */
            [0x604 / 8] = 0xff & ~(3 << (0x604 % 8)), /* PM1a_CNT (16-bit: 0x604, 0x605) */
        },
};

extern u64 gdt[];
void user_entry(void);
NORETURN void pattern_user_main(void);

NORETURN static void stale(uptr addr, u32 expected, u32 got)
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

/* Runs at CPL3, 64-bit mode, IF=0. */
NORETURN void pattern_user_main(void)
{
    volatile struct status *st = (volatile struct status *)(uptr)STATUS_ADDR;
    const uptr start = region_start, end = busy_end;
    const u32 k = every;
    uptr a;

    if (fill) {
        for (a = start; a != region_end; a += 8)
            *(volatile u64 *)a = fill_value(a);
        puts("pattern: filled\n");
    }
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
            if (fill && __builtin_expect(*(volatile u64 *)(a + 8) != fill_value(a + 8), 0))
                stale(a + 8, (u32)fill_value(a + 8), (u32) * (volatile u64 *)(a + 8));
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
        "  mov $0x33, %eax\n" /* SEL_UDATA */
        "  mov %eax, %ds\n"
        "  mov %eax, %es\n"
        "  mov %eax, %fs\n"
        "  mov %eax, %gs\n"
        "  call pattern_user_main\n");

void guest_main(void)
{
    u32 mib = 32, start = 4, k = 100, f = 0, busy = 0;
    cmdline_u32("mib", &mib);
    cmdline_u32("start", &start);
    cmdline_u32("every", &k);
    cmdline_u32("fill", &f);
    cmdline_u32("busy", &busy);
    if (busy == 0 || busy > mib)
        busy = mib;
    puts("pattern: booted mib=");
    put_dec(mib);
    puts(" start=");
    put_dec(start);
    puts(" every=");
    put_dec(k);
    putc('\n');

    u64 s = (u64)start << 20, len = (u64)mib << 20;
    u64 image_end = ((uptr)_end + 0xfffff) & ~0xfffffull;
    if (mib == 0 || s < image_end || s + len > 0xfec00000ull || !range_is_ram(s, len)) {
        puts("pattern: bad region start=");
        put_dec(start);
        puts(" mib=");
        put_dec(mib);
        puts(" (must be RAM above the guest image)\n");
        debug_exit(EXIT_BAD_CONFIG);
    }
    region_start = s;
    region_end = s + len;
    busy_end = s + ((u64)busy << 20);
    every = k;
    fill = f;

    volatile struct status *st = (volatile struct status *)(uptr)STATUS_ADDR;
    st->pass = 0;
    st->start_mib = start;
    st->mib = mib;
    st->magic = STATUS_MAGIC;

    /* 64-bit TSS descriptor (two GDT slots): base, limit, present, DPL0, available TSS. */
    u64 base = (uptr)&tss, limit = sizeof(tss) - 1;
    gdt[SEL_TSS / 8] = (limit & 0xffff) | ((base & 0xffffff) << 16) | (0x89ull << 40) |
                       (((limit >> 16) & 0xf) << 48) | (((base >> 24) & 0xff) << 56);
    gdt[SEL_TSS / 8 + 1] = base >> 32;
    __asm__ volatile("ltr %w0" : : "r"(SEL_TSS));

    /* Drop to CPL3 with IF=0. SYSEXIT rather than IRETQ: the nested KVM's instruction
     * emulator (all CPL0 code is emulated there) does not implement protected-mode IRET.
     * 64-bit SYSEXIT loads CS = IA32_SYSENTER_CS + 32 = 0x2b and SS = IA32_SYSENTER_CS + 40
     * = 0x33 (matching the GDT), RIP = RDX, RSP = RCX; RFLAGS is unchanged (IF=0). */
    __asm__ volatile("wrmsr" : : "c"(0x174), "a"(SEL_CODE32), "d"(0)); /* IA32_SYSENTER_CS */
    __asm__ volatile(".byte 0x48, 0x0f, 0x35" /* sysexitq */
                     :
                     : "c"((uptr)(ustack + sizeof(ustack))), "d"((uptr)user_entry)
                     : "memory");
    __builtin_unreachable();
}
