/* C reference benchmark: ringbus's own ring core driven with no Python, the
 * ceiling the Python API is measured against.
 *
 *   ring_ref throughput MODE PRODUCERS CONSUMERS SIZE BATCH SECONDS
 *   ring_ref pingpong   MODE SIZE ROUNDS
 *
 * MODE is "threads" or "procs" (forked processes, as the Python peers run).
 * Waiting uses the ring's own policy; set RINGBUS_SPIN_NS to change how long a
 * waiter spins before it sleeps on the futex (e.g. 1000000000 = spin only).
 * Prints one JSON object.
 */
#define _GNU_SOURCE
#include "../../csrc/ring.h"

#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <unistd.h>

typedef struct {
    _Atomic uint64_t produced, consumed;
    _Atomic int stop;
    _Atomic int ready;
} shared_t;

static char name[64];
static shared_t *sh;
static size_t size = 64, batch = 1;
static double seconds = 1.0;

static ring_t *attach(void)
{
    char err[RING_ERRBUF];
    ring_t *r;
    if (ring_open(name, RING_ATTACH, NULL, &r, err)) {
        fprintf(stderr, "%s\n", err);
        exit(2);
    }
    return r;
}

static void *producer(void *arg)
{
    (void)arg;
    ring_t *r = attach();
    char *buf = calloc(batch, size ? size : 1);
    ring_iov_t *iov = calloc(batch, sizeof *iov);
    for (size_t i = 0; i < batch; i++) {
        iov[i].base = buf + i * size;
        iov[i].len = size;
    }
    uint64_t n = 0;
    while (!atomic_load_explicit(&sh->stop, memory_order_relaxed)) {
        size_t done = 0;
        int rc = ring_put(r, iov, batch, &done, ring_deadline_after(0.05));
        n += done;
        if (rc != RING_OK && rc != RING_TIMEOUT)
            break;
    }
    atomic_fetch_add(&sh->produced, n);
    ring_detach(r);
    free(buf);
    free(iov);
    return NULL;
}

static void *consumer(void *arg)
{
    (void)arg;
    ring_t *r = attach();
    uint64_t n = 0;
    volatile unsigned char sink = 0;
    for (;;) {
        ring_batch_t b;
        int rc = ring_claim(r, batch, &b, ring_deadline_after(0.05));
        if (rc == RING_TIMEOUT) {
            if (atomic_load(&sh->stop))
                break;
            continue;
        }
        if (rc != RING_OK)
            break;
        const void *p;
        size_t len;
        while (ring_next(r, &b, &p, &len) == 1) {
            sink ^= len ? ((const unsigned char *)p)[0] : 0; /* touch the bytes */
            n++;
        }
        ring_release(r, &b);
    }
    atomic_fetch_add(&sh->consumed, n);
    ring_detach(r);
    return NULL;
}

static void run_all(int procs, int np, int nc)
{
    pthread_t th[64];
    pid_t pids[64];
    int k = 0;
    for (int i = 0; i < np + nc; i++) {
        void *(*fn)(void *) = i < nc ? consumer : producer;
        if (procs) {
            pid_t pid = fork();
            if (pid == 0) {
                fn(NULL);
                _exit(0);
            }
            pids[k++] = pid;
        } else {
            pthread_create(&th[k++], NULL, fn, NULL);
        }
    }
    usleep((useconds_t)(seconds * 1e6));
    atomic_store(&sh->stop, 1);
    for (int i = 0; i < k; i++) {
        if (procs)
            waitpid(pids[i], NULL, 0);
        else
            pthread_join(th[i], NULL);
    }
}

