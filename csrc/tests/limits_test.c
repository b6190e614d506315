/* Tests of the limits segment in C, with real processes (no Python):
 *
 *   limits_test
 *
 * - the token bucket: forked processes hammer one bucket; the grants never
 *   exceed burst + elapsed / interval (+1 for the token at the start), and a
 *   refusal's wait is exact;
 * - the permit cap: forked processes take and give back permits, counting
 *   who is inside in shared memory: never more than the cap at once;
 * - dead holders: one killed between its take and its stamp (fault point
 *   limit-after-take), one SIGKILLed holding a stamped permit, one zombie:
 *   their permits come back; an entry of another PID namespace never does.
 * Exit 0 and "OK" on success.  Built and run under ASan+UBSan by
 * tests/test_limits_core.py (and by `make -C csrc limits-asan`).
 */
#define _GNU_SOURCE
#include "../ring_limits.h"
#include "../ring.h"

#include <fcntl.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

static char name[64];
static int failures;

#define CHECK(cond, ...)                                                       \
    do {                                                                       \
        if (!(cond)) {                                                         \
            printf("FAIL %s:%d: ", __FILE__, __LINE__);                        \
            printf(__VA_ARGS__);                                               \
            printf("\n");                                                      \
            failures++;                                                        \
        }                                                                      \
    } while (0)

static limits_t *open_limits(void)
{
    char err[RING_ERRBUF];
    limits_t *l = NULL;
    if (limits_open(name, &l, err) != RING_OK) {
        printf("FAIL open: %s\n", err);
        exit(1);
    }
    return l;
}

static int slot_of(limits_t *l, const char *key)
{
    char err[RING_ERRBUF];
    int s = limits_slot(l, key, strlen(key), err);
    if (s < 0) {
        printf("FAIL slot %s: %s\n", key, err);
        exit(1);
    }
    return s;
}

/* ------------------------------------------------------------------ */

