/* Round-trip latency of one cache line passed between two threads: about 100 ns when the two cores
 * share a die (and its L3), 400-600 ns when a VM's two vCPUs sit on different dies. That state decides
 * how well cnnc (and ORT) scale to two threads, so benchmark notes say which one they ran in
 * (docs/benchmarks.md).
 *
 *     cc -O2 -pthread bench/pingpong.c -o /tmp/pp && /tmp/pp
 */
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <time.h>

enum { ROUNDS = 200000 };
static _Atomic int flag;

static void *echo(void *arg) {
    (void)arg;
    for (int i = 0; i < ROUNDS; i++) {
        while (atomic_load(&flag) != 1) {
        }
        atomic_store(&flag, 0);
    }
    return NULL;
}

int main(void) {
    pthread_t t;
    struct timespec a, b;
    pthread_create(&t, NULL, echo, NULL);
    clock_gettime(CLOCK_MONOTONIC, &a);
    for (int i = 0; i < ROUNDS; i++) {
        atomic_store(&flag, 1);
        while (atomic_load(&flag) != 0) {
        }
    }
    clock_gettime(CLOCK_MONOTONIC, &b);
    pthread_join(t, NULL);
    printf("round trip %.0f ns\n", ((b.tv_sec - a.tv_sec) * 1e9 + (b.tv_nsec - a.tv_nsec)) / ROUNDS);
    return 0;
}
