/* Multi-threaded stress test of the ring core, no Python.
 *
 *   stress [producers] [consumers] [messages_per_producer] [maxsize]
 *
 * Producers put stamped messages of random sizes (single-slot, multi-slot,
 * some crossing the wrap) singly and in batches; consumers claim runs of
 * records, verify each message's checksum and that each producer's
 * sequence numbers arrive in order, and count every (producer, seq) seen.
 * At the end every message must have been seen exactly once.  A small ring
 * forces both waits (full and empty) constantly.  Exit 0 and "OK" on success.
 * Built and run under ThreadSanitizer by tests/test_core_stress.py.
 */
#define _GNU_SOURCE
#include "../ring.h"

#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define MAXP 16
#define HDR 16 /* producer u32, seq u32, len u32, checksum u32 */
#define MAX_MSG 1000

static int P = 4, C = 4;
static uint32_t N = 20000;
static char name[64];
static _Atomic uint8_t *seen;         /* P * N counters */
static _Atomic uint64_t consumed;     /* messages taken by consumers */
static _Atomic int failures;

static uint32_t xorshift(uint32_t *s)
{
    uint32_t x = *s;
    x ^= x << 13;
    x ^= x >> 17;
    x ^= x << 5;
    return *s = x;
}

static uint32_t checksum(const uint8_t *p, size_t n)
{
    uint32_t h = 2166136261u; /* FNV-1a */
    for (size_t i = 0; i < n; i++)
        h = (h ^ p[i]) * 16777619u;
    return h;
}

static void fail(const char *what, uint32_t a, uint32_t b)
{
    fprintf(stderr, "FAIL: %s (%u, %u)\n", what, a, b);
    atomic_fetch_add(&failures, 1);
}

static ring_t *attach_or_die(void)
{
    char err[RING_ERRBUF];
    ring_t *r;
    if (ring_open(name, RING_ATTACH, NULL, &r, err) != RING_OK) {
        fprintf(stderr, "attach: %s\n", err);
        exit(2);
    }
    return r;
}

static size_t make(uint8_t *buf, uint32_t prod, uint32_t seq, uint32_t *rng)
{
    uint32_t pick = xorshift(rng) % 10;
    size_t len = pick < 6 ? HDR + xorshift(rng) % 48        /* one slot */
                 : pick < 9 ? HDR + xorshift(rng) % 300     /* a few slots */
                            : HDR + xorshift(rng) % (MAX_MSG - HDR + 1); /* many */
    for (size_t i = HDR; i < len; i++)
        buf[i] = (uint8_t)(xorshift(rng));
    uint32_t h[4] = {prod, seq, (uint32_t)len, checksum(buf + HDR, len - HDR)};
    memcpy(buf, h, HDR);
    return len;
}

static void *producer(void *arg)
{
    uint32_t id = (uint32_t)(uintptr_t)arg, rng = 0x9e3779b9u * (id + 1), seq = 0;
    ring_t *r = attach_or_die();
    static __thread uint8_t bufs[8][MAX_MSG];
    while (seq < N) {
        size_t batch = 1 + xorshift(&rng) % 8, done = 0;
        if (batch > N - seq)
            batch = N - seq;
        ring_iov_t iov[8];
        for (size_t i = 0; i < batch; i++) {
            iov[i].base = bufs[i];
            iov[i].len = make(bufs[i], id, seq + (uint32_t)i, &rng);
        }
        int rc = ring_put(r, iov, batch, &done, RING_FOREVER);
        if (rc != RING_OK || done != batch)
            fail("put", (uint32_t)rc, (uint32_t)done);
        seq += (uint32_t)batch;
    }
    ring_detach(r);
    return NULL;
}

