/*
 * mqs_failpoint.h: named points where a test can kill or stop the
 * process.
 *
 * Compiled in only when MQS_FAILPOINTS is defined (setup.py does so for
 * MQS_FAILPOINTS=1); otherwise every MQS_FAILPOINT is an empty statement.
 * At run time the environment variable MQS_FAILPOINT selects one point:
 *
 *   name          fire on the first pass
 *   name:N        fire on the Nth pass
 *   name:N:stop   on the Nth pass stop instead of dying
 *
 * Firing sends the process SIGKILL, exactly as an outside kill at that
 * instruction would. The stop mode sends SIGSTOP instead: the process
 * stays alive (its liveness lock stays held) at that instruction until
 * someone sends it SIGCONT, which models a producer stalled between two
 * steps. An outside SIGSTOP cannot land there, because Python runs the
 * whole C call between two bytecodes.
 */
#ifndef MQS_FAILPOINT_H
#define MQS_FAILPOINT_H

#ifdef MQS_FAILPOINTS
#include <signal.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>

static inline void mqs_failpoint(const char *name, _Atomic long *passes)
{
    const char *armed = getenv("MQS_FAILPOINT");
    size_t length = strlen(name);
    long wanted = 1;
    int sig = SIGKILL;
    char *end;

    if (armed == NULL || strncmp(armed, name, length) != 0)
        return;
    if (armed[length] == ':') {
        wanted = strtol(armed + length + 1, &end, 10);
        if (strcmp(end, ":stop") == 0)
            sig = SIGSTOP;
        else if (*end != '\0')
            return;
    } else if (armed[length] != '\0') {
        return;
    }
    if (atomic_fetch_add(passes, 1) + 1 == wanted)
        raise(sig);
}

#define MQS_FAILPOINT(name)                                  \
    do {                                                     \
        static _Atomic long mqs_failpoint_passes;            \
        mqs_failpoint((name), &mqs_failpoint_passes);        \
    } while (0)
#else
#define MQS_FAILPOINT(name) ((void)0)
#endif

#endif /* MQS_FAILPOINT_H */
