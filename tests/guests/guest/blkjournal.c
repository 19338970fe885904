/*
 * blkjournal: keeps a journal on a virtio-blk disk (modern virtio-pci, polled, no interrupts).
 *
 * CPL0 part (emulated on the nested KVM, kept short): parse the command line, set up a TSS
 * whose I/O bitmap allows COM1, the debug-exit port, PM1a_CNT and the PIT, and SYSEXIT to
 * 64-bit CPL3. CPL3 part (native speed): find the device through ECAM, initialise it, read
 * the whole disk and verify the journal, then append one record per interval, flushing
 * after each. See README.md for the record format and the output.
 */
#include "guest.h"

const char guest_name[] = "blkjournal";

#define EXIT_NO_DEVICE 2
#define EXIT_CORRUPT 3
#define EXIT_IO 5

#define SECTOR 512u
#define REC_MAGIC 0x4e524a42u /* "BJRN" */
#define READ_SECTORS 64u      /* sectors per read request while verifying */

#define VIRTIO_BLK_T_IN 0u
#define VIRTIO_BLK_T_OUT 1u
#define VIRTIO_BLK_T_FLUSH 4u
#define VIRTIO_BLK_F_RO 5u
#define VIRTIO_BLK_F_FLUSH 9u

/* Room for BENCH_MAX_DEPTH requests of three descriptors each. */
#define QSIZE 32u
#include "virtio.h"

struct blk_req_hdr {
    u32 type;
    u32 ioprio;
    u64 sector;
};

static struct rings rings __attribute__((aligned(4096)));
static struct blk_req_hdr req_hdr __attribute__((aligned(16)));
static volatile u8 req_status;
static u8 buf[READ_SECTORS * SECTOR] __attribute__((aligned(4096)));

static uptr common, notify_addr, devcfg;
static u16 last_used;
static u32 event_idx, msix;
static u32 count, interval_ms, disk_index, bench_on, bench_kib, bench_depth, bench_verify;

/* 64-bit TSS followed by the I/O permission bitmap (ports 0 to 0x60f). */

static u8 kstack[4096] __attribute__((aligned(16), section(".stack")));
static u8 ustack[16384] __attribute__((aligned(16), section(".stack")));

static struct tss tss __attribute__((aligned(128))) = {
    .rsp0 = (u64)(uptr)(kstack + sizeof(kstack)),
    .iomap_base = __builtin_offsetof(struct tss, iomap),
    .iomap =
        {
            [0 ... IOMAP_BYTES - 1] = 0xff,
            [0x40 / 8] = 0xf0,                        /* PIT 0x40-0x43 */
            [0xf4 / 8] = 0xff & ~(1 << (0xf4 % 8)),   /* debug exit */
            [0x3f8 / 8] = 0x00,                       /* COM1 0x3f8-0x3ff */
            [0x604 / 8] = 0xff & ~(3 << (0x604 % 8)), /* PM1a_CNT (16-bit) */
        },
};

extern u64 gdt[];
void user_entry(void);
NORETURN void blkjournal_user_main(void);


static void prefix(void) { puts("blkjournal: "); }

NORETURN static void fail(const char *msg, u8 code)
{
    prefix();
    puts(msg);
    putc('\n');
    debug_exit(code);
}

/* FNV-1a over n bytes. */
static u32 checksum(const u8 *p, u32 n)
{
    u32 h = 2166136261u;
    for (u32 i = 0; i < n; i++) {
        h ^= p[i];
        h *= 16777619u;
    }
    return h;
}

static u32 rd32(const u8 *p) { return (u32)p[0] | (u32)p[1] << 8 | (u32)p[2] << 16 | (u32)p[3] << 24; }
static void wr32(u8 *p, u32 v)
{
    p[0] = (u8)v;
    p[1] = (u8)(v >> 8);
    p[2] = (u8)(v >> 16);
    p[3] = (u8)(v >> 24);
}

/* Record layout in one sector: magic, seq, 500 payload bytes, FNV-1a of bytes 0..507. */
static void make_record(u8 *s, u32 seq)
{
    wr32(s, REC_MAGIC);
    wr32(s + 4, seq);
    for (u32 i = 8; i < SECTOR - 4; i++)
        s[i] = (u8)(seq * 31u + i);
    wr32(s + SECTOR - 4, checksum(s, SECTOR - 4));
}

