/* ringbus ring core, internal: the shared-memory structures, the handle,
 * and the static inline helpers every part of the core uses on its hot
 * path.  The layout and protocol are drawn in ring.h; nothing here is
 * part of the public API.
 *
 * The core is split by job:
 *   platform.c      clock, futex, /proc liveness, thread id, fork hook
 *   waiting.c       eventcount sleep side, spin lease, backoff ladder
 *   segment.c       names, geometry, create / attach / open / close / unlink
 *   attach_table.c  the attach table: register, find, release entries
 *   ring.c          put / claim / next / release, queries, task counters
 *   recover.c       crash recovery and the stuck-waiter check
 * Everything a put or get does per message is in ring.c or inline here,
 * so the hot path crosses no translation unit.
 */
#ifndef RINGBUS_RING_INTERNAL_H
#define RINGBUS_RING_INTERNAL_H

#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include "ring.h"

#include <limits.h>
#include <stdalign.h>
#include <stdatomic.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/stat.h>
#include <unistd.h>

/* Functions and data shared between the core's files, never exported. */
#define RING_HIDDEN __attribute__((visibility("hidden")))

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
#define MAX_ENTRIES 64
#define ENTRIES_OFFSET 4096
/* A waiter stuck on one ticket this long checks whether its claimant died. */
#define RECOVER_AFTER_NS 100000000LL
/* How long one round of spinning holds a side's spin lease, in 1.024 us
 * ticks (renewed while spinning: a few microseconds covers 64 pauses). */
#define SPIN_LEASE_TICKS 6LL
/* How long the recovery lock is held without renewal (recover.c). */
#define RECOVERY_LEASE_NS 1000000000LL
/* A claim that finds a sequence word ahead of a head / tail that did not
 * move re-reads this many times before it reports RING_ECORRUPT. */
#define CORRUPT_RETRIES 64

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
    /* 784: pid of the recovering process (0: free).  Informative only: a
     * pid cannot be checked across PID namespaces, so the lock is a lease,
     * held while recovery_lease (792) is in the future and not more than
     * one lease ahead (a value further out is bogus).  See recover.c. */
    _Atomic uint32_t recovery_lock;
    /* 788: claims in flight by threads that found the attach table full.
     * Their tickets have no intent a recoverer could see, so recovery waits
     * while this is non-zero.  Incremented before the claiming CAS (whose
     * release publishes it), decremented with release after the publish or
     * free: pairs with the acquire load in ring_recover. */
    _Atomic uint32_t anon_claims;
    _Atomic int64_t recovery_lease; /* 792: CLOCK_MONOTONIC ns */
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
    /* The owner's handle (low 32 bits of ring_t.gen; process-local, so only
     * meaningful with pid): a thread finds its own entry again after its
     * cache forgot it, and a detaching handle frees only the entries taken
     * through it. */
    _Atomic uint32_t handle;
    /* The owner's PID namespace (inode of /proc/self/ns/pid; 0: unknown, as
     * written by ringbus before it recorded it, when these four bytes were
     * the always-zero high half of a 64-bit handle).  Entries of another
     * namespace are never judged dead: their pid means nothing in our /proc. */
    _Atomic uint32_t pidns;
} entry_t;
_Static_assert(sizeof(entry_t) == 64, "one attach entry per cache line");

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
_Static_assert(offsetof(header_t, recovery_lease) == 792, "layout");
_Static_assert(offsetof(entry_t, handle) == 56 && offsetof(entry_t, pidns) == 60, "layout");
_Static_assert(ENTRIES_OFFSET + MAX_ENTRIES * sizeof(entry_t) <= RING_HEADER_SIZE, "table fits");
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

static inline entry_t *entries(const ring_t *r)
{
    return (entry_t *)(void *)((uint8_t *)r->hdr + ENTRIES_OFFSET);
}

/* Per-thread cache of the attach entry this thread uses on a handle. */
typedef struct {
    const ring_t *r;
    uint64_t gen, fgen;
    entry_t *e;
} entry_cache_t;
/* initial-exec: a direct %fs-relative access instead of a __tls_get_addr
 * call on every put and get; 140 bytes fit the static TLS reserve that
 * glibc keeps for dlopen()ed modules. */
#define RING_TLS __thread __attribute__((tls_model("initial-exec")))
#define ENTRY_CACHE 8 /* rings one thread uses in turn (a worker: tasks + replies) */
/* attach_table.c */
RING_HIDDEN extern RING_TLS entry_cache_t entry_cache[ENTRY_CACHE];
/* platform.c: bumped in every forked child */
RING_HIDDEN extern _Atomic uint64_t fork_gen;

/* ------------------------------------------------------------------ */
/* declarations shared between the core's files                        */

