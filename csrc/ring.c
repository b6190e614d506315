/* ringbus ring core.  The layout and protocol are drawn in ring.h. */
#define _GNU_SOURCE
#include "ring.h"

#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <linux/futex.h>
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

#ifdef RINGBUS_FAULT_INJECTION
/* RINGBUS_FAULT=<point> makes the process _exit(77) when it reaches that
 * point, to test recovery from a death at exactly that instruction. */
static void ring_fault_point(const char *name)
{
    const char *want = getenv("RINGBUS_FAULT");
    if (want && !strcmp(want, name))
        _exit(77);
}
#define FAULT_POINT(name) ring_fault_point(name)
#else
#define FAULT_POINT(name) ((void)0)
#endif

#define MAGIC 0x31535542474e4952ULL /* "RINGBUS1" little-endian */
#define META_PAD (1ULL << 63)
#define META_LEN_MASK 0xffffffffULL
#define PAGE 4096u
#define DEFAULT_SPIN_NS 20000 /* bounded: on 2 cores a longer spin starves */
#define YIELDS 8

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
} header_t;

_Static_assert(offsetof(header_t, layout_version) == RING_OFF_VERSION, "layout");
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
    char name[RING_NAME_MAX + 2];
};

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

static void futex_wake_all(_Atomic uint32_t *word)
{
    syscall(SYS_futex, (uint32_t *)(void *)word, FUTEX_WAKE, INT_MAX, NULL, NULL, 0);
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

static void ec_notify(eventcount_t *ec)
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
    futex_wake_all(&ec->seq);
}

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
} backoff_t;

static int closed(const ring_t *r)
{
    /* relaxed: close() is a request; waking waiters is what orders it. */
    return atomic_load_explicit(&r->closed, memory_order_relaxed);
}

static int backoff(ring_t *r, backoff_t *b, eventcount_t *ec, int64_t deadline,
                   int (*ready)(const ring_t *))
{
    int64_t now;
    if (!b->started) {
        b->started = 1;
        b->yields = 0;
        b->spin_until = ring_now() + r->spin_ns;
    }
    now = ring_now();
    if (now >= deadline)
        return RING_TIMEOUT;
    if (now < b->spin_until) {
        for (int i = 0; i < 64 && !ready(r); i++)
            cpu_relax();
        return RING_OK;
    }
    if (b->yields < YIELDS) {
        b->yields++;
        sched_yield();
        return RING_OK;
    }
    uint32_t key = ec_prepare(ec);
    if (ready(r) || closed(r)) {
        ec_cancel(ec);
        return RING_OK;
    }
    /* relaxed: a statistic. */
    atomic_fetch_add_explicit(&ec->waits, 1, memory_order_relaxed);
    int rc = futex_wait(&ec->seq, key, deadline);
    ec_cancel(ec);
    if (rc == RING_TIMEOUT || rc == RING_EINTR)
        return rc;
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

static uint64_t proc_start_time(pid_t pid)
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
    if (!p)
        return 0;
    unsigned long long start = 0;
    /* after ") " come fields 3..; starttime is field 22 */
    if (sscanf(p + 2, "%*c %*d %*d %*d %*d %*d %*u %*u %*u %*u %*u %*u %*u %*d %*d %*d %*d "
               "%*d %*d %llu", &start) != 1)
        return 0;
    return start;
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

static int create_ring(ring_t *r, const ring_params_t *p, int *exists, char *errbuf)
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
        if (magic != 0) {
            seterr(errbuf, "segment %s is foreign: not a ringbus ring (bad magic)", r->name);
            goto fail;
        }
        /* magic 0: the creator may still be between shm_open and publishing
         * its header; give it a bounded moment before calling it broken. */
        if (ring_now() > give_up) {
            int blank = 1;
            for (size_t i = 0; i < sizeof hb.raw && blank; i++)
                blank = hb.raw[i] == 0;
            if (st.st_size < (off_t)RING_HEADER_SIZE)
                seterr(errbuf, "segment %s is truncated: %lld bytes, smaller than a ring "
                       "header (%d bytes)", r->name, (long long)st.st_size, RING_HEADER_SIZE);
            else if (blank)
                seterr(errbuf, "segment %s was never initialized (blank header)", r->name);
            else
                seterr(errbuf, "segment %s is foreign: not a ringbus ring (no magic)", r->name);
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
    atomic_init(&r->closed, 0);
    if (!params)
        params = &defaults;
    if (mode == RING_ATTACH) {
        rc = attach_ring(r, errbuf);
    } else if (mode == RING_CREATE) {
        rc = create_ring(r, params, NULL, errbuf);
    } else {
        int exists = 0;
        rc = create_ring(r, params, &exists, errbuf);
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
    if (r->hdr)
        munmap(r->hdr, r->map_size);
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
static size_t claim_put(ring_t *r, const ring_iov_t *iov, size_t n, uint64_t *start,
                        uint64_t *end)
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
            if (!stale && now == pos)
                return 0;
            pos = now;
            continue;
        }
        /* relaxed CAS: it only arbitrates ticket ownership; publication
         * order is carried by the per-cell seq release/acquire pairs. */
        if (atomic_compare_exchange_weak_explicit(&h->tail, &pos, t, memory_order_relaxed,
                                                  memory_order_relaxed)) {
            *start = pos;
            *end = t;
            return i;
        }
    }
}