static int is_blank(const u8 *s)
{
    for (u32 i = 0; i < SECTOR; i++)
        if (s[i])
            return 0;
    return 1;
}

static const char *op_name(u32 type)
{
    return type == VIRTIO_BLK_T_IN ? "read" : type == VIRTIO_BLK_T_OUT ? "write" : "flush";
}

/* One request, completed synchronously by the device at the notify write; polls the used ring. */
static void blk_request(u32 type, u64 sector, void *data, u32 len)
{
    req_hdr.type = type;
    req_hdr.ioprio = 0;
    req_hdr.sector = sector;
    req_status = 0xff;
    struct vring_desc *d = rings.desc;
    d[0].addr = (u64)(uptr)&req_hdr;
    d[0].len = sizeof(req_hdr);
    d[0].flags = VRING_DESC_F_NEXT;
    u16 st = 1;
    if (len) {
        d[1].addr = (u64)(uptr)data;
        d[1].len = len;
        d[1].flags = VRING_DESC_F_NEXT | (type == VIRTIO_BLK_T_IN ? VRING_DESC_F_WRITE : 0);
        d[0].next = 1;
        d[1].next = 2;
        st = 2;
    } else {
        d[0].next = 1;
    }
    d[st].addr = (u64)(uptr)&req_status;
    d[st].len = 1;
    d[st].flags = VRING_DESC_F_WRITE;
    d[st].next = 0;
    u16 idx = rings.avail_idx;
    rings.avail_ring[idx % QSIZE] = 0;
    barrier();
    *(volatile u16 *)&rings.avail_idx = (u16)(idx + 1);
    virtio_mb();
    if (!event_idx || vring_need_event(*(volatile u16 *)&rings.avail_event, (u16)(idx + 1), idx))
        mmio_write16(notify_addr, 0);
    while (*(volatile u16 *)&rings.used_idx == last_used)
        cpu_relax();
    last_used++;
    barrier();
    if (req_status != 0) {
        prefix();
        puts("io error status=");
        put_dec(req_status);
        puts(" op=");
        puts(op_name(type));
        puts(" sector=");
        put_dec((u32)sector);
        putc('\n');
        debug_exit(EXIT_IO);
    }
}


/* Finds the disk_index-th virtio-blk on bus 0, maps its capabilities, initialises queue 0.
 * Returns the device features (low 32 bits). */
