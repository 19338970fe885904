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
};

/* A 32-bit read of device `dev`'s configuration space on bus 0, through ECAM. */
static inline u32 ecam_read32(u32 dev, u32 off) { return mmio_read32(ECAM_BASE + (dev << 15) + off); }

#endif
