/*
 * mqs_crc32c.c: CRC-32C with run-time dispatch to a CPU instruction.
 * Written from the polynomial definition; see mqs_crc32c.h.
 */
#include "mqs_crc32c.h"

#include <pthread.h>
#include <string.h>

#if defined(__x86_64__)
#include <nmmintrin.h>
#endif

#if defined(__aarch64__)
#include <arm_acle.h>
#include <sys/auxv.h>
#ifndef HWCAP_CRC32
#define HWCAP_CRC32 (1 << 7)
#endif
#endif

#define MQS_CRC32C_POLY_REFLECTED 0x82F63B78u

typedef uint32_t (*mqs_crc32c_fn)(uint32_t, const uint8_t *, size_t);

static uint32_t table[8][256];

/*
 * Interleaving: the SSE4.2 version runs three independent CRCs over
 * three adjacent blocks and merges them, because each crc32 instruction
 * waits for the previous one's result but independent ones overlap. On
 * a 2-vCPU AMD EPYC KVM guest, a C loop of 200,000 CRCs
 * of 4 KiB took about 190 ns per CRC this way against 430 ns in one
 * stream (best of five loops, four alternating runs). The raw CRC register
 * (before the final inversion) is linear over GF(2) in the register
 * and the data, so running register r over block B equals running r
 * over len(B) zero bytes XOR running 0 over B. The first term, a linear map
 * of r, is tabulated per byte of r: shift_long[k][b] is the register
 * after INTERLEAVE_LONG zero bytes from b << 8k (likewise for SHORT).
 */
#define INTERLEAVE_LONG 1024
#define INTERLEAVE_SHORT 128
static uint32_t shift_long[4][256];
static uint32_t shift_short[4][256];
static mqs_crc32c_fn impl_fn;
static const char *impl_name = "software";
static pthread_once_t init_once = PTHREAD_ONCE_INIT;

/* Table k maps a byte to its CRC after k further zero bytes, which is
 * what lets slicing-by-8 fold eight input bytes per step. */
static void fill_tables(void)
{
    for (uint32_t n = 0; n < 256; n++) {
        uint32_t c = n;
        for (int bit = 0; bit < 8; bit++)
            c = (c >> 1) ^ (MQS_CRC32C_POLY_REFLECTED & (0u - (c & 1u)));
        table[0][n] = c;
    }
    for (uint32_t n = 0; n < 256; n++) {
        uint32_t c = table[0][n];
        for (int k = 1; k < 8; k++) {
            c = table[0][c & 0xFF] ^ (c >> 8);
            table[k][n] = c;
        }
    }
}

static uint32_t crc_sw(uint32_t crc, const uint8_t *p, size_t n);

/* Tabulate the register after `zeros` zero bytes for each byte value at
 * each of the four byte positions of the register. */
static void fill_shift_table(uint32_t shift[4][256], size_t zeros)
{
    static const uint8_t zero_block[INTERLEAVE_LONG];

    for (int k = 0; k < 4; k++)
        for (uint32_t b = 0; b < 256; b++)
            shift[k][b] = crc_sw(b << (8 * k), zero_block, zeros);
}

static inline uint32_t shift_apply(uint32_t shift[4][256], uint32_t crc)
{
    return shift[0][crc & 0xFF] ^ shift[1][(crc >> 8) & 0xFF] ^
           shift[2][(crc >> 16) & 0xFF] ^ shift[3][crc >> 24];
}

static uint32_t crc_sw(uint32_t crc, const uint8_t *p, size_t n)
{
    while (n >= 8) {
        uint64_t word;
        memcpy(&word, p, 8);
        /* Little-endian: the low byte is the first byte of the input. */
        word ^= crc;
        crc = table[7][word & 0xFF] ^ table[6][(word >> 8) & 0xFF] ^
              table[5][(word >> 16) & 0xFF] ^ table[4][(word >> 24) & 0xFF] ^
              table[3][(word >> 32) & 0xFF] ^ table[2][(word >> 40) & 0xFF] ^
              table[1][(word >> 48) & 0xFF] ^ table[0][word >> 56];
        p += 8;
        n -= 8;
    }
    while (n--)
        crc = table[0][(crc ^ *p++) & 0xFF] ^ (crc >> 8);
    return crc;
}