static void write_records(ring_t *r, const ring_iov_t *iov, size_t n, uint64_t t)
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
        if (iov[i].len)
            memcpy(slot_at(r, t), iov[i].base, iov[i].len);
        FAULT_POINT("put-after-write");
        atomic_store_explicit(&c->meta, (uint64_t)iov[i].len, memory_order_relaxed); /* as above */
        /* release: the bytes and meta written above are visible to the
         * consumer whose acquire load sees t + 1. */
        atomic_store_explicit(&c->seq, t + 1, memory_order_release);
        bytes += iov[i].len;
        t += k;
    }
    header_t *h = r->hdr;
    /* relaxed: statistics; qsize() tolerates a momentary lag. */
    atomic_fetch_add_explicit(&h->puts, n, memory_order_relaxed);
    atomic_fetch_add_explicit(&h->bytes_in, bytes, memory_order_relaxed);
}

static int room_for_one(const ring_t *r)
{
    /* relaxed reads: this is only a hint for the spin loop. */
    uint64_t t = atomic_load_explicit(&r->hdr->tail, memory_order_relaxed);
    return atomic_load_explicit(&cell_at(r, t)->seq, memory_order_relaxed) == t;
}

int ring_put(ring_t *r, const ring_iov_t *iov, size_t n, size_t *done, int64_t deadline)
{
    size_t off = 0;
    backoff_t b = {0, 0, 0};
    *done = 0;
    for (size_t i = 0; i < n; i++)
        if (iov[i].len > r->max_msg)
            return RING_ETOOBIG;
    while (off < n) {
        if (closed(r))
            return RING_CLOSED;
        uint64_t start, end;
        size_t got = claim_put(r, iov + off, n - off, &start, &end);
        if (got) {
            FAULT_POINT("put-after-claim");
            write_records(r, iov + off, got, start);
            off += got;
            *done = off;
            ec_notify(&r->hdr->not_empty);
            b.started = 0;
            continue;
        }
        if (deadline == RING_NOWAIT)
            return RING_FULL;
        int rc = backoff(r, &b, &r->hdr->not_full, deadline, room_for_one);
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
    uint64_t len = meta & META_LEN_MASK;
    return meta == len && len <= r->max_msg && (t & r->mask) + slots_for(r, len) <= r->cap;
}

static int claim_get(ring_t *r, size_t max, ring_batch_t *b)
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
            if (meta & META_PAD) {
                t += meta & ~META_PAD;
                continue;
            }
            t += slots_for(r, meta);
            count++;
            bytes += meta;
        }
        if (t == pos) {
            /* relaxed: a fresher ticket; report empty only if head held. */
            uint64_t now = atomic_load_explicit(&h->head, memory_order_relaxed);
            if (!stale && now == pos)
                return RING_EMPTY;
            pos = now;
            continue;
        }
        /* relaxed CAS: ownership only; see above for data ordering. */
        if (atomic_compare_exchange_weak_explicit(&h->head, &pos, t, memory_order_relaxed,
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

static int published(const ring_t *r)
{
    /* relaxed: a hint for the spin loop; claim_get re-reads with acquire. */
    uint64_t t = atomic_load_explicit(&r->hdr->head, memory_order_relaxed);
    return atomic_load_explicit(&cell_at(r, t)->seq, memory_order_relaxed) == t + 1;
}

int ring_claim(ring_t *r, size_t max, ring_batch_t *b, int64_t deadline)
{
    backoff_t bo = {0, 0, 0};
    memset(b, 0, sizeof *b);
    if (max == 0)
        return RING_EINVAL;
    for (;;) {
        if (closed(r))
            return RING_CLOSED;
        int rc = claim_get(r, max, b);
        if (rc == RING_OK) {
            if (b->count)
                return RING_OK;
            ring_release(r, b); /* only padding was ready: free it, go on */
            continue;
        }
        if (rc != RING_EMPTY)
            return rc;
        if (deadline == RING_NOWAIT)
            return RING_EMPTY;
        rc = backoff(r, &bo, &r->hdr->not_empty, deadline, published);
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
        if (meta & META_PAD) {
            b->cursor += meta & ~META_PAD;
            continue;
        }
        b->cursor += slots_for(r, meta);
        *data = slot_at(r, t);
        *len = (size_t)meta;
        return 1;
    }
    return 0;
}

void ring_release(ring_t *r, const ring_batch_t *b)
{
    FAULT_POINT("get-before-release");
    for (uint64_t t = b->start; t < b->end; t++)
        /* release pairs with the producer's acquire in claim_put: our reads
         * of the slot happen before the next lap overwrites it. */
        atomic_store_explicit(&cell_at(r, t)->seq, t + r->cap, memory_order_release);
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

static int all_done(const ring_t *r) { return ring_unfinished(r) <= 0; }

int ring_task_join(ring_t *r, int64_t deadline)
{
    backoff_t b = {0, 0, 0};
    for (;;) {
        if (all_done(r))
            return RING_OK;
        if (closed(r))
            return RING_CLOSED;
        if (deadline == RING_NOWAIT)
            return RING_TIMEOUT;
        int rc = backoff(r, &b, &r->hdr->joined, deadline, all_done);
        if (rc != RING_OK)
            return rc;
    }
}
