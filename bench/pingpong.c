/* Which state a 2-core VM is in, for the notes of a two-thread benchmark (docs/benchmarks.md):
 * - the round trip of one cache line passed between two threads: about 50-100 ns when the two vCPUs
 *   share a die, 400-600 ns when they sit on different dies;
 * - how long one thread takes to overwrite 3 MB that the other thread has just read, against 3 MB
 *   only it has touched: on different dies every line must first be invalidated in the other die's
 *   cache (seven times slower, measured), which is what two threads splitting a network's layers
 *   pay on every write into activations both have read.
 *
 *     cc -O2 -pthread bench/pingpong.c -o /tmp/pp && /tmp/pp
 */
#define _GNU_SOURCE
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

enum { ROUNDS = 200000, WRITES = 20, FLOATS = (3 << 20) / 4 };
static _Atomic int flag;
static float *buf;
static volatile float sink;

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec * 1e-9;
}

static void pin(int cpu) {
    cpu_set_t set;
    CPU_ZERO(&set);
    CPU_SET(cpu, &set);
    sched_setaffinity(0, sizeof set, &set);
}

static void read_all(void) {
    float s = 0;
    for (int i = 0; i < FLOATS; i += 16) s += buf[i];
    sink = s;
}

static double write_all(void) {
    double t = now();
    for (int i = 0; i < FLOATS; i++) buf[i] = (float)i;
    return now() - t;
}

static void *echo(void *arg) {
    (void)arg;
    pin(1);
    for (int i = 0; i < ROUNDS; i++) {
        while (atomic_load(&flag) != 1) {
        }
        atomic_store(&flag, 0);
    }
    /* Then read the buffer whenever asked (flag 2), and say so (flag 3). */
    for (int r = 0; r < WRITES; r++) {
        while (atomic_load(&flag) != 2) {
        }
        read_all();
        atomic_store(&flag, 3);
    }
    return NULL;
}

int main(void) {
    pthread_t t;
    buf = aligned_alloc(64, FLOATS * sizeof(float));
    memset(buf, 0, FLOATS * sizeof(float));
    pin(0);
    pthread_create(&t, NULL, echo, NULL);
    double a = now();
    for (int i = 0; i < ROUNDS; i++) {
        atomic_store(&flag, 1);
        while (atomic_load(&flag) != 0) {
        }
    }
    printf("round trip %.0f ns\n", (now() - a) * 1e9 / ROUNDS);
    double own = 0, shared = 0;
    for (int r = 0; r < WRITES; r++) {
        read_all();
        own += write_all();
    }
    for (int r = 0; r < WRITES; r++) {
        read_all();
        atomic_store(&flag, 2);
        while (atomic_load(&flag) != 3) {
        }
        shared += write_all();
    }
    pthread_join(t, NULL);
    printf("writing 3 MB: %.0f us, after the other thread read it: %.0f us\n", own * 1e6 / WRITES, shared * 1e6 / WRITES);
    return 0;
}
