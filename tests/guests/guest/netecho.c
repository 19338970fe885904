/*
 * netecho: a polling virtio-net driver (modern virtio-pci, no interrupts) that answers ARP
 * for its IP, ICMP echo requests, and runs a UDP echo service whose answers carry the
 * guest's own running counter, so that a test can tell a lost datagram from a restarted
 * guest. A "FLOOD" request makes it send a burst of datagrams back (throughput benchmark).
 *
 * `csum=1` on the command line: the UDP datagrams it sends carry a checksum, and the driver
 * negotiates VIRTIO_NET_F_CSUM when the device offers it; the device (and behind it the
 * host kernel) then completes the checksum: the guest writes only the pseudo-header sum and
 * sets VIRTIO_NET_HDR_F_NEEDS_CSUM, as Linux does. Without the feature the guest computes
 * the checksum itself. Without `csum=1`, UDP checksums are 0 (none), as before.
 *
 * CPL0 part (emulated on the nested KVM, kept short): parse the command line, set up a TSS
 * whose I/O bitmap allows COM1, the debug-exit port, PM1a_CNT and the PIT, and SYSEXIT to
 * 64-bit CPL3. Everything else runs at CPL3 (native speed). See README.md.
 */
#include "guest.h"

const char guest_name[] = "netecho";

#define EXIT_NO_DEVICE 2

#define VIRTIO_NET_F_CSUM 0u
#define VIRTIO_NET_F_MAC 5u
#define VIRTIO_NET_F_STATUS 16u

#define QSIZE 32u
#define BUFSZ 2048u
#define HDR 12u /* virtio_net_hdr_v1 */
#define VRING_AVAIL_F_NO_INTERRUPT 1u
#include "virtio.h"
#define TX_BATCH 16u


/* Rings are zero at load (they live in .data); buffers need no initial contents. */
static struct rings rxq __attribute__((aligned(4096)));
static struct rings txq __attribute__((aligned(4096)));
static u8 rxbuf[QSIZE][BUFSZ] __attribute__((aligned(4096), section(".stack")));
static u8 txbuf[QSIZE][BUFSZ] __attribute__((aligned(4096), section(".stack")));

static uptr common, rx_notify, tx_notify, devcfg;
static u16 rx_last, tx_next;
static u8 mac[6];
static u32 my_ip = 0x0a000002u; /* host order */
static u32 port = 7, every_ms = 1000;
static u32 nonce;
static u32 n_rx, n_arp, n_icmp, n_udp, n_tx, n_flood;

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
NORETURN void netecho_user_main(void);

static inline void mb(void) { __asm__ volatile("mfence" ::: "memory"); }

static void prefix(void) { puts("netecho: "); }

NORETURN static void fail(const char *msg, u8 code)
{
    prefix();
    puts(msg);
    putc('\n');
    debug_exit(code);
}

static u16 be16(const u8 *p) { return (u16)(p[0] << 8 | p[1]); }
static u32 be32(const u8 *p) { return (u32)p[0] << 24 | (u32)p[1] << 16 | (u32)p[2] << 8 | p[3]; }
static void put16(u8 *p, u16 v)
{
    p[0] = (u8)(v >> 8);
    p[1] = (u8)v;
}
static void put32(u8 *p, u32 v)
{
    put16(p, (u16)(v >> 16));
    put16(p + 2, (u16)v);
}

static void put_ip(u32 ip)
{
    for (int i = 3; i >= 0; i--) {
        put_dec((ip >> (8 * i)) & 0xff);
        if (i)
            putc('.');
    }
}

static void put_mac(void)
{
    for (int i = 0; i < 6; i++) {
        putc("0123456789abcdef"[mac[i] >> 4]);
        putc("0123456789abcdef"[mac[i] & 15]);
        if (i < 5)
            putc(':');
    }
}

