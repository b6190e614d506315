/* ringbus ring core.  The layout and protocol are drawn in ring.h. */
#define _GNU_SOURCE
#include "ring.h"

#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <linux/futex.h>
#include <pthread.h>
#include <sched.h>
#include <stdalign.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define cpu_relax() _mm_pause()
#elif defined(__aarch64__)
#define cpu_relax() __asm__ __volatile__("yield" ::: "memory")
#else
#define cpu_relax() ((void)0)
#endif

/* Fault injection, always compiled in and off unless RINGBUS_FAULT names a
 * point when the handle is opened (RINGBUS_FAULT_AFTER=N skips N hits):
 * the process then _exit()s exactly there, to test crash recovery. */
enum { F_NONE, F_PUT_AFTER_CLAIM, F_PUT_MID_WRITE, F_GET_BEFORE_RELEASE };
#define FAULT(r, point)                                                        \
    do {                                                                       \
        if (__builtin_expect((r)->fault == (point), 0) && (r)->fault_skip-- <= 0) \
            _exit(77);                                                         \
    } while (0)

#define MAGIC 0x31535542474e4952ULL      /* "RINGBUS1" little-endian */
#define INIT_MAGIC 0x54494e49474e4952ULL /* "RINGINIT": creator still writing */
#define META_PAD (1ULL << 63)       /* padding to the end of the array */
#define META_ABANDONED (1ULL << 62) /* claimed by a producer that died */
#define META_SKIP (META_PAD | META_ABANDONED)
#define META_SPAN_MASK 0xffffffffULL
#define META_LEN_MASK 0xffffffffULL
#define PAGE 4096u
#define DEFAULT_SPIN_NS 20000 /* bounded: on 2 cores a longer spin starves */
#define YIELDS 8
#define MAX_PARTS 64
#define PARTS_OFFSET 4096
/* A waiter stuck on one ticket this long checks whether its claimant died. */
#define RECOVER_AFTER_NS 100000000LL
/* How long one round of spinning holds a side's spin lease, in 1.024 us
 * ticks (renewed while spinning: a few microseconds covers 64 pauses). */
#define SPIN_LEASE_TICKS 6LL

typedef struct {
    _Atomic uint32_t seq;     /* bumped by notifiers; the futex word */
    _Atomic uint32_t waiters; /* sleepers registered; 0 => no wake syscall */
    _Atomic uint64_t waits;   /* statistics: sleeps entered */
} eventcount_t;

typedef struct {
    /* 0 */ _Atomic uint64_t magic;
    /* 8 */ uint32_t layout_version;
    /* 12 */ uint32_t header_size;
    /* 16 */ uint64_t capacity;
    /* 24 */ uint32_t slot_size;
    /* 28 */ uint32_t max_message_size;
    /* 32 */ uint64_t limit;
    /* 40 */ uint32_t creator_uid;
    /* 44 */ uint32_t creator_pid;
    /* 48 */ uint64_t creator_start;
    /* 56 */ uint64_t segment_size;
    /* 64 */ uint64_t cells_offset;
    /* 72 */ uint64_t data_offset;
    /* 80 */ uint64_t created_unix_ns;
    /* 88 */ uint32_t flags; /* RING_FLAG_PERSISTENT: made by RING_OPEN */
    alignas(128) _Atomic uint64_t tail; /* 128 */
    _Atomic uint64_t puts;
    _Atomic uint64_t bytes_in;
    alignas(128) _Atomic uint64_t head; /* 256 */
    _Atomic uint64_t gets;
    _Atomic uint64_t bytes_out;
    alignas(128) eventcount_t not_empty; /* 384 */
    alignas(128) eventcount_t not_full;  /* 512 */
    alignas(128) _Atomic int64_t unfinished; /* 640 */
    eventcount_t joined;
    alignas(128) _Atomic uint64_t abandoned; /* 768 */
    _Atomic uint64_t recovered;
    _Atomic uint32_t recovery_lock; /* 784: pid of the recovering process */
    /* 788: claims in flight by threads that found the attach table full.
     * Their tickets have no intent a recoverer could see, so recovery waits
     * while this is non-zero.  Incremented before the claiming CAS (whose
     * release publishes it), decremented with release after the publish or
     * free: pairs with the acquire load in ring_recover. */
    _Atomic uint32_t anon_claims;
    /* CLOCK_MONOTONIC ns until which one consumer (get) / one producer (put)
     * holds the right to spin.  A lease, not a count: a spinner killed
     * mid-spin frees it by itself.  Lines of their own: the spinner renews
     * it while notifiers read the eventcount's waiter count. */
    alignas(128) _Atomic int64_t spin_lease_get; /* 896 */
    alignas(128) _Atomic int64_t spin_lease_put; /* 1024 */
} header_t;

/* One attached thread (page 1).  Intents are written BEFORE the CAS that
 * claims tickets and cleared after publishing / freeing them, so a
 * recoverer that sees the CAS's result also sees who made it. */
typedef struct {
    _Atomic uint32_t pid;      /* 0: free; CAS 0 -> pid takes the entry */
    _Atomic uint32_t tid;
    _Atomic uint64_t start;    /* process start time (clock ticks): pid reuse */
    _Atomic uint64_t put_lo;   /* producer claim [put_lo, put_hi); empty: none */
    _Atomic uint64_t put_hi;
    _Atomic uint32_t put_n;    /* records in that claim */
    _Atomic uint32_t put_done; /* records already published */
    _Atomic uint64_t get_lo;   /* consumer claim [get_lo, get_hi) */
    _Atomic uint64_t get_hi;
    /* The owner's handle (ring_t.gen; process-local, so only meaningful with
     * pid): a thread finds its own entry again after its cache forgot it,
     * and a detaching handle frees only the entries taken through it. */
    _Atomic uint64_t handle;
} part_t;
_Static_assert(sizeof(part_t) == 64, "one attach entry per cache line");

_Static_assert(offsetof(header_t, layout_version) == RING_OFF_VERSION, "layout");
_Static_assert(offsetof(header_t, spin_lease_put) == 1024, "layout");
_Static_assert(sizeof(header_t) <= 4096, "the header fits its page");
_Static_assert(offsetof(header_t, capacity) == RING_OFF_CAPACITY, "layout");
_Static_assert(offsetof(header_t, slot_size) == RING_OFF_SLOT_SIZE, "layout");
_Static_assert(offsetof(header_t, max_message_size) == RING_OFF_MAX_MESSAGE, "layout");
_Static_assert(offsetof(header_t, limit) == RING_OFF_LIMIT, "layout");
_Static_assert(offsetof(header_t, creator_uid) == RING_OFF_CREATOR_UID, "layout");
_Static_assert(offsetof(header_t, segment_size) == RING_OFF_SEGMENT_SIZE, "layout");
_Static_assert(offsetof(header_t, cells_offset) == RING_OFF_CELLS, "layout");
_Static_assert(offsetof(header_t, data_offset) == RING_OFF_DATA, "layout");
_Static_assert(offsetof(header_t, tail) == 128, "layout");
_Static_assert(offsetof(header_t, head) == 256, "layout");
_Static_assert(offsetof(header_t, not_empty) == 384, "layout");
_Static_assert(offsetof(header_t, not_full) == 512, "layout");
_Static_assert(offsetof(header_t, unfinished) == 640, "layout");
_Static_assert(offsetof(header_t, abandoned) == 768, "layout");
_Static_assert(sizeof(header_t) <= PAGE, "header fits page 0");
_Static_assert(offsetof(header_t, recovery_lock) == 784, "layout");
_Static_assert(offsetof(header_t, anon_claims) == 788, "layout");
_Static_assert(PARTS_OFFSET + MAX_PARTS * sizeof(part_t) <= RING_HEADER_SIZE, "table fits");
_Static_assert(sizeof(_Atomic uint32_t) == 4, "futex word is 32 bits");

typedef struct {
    _Atomic uint64_t seq;
    _Atomic uint64_t meta;
} cell_t;
_Static_assert(sizeof(cell_t) == 16, "cell is 16 bytes");

struct ring {
    header_t *hdr;
    cell_t *cells;
    uint8_t *data;
    size_t map_size;
    uint64_t cap, mask, limit;
    uint32_t slot_size, max_msg;
    int owner;
    int64_t spin_ns;
    _Atomic int closed; /* handle-local; other threads of this process read it */
    uint64_t gen;       /* unique per handle: keys the per-thread entry cache */
    _Atomic uint64_t mine; /* bit i: attach entry i was taken through this handle */
    int fault;
    long fault_skip;
    char name[RING_NAME_MAX + 2];
};

static inline part_t *parts(const ring_t *r)
{
    return (part_t *)(void *)((uint8_t *)r->hdr + PARTS_OFFSET);
}

static _Atomic uint64_t next_gen = 1;  /* handle generations */
static _Atomic uint64_t fork_gen = 0;  /* bumped in every forked child */
static pthread_once_t fork_once = PTHREAD_ONCE_INIT;

/* relaxed: only this process's threads compare it, after the fork. */
static void on_fork_child(void) { atomic_fetch_add_explicit(&fork_gen, 1, memory_order_relaxed); }
static void install_fork_handler(void) { pthread_atfork(NULL, NULL, on_fork_child); }

/* Per-thread cache of the attach entry this thread uses on a handle. */
typedef struct {
    const ring_t *r;
    uint64_t gen, fgen;
    part_t *p;
} part_cache_t;
/* initial-exec: a direct %fs-relative access instead of a __tls_get_addr
 * call on every put and get; 140 bytes fit the static TLS reserve that
 * glibc keeps for dlopen()ed modules. */