static void *consumer(void *arg)
{
    (void)arg;
    uint32_t rng = (uint32_t)(uintptr_t)arg * 7919u + 1, last[MAXP];
    int have[MAXP] = {0};
    ring_t *r = attach_or_die();
    uint64_t total = (uint64_t)P * N;
    while (atomic_load(&consumed) < total) {
        ring_batch_t b;
        int rc = ring_claim(r, 1 + xorshift(&rng) % 16, &b, ring_deadline_after(0.05));
        if (rc == RING_TIMEOUT)
            continue;
        if (rc != RING_OK) {
            fail("claim", (uint32_t)rc, 0);
            break;
        }
        const void *data;
        size_t len, n = 0;
        while (ring_next(r, &b, &data, &len) == 1) {
            uint32_t h[4];
            n++;
            if (len < HDR) {
                fail("short message", (uint32_t)len, 0);
                continue;
            }
            memcpy(h, data, HDR);
            if (h[0] >= (uint32_t)P || h[1] >= N || h[2] != len ||
                h[3] != checksum((const uint8_t *)data + HDR, len - HDR)) {
                fail("corrupt message", h[0], h[1]);
                continue;
            }
            if (have[h[0]] && h[1] <= last[h[0]])
                fail("per-producer order", last[h[0]], h[1]);
            have[h[0]] = 1;
            last[h[0]] = h[1];
            atomic_fetch_add(&seen[(size_t)h[0] * N + h[1]], 1);
        }
        if (n != b.count)
            fail("batch count", (uint32_t)n, (uint32_t)b.count);
        ring_release(r, &b);
        atomic_fetch_add(&consumed, n);
    }
    ring_detach(r);
    return NULL;
}

int main(int argc, char **argv)
{
    if (argc > 1) P = atoi(argv[1]);
    if (argc > 2) C = atoi(argv[2]);
    if (argc > 3) N = (uint32_t)atoi(argv[3]);
    uint64_t maxsize = argc > 4 ? (uint64_t)atoll(argv[4]) : 64;
    if (P < 1 || P > MAXP || C < 1 || C > 64) {
        fprintf(stderr, "bad arguments\n");
        return 2;
    }
    snprintf(name, sizeof name, "/ringbus-stress-%d", (int)getpid());
    ring_params_t params = {maxsize, 64, MAX_MSG};
    char err[RING_ERRBUF];
    ring_t *owner;
    if (ring_open(name, RING_CREATE, &params, &owner, err) != RING_OK) {
        fprintf(stderr, "create: %s\n", err);
        return 2;
    }
    seen = calloc((size_t)P * N, 1);
    pthread_t th[MAXP + 64];
    for (int i = 0; i < C; i++)
        pthread_create(&th[i], NULL, consumer, (void *)(uintptr_t)i);
    for (int i = 0; i < P; i++)
        pthread_create(&th[C + i], NULL, producer, (void *)(uintptr_t)i);
    for (int i = 0; i < C + P; i++)
        pthread_join(th[i], NULL);
    uint64_t lost = 0, dup = 0;
    for (size_t i = 0; i < (size_t)P * N; i++) {
        uint8_t v = atomic_load(&seen[i]);
        lost += v == 0;
        dup += v > 1;
    }
    ring_stats_t s;
    ring_get_stats(owner, &s);
    printf("producers=%d consumers=%d messages=%llu capacity=%llu puts=%llu gets=%llu "
           "waits_full=%llu waits_empty=%llu lost=%llu duplicated=%llu failures=%d\n",
           P, C, (unsigned long long)P * N, (unsigned long long)s.capacity,
           (unsigned long long)s.puts, (unsigned long long)s.gets,
           (unsigned long long)s.waits_full, (unsigned long long)s.waits_empty,
           (unsigned long long)lost, (unsigned long long)dup, atomic_load(&failures));
    ring_unlink(name, NULL);
    ring_detach(owner);
    free((void *)seen);
    int ok = !lost && !dup && !atomic_load(&failures) && s.puts == s.gets &&
             s.puts == (uint64_t)P * N;
    puts(ok ? "OK" : "FAILED");
    return ok ? 0 : 1;
}