/* `ip=A.B.C.D` on the command line; returns 1 and the address (host order) if valid. */
static int cmdline_ip(u32 *out)
{
    const char *p = boot_cmdline;
    while (*p) {
        while (*p == ' ')
            p++;
        if (p[0] == 'i' && p[1] == 'p' && p[2] == '=') {
            const char *s = p + 3;
            u32 ip = 0;
            for (int part = 0; part < 4; part++) {
                u32 v = 0;
                int digits = 0;
                while (*s >= '0' && *s <= '9' && digits < 4) {
                    v = v * 10 + (u32)(*s++ - '0');
                    digits++;
                }
                if (!digits || v > 255)
                    return 0;
                ip = ip << 8 | v;
                if (part < 3 && *s++ != '.')
                    return 0;
            }
            if (*s && *s != ' ')
                return 0;
            *out = ip;
            return 1;
        }
        while (*p && *p != ' ')
            p++;
    }
    return 0;
}

/* Internet checksum over n bytes (n even or odd). */
static u16 csum(const u8 *p, u32 n)
{
    u32 s = 0;
    for (u32 i = 0; i + 1 < n; i += 2)
        s += be16(p + i);
    if (n & 1)
        s += (u32)p[n - 1] << 8;
    while (s >> 16)
        s = (s & 0xffff) + (s >> 16);
    return (u16)~s;
}

/* One's complement sum of n bytes added to s (not folded, not inverted). */
static u32 sum_add(u32 s, const u8 *p, u32 n)
{
    for (u32 i = 0; i + 1 < n; i += 2)
        s += be16(p + i);
    if (n & 1)
        s += (u32)p[n - 1] << 8;
    return s;
}

static u16 fold(u32 s)
{
    while (s >> 16)
        s = (s & 0xffff) + (s >> 16);
    return (u16)s;
}

/* Waits for a free TX buffer and returns its frame area (after the virtio header). */
static u8 *tx_slot(void)
{
    while ((u16)(tx_next - *(volatile u16 *)&txq.used_idx) >= QSIZE)
        cpu_relax();
    u8 *b = txbuf[tx_next % QSIZE];
    memset(b, 0, HDR);
    return b + HDR;
}

static u16 tx_pending; /* posted but not yet notified */
static u32 event_idx, msix;
static u32 want_csum; /* `csum=1`: UDP checksums */
static u32 csum_offload; /* ... completed by the device (VIRTIO_NET_F_CSUM negotiated) */

/* Tell the device that queue `r`'s avail index moved by `added`, if it asked to hear. */
static void notify_if_needed(struct rings *r, uptr addr, u16 q, u16 added)
{
    virtio_mb();
    u16 now = *(volatile u16 *)&r->avail_idx;
    if (!event_idx || vring_need_event(*(volatile u16 *)&r->avail_event, now, (u16)(now - added)))
        mmio_write16(addr, q);
}

/* Posts the frame built in the current TX slot (len bytes, without the header). */
static void tx_post(u32 len)
{
    u16 i = tx_next % QSIZE;
    txq.desc[i].addr = (u64)(uptr)txbuf[i];
    txq.desc[i].len = HDR + len;
    txq.desc[i].flags = 0;
    txq.desc[i].next = 0;
    txq.avail_ring[txq.avail_idx % QSIZE] = i;
    barrier();
    *(volatile u16 *)&txq.avail_idx = (u16)(txq.avail_idx + 1);
    tx_next++;
    tx_pending++;
    n_tx++;
}

static void tx_kick(void)
{
    if (!tx_pending)
        return;
    notify_if_needed(&txq, tx_notify, 1, tx_pending);
    tx_pending = 0;
}

