/* What the polling virtio-pci guest drivers (blkjournal, netecho) share: the ECAM base,
 * the modern virtio-pci common-configuration layout and one split virtqueue laid out in
 * a single page. A guest defines QSIZE (its queue size) before including this. */
#ifndef VIRTIO_H
#define VIRTIO_H
#include "guest.h"

#ifndef QSIZE
#error "define QSIZE before including virtio.h"
/* A 32-bit read of device `dev`'s configuration space on bus 0, through ECAM. */
static inline u32 ecam_read32(u32 dev, u32 off) { return mmio_read32(ECAM_BASE + (dev << 15) + off); }

#endif

#define ECAM_BASE 0xb0000000u
#define VRING_DESC_F_NEXT 1u
#define VRING_DESC_F_WRITE 2u

/* Common configuration structure offsets. */
#define C_DFSEL 0x00
#define C_DF 0x04
#define C_GFSEL 0x08
#define C_GF 0x0c
#define C_STATUS 0x14
#define C_QSEL 0x16
#define C_QSIZE 0x18
#define C_QENABLE 0x1c
#define C_QNOTIFY_OFF 0x1e
#define C_MSIX_CONFIG 0x10
#define C_QMSIX 0x1a
#define VIRTIO_RING_F_EVENT_IDX 29
#define VIRTIO_MSI_NO_VECTOR 0xffffu
#define C_QDESC 0x20
#define C_QDRIVER 0x28
#define C_QDEVICE 0x30

struct vring_desc {
    u64 addr;
    u32 len;
    u16 flags;
    u16 next;
};

struct rings {
    struct vring_desc desc[QSIZE];
    u16 avail_flags, avail_idx, avail_ring[QSIZE], used_event;
    u8 pad[4096 - 16 * QSIZE - 2 * (QSIZE + 3)];
    u16 used_flags, used_idx;
    struct {
        u32 id, len;
    } used_ring[QSIZE];
    u16 avail_event; /* written by the device when VIRTIO_RING_F_EVENT_IDX is negotiated */
};

/* A full barrier that the CPL0 emulator also runs (mfence is SSE2, which it refuses):
 * the index write must be visible before the device's event index is read. */
static inline void virtio_mb(void) { __asm__ volatile("lock; addl $0,(%%rsp)" ::: "memory", "cc"); }

/* EVENT_IDX (virtio 1.x, 2.7.10): must the other side be told that the index moved from
 * `old` to `new`, given the index `event` it asked to hear about? */
static inline int vring_need_event(u16 event, u16 new_idx, u16 old)
{
    return (u16)(new_idx - event - 1) < (u16)(new_idx - old);
}

/* A 32-bit read of device `dev`'s configuration space on bus 0, through ECAM. */
static inline u32 ecam_read32(u32 dev, u32 off) { return mmio_read32(ECAM_BASE + (dev << 15) + off); }

/* The address BAR `bar` of `dev` decodes (32- or 64-bit memory BAR). */
static inline uptr bar_addr(u32 dev, u32 bar)
{
    u32 lo = ecam_read32(dev, 0x10 + 4 * bar);
    u64 base = lo & ~0xfu;
    if ((lo & 6) == 4)
        base |= (u64)ecam_read32(dev, 0x14 + 4 * bar) << 32;
    return (uptr)base;
}

/* Turn MSI-X on, as Linux does: table entry 0 an MSI to APIC 0 with `apic_vector`,
 * unmasked, every queue of `nqueues` on vector 0, no configuration vector. The guest
 * polls with interrupts off, so a delivered MSI only waits in the local APIC. Returns 1
 * when the device has MSI-X and took the vectors, else 0 (the device stays on INTx). */
static inline u32 msix_enable(u32 dev, uptr common, u16 nqueues, u8 apic_vector)
{
    u32 cap = ecam_read32(dev, 0x34) & 0xff;
    while (cap && (ecam_read32(dev, cap) & 0xff) != 0x11)
        cap = (ecam_read32(dev, cap) >> 8) & 0xff;
    if (!cap)
        return 0;
    u32 t = ecam_read32(dev, cap + 4);
    uptr table = bar_addr(dev, t & 7) + (t & ~7u);
    mmio_write32(table + 0, 0xfee00000u);
    mmio_write32(table + 4, 0);
    mmio_write32(table + 8, apic_vector);
    mmio_write32(table + 12, 0);
    mmio_write16(common + C_MSIX_CONFIG, VIRTIO_MSI_NO_VECTOR);
    for (u16 q = 0; q < nqueues; q++) {
        mmio_write16(common + C_QSEL, q);
        mmio_write16(common + C_QMSIX, 0);
        if (mmio_read16(common + C_QMSIX) != 0)
            return 0;
    }
    u16 control = (u16)(ecam_read32(dev, cap) >> 16);
    mmio_write16(ECAM_BASE + (dev << 15) + cap + 2, (u16)(control | 0x8000u));
    return 1;
}

#endif
