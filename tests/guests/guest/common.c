/* Shared runtime for the tiny test guests: boot info, console, exits, command line, IDT. */
#include "guest.h"

#define HVM_START_MAGIC 0x336ec578u
#define CMDLINE_MAX 1024

char boot_cmdline[CMDLINE_MAX];
u32 boot_memmap_entries;
struct memmap_entry boot_memmap[MAX_MEMMAP];

struct idt_entry {
    u16 off_lo;
    u16 sel;
    u8 ist;
    u8 type;
    u16 off_mid;
    u32 off_hi;
    u32 reserved;
} __attribute__((packed));

static struct idt_entry idt[256] __attribute__((aligned(16)));
static struct {
    u16 pad[3];
    u16 limit;
    u64 base;
} __attribute__((packed, aligned(8))) idt_desc = {{0, 0, 0}, sizeof(idt) - 1, (u64)(uptr)idt};

extern void *exc_stub_table[32];

void *memcpy(void *dst, const void *src, uptr n)
{
    u8 *d = dst;
    const u8 *s = src;
    while (n--)
        *d++ = *s++;
    return dst;
}

void *memset(void *dst, int c, uptr n)
{
    u8 *d = dst;
    while (n--)
        *d++ = (u8)c;
    return dst;
}

void putc(char c) { outb(COM1, (u8)c); }

void puts(const char *s)
{
    while (*s)
        outb(COM1, (u8)*s++);
}

void put_dec(u32 v)
{
    char buf[12];
    int i = 0;
    do {
        buf[i++] = (char)('0' + v % 10);
        v /= 10;
    } while (v);
    while (i)
        putc(buf[--i]);
}

void put_hex(u64 v)
{
    char buf[16];
    int i = 0;
    do {
        buf[i++] = "0123456789abcdef"[v & 15];
        v >>= 4;
    } while (v);
    putc('0');
    putc('x');
    while (i)
        putc(buf[--i]);
}

void put_prefix(void)
{
    puts(guest_name);
    puts(": ");
}

NORETURN void halt_forever(void)
{
    if (current_cpl() == 3) {
        /* cli/hlt would fault at CPL3. */
        for (;;)
            cpu_relax();
    }
    for (;;)
        __asm__ volatile("cli; hlt");
}

NORETURN void power_off(void)
{
    outw(PM1A_CNT_PORT, PM1A_POWEROFF);
    halt_forever();
}

NORETURN void debug_exit(u8 code)
{
    outb(DEBUG_EXIT_PORT, code);
    /* Without a debug-exit device the write is ignored: power off instead. */
    power_off();
}

static int parse_u32(const char *s, u32 *out)
{
    u32 v = 0;
    int any = 0;
    if (s[0] == '0' && (s[1] == 'x' || s[1] == 'X')) {
        s += 2;
        for (; *s && *s != ' '; s++) {
            u32 d;
            if (*s >= '0' && *s <= '9')
                d = (u32)(*s - '0');
            else if (*s >= 'a' && *s <= 'f')
                d = (u32)(*s - 'a' + 10);
            else if (*s >= 'A' && *s <= 'F')
                d = (u32)(*s - 'A' + 10);
            else
                return 0;
            if (v > 0x0fffffffu)
                return 0;
            v = (v << 4) | d;
            any = 1;
        }
    } else {
        for (; *s && *s != ' '; s++) {
            if (*s < '0' || *s > '9')
                return 0;
            u32 d = (u32)(*s - '0');
            if (v > (0xffffffffu - d) / 10)
                return 0;
            v = v * 10 + d;
            any = 1;
        }
    }
    if (!any)
        return 0;
    *out = v;
    return 1;
}

int cmdline_u32(const char *key, u32 *out)
{
    const char *p = boot_cmdline;
    while (*p) {
        while (*p == ' ')
            p++;
        const char *w = p;
        const char *k = key;
        while (*k && *w == *k) {
            w++;
            k++;
        }
        if (!*k && *w == '=')
            return parse_u32(w + 1, out);
        while (*p && *p != ' ')
            p++;
    }
    return 0;
}