/* Builds an IPv4 + UDP header in front of a payload already at f + 42. */
static void build_udp(u8 *f, const u8 *dst_mac, u32 dst_ip, u16 sport, u16 dport, u32 plen)
{
    memcpy(f, dst_mac, 6);
    memcpy(f + 6, mac, 6);
    put16(f + 12, 0x0800);
    u8 *ip = f + 14;
    ip[0] = 0x45;
    ip[1] = 0;
    put16(ip + 2, (u16)(20 + 8 + plen));
    put16(ip + 4, 0);
    put16(ip + 6, 0x4000); /* DF */
    ip[8] = 64;
    ip[9] = 17;
    put16(ip + 10, 0);
    put32(ip + 12, my_ip);
    put32(ip + 16, dst_ip);
    put16(ip + 10, csum(ip, 20));
    u8 *udp = ip + 20;
    put16(udp, sport);
    put16(udp + 2, dport);
    put16(udp + 4, (u16)(8 + plen));
    put16(udp + 6, 0); /* no checksum (IPv4) unless `csum=1` */
    if (!want_csum)
        return;
    /* Pseudo-header: addresses, protocol, UDP length. */
    u32 s = sum_add(0, ip + 12, 8) + 17 + 8 + plen;
    if (csum_offload) {
        /* The device completes it: the sum over the UDP header and payload (this
         * pseudo-header sum in the checksum field included), inverted, at csum_offset. */
        u8 *h = f - HDR;
        h[0] = 1; /* VIRTIO_NET_HDR_F_NEEDS_CSUM */
        h[6] = 34; /* csum_start (LE): Ethernet + IPv4 headers */
        h[7] = 0;
        h[8] = 6; /* csum_offset: the UDP checksum field */
        h[9] = 0;
        put16(udp + 6, fold(s));
        return;
    }
    u16 c = (u16)~fold(sum_add(s, udp, 8 + plen));
    put16(udp + 6, c ? c : 0xffff);
}

static void handle_arp(const u8 *f, u32 len)
{
    if (len < 42 || be16(f + 14) != 1 || be16(f + 16) != 0x0800 || f[18] != 6 || f[19] != 4 ||
        be16(f + 20) != 1 || be32(f + 38) != my_ip)
        return;
    n_arp++;
    u8 *o = tx_slot();
    memcpy(o, f + 6, 6);
    memcpy(o + 6, mac, 6);
    put16(o + 12, 0x0806);
    put16(o + 14, 1);
    put16(o + 16, 0x0800);
    o[18] = 6;
    o[19] = 4;
    put16(o + 20, 2);
    memcpy(o + 22, mac, 6);
    put32(o + 28, my_ip);
    memcpy(o + 32, f + 22, 10); /* requester's MAC and IP */
    memset(o + 42, 0, 18);
    tx_post(60);
}

static void handle_icmp(const u8 *f, u32 len, u32 ihl, u32 tot)
{
    const u8 *icmp = f + 14 + ihl;
    u32 ilen = tot - ihl;
    if (ilen < 8 || icmp[0] != 8 || 14 + tot > len || 14 + 20 + ilen > BUFSZ - HDR)
        return;
    n_icmp++;
    u8 *o = tx_slot();
    memcpy(o, f + 6, 6);
    memcpy(o + 6, mac, 6);
    put16(o + 12, 0x0800);
    u8 *ip = o + 14;
    ip[0] = 0x45;
    ip[1] = 0;
    put16(ip + 2, (u16)(20 + ilen));
    put16(ip + 4, 0);
    put16(ip + 6, 0);
    ip[8] = 64;
    ip[9] = 1;
    put16(ip + 10, 0);
    put32(ip + 12, my_ip);
    memcpy(ip + 16, f + 14 + 12, 4);
    put16(ip + 10, csum(ip, 20));
    u8 *r = ip + 20;
    memcpy(r, icmp, ilen);
    r[0] = 0;
    put16(r + 2, 0);
    put16(r + 2, csum(r, ilen));
    tx_post(14 + 20 + ilen);
}

/* FLOOD request: payload "FLOOD" count(u32 BE) size(u32 BE): send count datagrams of size
 * bytes (at least 8: seq u32 BE, count u32 BE, then a pattern) back to the requester. */
