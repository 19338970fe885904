/*
 * Shared definitions for the tiny test guests (freestanding C, x86-64).
 *
 * The guests enter in 32-bit protected mode (PVH), and entry.S switches to 64-bit long mode
 * at once (identity-mapped first 4 GiB, 2 MiB pages, user-accessible). Long mode matters on
 * the nested KVM these tests run on: there, CPL0 code is emulated, and CPL3 code runs natively
 * only in 64-bit mode (32-bit CPL3 code, with or without paging, was emulated too, and legacy
 * 32-bit paging could not be enabled at all).
 */
#ifndef GUEST_H
#define GUEST_H

/* GDT layout (entry.S). Kept in sync with the table there. The user segments sit at
 * IA32_SYSENTER_CS + 32 and + 40 (SYSENTER_CS = SEL_CODE32) as 64-bit SYSEXIT requires. */
#define SEL_CODE32 0x08 /* 32-bit code, DPL0 (entry, AP start-up) */
#define SEL_DATA0 0x10  /* data, DPL0 */
#define SEL_CODE64 0x18 /* 64-bit code, DPL0 */
#define SEL_UCODE64 0x2b /* 64-bit code, DPL3 (0x28 | RPL 3) */
#define SEL_UDATA 0x33   /* data, DPL3 (0x30 | RPL 3) */
#define SEL_TSS 0x38     /* 64-bit TSS, two slots */
#define GDT_ENTRIES 10

#ifdef __ASSEMBLER__
/* From 32-bit protected mode (CPL0, flat segments): enable PAE paging with the identity map,
 * EFER.LME and CR0.PG, which puts the CPU in compatibility mode; the caller then far-jumps
 * to SEL_CODE64. Clobbers eax, ecx, edx. */
.macro ENTER_LONG_MODE
	mov %cr4, %eax
	or $0x20, %eax		/* PAE */
	mov %eax, %cr4
	mov $pml4, %eax
	mov %eax, %cr3
	mov $0xc0000080, %ecx	/* EFER */
	rdmsr
	or $0x100, %eax		/* LME */
	wrmsr
	mov %cr0, %eax
	or $0x80000001, %eax	/* PG | PE */
	mov %eax, %cr0
.endm
#else

typedef unsigned char u8;
typedef unsigned short u16;
typedef unsigned int u32;
typedef unsigned long long u64;
typedef int i32;
typedef unsigned long uptr;

#define NORETURN __attribute__((noreturn))

#define COM1 0x3f8
#define DEBUG_EXIT_PORT 0xf4
#define PM1A_CNT_PORT 0x604
#define PM1A_POWEROFF 0x2000
#define LAPIC_BASE 0xfee00000u
#define IOAPIC_BASE 0xfec00000u

/* Exit code written to the debug-exit port when the guest takes an unexpected exception. */
#define EXIT_EXCEPTION 4

static inline void outb(u16 port, u8 v) { __asm__ volatile("outb %0, %1" : : "a"(v), "Nd"(port)); }
static inline void outw(u16 port, u16 v) { __asm__ volatile("outw %0, %1" : : "a"(v), "Nd"(port)); }
static inline u8 inb(u16 port)
{
    u8 v;
    __asm__ volatile("inb %1, %0" : "=a"(v) : "Nd"(port));
    return v;
}
static inline u32 mmio_read32(uptr addr) { return *(volatile u32 *)addr; }
static inline void mmio_write32(uptr addr, u32 v) { *(volatile u32 *)addr = v; }
static inline u8 mmio_read8(uptr a) { return *(volatile u8 *)a; }
static inline u16 mmio_read16(uptr a) { return *(volatile u16 *)a; }
static inline void mmio_write8(uptr a, u8 v) { *(volatile u8 *)a = v; }
static inline void mmio_write16(uptr a, u16 v) { *(volatile u16 *)a = v; }
static inline void barrier(void) { __asm__ volatile("" ::: "memory"); }

/* 64-bit TSS followed by the I/O permission bitmap (ports 0 to 0x60f), shared by the
 * guests that drop to CPL3; each fills in the ports its user code may touch. Ports past
 * the end of the bitmap (beyond the TSS limit) are denied. */
#define IOMAP_BYTES (0x610 / 8 + 1)
struct tss {
    u32 reserved0;
    u64 rsp0, rsp1, rsp2;
    u64 reserved1;
    u64 ist[7];
    u64 reserved2;
    u16 reserved3;
    u16 iomap_base;
    u8 iomap[IOMAP_BYTES];
} __attribute__((packed));
static inline void cpu_relax(void) { __asm__ volatile("pause" ::: "memory"); }
static inline u32 current_cpl(void)
{
    u32 cs;
    __asm__ volatile("mov %%cs, %0" : "=r"(cs));
    return cs & 3;
}

/* Provided by each guest. */
extern const char guest_name[];
void guest_main(void);

/* Serial console (COM1, write-only, no LSR polling). */
void putc(char c);
void puts(const char *s);
void put_dec(u32 v);
void put_hex(u64 v); /* "0x" followed by lowercase hex digits, no leading zeros */
/* "<guest_name>: " */
void put_prefix(void);

/* Exits. After requesting the exit the CPU halts (CPL0) or spins (CPL3). */
NORETURN void halt_forever(void);
NORETURN void debug_exit(u8 code); /* port 0xf4, then power off as a fallback */
NORETURN void power_off(void);

/* Boot information copied out of hvm_start_info before anything else runs. */
#define MAX_MEMMAP 32
struct memmap_entry {
    u64 addr;
    u64 size;
    u32 type;
    u32 reserved;
};
extern char boot_cmdline[];
extern u32 boot_memmap_entries;
extern struct memmap_entry boot_memmap[MAX_MEMMAP];

/* Finds `key=value` on the command line; returns 1 and stores the value if it is a valid
 * number (decimal, or hex with 0x), 0 otherwise. */
int cmdline_u32(const char *key, u32 *out);
/* True when the command line has exactly this word (for example "reset=kbd"). */
int cmdline_has(const char *word);
/* Returns 1 if [start, start+len) lies inside one E820 RAM entry (or no map was given). */
int range_is_ram(u64 start, u64 len);

/* Interrupt descriptor table. */
void idt_set(u32 vec, void *handler, u32 dpl);
/* Page tables (entry.S): PML4 for the identity map. */
extern u64 pml4[];
void idt_load(void);

/* PIT channel 0 as a free-running clock (mode 2, reload 65536). Call pit_clock_poll at
 * least every 50 ms; it returns the total number of 1.193182 MHz ticks since pit_clock_start. */
#define PIT_HZ 1193182u
void pit_clock_start(void);
u64 pit_clock_poll(void);

void *memcpy(void *dst, const void *src, uptr n);
void *memset(void *dst, int c, uptr n);

extern char _image_start[], _end[];

#endif /* __ASSEMBLER__ */
#endif