static void test_bucket(void)
{
    const int procs = 4;
    const uint64_t interval = 2000000, burst = 5; /* 500/s, 5 at once */
    limits_t *l = open_limits();
    int s = slot_of(l, "bucket");
    _Atomic uint64_t *granted = mmap(NULL, 4096, PROT_READ | PROT_WRITE,
                                     MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    int64_t t0 = ring_now();
    for (int p = 0; p < procs; p++) {
        if (fork() == 0) {
            limits_t *c = open_limits(); /* a handle of its own, as a worker has */
            int64_t end = ring_now() + 300000000;
            while (ring_now() < end)
                if (limits_rate_acquire(c, s, interval, burst) == 0)
                    atomic_fetch_add(granted, 1);
            limits_close(c);
            _exit(0);
        }
    }
    while (wait(NULL) > 0)
        ;
    int64_t t1 = ring_now();
    uint64_t most = burst + (uint64_t)(t1 - t0) / interval + 1;
    uint64_t g = atomic_load(granted);
    CHECK(g <= most, "bucket granted %llu > %llu", (unsigned long long)g,
          (unsigned long long)most);
    CHECK(g >= 50, "bucket granted only %llu in 0.3 s at 500/s", (unsigned long long)g);
    limits_stats_t st;
    limits_get_stats(l, s, &st);
    CHECK(st.rate_granted == g, "stats say %llu granted", (unsigned long long)st.rate_granted);
    printf("bucket: %llu granted in %.3f s (at most %llu), %llu refused\n",
           (unsigned long long)g, (t1 - t0) / 1e9, (unsigned long long)most,
           (unsigned long long)st.rate_refused);
    /* the exact wait: one token a second, burst 1 */
    int s2 = slot_of(l, "slow");
    CHECK(limits_rate_acquire(l, s2, 1000000000, 1) == 0, "first token refused");
    int64_t w = limits_rate_acquire(l, s2, 1000000000, 1);
    CHECK(w > 900000000 && w <= 1000000000, "wait %lld ns for the next token", (long long)w);
    munmap((void *)granted, 4096);
    limits_close(l);
}

static void test_cap(void)
{
    const int procs = 6;
    const uint32_t cap = 3;
    limits_t *l = open_limits();
    int s = slot_of(l, "cap");
    _Atomic int64_t *shared = mmap(NULL, 4096, PROT_READ | PROT_WRITE,
                                   MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    /* [0] inside now, [1] most inside ever, [2] grants, [3] bad releases */
    for (int p = 0; p < procs; p++) {
        if (fork() == 0) {
            limits_t *c = open_limits();
            int64_t end = ring_now() + 300000000;
            while (ring_now() < end) {
                int permit = limits_permit_acquire(c, s, cap);
                if (!permit)
                    continue;
                int64_t in = atomic_fetch_add(&shared[0], 1) + 1, most = atomic_load(&shared[1]);
                while (in > most && !atomic_compare_exchange_weak(&shared[1], &most, in))
                    ;
                atomic_fetch_add(&shared[2], 1);
                for (volatile int k = 0; k < 200; k++)
                    ;
                atomic_fetch_sub(&shared[0], 1);
                if (limits_permit_release(c, s, permit))
                    atomic_fetch_add(&shared[3], 1);
            }
            limits_close(c);
            _exit(0);
        }
    }
    while (wait(NULL) > 0)
        ;
    CHECK(shared[1] <= (int64_t)cap, "%lld inside at once with a cap of %u",
          (long long)shared[1], cap);
    CHECK(shared[1] >= 1 && shared[2] > 100, "only %lld grants", (long long)shared[2]);
    CHECK(shared[3] == 0, "%lld permits were not ours at release", (long long)shared[3]);
    limits_stats_t st;
    limits_get_stats(l, s, &st);
    CHECK(st.held == 0, "%u permits still held", st.held);
    printf("cap: %lld grants, at most %lld inside (cap %u), %llu refusals\n",
           (long long)shared[2], (long long)shared[1], cap,
           (unsigned long long)st.permits_refused);
    munmap((void *)shared, 4096);
    limits_close(l);
}

/* A child that takes a permit of `key` (cap 1), tells the parent, and then
 * waits for its fate; with the fault armed it dies inside the take. */
static pid_t holder(const char *key, int fault, int exit_after)
{
    int fd[2];
    if (pipe(fd))
        exit(1);
    pid_t pid = fork();
    if (pid == 0) {
        close(fd[0]);
        if (fault)
            setenv("RINGBUS_FAULT", "limit-after-take", 1);
        limits_t *c = open_limits();
        int permit = limits_permit_acquire(c, slot_of(c, key), 1);
        if (write(fd[1], &permit, sizeof permit) != sizeof permit)
            _exit(2);
        if (exit_after)
            _exit(0); /* without giving it back */
        pause();
        _exit(0);
    }
    close(fd[1]);
    int permit = 0;
    ssize_t n = read(fd[0], &permit, sizeof permit);
    close(fd[0]);
    CHECK(fault ? n == 0 : (n == sizeof permit && permit == 1), "holder took permit %d", permit);
    return pid;
}

static void expect_reclaimed(limits_t *l, const char *key, const char *how)
{
    int s = slot_of(l, key);
    limits_stats_t st;
    limits_get_stats(l, s, &st);
    CHECK(st.held == 1, "%s: %u held before", how, st.held);
    int permit = limits_permit_acquire(l, s, 1);
    CHECK(permit == 1, "%s: the dead holder's permit did not come back", how);
    limits_get_stats(l, s, &st);
    CHECK(st.reclaimed == 1, "%s: %llu reclaimed", how, (unsigned long long)st.reclaimed);
    CHECK(limits_permit_release(l, s, permit) == 0, "%s: release", how);
    printf("%s: permit reclaimed\n", how);
}

static void test_dead_holders(void)
{
    limits_t *l = open_limits();
    int status = 0;
    /* killed between the CAS that took the permit and its stamp */
    pid_t pid = holder("mid-acquire", 1, 0);
    waitpid(pid, &status, 0);
    CHECK(WIFEXITED(status) && WEXITSTATUS(status) == 77, "fault point not reached");
    expect_reclaimed(l, "mid-acquire", "killed mid-acquire");
    /* SIGKILLed while holding a stamped permit */
    pid = holder("killed", 0, 0);
    int s = slot_of(l, "killed");
    CHECK(limits_permit_acquire(l, s, 1) == 0, "a live holder's permit was taken");
    kill(pid, SIGKILL);
    waitpid(pid, NULL, 0);
    usleep(LIMITS_RECLAIM_EVERY_NS / 1000 + 1000); /* the scan gate of the refusal above */
    expect_reclaimed(l, "killed", "SIGKILLed holder");
    /* exited without giving it back, not reaped yet: a zombie */
    pid = holder("zombie", 0, 1);
    char stat_path[64], buf[256];
    snprintf(stat_path, sizeof stat_path, "/proc/%d/stat", (int)pid);
    for (int i = 0; i < 1000; i++) { /* until it is a zombie */
        FILE *f = fopen(stat_path, "r");
        size_t n = f ? fread(buf, 1, sizeof buf - 1, f) : 0;
        if (f)
            fclose(f);
        buf[n] = 0;
        char *p = strrchr(buf, ')');
        if (p && p[1] == ' ' && p[2] == 'Z')
            break;
        usleep(1000);
    }
    expect_reclaimed(l, "zombie", "zombie holder");
    waitpid(pid, NULL, 0);
    limits_close(l);
}

/* An entry written in another PID namespace: never judged, never freed. */
static void test_foreign_namespace(void)
{
    limits_t *l = open_limits();
    int s = slot_of(l, "foreign");
    struct stat ns;
    CHECK(stat("/proc/self/ns/pid", &ns) == 0, "no /proc/self/ns/pid");
    int fd = shm_open(name, O_RDWR, 0);
    uint8_t *base = mmap(NULL, LIMITS_SEGMENT_SIZE, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    close(fd);
    _Atomic uint64_t *owner = (_Atomic uint64_t *)(void *)(base + LIMITS_HEADER_SIZE +
                                                           (size_t)s * LIMITS_SLOT_SIZE +
                                                           LIMITS_HOLDERS_OFFSET);
    uint32_t other_ns = (uint32_t)ns.st_ino + 1, gone_pid = 4194303; /* no such pid here */
    atomic_store(owner, gone_pid | (uint64_t)other_ns << 32);
    CHECK(limits_permit_acquire(l, s, 1) == 0, "an entry of another pid namespace was freed");
    CHECK(limits_reclaim(l, s) == 0, "reclaim freed a foreign entry");
    atomic_store(owner, gone_pid | (uint64_t)(uint32_t)ns.st_ino << 32); /* ours: judged */
    CHECK(limits_reclaim(l, s) == 1, "a dead entry of our namespace was not freed");
    munmap(base, LIMITS_SEGMENT_SIZE);
    printf("foreign namespace: left alone\n");
    limits_close(l);
}

int main(void)
{
    char err[RING_ERRBUF];
    snprintf(name, sizeof name, "/ringbus-test-%d-limits-c", (int)getpid());
    setvbuf(stdout, NULL, _IOLBF, 0);
    test_bucket();
    test_cap();
    test_dead_holders();
    test_foreign_namespace();
    limits_unlink(name, err);
    if (failures) {
        printf("%d failures\n", failures);
        return 1;
    }
    printf("OK\n");
    return 0;
}