static void flood(const u8 *f, const u8 *udp, const u8 *payload, u32 plen)
{
    if (plen < 13)
        return;
    u32 count = be32(payload + 5), size = be32(payload + 9);
    if (size < 8)
        size = 8;
    if (size > 1472)
        size = 1472;
    n_flood++;
    u8 dst_mac[6];
    memcpy(dst_mac, f + 6, 6);
    u32 dst_ip = be32(f + 14 + 12);
    u16 sport = be16(udp + 2), dport = be16(udp);
    for (u32 i = 0; i < count; i++) {
        u8 *o = tx_slot();
        u8 *p = o + 42;
        put32(p, i);
        put32(p + 4, count);
        for (u32 k = 8; k < size; k++)
            p[k] = (u8)k;
        build_udp(o, dst_mac, dst_ip, sport, dport, size);
        tx_post(42 + size);
        if (tx_pending >= TX_BATCH)
            tx_kick();
    }
    tx_kick();
}

static void handle_udp(const u8 *f, u32 len, u32 ihl, u32 tot)
{
    const u8 *udp = f + 14 + ihl;
    if (tot < ihl + 8 || 14 + tot > len)
        return;
    u32 ulen = be16(udp + 4);
    if (ulen < 8 || ulen > tot - ihl || be16(udp + 2) != port)
        return;
    const u8 *payload = udp + 8;
    u32 plen = ulen - 8;
    if (plen >= 5 && payload[0] == 'F' && payload[1] == 'L' && payload[2] == 'O' &&
        payload[3] == 'O' && payload[4] == 'D') {
        flood(f, udp, payload, plen);
        return;
    }
    if (plen > 1464)
        plen = 1464;
    n_udp++;
    u8 *o = tx_slot();
    put32(o + 42, n_udp);
    put32(o + 46, nonce);
    memcpy(o + 50, payload, plen);
    build_udp(o, f + 6, be32(f + 14 + 12), (u16)port, be16(udp), plen + 8);
    tx_post(42 + 8 + plen);
}

static void handle_frame(const u8 *f, u32 len)
{
    n_rx++;
    if (len < 14)
        return;
    u16 type = be16(f + 12);
    if (type == 0x0806) {
        handle_arp(f, len);
        return;
    }
    if (type != 0x0800 || len < 34)
        return;
    const u8 *ip = f + 14;
    u32 ihl = (u32)(ip[0] & 15) * 4;
    u32 tot = be16(ip + 2);
    if ((ip[0] >> 4) != 4 || ihl < 20 || tot < ihl || 14 + tot > len || be32(ip + 16) != my_ip)
        return;
    if ((be16(ip + 6) & 0x3fff) != 0)
        return; /* fragments are not reassembled */
    if (ip[9] == 1)
        handle_icmp(f, len, ihl, tot);
    else if (ip[9] == 17)
        handle_udp(f, len, ihl, tot);
}


/* The address a capability's (bar, offset) names; 64-bit memory BARs included. */
static uptr cap_addr(u32 slot, u32 cap)
{
    u32 bar = ecam_read32(slot, cap + 4) & 0xff;
    u32 lo = ecam_read32(slot, 0x10 + 4 * bar);
    u64 base = lo & ~0xfu;
    if ((lo & 6) == 4)
        base |= (u64)ecam_read32(slot, 0x14 + 4 * bar) << 32;
    return (uptr)(base + ecam_read32(slot, cap + 8));
}

static void setup_queue(u16 q, struct rings *r)
{
    mmio_write16(common + C_QSEL, q);
    mmio_write16(common + C_QSIZE, QSIZE);
    mmio_write32(common + C_QDESC, (u32)(uptr)r->desc);
    mmio_write32(common + C_QDESC + 4, 0);
    mmio_write32(common + C_QDRIVER, (u32)(uptr)&r->avail_flags);
    mmio_write32(common + C_QDRIVER + 4, 0);
    mmio_write32(common + C_QDEVICE, (u32)(uptr)&r->used_flags);
    mmio_write32(common + C_QDEVICE + 4, 0);
    r->avail_flags = VRING_AVAIL_F_NO_INTERRUPT;
    mmio_write16(common + C_QENABLE, 1);
}