#define RING_TLS __thread __attribute__((tls_model("initial-exec")))
#define PART_CACHE 8 /* rings one thread uses in turn (a worker: tasks + replies) */
static RING_TLS part_cache_t part_cache[PART_CACHE];
static RING_TLS unsigned part_cache_next;
static RING_TLS uint32_t my_tid;     /* gettid() is a syscall: cached... */
static RING_TLS uint64_t my_tid_fgen; /* ...and re-read in a forked child */

static part_t *self_part(ring_t *r);
static void release_parts(ring_t *r);
static void check_stuck(ring_t *r, int64_t now, uint64_t *ticket, int64_t *since);

/* ------------------------------------------------------------------ */
/* small helpers                                                       */

static void seterr(char *errbuf, const char *fmt, ...)
{
    if (!errbuf)
        return;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(errbuf, RING_ERRBUF, fmt, ap);
    va_end(ap);
}

int64_t ring_now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

int64_t ring_deadline_after(double seconds)
{
    if (seconds <= 0)
        return ring_now(); /* already due: one attempt, no sleep */
    if (seconds > 9.0e9)
        return RING_FOREVER;
    return ring_now() + (int64_t)(seconds * 1e9);
}

static uint64_t pow2_at_least(uint64_t v)
{
    uint64_t p = 1;
    while (p < v)
        p <<= 1;
    return p;
}

static inline cell_t *cell_at(const ring_t *r, uint64_t t) { return &r->cells[t & r->mask]; }
static inline uint8_t *slot_at(const ring_t *r, uint64_t t)
{
    return r->data + (size_t)(t & r->mask) * r->slot_size;
}
static inline uint64_t slots_for(const ring_t *r, size_t len)
{
    return len <= r->slot_size ? 1 : (len + r->slot_size - 1) / r->slot_size;
}

static int futex_wait(_Atomic uint32_t *word, uint32_t expect, int64_t deadline)
{
    struct timespec ts, *tp = NULL;
    if (deadline != RING_FOREVER) {
        ts.tv_sec = deadline / 1000000000LL;
        ts.tv_nsec = deadline % 1000000000LL;
        tp = &ts;
    }
    /* FUTEX_WAIT_BITSET takes an absolute CLOCK_MONOTONIC deadline, so
     * spurious wakeups never stretch the caller's timeout. Not PRIVATE:
     * the word is shared between processes. */
    long rc = syscall(SYS_futex, (uint32_t *)(void *)word, FUTEX_WAIT_BITSET, expect,
                      tp, NULL, FUTEX_BITSET_MATCH_ANY);
    if (rc == 0 || errno == EAGAIN)
        return RING_OK;
    if (errno == ETIMEDOUT)
        return RING_TIMEOUT;
    if (errno == EINTR)
        return RING_EINTR;
    return RING_ESYS;
}

static void futex_wake(_Atomic uint32_t *word, int n)
{
    syscall(SYS_futex, (uint32_t *)(void *)word, FUTEX_WAKE, n, NULL, NULL, 0);
}

static void futex_wake_all(_Atomic uint32_t *word) { futex_wake(word, INT_MAX); }

/* Eventcount: a waiter registers, re-checks its condition, then sleeps on
 * the seq word it read; a notifier only bumps and wakes when a waiter is
 * registered.  The two seq_cst fences (ec_prepare / ec_notify) form a
 * Dekker pair: either the notifier sees waiters > 0, or the waiter's
 * re-check sees the notifier's published data. */
#if defined(__SANITIZE_THREAD__)
#define RING_TSAN 1
#elif defined(__has_feature)
#if __has_feature(thread_sanitizer)
#define RING_TSAN 1
#endif
#endif

static uint32_t ec_prepare(eventcount_t *ec)
{
#ifdef RING_TSAN
    /* TSan has no fences: a seq_cst RMW on the word the notifier also
     * RMWs gives the same either-or (see ec_notify). */
    atomic_fetch_add_explicit(&ec->waiters, 1, memory_order_seq_cst);
#else
    /* relaxed RMW: ordering comes from the seq_cst fence right after it. */
    atomic_fetch_add_explicit(&ec->waiters, 1, memory_order_relaxed);
    atomic_thread_fence(memory_order_seq_cst); /* pairs with ec_notify's fence */
#endif
    /* acquire pairs with the notifier's release bump: a key that already
     * includes a bump also makes the data published before it visible. */
    return atomic_load_explicit(&ec->seq, memory_order_acquire);
}

static void ec_cancel(eventcount_t *ec)
{
    /* relaxed: the count is only a hint for notifiers to make the syscall. */
    atomic_fetch_sub_explicit(&ec->waiters, 1, memory_order_relaxed);
}

/* Wake up to n sleepers (INT_MAX: all).  Waking only as many consumers as
 * there are new messages avoids a thundering herd: with 4 idle workers on 2
 * cores, waking all of them per task cost 3 wasted wake-ups and spins.  A
 * woken waiter that leaves without taking anything passes the wake-up on
 * (see backoff), so none is lost. */
static void ec_notify_n(eventcount_t *ec, int n)
{
#ifdef RING_TSAN
    /* seq_cst RMW reads the latest count: either it sees the waiter, or the
     * waiter's RMW comes later and synchronizes with this one. */
    if (atomic_fetch_add_explicit(&ec->waiters, 0, memory_order_seq_cst) == 0)
        return;
#else
    atomic_thread_fence(memory_order_seq_cst); /* pairs with ec_prepare's fence */
    /* relaxed: the fence above orders it after our publication; a plain
     * load keeps this line shared instead of bouncing it on every put. */
    if (atomic_load_explicit(&ec->waiters, memory_order_relaxed) == 0)
        return;
#endif
    /* release pairs with ec_prepare's acquire load of the key. */
    atomic_fetch_add_explicit(&ec->seq, 1, memory_order_release);
    futex_wake(&ec->seq, n);
}

static void ec_notify(eventcount_t *ec) { ec_notify_n(ec, INT_MAX); }

static void ec_wake_everyone(eventcount_t *ec)
{
    /* release: same pairing as ec_notify; unconditional because close()
     * must reach sleepers that registered a moment ago. */
    atomic_fetch_add_explicit(&ec->seq, 1, memory_order_release);
    futex_wake_all(&ec->seq);
}

/* One step of the wait ladder: spin (bounded), then yield, then sleep.
 * Returns RING_OK to retry the operation, or a terminal status. */
typedef struct {
    int64_t spin_until;
    int yields;
    int started;
    uint64_t stuck_ticket; /* the ticket this waiter has been stuck on */
    int64_t stuck_since;   /* ... since then (0: not stuck) */
} backoff_t;

static int closed(const ring_t *r)
{
    /* relaxed: close() is a request; waking waiters is what orders it. */
    return atomic_load_explicit(&r->closed, memory_order_relaxed);
}

static int backoff(ring_t *r, backoff_t *b, eventcount_t *ec, int64_t deadline,
                   int (*ready)(const ring_t *, size_t), size_t arg)
{
    int64_t now;
    if (!b->started) {
        b->started = 1;
        b->yields = 0;
        b->spin_until = ring_now() + r->spin_ns;
    }
    now = ring_now();
    if (now >= deadline) {
        /* Leaving: if a wake-up meant for us finds work nobody takes, hand
         * it to the next sleeper (a no-op when nobody sleeps). */
        if (ready(r, arg))
            ec_notify_n(ec, 1);
        return RING_TIMEOUT;
    }
    if (now < b->spin_until) {
        /* One spinner per side: on 2 cores, two idle workers spinning next
         * to a dispatcher that also spins for its reply starve each other.
         * The others go straight to yielding and sleeping (and a put wakes
         * one of them).  relaxed: the lease only decides whether to spin;
         * no data is published through it. */
        _Atomic int64_t *lease = ec == &r->hdr->not_empty  ? &r->hdr->spin_lease_get
                                 : ec == &r->hdr->not_full ? &r->hdr->spin_lease_put
                                                           : NULL;
        if (lease) {
            /* The lease: expiry in 1.024 us ticks << 7 | owner (the caller's
             * attach entry + 1; 0 = anonymous), so a waiter recognises its
             * own lease from its previous wait. */
            part_t *me = self_part(r);
            int64_t owner = me ? (int64_t)(me - parts(r)) + 1 : 0;
            int64_t tick = now >> 10;
            int64_t held = atomic_load_explicit(lease, memory_order_relaxed);
            int own = owner && (held & 127) == owner;
            if (!own && (held >> 7) > tick) {
                b->spin_until = now; /* someone else spins: do not */
                return RING_OK;
            }
            /* Renew only when half used: fewer writes to the lease line. */
            if (!own || (held >> 7) - tick < SPIN_LEASE_TICKS / 2) {
                int64_t mine = ((tick + SPIN_LEASE_TICKS) << 7) | owner;
                if (!atomic_compare_exchange_strong_explicit(lease, &held, mine,
                                                             memory_order_relaxed,
                                                             memory_order_relaxed)) {
                    b->spin_until = now;
                    return RING_OK;
                }
            }
        }
        for (int i = 0; i < 64 && !ready(r, arg); i++)
            cpu_relax();
        return RING_OK;
    }
    if (b->yields < YIELDS) {
        b->yields++;
        sched_yield();
        return RING_OK;
    }
    /* A claimant that died would make this wait last forever: check for it
     * now and then, and sleep no longer than that check's period. */
    int64_t until = deadline;
    check_stuck(r, now, &b->stuck_ticket, &b->stuck_since);
    if (b->stuck_since && until > now + RECOVER_AFTER_NS)
        until = now + RECOVER_AFTER_NS;
    uint32_t key = ec_prepare(ec);
    if (ready(r, arg) || closed(r)) {
        ec_cancel(ec);
        return RING_OK;
    }
    /* relaxed: a statistic. */
    atomic_fetch_add_explicit(&ec->waits, 1, memory_order_relaxed);
    int rc = futex_wait(&ec->seq, key, until);
    if (rc == RING_TIMEOUT && until < deadline)
        rc = RING_OK;
    ec_cancel(ec);
    if (rc == RING_TIMEOUT || rc == RING_EINTR) {
        if (ready(r, arg))
            ec_notify_n(ec, 1); /* pass it on, as above */
        return rc;
    }
    if (rc != RING_OK)
        return RING_ESYS;
    b->started = 0; /* woken: spin again briefly before the next sleep */
    return RING_OK;
}