#if defined(__x86_64__)
/* Three CRCs of `block` bytes each from p, merged into crc. */
__attribute__((target("sse4.2"))) static inline uint32_t
crc_sse42_3way(uint32_t crc, const uint8_t *p, size_t block,
               uint32_t shift[4][256])
{
    uint64_t c0 = crc, c1 = 0, c2 = 0;

    for (size_t i = 0; i < block; i += 8) {
        uint64_t w0, w1, w2;
        memcpy(&w0, p + i, 8);
        memcpy(&w1, p + block + i, 8);
        memcpy(&w2, p + 2 * block + i, 8);
        c0 = _mm_crc32_u64(c0, w0);
        c1 = _mm_crc32_u64(c1, w1);
        c2 = _mm_crc32_u64(c2, w2);
    }
    crc = shift_apply(shift, (uint32_t)c0) ^ (uint32_t)c1;
    return shift_apply(shift, crc) ^ (uint32_t)c2;
}

__attribute__((target("sse4.2"))) static uint32_t
crc_sse42(uint32_t crc, const uint8_t *p, size_t n)
{
    uint64_t c;

    while (n >= 3 * INTERLEAVE_LONG) {
        crc = crc_sse42_3way(crc, p, INTERLEAVE_LONG, shift_long);
        p += 3 * INTERLEAVE_LONG;
        n -= 3 * INTERLEAVE_LONG;
    }
    while (n >= 3 * INTERLEAVE_SHORT) {
        crc = crc_sse42_3way(crc, p, INTERLEAVE_SHORT, shift_short);
        p += 3 * INTERLEAVE_SHORT;
        n -= 3 * INTERLEAVE_SHORT;
    }
    c = crc;
    while (n >= 8) {
        uint64_t word;
        memcpy(&word, p, 8);
        c = _mm_crc32_u64(c, word);
        p += 8;
        n -= 8;
    }
    crc = (uint32_t)c;
    while (n--)
        crc = _mm_crc32_u8(crc, *p++);
    return crc;
}
#endif

#if defined(__aarch64__)
/* NOTE: compiled and dispatched on aarch64 only; the x86_64 test machine
 * never runs this path. */
__attribute__((target("+crc"))) static uint32_t
crc_armv8(uint32_t crc, const uint8_t *p, size_t n)
{
    while (n >= 8) {
        uint64_t word;
        memcpy(&word, p, 8);
        crc = __crc32cd(crc, word);
        p += 8;
        n -= 8;
    }
    while (n--)
        crc = __crc32cb(crc, *p++);
    return crc;
}
#endif

static void init_once_body(void)
{
    fill_tables();
    fill_shift_table(shift_long, INTERLEAVE_LONG);
    fill_shift_table(shift_short, INTERLEAVE_SHORT);
    impl_fn = crc_sw;
#if defined(__x86_64__)
    __builtin_cpu_init();
    if (__builtin_cpu_supports("sse4.2")) {
        impl_fn = crc_sse42;
        impl_name = "sse4.2";
    }
#elif defined(__aarch64__)
    if (getauxval(AT_HWCAP) & HWCAP_CRC32) {
        impl_fn = crc_armv8;
        impl_name = "armv8";
    }
#endif
}

__attribute__((constructor)) void mqs_crc32c_init(void)
{
    pthread_once(&init_once, init_once_body);
}

uint32_t mqs_crc32c_extend(uint32_t crc, const void *data, size_t n)
{
    return ~impl_fn(~crc, (const uint8_t *)data, n);
}

uint32_t mqs_crc32c_extend_sw(uint32_t crc, const void *data, size_t n)
{
    return ~crc_sw(~crc, (const uint8_t *)data, n);
}

const char *mqs_crc32c_impl(void)
{
    return impl_name;
}