static void virtio_init(void)
{
    u32 slot = 0;
    for (u32 dev = 1; dev < 32; dev++) {
        if (ecam_read32(dev, 0) == 0x10411af4u) {
            slot = dev;
            break;
        }
    }
    if (!slot)
        fail("no virtio-net device", EXIT_NO_DEVICE);
    mmio_write32(ECAM_BASE + (slot << 15) + 4, 0x6); /* memory space, bus master */
    u32 notify_mult = 0;
    uptr notify_base = 0;
    for (u32 cap = ecam_read32(slot, 0x34) & 0xff; cap; cap = (ecam_read32(slot, cap) >> 8) & 0xff) {
        u32 head = ecam_read32(slot, cap);
        if ((head & 0xff) != 0x09)
            continue;
        switch ((head >> 24) & 0xff) {
        case 1:
            common = cap_addr(slot, cap);
            break;
        case 2:
            notify_base = cap_addr(slot, cap);
            notify_mult = ecam_read32(slot, cap + 16);
            break;
        case 4:
            devcfg = cap_addr(slot, cap);
            break;
        }
    }
    if (!common || !notify_base || !devcfg)
        fail("virtio capabilities missing", EXIT_NO_DEVICE);
    prefix();
    puts("virtio-net at slot ");
    put_dec(slot);
    puts(" common=");
    put_hex(common);
    putc('\n');

    mmio_write8(common + C_STATUS, 0);
    mmio_write8(common + C_STATUS, 1 | 2);
    mmio_write32(common + C_DFSEL, 0);
    u32 f = mmio_read32(common + C_DF);
    mmio_write32(common + C_DFSEL, 1);
    if (!(mmio_read32(common + C_DF) & 1))
        fail("device is not virtio 1.x", EXIT_NO_DEVICE);
    if (!(f & (1u << VIRTIO_NET_F_MAC)))
        fail("device has no MAC address", EXIT_NO_DEVICE);
    mmio_write32(common + C_GFSEL, 0);
    /* EVENT_IDX unless `event_idx=0`: notify only when the device asked to hear of it. */
    u32 want = 1u << VIRTIO_NET_F_MAC | 1u << VIRTIO_NET_F_STATUS;
    if (!cmdline_has("event_idx=0"))
        want |= 1u << VIRTIO_RING_F_EVENT_IDX;
    want_csum = cmdline_has("csum=1");
    if (want_csum)
        want |= 1u << VIRTIO_NET_F_CSUM;
    mmio_write32(common + C_GF, f & want);
    event_idx = (f & want & (1u << VIRTIO_RING_F_EVENT_IDX)) != 0;
    csum_offload = (f & want & (1u << VIRTIO_NET_F_CSUM)) != 0;
    mmio_write32(common + C_GFSEL, 1);
    mmio_write32(common + C_GF, 1); /* VERSION_1 */
    mmio_write8(common + C_STATUS, 1 | 2 | 8);
    if (!(mmio_read8(common + C_STATUS) & 8))
        fail("device refused features", EXIT_NO_DEVICE);
    setup_queue(0, &rxq);
    rx_notify = notify_base + mmio_read16(common + C_QNOTIFY_OFF) * notify_mult;
    setup_queue(1, &txq);
    tx_notify = notify_base + mmio_read16(common + C_QNOTIFY_OFF) * notify_mult;
    /* MSI-X unless `msix=0` (the rings are still polled: interrupts stay off). */
    msix = !cmdline_has("msix=0") && msix_enable(slot, common, 2, 0x40);
    prefix();
    puts("virtio msix=");
    put_dec(msix);
    puts(" event_idx=");
    put_dec(event_idx);
    puts(" csum=");
    put_dec(csum_offload);
    putc('\n');
    for (u32 i = 0; i < 6; i++)
        mac[i] = mmio_read8(devcfg + i);
    /* All RX buffers to the device before DRIVER_OK. */
    for (u16 i = 0; i < QSIZE; i++) {
        rxq.desc[i].addr = (u64)(uptr)rxbuf[i];
        rxq.desc[i].len = BUFSZ;
        rxq.desc[i].flags = VRING_DESC_F_WRITE;
        rxq.desc[i].next = 0;
        rxq.avail_ring[i] = i;
    }
    barrier();
    rxq.avail_idx = QSIZE;
    mmio_write8(common + C_STATUS, 1 | 2 | 8 | 4);
    if (mmio_read8(common + C_STATUS) & 0x40)
        fail("device needs reset", EXIT_NO_DEVICE);
    mb();
    mmio_write16(rx_notify, 0);
    if ((f & (1u << VIRTIO_NET_F_STATUS)) && !(mmio_read16(devcfg + 6) & 1)) {
        prefix();
        puts("link is down\n");
    }
}