int range_is_ram(u64 start, u64 len)
{
    if (boot_memmap_entries == 0)
        return 1;
    for (u32 i = 0; i < boot_memmap_entries; i++) {
        const struct memmap_entry *e = &boot_memmap[i];
        if (e->type == 1 && start >= e->addr && start + len <= e->addr + e->size)
            return 1;
    }
    return 0;
}

void idt_set(u32 vec, void *handler, u32 dpl)
{
    uptr h = (uptr)handler;
    idt[vec].off_lo = (u16)h;
    idt[vec].sel = SEL_CODE64;
    idt[vec].ist = 0;
    idt[vec].type = (u8)(0x8e | (dpl << 5)); /* present, 64-bit interrupt gate */
    idt[vec].off_mid = (u16)(h >> 16);
    idt[vec].off_hi = (u32)(h >> 32);
    idt[vec].reserved = 0;
}

void idt_load(void) { __asm__ volatile("lidt %0" : : "m"(idt_desc.limit)); }

/* Called from exc_common with a pointer to {vector, error code, rip, cs, rflags, rsp, ss}. */
NORETURN void exception_handler(const u64 *frame);
NORETURN void exception_handler(const u64 *frame)
{
    putc('\n');
    put_prefix();
    puts("exception vec=");
    put_dec((u32)frame[0]);
    puts(" err=");
    put_hex(frame[1]);
    puts(" rip=");
    put_hex(frame[2]);
    puts(" cs=");
    put_hex(frame[3]);
    putc('\n');
    debug_exit(EXIT_EXCEPTION);
}

static u16 pit_last;
static u64 pit_total;

static u16 pit_read(void)
{
    outb(0x43, 0x00); /* latch channel 0 */
    u16 lo = inb(0x40);
    u16 hi = inb(0x40);
    return (u16)(lo | (hi << 8));
}

void pit_clock_start(void)
{
    outb(0x43, 0x34); /* channel 0, lobyte/hibyte, mode 2, binary */
    outb(0x40, 0);
    outb(0x40, 0); /* reload 65536 */
    pit_total = 0;
    pit_last = pit_read();
}

u64 pit_clock_poll(void)
{
    u16 now = pit_read();
    pit_total += (u16)(pit_last - now); /* the counter counts down, modulo 65536 */
    pit_last = now;
    return pit_total;
}

NORETURN void boot_main(u32 start_info);
NORETURN void boot_main(u32 start_info)
{
    const volatile u8 *si = (const volatile u8 *)(uptr)start_info;
    int bad_magic = 1;
    if (start_info && *(const volatile u32 *)si == HVM_START_MAGIC) {
        bad_magic = 0;
        u32 version = *(const volatile u32 *)(si + 4);
        u32 cmdline = *(const volatile u32 *)(si + 24);
        u32 cmdline_hi = *(const volatile u32 *)(si + 28);
        if (cmdline && !cmdline_hi) {
            const volatile char *c = (const volatile char *)(uptr)cmdline;
            u32 i = 0;
            while (i < CMDLINE_MAX - 1 && c[i]) {
                boot_cmdline[i] = c[i];
                i++;
            }
            boot_cmdline[i] = 0;
        }
        if (version >= 1) {
            u32 map = *(const volatile u32 *)(si + 40);
            u32 map_hi = *(const volatile u32 *)(si + 44);
            u32 n = *(const volatile u32 *)(si + 48);
            if (map && !map_hi) {
                if (n > MAX_MEMMAP)
                    n = MAX_MEMMAP;
                memcpy(boot_memmap, (const void *)(uptr)map, n * sizeof(struct memmap_entry));
                boot_memmap_entries = n;
            }
        }
    }
    for (u32 v = 0; v < 32; v++)
        idt_set(v, exc_stub_table[v], 0);
    idt_load();
    if (bad_magic) {
        put_prefix();
        puts("warning: no hvm_start_info (bad magic), empty command line\n");
    }
    guest_main();
    power_off();
}

int cmdline_has(const char *word)
{
    const char *p = boot_cmdline;
    while (*p) {
        while (*p == ' ')
            p++;
        const char *w = p;
        const char *k = word;
        while (*k && *w == *k) {
            w++;
            k++;
        }
        if (!*k && (*w == ' ' || *w == 0))
            return 1;
        while (*p && *p != ' ')
            p++;
    }
    return 0;
}
