/*
 * check.h: CHECK and CHECK_EQ for the C tests in this folder.
 *
 * A failed check prints its file, function, line and values to stderr
 * and the test goes on. The counts are atomic, so threads of a stress
 * run may check too. A test's main prints "N passed, M failed" from
 * checks_passed and checks_failed and exits with 1 when M > 0.
 */
#ifndef MQS_TEST_CHECK_H
#define MQS_TEST_CHECK_H

#include <inttypes.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>

static atomic_int checks_passed;
static atomic_int checks_failed;

static inline const char *check_file_name(const char *path)
{
    const char *slash = strrchr(path, '/');

    return slash != NULL ? slash + 1 : path;
}

static inline void check_true(int ok, const char *text, const char *file,
                       const char *func, int line)
{
    if (ok) {
        atomic_fetch_add(&checks_passed, 1);
        return;
    }
    atomic_fetch_add(&checks_failed, 1);
    fprintf(stderr, "FAIL %s (%s:%d): %s\n", func, check_file_name(file),
            line, text);
}

static inline void check_eq(int64_t actual, int64_t expected, const char *text,
                     const char *file, const char *func, int line)
{
    if (actual == expected) {
        atomic_fetch_add(&checks_passed, 1);
        return;
    }
    atomic_fetch_add(&checks_failed, 1);
    fprintf(stderr, "FAIL %s (%s:%d): %s is %" PRId64 ", expected %" PRId64
            "\n", func, check_file_name(file), line, text, actual, expected);
}

#define CHECK(cond) check_true((cond), #cond, __FILE__, __func__, __LINE__)
#define CHECK_EQ(actual, expected)                                          \
    check_eq((int64_t)(actual), (int64_t)(expected),                        \
             #actual " == " #expected, __FILE__, __func__, __LINE__)

#endif /* MQS_TEST_CHECK_H */