static void report(void)
{
    prefix();
    puts("rx=");
    put_dec(n_rx);
    puts(" arp=");
    put_dec(n_arp);
    puts(" icmp=");
    put_dec(n_icmp);
    puts(" udp=");
    put_dec(n_udp);
    puts(" tx=");
    put_dec(n_tx);
    putc('\n');
}

/* Runs at CPL3, 64-bit mode, IF=0. */
NORETURN void netecho_user_main(void)
{
    u32 lo, hi;
    __asm__ volatile("rdtsc" : "=a"(lo), "=d"(hi));
    nonce = lo ^ hi;
    virtio_init();
    prefix();
    puts("up mac=");
    put_mac();
    puts(" ip=");
    put_ip(my_ip);
    puts(" port=");
    put_dec(port);
    putc('\n');
    pit_clock_start();
    u64 next_report = (u64)every_ms * (PIT_HZ / 1000);
    u32 idle = 0, batches = 0;
    for (;;) {
        u16 used = *(volatile u16 *)&rxq.used_idx;
        if (used == rx_last) {
            cpu_relax();
            if (++idle < 16384)
                continue;
        }
        idle = 0;
        barrier();
        u16 reposted = 0;
        while (rx_last != used) {
            u32 id = rxq.used_ring[rx_last % QSIZE].id % QSIZE;
            u32 len = rxq.used_ring[rx_last % QSIZE].len;
            if (len > HDR && len <= BUFSZ)
                handle_frame(rxbuf[id] + HDR, len - HDR);
            rxq.avail_ring[rxq.avail_idx % QSIZE] = (u16)id;
            barrier();
            *(volatile u16 *)&rxq.avail_idx = (u16)(rxq.avail_idx + 1);
            rx_last++;
            reposted++;
            if (tx_pending >= TX_BATCH)
                tx_kick();
        }
        tx_kick();
        if (reposted)
            notify_if_needed(&rxq, rx_notify, 0, reposted);
        /* The PIT costs three port exits: read it when idle or every 64 batches. */
        if (reposted && (++batches & 63) != 0)
            continue;
        u64 now = pit_clock_poll();
        if (every_ms && now >= next_report) {
            report();
            next_report = now + (u64)every_ms * (PIT_HZ / 1000);
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
        "  call netecho_user_main\n");

void guest_main(void)
{
    cmdline_ip(&my_ip);
    cmdline_u32("port", &port);
    cmdline_u32("every_ms", &every_ms);
    if (port == 0 || port > 65535)
        port = 7;
    puts("netecho: booted ip=");
    put_ip(my_ip);
    puts(" port=");
    put_dec(port);
    puts(" every_ms=");
    put_dec(every_ms);
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