static u32 virtio_init(u64 *capacity)
{
    u32 found = 0, slot = 0;
    for (u32 dev = 0; dev < 32; dev++) {
        if (ecam_read32(dev, 0) == 0x10421af4u && found++ == disk_index) {
            slot = dev;
            break;
        }
    }
    if (!slot)
        fail("no virtio-blk device", EXIT_NO_DEVICE);
    u32 bar0 = ecam_read32(slot, 0x10) & ~0xfu;
    mmio_write32(ECAM_BASE + (slot << 15) + 4, 0x6); /* memory space, bus master */
    u32 notify_mult = 0;
    uptr notify_base = 0;
    for (u32 cap = ecam_read32(slot, 0x34) & 0xff; cap; cap = (ecam_read32(slot, cap) >> 8) & 0xff) {
        u32 head = ecam_read32(slot, cap);
        if ((head & 0xff) != 0x09)
            continue;
        /* The BAR the capability names: BAR0 here, BAR4 on QEMU. */
        uptr where = bar_addr(slot, ecam_read32(slot, cap + 4) & 0xff) + ecam_read32(slot, cap + 8);
        switch ((head >> 24) & 0xff) {
        case 1:
            common = where;
            break;
        case 2:
            notify_base = where;
            notify_mult = ecam_read32(slot, cap + 16);
            break;
        case 4:
            devcfg = where;
            break;
        }
    }
    if (!common || !notify_base || !devcfg)
        fail("virtio capabilities missing", EXIT_NO_DEVICE);
    prefix();
    puts("virtio-blk at slot ");
    put_dec(slot);
    puts(" bar0=");
    put_hex(bar0);
    putc('\n');

    mmio_write8(common + C_STATUS, 0);
    mmio_write8(common + C_STATUS, 1 | 2); /* ACKNOWLEDGE | DRIVER */
    mmio_write32(common + C_DFSEL, 0);
    u32 f = mmio_read32(common + C_DF);
    mmio_write32(common + C_DFSEL, 1);
    if (!(mmio_read32(common + C_DF) & 1))
        fail("device is not virtio 1.x", EXIT_NO_DEVICE);
    mmio_write32(common + C_GFSEL, 0);
    /* EVENT_IDX unless `event_idx=0`: notify only when the device asked to hear of it. */
    u32 want = 1u << VIRTIO_BLK_F_FLUSH | 1u << VIRTIO_BLK_F_RO;
    if (!cmdline_has("event_idx=0"))
        want |= 1u << VIRTIO_RING_F_EVENT_IDX;
    mmio_write32(common + C_GF, f & want);
    event_idx = (f & want & (1u << VIRTIO_RING_F_EVENT_IDX)) != 0;
    mmio_write32(common + C_GFSEL, 1);
    mmio_write32(common + C_GF, 1); /* VERSION_1 */
    mmio_write8(common + C_STATUS, 1 | 2 | 8);
    if (!(mmio_read8(common + C_STATUS) & 8))
        fail("device refused features", EXIT_NO_DEVICE);
    mmio_write16(common + C_QSEL, 0);
    mmio_write16(common + C_QSIZE, QSIZE);
    mmio_write32(common + C_QDESC, (u32)(uptr)rings.desc);
    mmio_write32(common + C_QDESC + 4, 0);
    mmio_write32(common + C_QDRIVER, (u32)(uptr)&rings.avail_flags);
    mmio_write32(common + C_QDRIVER + 4, 0);
    mmio_write32(common + C_QDEVICE, (u32)(uptr)&rings.used_flags);
    mmio_write32(common + C_QDEVICE + 4, 0);
    notify_addr = notify_base + mmio_read16(common + C_QNOTIFY_OFF) * notify_mult;
    mmio_write16(common + C_QENABLE, 1);
    /* MSI-X unless `msix=0` (completions are still polled: interrupts stay off). */
    msix = !cmdline_has("msix=0") && msix_enable(slot, common, 1, 0x40);
    mmio_write8(common + C_STATUS, 1 | 2 | 8 | 4); /* DRIVER_OK */
    if (mmio_read8(common + C_STATUS) & 0x40)
        fail("device needs reset", EXIT_NO_DEVICE);
    *capacity = (u64)mmio_read32(devcfg) | (u64)mmio_read32(devcfg + 4) << 32;
    prefix();
    puts("virtio msix=");
    put_dec(msix);
    puts(" event_idx=");
    put_dec(event_idx);
    putc('\n');
    return f;
}

/* Benchmark mode (`bench=seqw|seqr|randw|randr|all`): `count` requests (default 8192) of
 * `bs_kib` KiB (default 4) per mode, `depth` of them in flight (default 1), over the whole
 * disk (sequential: block i modulo the number of blocks; random: xorshift32 from a fixed
 * seed). Write modes end with one FLUSH, inside the timed part. Each mode prints
 * `blkbench: <mode> start`, then `blkbench: <mode> <n> requests <bytes> bytes tsc=<cycles>`;
 * the host times the two lines (and may cross-check with the TSC delta). With `verify=1`,
 * every write carries a pattern derived from its block number and every read is checked
 * against it (outside the benchmark's timing purpose: it costs guest CPU per request).
 * The journal is overwritten.
 *
 * The request buffers (one per request in flight) live at BENCH_BUF_BASE, outside the
 * image: a 1 MiB request size times 8 would make the ELF (whose .bss is in the file) 8 MiB
 * larger. The region ends at 16 MiB, so the guest needs at least that much RAM. */
#define BENCH_DEFAULT_KIB 4u
#define BENCH_MAX_BYTES (8u << 20)
#define BENCH_MAX_DEPTH 8u
#define BENCH_DEFAULT_COUNT 8192u
#define BENCH_BUF_BASE 0x800000u

static struct blk_req_hdr bench_hdr[BENCH_MAX_DEPTH] __attribute__((aligned(16)));
static volatile u8 bench_status[BENCH_MAX_DEPTH];
static u32 bench_block[BENCH_MAX_DEPTH];