/* ------------------------------------------------------------------ */
/* open / attach                                                       */

int ring_validate_name(const char *name, char *errbuf)
{
    const char *p = name;
    if (!name) {
        seterr(errbuf, "ring name is missing");
        return RING_EINVAL;
    }
    if (*p == '/')
        p++;
    size_t n = strlen(p);
    if (n == 0 || n > RING_NAME_MAX) {
        seterr(errbuf, "invalid ring name '%.210s': it must have 1 to %d characters after "
               "the leading '/'", name, RING_NAME_MAX);
        return RING_EINVAL;
    }
    if (!strcmp(p, ".") || !strcmp(p, "..")) {
        seterr(errbuf, "invalid ring name '%s'", name);
        return RING_EINVAL;
    }
    for (size_t i = 0; i < n; i++) {
        char c = p[i];
        if (!((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') ||
              c == '-' || c == '_' || c == '.')) {
            seterr(errbuf, "invalid ring name '%.210s': only letters, digits, '.', '_' and "
                   "'-' may follow the leading '/'", name);
            return RING_EINVAL;
        }
    }
    return RING_OK;
}

static void normalize(const char *name, char out[RING_NAME_MAX + 2])
{
    snprintf(out, RING_NAME_MAX + 2, "/%s", name[0] == '/' ? name + 1 : name);
}

typedef struct {
    uint64_t cap, limit, cells_off, data_off, total;
    uint32_t slot, max_msg;
} geometry_t;

/* Derives the whole geometry from three numbers; attach recomputes it from
 * the header and insists on equality, so a forged header cannot point
 * outside the mapping. */
static int geometry(uint64_t maxsize, uint32_t slot, uint32_t max_msg, geometry_t *g,
                    char *errbuf)
{
    if (slot < RING_MIN_SLOT_SIZE || slot > RING_MAX_SLOT_SIZE || slot % 8) {
        seterr(errbuf, "slot_size %u is invalid: it must be a multiple of 8 from %d to %d",
               slot, RING_MIN_SLOT_SIZE, RING_MAX_SLOT_SIZE);
        return RING_EINVAL;
    }
    if (max_msg < 1 || max_msg > RING_MAX_MESSAGE) {
        seterr(errbuf, "max_message_size %u is invalid: it must be from 1 to %d", max_msg,
               RING_MAX_MESSAGE);
        return RING_EINVAL;
    }
    if (maxsize > RING_MAX_CAPACITY) {
        seterr(errbuf, "maxsize %llu is too large (at most %d)", (unsigned long long)maxsize,
               RING_MAX_CAPACITY);
        return RING_EINVAL;
    }
    uint64_t kmax = ((uint64_t)max_msg + slot - 1) / slot;
    uint64_t cap = pow2_at_least(maxsize ? maxsize : RING_DEFAULT_CAPACITY);
    /* A record of k slots plus its padding (< k) must always fit an empty
     * ring, else a big message at the wrap could never be put. */
    uint64_t need = pow2_at_least(2 * kmax);
    if (need > cap)
        cap = need;
    if (cap < 2)
        cap = 2;
    if (cap > RING_MAX_CAPACITY) {
        seterr(errbuf, "geometry too large: %llu slots", (unsigned long long)cap);
        return RING_EINVAL;
    }
    g->cap = cap;
    g->limit = (maxsize && maxsize < cap) ? maxsize : cap;
    g->slot = slot;
    g->max_msg = max_msg;
    g->cells_off = RING_HEADER_SIZE;
    g->data_off = (g->cells_off + cap * sizeof(cell_t) + PAGE - 1) / PAGE * PAGE;
    g->total = g->data_off + cap * (uint64_t)slot;
    if (g->total > (1ULL << 40)) {
        seterr(errbuf, "ring of %llu bytes is too large", (unsigned long long)g->total);
        return RING_EINVAL;
    }
    return RING_OK;
}

/* Start time (clock ticks since boot) and state letter of a process, from
 * /proc/<pid>/stat; 0 if it does not exist. */
static uint64_t proc_info(pid_t pid, char *state)
{
    char path[64], buf[1024];
    snprintf(path, sizeof path, "/proc/%d/stat", (int)pid);
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return 0;
    ssize_t n = read(fd, buf, sizeof buf - 1);
    close(fd);
    if (n <= 0)
        return 0;
    buf[n] = 0;
    char *p = strrchr(buf, ')'); /* comm may contain spaces and ')' */
    if (!p || p[1] != ' ')
        return 0;
    unsigned long long start = 0;
    char st = 0;
    /* after ") " come the state (field 3) ... starttime (field 22) */
    if (sscanf(p + 2, "%c %*d %*d %*d %*d %*d %*u %*u %*u %*u %*u %*u %*u %*d %*d %*d %*d "
               "%*d %*d %llu", &st, &start) != 2)
        return 0;
    if (state)
        *state = st;
    return start;
}

static uint64_t proc_start_time(pid_t pid) { return proc_info(pid, NULL); }

/* Dead: gone, a zombie, or its pid reused by a process started later. */
static int proc_alive(uint32_t pid, uint64_t start)
{
    char state = 0;
    if (pid == 0)
        return 0;
    uint64_t now = proc_info((pid_t)pid, &state);
    if (now == 0)
        return 0;
    if (state == 'Z' || state == 'X')
        return 0;
    return start == 0 || now == start; /* start 0: entry still being filled in */
}

/* ------------------------------------------------------------------ */
/* the attach table                                                    */

static int part_idle(const part_t *e)
{
    /* acquire pairs with the release stores that clear intents. */
    return atomic_load_explicit(&e->put_lo, memory_order_acquire) ==
               atomic_load_explicit(&e->put_hi, memory_order_acquire) &&
           atomic_load_explicit(&e->get_lo, memory_order_acquire) ==
               atomic_load_explicit(&e->get_hi, memory_order_acquire);
}

static void free_part(part_t *e, uint32_t pid)
{
    /* relaxed stores: the release CAS on pid below publishes them. */
    atomic_store_explicit(&e->start, 0, memory_order_relaxed);
    atomic_store_explicit(&e->tid, 0, memory_order_relaxed);
    uint32_t expect = pid;
    atomic_compare_exchange_strong_explicit(&e->pid, &expect, 0, memory_order_release,
                                            memory_order_relaxed);
}

static uint64_t self_start(void)
{
    static _Atomic uint64_t cached;       /* per process... */
    static _Atomic uint64_t cached_fgen;  /* ...re-read after a fork */
    uint64_t fg = atomic_load_explicit(&fork_gen, memory_order_relaxed);
    /* relaxed: a benign race computes the same value twice. */
    uint64_t v = atomic_load_explicit(&cached, memory_order_relaxed);
    if (v == 0 || atomic_load_explicit(&cached_fgen, memory_order_relaxed) != fg) {
        v = proc_start_time(getpid());
        atomic_store_explicit(&cached, v, memory_order_relaxed);
        atomic_store_explicit(&cached_fgen, fg, memory_order_relaxed);
    }
    return v;
}

static uint32_t self_tid(void)
{
    /* relaxed: fork_gen changes only in a fresh child, before its threads run. */
    uint64_t fg = atomic_load_explicit(&fork_gen, memory_order_relaxed);
    if (my_tid == 0 || my_tid_fgen != fg) {
        my_tid = (uint32_t)syscall(SYS_gettid);
        my_tid_fgen = fg;
    }
    return my_tid;
}

/* Has thread tid of live process pid exited?  Its idle entry can then be
 * given to another thread: threads come and go (a thread per request, an
 * executor's pool) and an entry per thread ever seen would fill the table.
 * A tid is recycled only after the kernel's pid space wraps. */
static int thread_gone(uint32_t pid, uint32_t tid)
{
    char path[64];
    if (tid == 0 || tid == pid)
        return 0; /* unknown yet, or the main thread (dies with the process) */
    snprintf(path, sizeof path, "/proc/%u/task/%u", pid, tid);
    return access(path, F_OK) != 0 && errno == ENOENT;
}

static part_t *register_part(ring_t *r)
{
    part_t *t = parts(r);
    uint32_t me = (uint32_t)getpid(), tid = self_tid();
    uint64_t mine = atomic_load_explicit(&r->mine, memory_order_relaxed);
    /* Our own entry, if this thread took one through this handle before
     * its cache forgot it (it uses more rings than the cache holds).
     * Taking a second one would leak it until the handle detaches. */
    for (int i = 0; i < MAX_PARTS; i++) {
        if (!((mine >> i) & 1))
            continue;
        /* relaxed: fields this thread wrote itself (pid checked first: a
         * fork child inherits the bitmask, not the entries). */
        if (atomic_load_explicit(&t[i].pid, memory_order_relaxed) == me &&
            atomic_load_explicit(&t[i].tid, memory_order_relaxed) == tid &&
            atomic_load_explicit(&t[i].handle, memory_order_relaxed) == r->gen)
            return &t[i];
    }
    for (int pass = 0; pass < 2; pass++) {
        for (int i = 0; i < MAX_PARTS; i++) {
            /* acquire: see the previous owner's final stores. */
            uint32_t cur = atomic_load_explicit(&t[i].pid, memory_order_acquire);
            if (pass == 0 && cur != 0)
                continue;
            if (pass == 1) {
                /* table full: take over idle entries of dead processes or
                 * of exited threads (a claim waits for ring_recover). */
                if (cur == 0 || !part_idle(&t[i]))
                    continue;
                if (proc_alive(cur, atomic_load_explicit(&t[i].start, memory_order_relaxed)) &&
                    !thread_gone(cur, atomic_load_explicit(&t[i].tid, memory_order_relaxed)))
                    continue;
            }
            /* acq_rel: exclusive ownership of the entry (over an exited
             * thread's entry of this very process too: cur == me). */
            if (!atomic_compare_exchange_strong_explicit(&t[i].pid, &cur, me,
                                                         memory_order_acq_rel,
                                                         memory_order_relaxed))
                continue;
            /* relaxed: read by recoverers only together with pid. */
            atomic_store_explicit(&t[i].tid, tid, memory_order_relaxed);
            atomic_store_explicit(&t[i].handle, r->gen, memory_order_relaxed);
            atomic_store_explicit(&t[i].put_lo, 0, memory_order_relaxed);
            atomic_store_explicit(&t[i].put_hi, 0, memory_order_relaxed);
            atomic_store_explicit(&t[i].get_lo, 0, memory_order_relaxed);
            atomic_store_explicit(&t[i].get_hi, 0, memory_order_relaxed);
            /* release: the cleared intents are visible before the start
             * time that makes the entry count as fully alive. */
            atomic_store_explicit(&t[i].start, self_start(), memory_order_release);
            /* relaxed: only this process reads its own bitmask. */
            atomic_fetch_or_explicit(&r->mine, 1ULL << i, memory_order_relaxed);
            return &t[i];
        }
    }
    /* More than 64 live threads attached: this thread claims without an
     * intent, counted in anon_claims so that recovery keeps off. */
    return NULL;
}

static part_t *self_part(ring_t *r)
{
    /* relaxed: changes only in a fresh child, before its threads run. */
    uint64_t fg = atomic_load_explicit(&fork_gen, memory_order_relaxed);
    for (int i = 0; i < PART_CACHE; i++) {
        part_cache_t *c = &part_cache[i];
        if (c->r == r && c->gen == r->gen && c->fgen == fg)
            return c->p;
    }
    part_t *p = register_part(r);
    part_cache_t *c = &part_cache[part_cache_next++ % PART_CACHE];
    c->r = r;
    c->gen = r->gen;
    c->fgen = fg;
    c->p = p;
    return p;
}

static void release_parts(ring_t *r)
{
    part_t *t = parts(r);
    uint32_t me = (uint32_t)getpid();
    uint64_t mine = atomic_load_explicit(&r->mine, memory_order_relaxed);
    for (int i = 0; i < MAX_PARTS; i++)
        /* relaxed handle: our own store; an entry another handle of this
         * process took over (from an exited thread) is not ours to free. */
        if ((mine >> i) & 1 && atomic_load_explicit(&t[i].handle, memory_order_relaxed) == r->gen &&
            part_idle(&t[i]))
            free_part(&t[i], me); /* a CAS: entries a fork child inherited stay */
}

static int map_handle(ring_t *r, int fd, const geometry_t *g, char *errbuf)
{
    void *base = mmap(NULL, g->total, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    if (base == MAP_FAILED) {
        seterr(errbuf, "cannot map ring %s (%llu bytes): %s", r->name,
               (unsigned long long)g->total, strerror(errno));
        return RING_ESYS;
    }
    r->hdr = base;
    r->cells = (cell_t *)((uint8_t *)base + g->cells_off);
    r->data = (uint8_t *)base + g->data_off;
    r->map_size = g->total;
    r->cap = g->cap;
    r->mask = g->cap - 1;
    r->limit = g->limit;
    r->slot_size = g->slot;
    r->max_msg = g->max_msg;
    return RING_OK;
}

static int create_ring(ring_t *r, const ring_params_t *p, int *exists, uint32_t flags,
                       char *errbuf)
{
    geometry_t g;
    int rc = geometry(p->maxsize, p->slot_size ? p->slot_size : RING_DEFAULT_SLOT_SIZE,
                      p->max_message_size ? p->max_message_size : RING_DEFAULT_MAX_MESSAGE,
                      &g, errbuf);
    if (rc)
        return rc;
    int fd = shm_open(r->name, O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC, 0600);
    if (fd < 0) {
        if (errno == EEXIST && exists) {
            *exists = 1;
            return RING_ESYS;
        }
        seterr(errbuf, "cannot create ring %s: %s", r->name, strerror(errno));
        return RING_ESYS;
    }
    fchmod(fd, 0600); /* the umask may not widen it, but make it exact */
    /* Reserve every page now: on a full /dev/shm this fails cleanly here
     * instead of raising SIGBUS at the first write into the ring. */
    int err = posix_fallocate(fd, 0, (off_t)g.total);
    if (err) {
        seterr(errbuf, "cannot create ring %s: no room for %llu bytes in /dev/shm (%s)",
               r->name, (unsigned long long)g.total, strerror(err));
        close(fd);
        shm_unlink(r->name);
        return RING_ESYS;
    }
    rc = map_handle(r, fd, &g, errbuf);
    close(fd);
    if (rc) {
        shm_unlink(r->name);
        return rc;
    }
    header_t *h = r->hdr;
    /* relaxed: only tells attachers to wait; MAGIC below is the publication. */
    atomic_store_explicit(&h->magic, INIT_MAGIC, memory_order_relaxed);
    h->layout_version = RING_LAYOUT_VERSION;
    h->header_size = RING_HEADER_SIZE;
    h->capacity = g.cap;
    h->slot_size = g.slot;
    h->max_message_size = g.max_msg;
    h->limit = g.limit;
    h->creator_uid = (uint32_t)geteuid();
    h->creator_pid = (uint32_t)getpid();
    h->creator_start = proc_start_time(getpid());
    h->segment_size = g.total;
    h->cells_offset = g.cells_off;
    h->data_offset = g.data_off;
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    h->created_unix_ns = (uint64_t)ts.tv_sec * 1000000000ULL + (uint64_t)ts.tv_nsec;
    h->flags = flags;
    for (uint64_t t = 0; t < g.cap; t++)
        /* relaxed: nobody may read cells before magic is published. */
        atomic_store_explicit(&r->cells[t].seq, t, memory_order_relaxed);
    /* release pairs with attach's acquire load of magic: an attacher that
     * sees the magic sees the whole initialized header and cells. */
    atomic_store_explicit(&h->magic, MAGIC, memory_order_release);
    r->owner = 1;
    return RING_OK;
}

static int attach_ring(ring_t *r, char *errbuf)
{
    int fd = shm_open(r->name, O_RDWR | O_CLOEXEC, 0);
    if (fd < 0) {
        if (errno == ENOENT)
            seterr(errbuf, "no ring named %s (missing segment /dev/shm%s)", r->name, r->name);
        else
            seterr(errbuf, "cannot open ring %s: %s", r->name, strerror(errno));
        return RING_ESYS;
    }
    struct stat st;
    int64_t give_up = ring_now() + 1000000000LL; /* a creator is at most this slow */
    union {
        header_t h;
        uint8_t raw[PAGE];
    } hb;
    for (;;) {
        if (fstat(fd, &st) < 0) {
            seterr(errbuf, "cannot stat ring %s: %s", r->name, strerror(errno));
            goto fail;
        }
        if (st.st_uid != geteuid()) {
            seterr(errbuf, "ring %s belongs to another user (uid %u, we are uid %u): refused",
                   r->name, (unsigned)st.st_uid, (unsigned)geteuid());
            goto fail;
        }
        if (st.st_mode & 077) {
            seterr(errbuf, "ring %s has unsafe permissions %03o (ringbus segments are 0600): "
                   "refused", r->name, (unsigned)(st.st_mode & 0777));
            goto fail;
        }
        memset(&hb, 0, sizeof hb);
        uint64_t magic = 0;
        if (st.st_size >= (off_t)RING_HEADER_SIZE) {
            ssize_t n = pread(fd, hb.raw, PAGE, 0);
            if (n != (ssize_t)PAGE) {
                seterr(errbuf, "cannot read ring %s header", r->name);
                goto fail;
            }
            memcpy(&magic, hb.raw, sizeof magic);
        }
        if (magic == MAGIC)
            break;
        int blank = 1;
        for (size_t i = 0; i < sizeof hb.raw && blank; i++)
            blank = hb.raw[i] == 0;
        /* Only a creator caught between shm_open and publishing its header
         * leaves a segment that is empty, blank or marked RINGINIT; anything
         * else is refused at once. */
        int creating = st.st_size == 0 || (st.st_size >= (off_t)RING_HEADER_SIZE &&
                                          (blank || magic == INIT_MAGIC));
        if (!creating || ring_now() > give_up) {
            if (st.st_size < (off_t)RING_HEADER_SIZE)
                seterr(errbuf, "segment %s is truncated: %lld bytes, smaller than a ring "
                       "header (%d bytes)", r->name, (long long)st.st_size, RING_HEADER_SIZE);
            else if (blank || magic == INIT_MAGIC)
                seterr(errbuf, "segment %s was never initialized (its creator died while "
                       "creating it)", r->name);
            else
                seterr(errbuf, "segment %s is foreign: not a ringbus ring (bad magic)", r->name);
            goto fail;
        }
        usleep(1000);
    }
    /* The geometry was copied by pread after the magic was seen; re-read the
     * magic through the mapping with acquire below, before any cell use. */
    header_t *h = &hb.h;
    if (h->layout_version != RING_LAYOUT_VERSION) {
        seterr(errbuf, "ring %s has %s layout version %u (this ringbus reads version %d)",
               r->name, h->layout_version > RING_LAYOUT_VERSION ? "a newer" : "an older",
               h->layout_version, RING_LAYOUT_VERSION);
        goto fail;
    }
    if (h->creator_uid != (uint32_t)geteuid()) {
        seterr(errbuf, "ring %s was created by another user (uid %u): refused", r->name,
               h->creator_uid);
        goto fail;
    }
    geometry_t g;
    uint64_t cap = h->capacity;
    if (h->header_size != RING_HEADER_SIZE || cap < 2 || cap > RING_MAX_CAPACITY ||
        (cap & (cap - 1)) || h->limit < 1 || h->limit > cap ||
        geometry(h->limit < cap ? h->limit : cap, h->slot_size, h->max_message_size, &g,
                 NULL) != RING_OK) {
        seterr(errbuf, "ring %s has an invalid geometry in its header (capacity %llu, "
               "slot_size %u, max_message_size %u)", r->name, (unsigned long long)cap,
               h->slot_size, h->max_message_size);
        goto fail;
    }
    if (g.cap != cap || g.limit != h->limit || h->cells_offset != g.cells_off ||
        h->data_offset != g.data_off || h->segment_size != g.total) {
        seterr(errbuf, "ring %s has an inconsistent header (offsets or sizes do not match "
               "its geometry)", r->name);
        goto fail;
    }
    if ((uint64_t)st.st_size < g.total) {
        seterr(errbuf, "segment %s is truncated: %lld bytes, its header says %llu", r->name,
               (long long)st.st_size, (unsigned long long)g.total);
        goto fail;
    }
    int rc = map_handle(r, fd, &g, errbuf);
    close(fd);
    /* acquire pairs with the creator's release store of magic: the cells it
     * initialized are visible before this handle touches them. */
    if (rc == RING_OK && atomic_load_explicit(&r->hdr->magic, memory_order_acquire) != MAGIC) {
        munmap(r->hdr, r->map_size);
        seterr(errbuf, "segment %s changed while attaching (bad magic)", r->name);
        return RING_EINVAL;
    }
    return rc;
fail:
    close(fd);
    return RING_EINVAL;
}

int ring_open(const char *name, int mode, const ring_params_t *params, ring_t **out,
              char *errbuf)
{
    static const ring_params_t defaults = {0, 0, 0};
    *out = NULL;
    int rc = ring_validate_name(name, errbuf);
    if (rc)
        return rc;
    if (mode != RING_CREATE && mode != RING_ATTACH && mode != RING_OPEN) {
        seterr(errbuf, "invalid open mode %d", mode);
        return RING_EINVAL;
    }
    ring_t *r = calloc(1, sizeof *r);
    if (!r) {
        seterr(errbuf, "out of memory");
        return RING_ESYS;
    }
    normalize(name, r->name);
    r->spin_ns = DEFAULT_SPIN_NS;
    const char *env = getenv("RINGBUS_SPIN_NS");
    if (env && *env)
        r->spin_ns = atoll(env);
    /* relaxed: a unique number is all that is needed. */
    r->gen = atomic_fetch_add_explicit(&next_gen, 1, memory_order_relaxed);
    env = getenv("RINGBUS_FAULT");
    if (env && *env) {
        r->fault = !strcmp(env, "put-after-claim")      ? F_PUT_AFTER_CLAIM
                   : !strcmp(env, "put-mid-write")      ? F_PUT_MID_WRITE
                   : !strcmp(env, "get-before-release") ? F_GET_BEFORE_RELEASE
                                                        : F_NONE;
        env = getenv("RINGBUS_FAULT_AFTER");
        r->fault_skip = env ? atol(env) : 0;
    }
    pthread_once(&fork_once, install_fork_handler);
    atomic_init(&r->closed, 0);
    if (!params)
        params = &defaults;
    if (mode == RING_ATTACH) {
        rc = attach_ring(r, errbuf);
    } else if (mode == RING_CREATE) {
        rc = create_ring(r, params, NULL, 0, errbuf);
    } else {
        int exists = 0;
        rc = create_ring(r, params, &exists, RING_FLAG_PERSISTENT, errbuf);
        if (rc && exists)
            rc = attach_ring(r, errbuf);
        r->owner = 0; /* an opened ring is persistent: nobody auto-unlinks it */
    }
    if (rc) {
        free(r);
        return rc;
    }
    *out = r;
    return RING_OK;
}

void ring_detach(ring_t *r)
{
    if (!r)
        return;
    if (r->hdr) {
        release_parts(r);
        munmap(r->hdr, r->map_size);
    }
    free(r);
}

void ring_close(ring_t *r)
{
    /* relaxed store; the seq bumps below (release) order it for sleepers. */
    atomic_store_explicit(&r->closed, 1, memory_order_relaxed);
    ec_wake_everyone(&r->hdr->not_empty);
    ec_wake_everyone(&r->hdr->not_full);
    ec_wake_everyone(&r->hdr->joined);
}

int ring_is_closed(const ring_t *r) { return closed(r); }

int ring_unlink(const char *name, char *errbuf)
{
    char n[RING_NAME_MAX + 2];
    int rc = ring_validate_name(name, errbuf);
    if (rc)
        return rc;
    normalize(name, n);
    if (shm_unlink(n) < 0) {
        seterr(errbuf, errno == ENOENT ? "no ring named %s" : "cannot unlink ring %s: %s", n,
               strerror(errno));
        return RING_ESYS;
    }
    return RING_OK;
}

uint64_t ring_capacity(const ring_t *r) { return r->cap; }
uint64_t ring_limit(const ring_t *r) { return r->limit; }
uint32_t ring_slot_size(const ring_t *r) { return r->slot_size; }
uint32_t ring_max_message(const ring_t *r) { return r->max_msg; }
const char *ring_name(const ring_t *r) { return r->name; }
int ring_is_owner(const ring_t *r) { return r->owner; }
void ring_set_spin(ring_t *r, int64_t spin_ns) { r->spin_ns = spin_ns < 0 ? 0 : spin_ns; }

/* ------------------------------------------------------------------ */
/* producer                                                            */

/* Claims tickets for the longest prefix of iov that fits now, with one CAS
 * on tail.  Returns how many records were claimed (0: full) and their
 * ticket range. */
static size_t claim_put(ring_t *r, part_t *p, const ring_iov_t *iov, size_t n,
                        uint64_t *start, uint64_t *end)
{
    header_t *h = r->hdr;
    /* relaxed: the CAS below validates it; the seq loads order the data. */
    uint64_t pos = atomic_load_explicit(&h->tail, memory_order_relaxed);
    for (;;) {
        uint64_t t = pos, head = 0;
        size_t i = 0;
        int stale = 0;
        if (r->limit < r->cap)
            /* relaxed: a stale head only looks fuller (a conservative
             * answer); the seq check below is what keeps data safe. */
            head = atomic_load_explicit(&h->head, memory_order_relaxed);
        for (; i < n; i++) {
            uint64_t k = slots_for(r, iov[i].len);
            uint64_t idx = t & r->mask;
            uint64_t need = k + (idx + k > r->cap ? r->cap - idx : 0);
            if (r->limit < r->cap && t + need - head > r->limit && t != head)
                break;
            uint64_t j = 0;
            for (; j < need; j++) {
                /* acquire pairs with the consumer's release in ring_release:
                 * its reads of the slot are done before we overwrite it. */
                uint64_t s = atomic_load_explicit(&cell_at(r, t + j)->seq, memory_order_acquire);
                if (s != t + j) {
                    /* ahead of us: another producer claimed it (stale pos) */
                    stale = (int64_t)(s - (t + j)) > 0;
                    break;
                }
            }
            if (j < need)
                break;
            t += need;
        }
        if (i == 0) {
            /* relaxed: just a fresher ticket to retry from. A stale pos
             * would otherwise report a full ring that has room. */
            uint64_t now = atomic_load_explicit(&h->tail, memory_order_relaxed);
            if (!stale && now == pos) {
                if (p) /* a failed CAS left an intent on others' tickets: a
                        * sleeping "live claimant" would block their recovery */
                    atomic_store_explicit(&p->put_hi,
                                          atomic_load_explicit(&p->put_lo, memory_order_relaxed),
                                          memory_order_release);
                return 0;
            }
            pos = now;
            continue;
        }
        if (p) {
            /* relaxed: published by the release CAS just below. */
            atomic_store_explicit(&p->put_lo, pos, memory_order_relaxed);
            atomic_store_explicit(&p->put_hi, t, memory_order_relaxed);
            atomic_store_explicit(&p->put_n, (uint32_t)i, memory_order_relaxed);
            atomic_store_explicit(&p->put_done, 0, memory_order_relaxed);
        }
        /* release CAS: a recoverer that acquires tail sees our intent above.
         * Ticket ownership is all it arbitrates; the data is ordered by the
         * per-cell seq release/acquire pairs. */
        if (atomic_compare_exchange_weak_explicit(&h->tail, &pos, t, memory_order_release,
                                                  memory_order_relaxed)) {
            *start = pos;
            *end = t;
            return i;
        }
    }
}

static void write_records(ring_t *r, part_t *p, const ring_iov_t *iov, size_t n, uint64_t t)
{
    size_t bytes = 0;
    for (size_t i = 0; i < n; i++) {
        uint64_t k = slots_for(r, iov[i].len);
        uint64_t idx = t & r->mask;
        if (idx + k > r->cap) {
            uint64_t pad = r->cap - idx;
            cell_t *c = cell_at(r, t);
            /* relaxed: published by the release store of seq just below. */
            atomic_store_explicit(&c->meta, META_PAD | pad, memory_order_relaxed);
            /* release pairs with the consumer's acquire load of seq. */
            atomic_store_explicit(&c->seq, t + 1, memory_order_release);
            t += pad;
        }
        cell_t *c = cell_at(r, t);
        if (__builtin_expect(r->fault == F_PUT_MID_WRITE, 0) && iov[i].len > r->slot_size) {
            memcpy(slot_at(r, t), iov[i].base, r->slot_size);
            FAULT(r, F_PUT_MID_WRITE);
            memcpy(slot_at(r, t) + r->slot_size, (const uint8_t *)iov[i].base + r->slot_size,
                   iov[i].len - r->slot_size);
        } else if (iov[i].len) {
            memcpy(slot_at(r, t), iov[i].base, iov[i].len);
        }
        atomic_store_explicit(&c->meta, (uint64_t)iov[i].len, memory_order_relaxed); /* as above */
        /* release: the bytes and meta written above are visible to the
         * consumer whose acquire load sees t + 1. */
        atomic_store_explicit(&c->seq, t + 1, memory_order_release);
        if (p)
            /* relaxed: read by a recoverer only once we are dead. */
            atomic_store_explicit(&p->put_done, (uint32_t)(i + 1), memory_order_relaxed);
        bytes += iov[i].len;
        t += k;
    }
    header_t *h = r->hdr;
    /* relaxed: statistics; qsize() tolerates a momentary lag. */
    atomic_fetch_add_explicit(&h->puts, n, memory_order_relaxed);
    atomic_fetch_add_explicit(&h->bytes_in, bytes, memory_order_relaxed);
    if (p)
        /* release: a recoverer that sees the claim cleared sees it published. */
        atomic_store_explicit(&p->put_hi, atomic_load_explicit(&p->put_lo, memory_order_relaxed),
                              memory_order_release);
}

/* Would a message of len bytes fit at the tail now?  The same test as
 * claim_put's, without the CAS.  It must be exact: a waiter that sleeps
 * only when this is false never sleeps through room, and never spins on a
 * "room for one slot" that a larger message cannot use. */
static int room_for(const ring_t *r, size_t len)
{
    /* relaxed loads: after ec_prepare's fence (or in the spin loop, where a
     * stale answer only costs one more try). */
    uint64_t t = atomic_load_explicit(&r->hdr->tail, memory_order_relaxed);
    uint64_t k = slots_for(r, len), idx = t & r->mask;
    uint64_t need = k + (idx + k > r->cap ? r->cap - idx : 0);
    if (r->limit < r->cap) {
        uint64_t head = atomic_load_explicit(&r->hdr->head, memory_order_relaxed);
        if (t + need - head > r->limit && t != head)
            return 0;
    }
    for (uint64_t j = 0; j < need; j++)
        if (atomic_load_explicit(&cell_at(r, t + j)->seq, memory_order_relaxed) != t + j)
            return 0;
    return 1;
}

int ring_put(ring_t *r, const ring_iov_t *iov, size_t n, size_t *done, int64_t deadline)
{
    size_t off = 0;
    backoff_t b = {0};
    *done = 0;
    for (size_t i = 0; i < n; i++)
        if (iov[i].len > r->max_msg)
            return RING_ETOOBIG;
    part_t *p = self_part(r);
    _Atomic uint32_t *anon = &r->hdr->anon_claims;
    while (off < n) {
        if (closed(r))
            return RING_CLOSED;
        uint64_t start, end;
        if (!p)
            /* relaxed: the claiming CAS (release) publishes it. */
            atomic_fetch_add_explicit(anon, 1, memory_order_relaxed);
        size_t got = claim_put(r, p, iov + off, n - off, &start, &end);
        if (got) {
            FAULT(r, F_PUT_AFTER_CLAIM);
            write_records(r, p, iov + off, got, start);
            if (!p)
                /* release: a recoverer that reads the decrement sees the publish. */
                atomic_fetch_sub_explicit(anon, 1, memory_order_release);
            off += got;
            *done = off;
            /* one consumer per new message: got is small, and a consumer
             * woken for a batch takes what it finds */
            ec_notify_n(&r->hdr->not_empty, got > INT_MAX ? INT_MAX : (int)got);
            b.started = 0;
            continue;
        }
        if (!p) /* release: as above (nothing was claimed) */
            atomic_fetch_sub_explicit(anon, 1, memory_order_release);
        if (deadline == RING_NOWAIT)
            return RING_FULL;
        int rc = backoff(r, &b, &r->hdr->not_full, deadline, room_for, iov[off].len);
        if (rc != RING_OK)
            return rc;
    }
    return RING_OK;
}

/* ------------------------------------------------------------------ */
/* consumer                                                            */

static int meta_ok(const ring_t *r, uint64_t t, uint64_t meta)
{
    if (meta & META_PAD) {
        uint64_t pad = meta & ~META_PAD;
        return pad >= 1 && (t & r->mask) + pad == r->cap;
    }
    if (meta & META_ABANDONED) {
        uint64_t span = meta & ~META_ABANDONED;
        return span >= 1 && span <= r->cap; /* carries no bytes: may wrap */
    }
    uint64_t len = meta & META_LEN_MASK;
    return meta == len && len <= r->max_msg && (t & r->mask) + slots_for(r, len) <= r->cap;
}

static int claim_get(ring_t *r, part_t *p, size_t max, ring_batch_t *b)
{
    header_t *h = r->hdr;
    /* relaxed: validated by the CAS; data order comes from cell seq. */
    uint64_t pos = atomic_load_explicit(&h->head, memory_order_relaxed);
    for (;;) {
        uint64_t t = pos;
        size_t count = 0, bytes = 0;
        int stale = 0;
        while (count < max) {
            /* acquire pairs with the producer's release publish: the
             * record's meta and bytes are visible once seq == t + 1. */
            uint64_t s = atomic_load_explicit(&cell_at(r, t)->seq, memory_order_acquire);
            if (s != t + 1) {
                stale = t == pos && (int64_t)(s - (t + 1)) > 0;
                break;
            }
            /* relaxed: ordered by the acquire above; if another consumer
             * wins this record our CAS fails and the value is discarded. */
            uint64_t meta = atomic_load_explicit(&cell_at(r, t)->meta, memory_order_relaxed);
            if (!meta_ok(r, t, meta)) {
                if (atomic_load_explicit(&h->head, memory_order_relaxed) != pos)
                    break; /* we raced a consumer: the CAS will fail */
                return RING_ECORRUPT;
            }
            if (meta & META_SKIP) {
                t += meta & META_SPAN_MASK;
                continue;
            }
            t += slots_for(r, meta);
            count++;
            bytes += meta;
        }
        if (t == pos) {
            /* relaxed: a fresher ticket; report empty only if head held. */
            uint64_t now = atomic_load_explicit(&h->head, memory_order_relaxed);
            if (!stale && now == pos) {
                if (p) /* as in claim_put: never sleep holding a stale intent */
                    atomic_store_explicit(&p->get_hi,
                                          atomic_load_explicit(&p->get_lo, memory_order_relaxed),
                                          memory_order_release);
                return RING_EMPTY;
            }
            pos = now;
            continue;
        }
        if (p) {
            /* relaxed: published by the release CAS just below. */
            atomic_store_explicit(&p->get_lo, pos, memory_order_relaxed);
            atomic_store_explicit(&p->get_hi, t, memory_order_relaxed);
        }
        /* release CAS: a recoverer that acquires head sees our intent;
         * ownership is all it arbitrates (data order: cell seq). */
        if (atomic_compare_exchange_weak_explicit(&h->head, &pos, t, memory_order_release,
                                                  memory_order_relaxed)) {
            b->start = b->cursor = pos;
            b->end = t;
            b->count = count;
            b->bytes = bytes;
            if (count) {
                /* relaxed: statistics */
                atomic_fetch_add_explicit(&h->gets, count, memory_order_relaxed);
                atomic_fetch_add_explicit(&h->bytes_out, bytes, memory_order_relaxed);
            }
            return RING_OK;
        }
    }
}

static int published(const ring_t *r, size_t unused)
{
    (void)unused;
    /* relaxed: a hint for the spin loop; claim_get re-reads with acquire. */
    uint64_t t = atomic_load_explicit(&r->hdr->head, memory_order_relaxed);
    return atomic_load_explicit(&cell_at(r, t)->seq, memory_order_relaxed) == t + 1;
}

int ring_claim(ring_t *r, size_t max, ring_batch_t *b, int64_t deadline)
{
    backoff_t bo = {0};
    memset(b, 0, sizeof *b);
    if (max == 0)
        return RING_EINVAL;
    part_t *p = self_part(r);
    _Atomic uint32_t *anon = &r->hdr->anon_claims;
    for (;;) {
        if (closed(r))
            return RING_CLOSED;
        if (!p) /* relaxed: as in ring_put */
            atomic_fetch_add_explicit(anon, 1, memory_order_relaxed);
        int rc = claim_get(r, p, max, b);
        if (rc == RING_OK) {
            b->part = p;
            b->anon = !p; /* ring_release decrements */
            if (b->count)
                return RING_OK;
            ring_release(r, b); /* only padding was ready: free it, go on */
            continue;
        }
        if (!p) /* release: as in ring_put */
            atomic_fetch_sub_explicit(anon, 1, memory_order_release);
        if (rc != RING_EMPTY)
            return rc;
        if (deadline == RING_NOWAIT)
            return RING_EMPTY;
        rc = backoff(r, &bo, &r->hdr->not_empty, deadline, published, 0);
        if (rc != RING_OK)
            return rc;
    }
}

int ring_next(ring_t *r, ring_batch_t *b, const void **data, size_t *len)
{
    while (b->cursor < b->end) {
        uint64_t t = b->cursor;
        /* relaxed: we own these tickets; the claim's acquire ordered them. */
        uint64_t meta = atomic_load_explicit(&cell_at(r, t)->meta, memory_order_relaxed);
        if (meta & META_SKIP) {
            b->cursor += meta & META_SPAN_MASK;
            continue;
        }
        b->cursor += slots_for(r, meta);
        *data = slot_at(r, t);
        *len = (size_t)meta;
        return 1;
    }
    return 0;
}

static void free_tickets(ring_t *r, uint64_t from, uint64_t to)
{
    for (uint64_t t = from; t < to; t++)
        /* release pairs with the producer's acquire in claim_put: our reads
         * of the slot happen before the next lap overwrites it. */
        atomic_store_explicit(&cell_at(r, t)->seq, t + r->cap, memory_order_release);
}

void ring_release(ring_t *r, const ring_batch_t *b)
{
    FAULT(r, F_GET_BEFORE_RELEASE);
    free_tickets(r, b->start, b->end);
    /* The entry that holds the intent, not self_part(): code run between
     * claim and release (an unpickler) may have made this thread's cache
     * forget it. */
    part_t *p = b->part;
    if (p)
        /* release: whoever sees the claim cleared sees the slots freed. */
        atomic_store_explicit(&p->get_hi, atomic_load_explicit(&p->get_lo, memory_order_relaxed),
                              memory_order_release);
    else if (b->anon)
        /* release: a recoverer that reads the decrement sees the slots freed. */
        atomic_fetch_sub_explicit(&r->hdr->anon_claims, 1, memory_order_release);
    ec_notify(&r->hdr->not_full);
}

/* ------------------------------------------------------------------ */
/* queries and JoinableQueue                                           */

uint64_t ring_qsize(const ring_t *r)
{
    /* relaxed: an instantaneous estimate, as multiprocessing's is. gets is
     * read first so a racing get cannot make the difference negative. */
    uint64_t gets = atomic_load_explicit(&r->hdr->gets, memory_order_relaxed);
    uint64_t puts = atomic_load_explicit(&r->hdr->puts, memory_order_relaxed);
    return puts > gets ? puts - gets : 0;
}

int ring_full(const ring_t *r)
{
    /* relaxed: an estimate. */
    uint64_t head = atomic_load_explicit(&r->hdr->head, memory_order_relaxed);
    uint64_t tail = atomic_load_explicit(&r->hdr->tail, memory_order_relaxed);
    return tail - head >= r->limit;
}

void ring_get_stats(const ring_t *r, ring_stats_t *s)
{
    const header_t *h = r->hdr;
    memset(s, 0, sizeof *s);
    s->capacity = r->cap;
    s->limit = r->limit;
    s->slot_size = r->slot_size;
    s->max_message_size = r->max_msg;
    s->layout_version = h->layout_version;
    s->creator_uid = h->creator_uid;
    s->creator_pid = h->creator_pid;
    s->segment_size = h->segment_size;
    s->created_unix_ns = h->created_unix_ns;
    s->flags = h->flags;
    /* relaxed loads throughout: a monitoring snapshot, not a transaction. */
    s->head = atomic_load_explicit(&h->head, memory_order_relaxed);
    s->tail = atomic_load_explicit(&h->tail, memory_order_relaxed);
    s->gets = atomic_load_explicit(&h->gets, memory_order_relaxed);
    s->puts = atomic_load_explicit(&h->puts, memory_order_relaxed);
    s->bytes_in = atomic_load_explicit(&h->bytes_in, memory_order_relaxed);
    s->bytes_out = atomic_load_explicit(&h->bytes_out, memory_order_relaxed);
    s->waits_full = atomic_load_explicit(&h->not_full.waits, memory_order_relaxed);
    s->waits_empty = atomic_load_explicit(&h->not_empty.waits, memory_order_relaxed);
    s->abandoned = atomic_load_explicit(&h->abandoned, memory_order_relaxed);
    s->recovered = atomic_load_explicit(&h->recovered, memory_order_relaxed);
    s->unfinished = atomic_load_explicit(&h->unfinished, memory_order_relaxed);
}

void ring_task_add(ring_t *r, int64_t n)
{
    /* acq_rel: a join() that sees 0 must see every task_done before it. */
    int64_t now = atomic_fetch_add_explicit(&r->hdr->unfinished, n, memory_order_acq_rel) + n;
    if (now == 0)
        ec_notify(&r->hdr->joined);
}

int ring_task_done(ring_t *r)
{
    /* relaxed initial read; the CAS below carries acq_rel. */
    int64_t v = atomic_load_explicit(&r->hdr->unfinished, memory_order_relaxed);
    do {
        if (v <= 0)
            return RING_EUNDERFLOW;
    } while (!atomic_compare_exchange_weak_explicit(&r->hdr->unfinished, &v, v - 1,
                                                    memory_order_acq_rel, memory_order_relaxed));
    if (v == 1)
        ec_notify(&r->hdr->joined);
    return RING_OK;
}

int64_t ring_unfinished(const ring_t *r)
{
    /* acquire pairs with the acq_rel decrements: join returns after them. */
    return atomic_load_explicit(&r->hdr->unfinished, memory_order_acquire);
}

static int all_done(const ring_t *r, size_t unused)
{
    (void)unused;
    return ring_unfinished(r) <= 0;
}

int ring_task_join(ring_t *r, int64_t deadline)
{
    backoff_t b = {0};
    for (;;) {
        if (all_done(r, 0))
            return RING_OK;
        if (closed(r))
            return RING_CLOSED;
        if (deadline == RING_NOWAIT)
            return RING_TIMEOUT;
        int rc = backoff(r, &b, &r->hdr->joined, deadline, all_done, 0);
        if (rc != RING_OK)
            return rc;
    }
}

/* ------------------------------------------------------------------ */
/* crash recovery                                                      */

static int lock_recovery(ring_t *r)
{
    header_t *h = r->hdr;
    uint32_t me = (uint32_t)getpid();
    for (int i = 0; i < 2000; i++) {
        uint32_t cur = 0;
        /* acquire: see everything the previous recoverer did. */
        if (atomic_compare_exchange_strong_explicit(&h->recovery_lock, &cur, me,
                                                    memory_order_acquire, memory_order_relaxed))
            return 1;
        /* a holder that died keeps no lock: take it over */
        if (cur != me && !proc_alive(cur, 0) &&
            atomic_compare_exchange_strong_explicit(&h->recovery_lock, &cur, me,
                                                    memory_order_acquire, memory_order_relaxed))
            return 1;
        usleep(500);
    }
    return 0;
}

static void unlock_recovery(ring_t *r)
{
    /* release: our repairs are visible to the next recoverer. */
    atomic_store_explicit(&r->hdr->recovery_lock, 0, memory_order_release);
}

typedef struct {
    uint32_t pid;
    int alive;
    uint64_t put_lo, put_hi, get_lo, get_hi;
    uint32_t put_n, put_done;
} snap_t;

static void snapshot(ring_t *r, snap_t *sn)
{
    part_t *t = parts(r);
    for (int i = 0; i < MAX_PARTS; i++) {
        /* acquire pairs with register_part's release of start. */
        sn[i].pid = atomic_load_explicit(&t[i].pid, memory_order_acquire);
        uint64_t start = atomic_load_explicit(&t[i].start, memory_order_acquire);
        sn[i].alive = sn[i].pid && proc_alive(sn[i].pid, start);
        sn[i].put_lo = atomic_load_explicit(&t[i].put_lo, memory_order_acquire);
        sn[i].put_hi = atomic_load_explicit(&t[i].put_hi, memory_order_acquire);
        sn[i].put_n = atomic_load_explicit(&t[i].put_n, memory_order_relaxed);
        sn[i].put_done = atomic_load_explicit(&t[i].put_done, memory_order_relaxed);
        sn[i].get_lo = atomic_load_explicit(&t[i].get_lo, memory_order_acquire);
        sn[i].get_hi = atomic_load_explicit(&t[i].get_hi, memory_order_acquire);
    }
}

/* A dead producer's claim at ticket x: among dead intents covering x, the
 * true claim has the largest start (a stale intent read an older tail);
 * among equal starts take the shortest, so nothing beyond the true claim is
 * ever abandoned (the rest is found on the next pass). */
static int dead_put_claim(const snap_t *sn, uint64_t x, uint64_t tail)
{
    int best = -1;
    for (int i = 0; i < MAX_PARTS; i++) {
        if (!sn[i].pid || sn[i].alive || !(sn[i].put_lo <= x && x < sn[i].put_hi) ||
            sn[i].put_hi > tail)
            continue;
        if (best < 0 || sn[i].put_lo > sn[best].put_lo ||
            (sn[i].put_lo == sn[best].put_lo && sn[i].put_hi < sn[best].put_hi))
            best = i;
    }
    return best;
}

static int live_covers(const snap_t *sn, uint64_t lo, uint64_t hi, int get)
{
    for (int i = 0; i < MAX_PARTS; i++) {
        if (!sn[i].alive)
            continue;
        uint64_t a = get ? sn[i].get_lo : sn[i].put_lo, b = get ? sn[i].get_hi : sn[i].put_hi;
        if (a < b && a < hi && lo < b)
            return 1;
    }
    return 0;
}

static void clear_put(ring_t *r, int i)
{
    part_t *e = &parts(r)[i];
    /* release: pairs with snapshot's acquire. */
    atomic_store_explicit(&e->put_hi, atomic_load_explicit(&e->put_lo, memory_order_relaxed),
                          memory_order_release);
}

static void clear_get(ring_t *r, int i)
{
    part_t *e = &parts(r)[i];
    atomic_store_explicit(&e->get_hi, atomic_load_explicit(&e->get_lo, memory_order_relaxed),
                          memory_order_release); /* as in clear_put */
}

static int keep(ring_recovery_t *out, const void *data, size_t len)
{
    if (out->n == out->cap) {
        size_t cap = out->cap ? out->cap * 2 : 16;
        ring_iov_t *iov = realloc(out->iov, cap * sizeof *iov);
        if (!iov)
            return -1;
        out->iov = iov;
        out->cap = cap;
    }
    void *copy = malloc(len ? len : 1);
    if (!copy)
        return -1;
    memcpy(copy, data, len);
    out->iov[out->n].base = copy;
    out->iov[out->n].len = len;
    out->n++;
    return 0;
}

void ring_recovery_free(ring_recovery_t *out)
{
    for (size_t i = 0; i < out->n; i++)
        free((void *)out->iov[i].base);
    free(out->iov);
    memset(out, 0, sizeof *out);
}

int ring_recover(ring_t *r, int flags, ring_recovery_t *out)
{
    header_t *h = r->hdr;
    snap_t sn[MAX_PARTS];
    memset(out, 0, sizeof *out);
    if (!lock_recovery(r))
        return RING_TIMEOUT;
    /* acquire pairs with the release CASes on head/tail: every claim they
     * reflect has its intent visible in the snapshot taken after. */
    uint64_t head = atomic_load_explicit(&h->head, memory_order_acquire);
    uint64_t tail = atomic_load_explicit(&h->tail, memory_order_acquire);
    snapshot(r, sn);
    int rc = RING_OK;
    /* acquire pairs with the release decrements.  A claim without an
     * intent that head/tail above reflect incremented before its CAS, so
     * a zero here means every such claim is published / freed; claims
     * made after our head/tail loads lie beyond the tickets we look at.
     * Otherwise a stale dead intent could cover that live claim and we
     * would abandon or free tickets someone is still writing or reading. */
    if (atomic_load_explicit(&h->anon_claims, memory_order_acquire) != 0) {
        out->deferred = 1;
        flags &= ~(RING_RECOVER_PRODUCERS | RING_RECOVER_CONSUMERS);
    }

    /* Producers that died between claim and publish: walk the claimed,
     * unconsumed tickets and turn each dead claim into a skip record. */
    for (uint64_t x = head; (flags & RING_RECOVER_PRODUCERS) && x < tail;) {
        cell_t *c = cell_at(r, x);
        uint64_t s = atomic_load_explicit(&c->seq, memory_order_acquire); /* pairs with publish */
        if (s == x + 1) {
            uint64_t meta = atomic_load_explicit(&c->meta, memory_order_relaxed);
            if (!meta_ok(r, x, meta))
                break;
            x += meta & META_SKIP ? meta & META_SPAN_MASK : slots_for(r, meta);
            continue;
        }
        if (s != x)
            break; /* consumers moved on under us: stop, nothing is lost */
        int i = dead_put_claim(sn, x, tail);
        if (i < 0 || live_covers(sn, x, x + 1, 0)) {
            /* a live claimant will publish: skip past its claim if known */
            uint64_t next = x;
            for (int j = 0; j < MAX_PARTS; j++)
                if (sn[j].alive && sn[j].put_lo <= x && x < sn[j].put_hi && sn[j].put_hi > next)
                    next = sn[j].put_hi;
            if (next == x)
                break;
            x = next;
            continue;
        }
        uint64_t span = sn[i].put_hi - x;
        uint64_t lost = sn[i].put_n > sn[i].put_done ? sn[i].put_n - sn[i].put_done : 0;
        /* relaxed meta, then release seq: the same publication as a put. */
        atomic_store_explicit(&c->meta, META_ABANDONED | span, memory_order_relaxed);
        atomic_store_explicit(&c->seq, x + 1, memory_order_release);
        clear_put(r, i);
        sn[i].put_hi = sn[i].put_lo;
        /* relaxed: statistics. */
        atomic_fetch_add_explicit(&h->abandoned, lost, memory_order_relaxed);
        out->abandoned += lost;
        x += span;
    }
    if (out->abandoned || (flags & RING_RECOVER_PRODUCERS))
        ec_notify(&h->not_empty);

    /* Consumers that died holding a claimed batch: copy its messages out
     * (or count them for requeueing) and free its slots. */
    for (int i = 0; (flags & RING_RECOVER_CONSUMERS) && i < MAX_PARTS; i++) {
        if (!sn[i].pid || sn[i].alive || sn[i].get_lo >= sn[i].get_hi)
            continue;
        uint64_t lo = sn[i].get_lo, hi = sn[i].get_hi;
        if (hi > head) { /* its CAS never happened */
            clear_get(r, i);
            continue;
        }
        if (live_covers(sn, lo, hi, 1))
            continue;
        for (uint64_t t = lo; t < hi;) {
            cell_t *c = cell_at(r, t);
            uint64_t s = atomic_load_explicit(&c->seq, memory_order_acquire); /* as above */
            if (s == t + 1) { /* a record start, still unfreed */
                uint64_t meta = atomic_load_explicit(&c->meta, memory_order_relaxed);
                uint64_t span = !meta_ok(r, t, meta) ? 1
                                : meta & META_SKIP  ? meta & META_SPAN_MASK
                                                    : slots_for(r, meta);
                if (meta_ok(r, t, meta) && !(meta & META_SKIP)) {
                    if (keep(out, slot_at(r, t), (size_t)meta) < 0) {
                        rc = RING_ESYS; /* out of memory: leave the rest held */
                        goto done;
                    }
                    out->recovered++;
                }
                if (t + span > hi)
                    span = hi - t;
                free_tickets(r, t, t + span);
                t += span;
            } else {
                if (s == t) /* a middle slot whose record start was freed */
                    free_tickets(r, t, t + 1);
                t++;
            }
        }
        clear_get(r, i);
    }
    if (out->recovered) {
        atomic_fetch_add_explicit(&h->recovered, out->recovered, memory_order_relaxed); /* stat */
        ec_notify(&h->not_full);
    }

    /* Give dead processes' idle entries back. */
    for (int i = 0; i < MAX_PARTS; i++) {
        if (sn[i].pid && !sn[i].alive && part_idle(&parts(r)[i])) {
            free_part(&parts(r)[i], sn[i].pid);
            out->reclaimed++;
        }
    }
done:
    unlock_recovery(r);
    if (rc == RING_OK && (flags & RING_RECOVER_REQUEUE) && out->n) {
        size_t done_n = 0;
        rc = ring_put(r, out->iov, out->n, &done_n, RING_FOREVER);
        /* free the copies, keep the counts for the caller */
        for (size_t i = 0; i < out->n; i++)
            free((void *)out->iov[i].base);
        free(out->iov);
        out->iov = NULL;
        out->n = out->cap = 0;
    }
    return rc;
}

static void check_stuck(ring_t *r, int64_t now, uint64_t *ticket, int64_t *since)
{
    header_t *h = r->hdr;
    /* relaxed: a heuristic trigger; ring_recover re-reads with acquire. */
    uint64_t head = atomic_load_explicit(&h->head, memory_order_relaxed);
    uint64_t tail = atomic_load_explicit(&h->tail, memory_order_relaxed);
    uint64_t t = 0;
    int flags = 0;
    if (tail > head && atomic_load_explicit(&cell_at(r, head)->seq, memory_order_relaxed) == head) {
        t = head; /* claimed, never published */
        flags = RING_RECOVER_PRODUCERS;
    } else if (tail >= r->cap && head > tail - r->cap &&
               atomic_load_explicit(&cell_at(r, tail)->seq, memory_order_relaxed) != tail) {
        t = tail | (1ULL << 63); /* consumed, never freed */
        flags = RING_RECOVER_CONSUMERS | RING_RECOVER_REQUEUE;
    }
    if (!flags) {
        *since = 0;
        return;
    }
    if (*since == 0 || *ticket != t) {
        *ticket = t;
        *since = now;
        return;
    }
    if (now - *since >= RECOVER_AFTER_NS) {
        ring_recovery_t out;
        ring_recover(r, flags, &out);
        ring_recovery_free(&out);
        *since = now;
    }
}

size_t ring_participants(ring_t *r, ring_participant_t *out, size_t max)
{
    snap_t sn[MAX_PARTS];
    size_t n = 0;
    part_t *t = parts(r);
    snapshot(r, sn);
    for (int i = 0; i < MAX_PARTS && n < max; i++) {
        if (!sn[i].pid)
            continue;
        out[n].pid = sn[i].pid;
        out[n].tid = atomic_load_explicit(&t[i].tid, memory_order_relaxed); /* informative */
        out[n].alive = sn[i].alive;
        out[n].putting = sn[i].put_lo < sn[i].put_hi;
        out[n].getting = sn[i].get_lo < sn[i].get_hi;
        n++;
    }
    return n;
}