/* platform.c */
/* 0 when ``fd`` (a segment named ``name``, a ``kind`` such as "ring") is a file of
 * this user with no group or other bits; else -1 with the reason in errbuf. */
RING_HIDDEN int check_segment_file(int fd, struct stat *st, const char *kind, const char *name,
                                   char *errbuf);
RING_HIDDEN void seterr(char *errbuf, const char *fmt, ...)
    __attribute__((format(printf, 2, 3)));
RING_HIDDEN void install_fork_handler_once(void);
RING_HIDDEN int futex_wait(_Atomic uint32_t *word, uint32_t expect, int64_t deadline);
RING_HIDDEN void futex_wake(_Atomic uint32_t *word, int n);
RING_HIDDEN uint64_t proc_start_time(pid_t pid);
RING_HIDDEN int proc_alive(uint32_t pid, uint64_t start);
RING_HIDDEN uint64_t self_start(void);
RING_HIDDEN uint32_t self_tid(void);
RING_HIDDEN int thread_gone(uint32_t pid, uint32_t tid);
RING_HIDDEN uint32_t self_pidns(void);

/* waiting.c */
typedef struct {
    int64_t spin_until;
    int yields;
    int started;
    uint64_t stuck_ticket; /* the ticket this waiter has been stuck on */
    int64_t stuck_since;   /* ... since then (0: not stuck) */
} backoff_t;
RING_HIDDEN int backoff(ring_t *r, backoff_t *b, eventcount_t *ec, int64_t deadline,
                        int (*ready)(const ring_t *, size_t), size_t arg);
RING_HIDDEN void ec_wake_everyone(eventcount_t *ec);

/* attach_table.c */
RING_HIDDEN entry_t *self_entry_slow(ring_t *r, uint64_t fgen);
RING_HIDDEN void release_entries(ring_t *r);
RING_HIDDEN int entry_idle(const entry_t *e);
RING_HIDDEN void free_entry(entry_t *e, uint32_t pid);
RING_HIDDEN int entry_owner_alive(uint32_t pid, uint64_t start, uint32_t pidns);
typedef struct {
    uint32_t pid;
    int alive;
    uint64_t put_lo, put_hi, get_lo, get_hi;
    uint32_t put_n, put_done;
} entry_snap_t;
RING_HIDDEN void snapshot_entries(ring_t *r, entry_snap_t *sn);

/* recover.c */
RING_HIDDEN void check_stuck(ring_t *r, int64_t now, uint64_t *ticket, int64_t *since);

/* ------------------------------------------------------------------ */
/* inline helpers (hot path)                                           */

static inline cell_t *cell_at(const ring_t *r, uint64_t t) { return &r->cells[t & r->mask]; }
static inline uint8_t *slot_at(const ring_t *r, uint64_t t)
{
    return r->data + (size_t)(t & r->mask) * r->slot_size;
}
static inline uint64_t slots_for(const ring_t *r, size_t len)
{
    return len <= r->slot_size ? 1 : (len + r->slot_size - 1) / r->slot_size;
}

static inline int closed(const ring_t *r)
{
    /* relaxed: close() is a request; waking waiters is what orders it. */
    return atomic_load_explicit(&r->closed, memory_order_relaxed);
}

/* This thread's attach entry on r (NULL: the table is full).  The cache
 * lookup is inline: put and get call it once per operation. */
static inline entry_t *self_entry(ring_t *r)
{
    /* relaxed: changes only in a fresh child, before its threads run. */
    uint64_t fg = atomic_load_explicit(&fork_gen, memory_order_relaxed);
    for (int i = 0; i < ENTRY_CACHE; i++) {
        entry_cache_t *c = &entry_cache[i];
        if (c->r == r && c->gen == r->gen && c->fgen == fg)
            return c->e;
    }
    return self_entry_slow(r, fg);
}

static inline int meta_ok(const ring_t *r, uint64_t t, uint64_t meta)
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

static inline void free_tickets(ring_t *r, uint64_t from, uint64_t to)
{
    for (uint64_t t = from; t < to; t++)
        /* release pairs with the producer's acquire in claim_put: our reads
         * of the slot happen before the next lap overwrites it. */
        atomic_store_explicit(&cell_at(r, t)->seq, t + r->cap, memory_order_release);
}

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

/* Wake up to n sleepers (INT_MAX: all).  Waking only as many consumers as
 * there are new messages avoids a thundering herd: with 4 idle workers on 2
 * cores, waking all of them per task cost 3 wasted wake-ups and spins.  A
 * woken waiter that leaves without taking anything passes the wake-up on
 * (see backoff), so none is lost. */
static inline void ec_notify_n(eventcount_t *ec, int n)
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

static inline void ec_notify(eventcount_t *ec) { ec_notify_n(ec, INT_MAX); }

#endif /* RINGBUS_RING_INTERNAL_H */