static void put_dec64(u64 v)
{
    char d[20];
    int n = 0;
    do {
        d[n++] = (char)('0' + v % 10);
        v /= 10;
    } while (v);
    while (n)
        putc(d[--n]);
}

static inline u64 rdtsc(void)
{
    u32 lo, hi;
    __asm__ volatile("lfence; rdtsc" : "=a"(lo), "=d"(hi)::"memory");
    return (u64)hi << 32 | lo;
}

static u8 *bench_buf(u32 slot) { return (u8 *)(uptr)(BENCH_BUF_BASE + slot * bench_kib * 1024u); }

/* The verify pattern of 8-byte word `w` of block `b`: never zero, so a block never written
 * (a sparse hole) does not pass. */
static u64 bench_word(u32 b, u32 w) { return ((u64)(b + 1) << 32 | w) ^ 0x5a5a5a5a00000000ull; }

static void bench_fill(u32 slot, u32 b)
{
    u64 *p = (u64 *)bench_buf(slot);
    for (u32 w = 0; w < bench_kib * 128u; w++)
        p[w] = bench_word(b, w);
}

static void bench_check(u32 slot)
{
    const u64 *p = (const u64 *)bench_buf(slot);
    u32 b = bench_block[slot];
    for (u32 w = 0; w < bench_kib * 128u; w++) {
        if (p[w] != bench_word(b, w)) {
            puts("blkbench: verify failed at block ");
            put_dec(b);
            puts(" word ");
            put_dec(w);
            putc('\n');
            debug_exit(EXIT_CORRUPT);
        }
    }
}

/* Post the request of `slot` (descriptors 3 * slot ..+2) for block `b`; notify the device
 * when it asks to hear of it. */
static void bench_submit(u32 slot, u32 write, u32 b)
{
    u32 bytes = bench_kib * 1024u;
    u16 h = (u16)(slot * 3);
    struct vring_desc *d = rings.desc;
    bench_block[slot] = b;
    if (bench_verify && write)
        bench_fill(slot, b);
    bench_hdr[slot].type = write ? VIRTIO_BLK_T_OUT : VIRTIO_BLK_T_IN;
    bench_hdr[slot].ioprio = 0;
    bench_hdr[slot].sector = (u64)b * (bytes / SECTOR);
    bench_status[slot] = 0xff;
    d[h].addr = (u64)(uptr)&bench_hdr[slot];
    d[h].len = sizeof(bench_hdr[slot]);
    d[h].flags = VRING_DESC_F_NEXT;
    d[h].next = (u16)(h + 1);
    d[h + 1].addr = (u64)(uptr)bench_buf(slot);
    d[h + 1].len = bytes;
    d[h + 1].flags = VRING_DESC_F_NEXT | (write ? 0 : VRING_DESC_F_WRITE);
    d[h + 1].next = (u16)(h + 2);
    d[h + 2].addr = (u64)(uptr)&bench_status[slot];
    d[h + 2].len = 1;
    d[h + 2].flags = VRING_DESC_F_WRITE;
    d[h + 2].next = 0;
    u16 idx = rings.avail_idx;
    rings.avail_ring[idx % QSIZE] = h;
    barrier();
    *(volatile u16 *)&rings.avail_idx = (u16)(idx + 1);
    virtio_mb();
    if (!event_idx || vring_need_event(*(volatile u16 *)&rings.avail_event, (u16)(idx + 1), idx))
        mmio_write16(notify_addr, 0);
}

/* Wait for the next completion; returns its slot after checking its status (and, with
 * `verify=1`, a read's data). */
static u32 bench_reap(u32 write)
{
    while (*(volatile u16 *)&rings.used_idx == last_used)
        cpu_relax();
    barrier();
    u32 id = rings.used_ring[last_used % QSIZE].id;
    last_used++;
    u32 slot = id / 3;
    if (id % 3 || slot >= bench_depth)
        fail("bench: the device completed an unknown descriptor", EXIT_IO);
    if (bench_status[slot] != 0) {
        prefix();
        puts("io error status=");
        put_dec(bench_status[slot]);
        puts(" op=");
        puts(op_name(write ? VIRTIO_BLK_T_OUT : VIRTIO_BLK_T_IN));
        puts(" block=");
        put_dec(bench_block[slot]);
        putc('\n');
        debug_exit(EXIT_IO);
    }
    if (bench_verify && !write)
        bench_check(slot);
    return slot;
}