static int pingpong(int procs, uint64_t rounds)
{
    char n2[80];
    snprintf(n2, sizeof n2, "%s-back", name);
    char err[RING_ERRBUF];
    ring_params_t p = {1024, 256, 1 << 20};
    ring_t *back;
    if (ring_open(n2, RING_CREATE, &p, &back, err)) {
        fprintf(stderr, "%s\n", err);
        return 2;
    }
    pid_t pid = 0;
    pthread_t th;
    (void)th;
    if (procs) {
        pid = fork();
        if (pid == 0) {
            ring_t *a = attach(), *bk;
            ring_open(n2, RING_ATTACH, NULL, &bk, err);
            for (uint64_t i = 0; i < rounds; i++) {
                ring_batch_t b;
                const void *d;
                size_t len, done;
                ring_claim(a, 1, &b, RING_FOREVER);
                ring_next(a, &b, &d, &len);
                ring_iov_t iov = {d, len};
                ring_put(bk, &iov, 1, &done, RING_FOREVER);
                ring_release(a, &b);
            }
            _exit(0);
        }
    } else {
        fprintf(stderr, "pingpong runs in procs mode\n");
        return 2;
    }
    ring_t *a = attach();
    char *buf = calloc(1, size ? size : 1);
    int64_t *lat = malloc(rounds * sizeof *lat);
    for (uint64_t i = 0; i < rounds; i++) {
        ring_iov_t iov = {buf, size};
        size_t done;
        ring_batch_t b;
        int64_t t0 = ring_now();
        ring_put(a, &iov, 1, &done, RING_FOREVER);
        ring_claim(back, 1, &b, RING_FOREVER);
        ring_release(back, &b);
        lat[i] = ring_now() - t0;
    }
    waitpid(pid, NULL, 0);
    int cmp(const void *x, const void *y);
    qsort(lat, rounds, sizeof *lat, cmp);
    printf("{\"kind\": \"pingpong\", \"size\": %zu, \"rounds\": %llu, \"p50_ns\": %lld, "
           "\"p99_ns\": %lld, \"p999_ns\": %lld}\n",
           size, (unsigned long long)rounds, (long long)lat[rounds / 2],
           (long long)lat[rounds * 99 / 100], (long long)lat[rounds * 999 / 1000]);
    ring_detach(a);
    ring_unlink(n2, NULL);
    ring_detach(back);
    free(lat);
    free(buf);
    return 0;
}

int cmp(const void *x, const void *y)
{
    int64_t a = *(const int64_t *)x, b = *(const int64_t *)y;
    return (a > b) - (a < b);
}

int main(int argc, char **argv)
{
    if (argc < 3) {
        fprintf(stderr, "usage: ring_ref throughput|pingpong threads|procs ...\n");
        return 2;
    }
    int procs = !strcmp(argv[2], "procs");
    sh = mmap(NULL, sizeof *sh, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    snprintf(name, sizeof name, "/ringbus-ref-%d", (int)getpid());
    char err[RING_ERRBUF];
    ring_t *owner;
    ring_params_t params = {0, 0, 0};
    if (ring_open(name, RING_CREATE, &params, &owner, err)) {
        fprintf(stderr, "%s\n", err);
        return 2;
    }
    int rc = 0;
    if (!strcmp(argv[1], "pingpong")) {
        size = argc > 3 ? (size_t)atol(argv[3]) : 64;
        rc = pingpong(procs, argc > 4 ? (uint64_t)atoll(argv[4]) : 100000);
    } else {
        int np = argc > 3 ? atoi(argv[3]) : 1, nc = argc > 4 ? atoi(argv[4]) : 1;
        size = argc > 5 ? (size_t)atol(argv[5]) : 64;
        batch = argc > 6 ? (size_t)atol(argv[6]) : 1;
        seconds = argc > 7 ? atof(argv[7]) : 1.0;
        if (np < 1 || nc < 1 || np + nc > 64 || batch < 1) {
            fprintf(stderr, "bad arguments\n");
            rc = 2;
        } else {
            int64_t t0 = ring_now();
            run_all(procs, np, nc);
            double dt = (double)(ring_now() - t0) / 1e9;
            uint64_t n = atomic_load(&sh->consumed);
            printf("{\"kind\": \"throughput\", \"mode\": \"%s\", \"producers\": %d, "
                   "\"consumers\": %d, \"size\": %zu, \"batch\": %zu, \"seconds\": %.3f, "
                   "\"messages\": %llu, \"msg_per_s\": %.0f, \"mb_per_s\": %.1f}\n",
                   argv[2], np, nc, size, batch, dt, (unsigned long long)n, n / dt,
                   n * (double)size / dt / 1e6);
        }
    }
    ring_unlink(name, NULL);
    ring_detach(owner);
    return rc;
}
