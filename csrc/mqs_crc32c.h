/*
 * mqs_crc32c.h: CRC-32C (Castagnoli), the checksum of every segment-log
 * record.
 *
 *   polynomial   0x1EDC6F41 (reflected 0x82F63B78), as in iSCSI, ext4
 *                metadata and Kafka record batches
 *   init/xorout  0xFFFFFFFF, applied inside mqs_crc32c_extend, so
 *                mqs_crc32c_extend(0, "123456789", 9) == 0xE3069283
 *
 * Four implementations, the fastest the CPU runs picked once at load
 * time:
 *   x86_64   folding with VPCLMULQDQ on 512-bit registers for 512 bytes
 *            or more (see mqs_crc32c.c), when CPUID reports AVX-512
 *            (F, VL, DQ), VPCLMULQDQ and SSE4.2
 *   x86_64   SSE4.2 `crc32` instruction, 8 bytes per step, three
 *            blocks at a time, when CPUID reports SSE4.2
 *   aarch64  ARMv8 CRC32C instructions, when HWCAP_CRC32 is set
 *   others   software slicing-by-8 over eight 256-entry tables (8 KiB)
 * All return the same values; the tests compare every one this CPU
 * runs with the software version.
 */
#ifndef MQS_CRC32C_H
#define MQS_CRC32C_H

#include <stddef.h>
#include <stdint.h>

/*
 * Continue a CRC-32C over `n` more bytes: pass 0 to start, or a previous
 * result (or a per-segment seed) to chain. Any thread; no state is
 * written after initialisation.
 */
uint32_t mqs_crc32c_extend(uint32_t crc, const void *data, size_t n);

/* The software slicing-by-8 version, whatever the CPU offers. Any thread. */
uint32_t mqs_crc32c_extend_sw(uint32_t crc, const void *data, size_t n);

/*
 * Name of the implementation mqs_crc32c_extend uses: "avx512+vpclmulqdq",
 * "sse4.2", "armv8" or "software". Any thread.
 */
const char *mqs_crc32c_impl(void);

/* For tests: the implementations this CPU runs (the software one is
 * number 0), their names, and a CRC by implementation number i. */
int mqs_crc32c_impl_count(void);
const char *mqs_crc32c_impl_name(int i);
uint32_t mqs_crc32c_extend_with(int i, uint32_t crc, const void *data,
                                size_t n);

/*
 * Fill the tables and pick the implementation. Runs from a constructor
 * when the library loads; calling it again is harmless. Any thread.
 */
void mqs_crc32c_init(void);

#endif /* MQS_CRC32C_H */