/* The block of request number `i`: sequential, or the next xorshift32 value. */
static u32 bench_next(u32 random, u32 *x, u32 i, u32 blocks)
{
    if (!random)
        return i % blocks;
    *x ^= *x << 13;
    *x ^= *x >> 17;
    *x ^= *x << 5;
    return *x % blocks;
}

static void bench_mode(const char *name, u32 write, u32 random, u64 capacity, u32 flush)
{
    u32 bytes = bench_kib * 1024u;
    u32 blocks = (u32)(capacity / (bytes / SECTOR));
    u32 n = count ? count : BENCH_DEFAULT_COUNT;
    u32 x = 0x2545f491u;
    if (!blocks)
        fail("bench: disk smaller than one request", EXIT_NO_DEVICE);
    for (u32 s = 0; s < bench_depth; s++)
        for (u32 i = 0; i < bytes; i++)
            bench_buf(s)[i] = (u8)(i * 7u + write);
    puts("blkbench: ");
    puts(name);
    puts(" start\n");
    u64 t0 = rdtsc();
    /* Fill every slot once, then refill each slot as its request completes. */
    u32 posted = 0;
    for (u32 s = 0; s < bench_depth && posted < n; s++, posted++)
        bench_submit(s, write, bench_next(random, &x, posted, blocks));
    for (u32 done = 0; done < n; done++) {
        u32 slot = bench_reap(write);
        if (posted < n) {
            bench_submit(slot, write, bench_next(random, &x, posted, blocks));
            posted++;
        }
    }
    if (write && flush)
        blk_request(VIRTIO_BLK_T_FLUSH, 0, 0, 0);
    u64 t1 = rdtsc();
    puts("blkbench: ");
    puts(name);
    putc(' ');
    put_dec(n);
    puts(" requests ");
    put_dec64((u64)n * bytes);
    puts(" bytes tsc=");
    put_dec64(t1 - t0);
    putc('\n');
    if (bench_verify && !write) {
        puts("blkbench: ");
        puts(name);
        puts(" verified ");
        put_dec(n);
        puts(" requests\n");
    }
}

NORETURN static void bench(u64 capacity, u32 features)
{
    u32 all = cmdline_has("bench=all");
    u32 flush = (features & (1u << VIRTIO_BLK_F_FLUSH)) != 0;
    /* bs_kib: a whole number of 4 KiB pages (so that the verify words and the sectors
     * line up), depth: 1 to BENCH_MAX_DEPTH, all buffers inside their region. */
    if (!bench_kib || bench_kib % 4 || !bench_depth || bench_depth > BENCH_MAX_DEPTH ||
        (u64)bench_kib * 1024u * bench_depth > BENCH_MAX_BYTES)
        fail("bench: bs_kib must be a multiple of 4 and depth 1 to 8, bs_kib * depth <= 8192",
             EXIT_NO_DEVICE);
    if ((uptr)_end > BENCH_BUF_BASE)
        fail("bench: the image overlaps the request buffers", EXIT_NO_DEVICE);
    puts("blkbench: bs_kib=");
    put_dec(bench_kib);
    puts(" depth=");
    put_dec(bench_depth);
    puts(" verify=");
    put_dec(bench_verify);
    putc('\n');
    if (all || cmdline_has("bench=seqw"))
        bench_mode("seqw", 1, 0, capacity, flush);
    if (all || cmdline_has("bench=seqr"))
        bench_mode("seqr", 0, 0, capacity, flush);
    if (all || cmdline_has("bench=randw"))
        bench_mode("randw", 1, 1, capacity, flush);
    if (all || cmdline_has("bench=randr"))
        bench_mode("randr", 0, 1, capacity, flush);
    puts("blkbench: done\n");
    debug_exit(0);
}

/* Runs at CPL3, 64-bit mode, IF=0. */
NORETURN void blkjournal_user_main(void)
{
    u64 capacity;
    u32 features = virtio_init(&capacity);
    if (capacity > 0xffffffffu)
        capacity = 0xffffffffu;
    if (bench_on)
        bench(capacity, features);

    /* Read the whole disk: records from sector 0 with seq = sector + 1, then blank sectors. */
    u32 records = 0;
    int ended = 0;
    for (u64 s = 0; s < capacity; s += READ_SECTORS) {
        u32 n = capacity - s < READ_SECTORS ? (u32)(capacity - s) : READ_SECTORS;
        blk_request(VIRTIO_BLK_T_IN, s, buf, n * SECTOR);
        for (u32 i = 0; i < n; i++) {
            const u8 *sec = buf + i * SECTOR;
            u32 k = (u32)s + i;
            int ok;
            if (!ended && rd32(sec) == REC_MAGIC) {
                ok = rd32(sec + 4) == k + 1 && rd32(sec + SECTOR - 4) == checksum(sec, SECTOR - 4);
                records++;
            } else {
                ended = 1;
                ok = is_blank(sec);
            }
            if (!ok) {
                prefix();
                puts("journal corrupt at sector ");
                put_dec(k);
                putc('\n');
                debug_exit(EXIT_CORRUPT);
            }
        }
    }
    prefix();
    puts("found ");
    put_dec(records);
    puts(" records, last seq=");
    put_dec(records);
    putc('\n');
    if (features & (1u << VIRTIO_BLK_F_RO)) {
        prefix();
        puts("disk is read-only\n");
    }

    pit_clock_start();
    u32 seq = records, written = 0;
    for (;;) {
        if (count && written == count) {
            prefix();
            puts("done seq=");
            put_dec(seq);
            putc('\n');
            debug_exit(0);
        }
        if (seq >= capacity) {
            prefix();
            puts("journal full seq=");
            put_dec(seq);
            putc('\n');
            debug_exit(0);
        }
        seq++;
        make_record(buf, seq);
        blk_request(VIRTIO_BLK_T_OUT, seq - 1, buf, SECTOR);
        blk_request(VIRTIO_BLK_T_FLUSH, 0, 0, 0);
        written++;
        putc('J');
        put_dec(seq);
        putc('\n');
        u64 until = pit_clock_poll() + (u64)interval_ms * (PIT_HZ / 1000);
        while (pit_clock_poll() < until)
            cpu_relax();
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
        "  call blkjournal_user_main\n");

void guest_main(void)
{
    count = 0;
    interval_ms = 50;
    disk_index = 0;
    cmdline_u32("count", &count);
    cmdline_u32("interval_ms", &interval_ms);
    cmdline_u32("disk", &disk_index);
    bench_kib = BENCH_DEFAULT_KIB;
    bench_depth = 1;
    bench_verify = 0;
    cmdline_u32("bs_kib", &bench_kib);
    cmdline_u32("depth", &bench_depth);
    cmdline_u32("verify", &bench_verify);
    bench_on = cmdline_has("bench=seqw") || cmdline_has("bench=seqr") || cmdline_has("bench=randw") ||
               cmdline_has("bench=randr") || cmdline_has("bench=all");
    puts("blkjournal: booted count=");
    put_dec(count);
    puts(" interval_ms=");
    put_dec(interval_ms);
    puts(" disk=");
    put_dec(disk_index);
    putc('\n');

    /* 64-bit TSS descriptor (two GDT slots), then SYSEXIT to CPL3 (see pattern.c). */
    u64 base = (uptr)&tss, limit = sizeof(tss) - 1;
    gdt[SEL_TSS / 8] = (limit & 0xffff) | ((base & 0xffffff) << 16) | (0x89ull << 40) |
                       (((limit >> 16) & 0xf) << 48) | (((base >> 24) & 0xff) << 56);
    gdt[SEL_TSS / 8 + 1] = base >> 32;
    __asm__ volatile("ltr %w0" : : "r"(SEL_TSS));
    __asm__ volatile("wrmsr" : : "c"(0x174), "a"(SEL_CODE32), "d"(0)); /* IA32_SYSENTER_CS */
    __asm__ volatile(".byte 0x48, 0x0f, 0x35" /* sysexitq */
                     :
                     : "c"((uptr)(ustack + sizeof(ustack))), "d"((uptr)user_entry)
                     : "memory");
    __builtin_unreachable();
}
