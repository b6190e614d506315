/* ringbus limits: the segment of a bus's rate limits and concurrency caps
 * (layout and protocol drawn in ring_limits.h).  Create / attach / validate, the
 * slots named per handler, the token bucket and the permit holder table. */
#include "ring_internal.h" /* first: it defines _GNU_SOURCE */
#include "ring_limits.h"

#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <time.h>

#define LMAGIC 0x3154494d494c4252ULL     /* "RBLIMIT1" little-endian */
#define LINIT_MAGIC 0x54494e49494c4252ULL /* "RBLIINIT": creator still writing */
#define SLOT_WRITING (1ULL << 62)
#define SLOT_PUBLISHED (1ULL << 63)
#define SLOT_TAKEOVER_NS 1000000000LL /* a name half-written this long: writer gone */

typedef struct {
    /* 0 */ _Atomic uint64_t magic;
    /* 8 */ uint32_t layout_version;
    /* 12 */ uint32_t header_size;
    /* 16 */ uint32_t slots;
    /* 20 */ uint32_t holders;
    /* 24 */ uint32_t slot_size;
    /* 28 */ uint32_t creator_uid;
    /* 32 */ uint32_t creator_pid;
    /* 36 */ uint32_t zero;
    /* 40 */ uint64_t creator_start;
    /* 48 */ uint64_t segment_size;
    /* 56 */ uint64_t created_unix_ns;
} lheader_t;

typedef struct {
    _Atomic uint64_t owner; /* pid | pidns << 32; 0: free */
    _Atomic uint64_t stamp; /* pid | low32(start) << 32 */
} holder_t;

typedef struct {
    /* +0 */ _Atomic uint64_t state;
    /* +8 */ _Atomic uint32_t name_len;
    /* +12 */ uint32_t zero;
    /* +16 */ char name[240];
    /* +256 */ _Atomic uint64_t interval_ns;
    /* +264 */ _Atomic uint64_t burst;
    /* +272 */ _Atomic uint32_t cap;
    alignas(128) _Atomic int64_t tat; /* +384 */
    _Atomic uint64_t rate_granted;    /* +392 */
    _Atomic uint64_t rate_refused;    /* +400 */
    _Atomic int64_t horizon;          /* +408 */
    alignas(128) _Atomic int64_t reclaim_at; /* +512 */
    _Atomic uint64_t permits_taken;          /* +520 */
    _Atomic uint64_t permits_refused;        /* +528 */
    _Atomic uint64_t reclaimed;              /* +536 */
    alignas(1024) holder_t holder[LIMITS_HOLDERS]; /* +1024 */
} lslot_t;

_Static_assert(sizeof(lheader_t) == 64, "limits header drawn in ring_limits.h");
_Static_assert(offsetof(lslot_t, tat) == LIMITS_OFF_SLOT_TAT, "tat at +384");
_Static_assert(offsetof(lslot_t, horizon) == 408, "horizon at +408");
_Static_assert(offsetof(lslot_t, reclaim_at) == 512, "reclaim_at at +512");
_Static_assert(offsetof(lslot_t, holder) == LIMITS_HOLDERS_OFFSET, "holders at +1024");
_Static_assert(sizeof(lslot_t) == LIMITS_SLOT_SIZE, "slot size drawn in ring_limits.h");
_Static_assert(LIMITS_HEADER_SIZE + LIMITS_SLOTS * LIMITS_SLOT_SIZE == LIMITS_SEGMENT_SIZE,
               "segment size drawn in ring_limits.h");

struct limits {
    lheader_t *hdr;
    lslot_t *slot;
    char name[RING_NAME_MAX + 2];
    int fault; /* RINGBUS_FAULT=limit-after-take: _exit(77) between take and stamp */
    _Atomic uint64_t fgen;  /* fork generation the two words below belong to */
    _Atomic uint64_t owner; /* this process's owner word */
    _Atomic uint64_t stamp; /* this process's stamp word */
    _Atomic uint32_t hint; /* where the next permit search starts */
};

static void normalize(const char *name, char out[RING_NAME_MAX + 2])
{
    snprintf(out, RING_NAME_MAX + 2, "/%s", name[0] == '/' ? name + 1 : name);
}

/* ------------------------------------------------------------------ */
/* the segment                                                         */

static int create_segment(limits_t *l, char *errbuf)
{
    int fd = shm_open(l->name, O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC, 0600);
    if (fd < 0)
        return errno == EEXIST ? -1 : (seterr(errbuf, "cannot create limits segment %s: %s",
                                              l->name, strerror(errno)),
                                       RING_ESYS);
    fchmod(fd, 0600); /* the umask may not widen it, but make it exact */
    int err = posix_fallocate(fd, 0, LIMITS_SEGMENT_SIZE);
    if (err) {
        seterr(errbuf, "cannot create limits segment %s: no room for %d bytes in /dev/shm (%s)",
               l->name, LIMITS_SEGMENT_SIZE, strerror(err));
        close(fd);
        shm_unlink(l->name);
        return RING_ESYS;
    }
    void *base = mmap(NULL, LIMITS_SEGMENT_SIZE, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    close(fd);
    if (base == MAP_FAILED) {
        seterr(errbuf, "cannot map limits segment %s: %s", l->name, strerror(errno));
        shm_unlink(l->name);
        return RING_ESYS;
    }
    lheader_t *h = base;
    /* relaxed: only tells attachers to wait; LMAGIC below is the publication. */
    atomic_store_explicit(&h->magic, LINIT_MAGIC, memory_order_relaxed);
    h->layout_version = LIMITS_LAYOUT_VERSION;
    h->header_size = LIMITS_HEADER_SIZE;
    h->slots = LIMITS_SLOTS;
    h->holders = LIMITS_HOLDERS;
    h->slot_size = LIMITS_SLOT_SIZE;
    h->creator_uid = (uint32_t)geteuid();
    h->creator_pid = (uint32_t)getpid();
    h->creator_start = proc_start_time(getpid());
    h->segment_size = LIMITS_SEGMENT_SIZE;
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    h->created_unix_ns = (uint64_t)ts.tv_sec * 1000000000ULL + (uint64_t)ts.tv_nsec;
    /* release pairs with attach_segment's acquire load of magic: the header
     * (and the zeroed slots of a fresh file) are visible with the magic. */
    atomic_store_explicit(&h->magic, LMAGIC, memory_order_release);
    l->hdr = h;
    return RING_OK;
}

static int attach_segment(limits_t *l, char *errbuf)
{
    int fd = shm_open(l->name, O_RDWR | O_CLOEXEC, 0);
    if (fd < 0) {
        seterr(errbuf, "cannot open limits segment %s: %s", l->name, strerror(errno));
        return RING_ESYS;
    }
    int64_t give_up = ring_now() + 1000000000LL; /* a creator is at most this slow */
    lheader_t h;
    struct stat st;
    for (;;) {
        if (check_segment_file(fd, &st, "limits segment", l->name, errbuf) < 0)
            goto fail;
        memset(&h, 0, sizeof h);
        if (st.st_size >= (off_t)sizeof h && pread(fd, &h, sizeof h, 0) != (ssize_t)sizeof h) {
            seterr(errbuf, "cannot read limits segment %s header", l->name);
            goto fail;
        }
        uint64_t magic = atomic_load_explicit(&h.magic, memory_order_relaxed); /* a copy */
        if (magic == LMAGIC)
            break;
        /* Only a creator between shm_open and its magic leaves an empty
         * file, or a blank or RBLIINIT header: anything else is refused. */
        int creating = st.st_size == 0 || (st.st_size == LIMITS_SEGMENT_SIZE &&
                                          (magic == 0 || magic == LINIT_MAGIC));
        if (!creating || ring_now() > give_up) {
            if (magic != 0 && magic != LINIT_MAGIC)
                seterr(errbuf, "segment %s is foreign: not a ringbus limits segment (bad "
                       "magic)", l->name);
            else if (st.st_size != 0 && st.st_size < (off_t)LIMITS_SEGMENT_SIZE)
                seterr(errbuf, "limits segment %s is truncated: %lld bytes, a limits segment "
                       "has %d", l->name, (long long)st.st_size, LIMITS_SEGMENT_SIZE);
            else
                seterr(errbuf, "limits segment %s was never initialized (its creator died "
                       "while creating it)", l->name);
            goto fail;
        }
        usleep(1000);
    }
    if (h.layout_version != LIMITS_LAYOUT_VERSION) {
        seterr(errbuf, "limits segment %s has %s layout version %u (this ringbus reads "
               "version %d)", l->name, h.layout_version > LIMITS_LAYOUT_VERSION ? "a newer"
               : "an older", h.layout_version, LIMITS_LAYOUT_VERSION);
        goto fail;
    }
    if (h.creator_uid != (uint32_t)geteuid()) {
        seterr(errbuf, "limits segment %s was created by another user (uid %u): refused",
               l->name, h.creator_uid);
        goto fail;
    }
    if (h.header_size != LIMITS_HEADER_SIZE || h.slots != LIMITS_SLOTS ||
        h.holders != LIMITS_HOLDERS || h.slot_size != LIMITS_SLOT_SIZE ||
        h.segment_size != LIMITS_SEGMENT_SIZE) {
        seterr(errbuf, "limits segment %s has an invalid geometry in its header (%u slots of "
               "%u bytes, %u holders, %llu bytes)", l->name, h.slots, h.slot_size, h.holders,
               (unsigned long long)h.segment_size);
        goto fail;
    }
    if (st.st_size != (off_t)LIMITS_SEGMENT_SIZE) {
        seterr(errbuf, "limits segment %s is %s: %lld bytes, its header says %d", l->name,
               st.st_size < (off_t)LIMITS_SEGMENT_SIZE ? "truncated" : "oversized",
               (long long)st.st_size, LIMITS_SEGMENT_SIZE);
        goto fail;
    }
    void *base = mmap(NULL, LIMITS_SEGMENT_SIZE, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    close(fd);
    if (base == MAP_FAILED) {
        seterr(errbuf, "cannot map limits segment %s: %s", l->name, strerror(errno));
        return RING_ESYS;
    }
    l->hdr = base;
    /* acquire pairs with the creator's release store of magic. */
    if (atomic_load_explicit(&l->hdr->magic, memory_order_acquire) != LMAGIC) {
        munmap(base, LIMITS_SEGMENT_SIZE);
        l->hdr = NULL;
        seterr(errbuf, "limits segment %s changed while attaching (bad magic)", l->name);
        return RING_EINVAL;
    }
    return RING_OK;
fail:
    close(fd);
    return RING_EINVAL;
}

int limits_open(const char *name, limits_t **out, char *errbuf)
{
    *out = NULL;
    int rc = ring_validate_name(name, errbuf);
    if (rc)
        return rc;
    limits_t *l = calloc(1, sizeof *l);
    if (!l) {
        seterr(errbuf, "out of memory");
        return RING_ESYS;
    }
    normalize(name, l->name);
    const char *env = getenv("RINGBUS_FAULT");
    l->fault = env && !strcmp(env, "limit-after-take");
    install_fork_handler_once();
    rc = create_segment(l, errbuf);
    if (rc == -1)
        rc = attach_segment(l, errbuf);
    if (rc) {
        free(l);
        return rc;
    }
    l->slot = (lslot_t *)((uint8_t *)l->hdr + LIMITS_HEADER_SIZE);
    *out = l;
    return RING_OK;
}

void limits_close(limits_t *l)
{
    if (!l)
        return;
    munmap(l->hdr, LIMITS_SEGMENT_SIZE);
    free(l);
}

int limits_unlink(const char *name, char *errbuf)
{
    char n[RING_NAME_MAX + 2];
    int rc = ring_validate_name(name, errbuf);
    if (rc)
        return rc;
    normalize(name, n);
    if (shm_unlink(n) < 0) {
        seterr(errbuf, "cannot unlink limits segment %s: %s", n, strerror(errno));
        return RING_ESYS;
    }
    return RING_OK;
}

/* ------------------------------------------------------------------ */
/* slots: one per limited handler, found by name                       */

static uint64_t fnv1a(const char *s, size_t n)
{
    uint64_t h = 0xcbf29ce484222325ULL;
    for (size_t i = 0; i < n; i++)
        h = (h ^ (uint8_t)s[i]) * 0x100000001b3ULL;
    return h;
}

int limits_slot(limits_t *l, const char *key, size_t len, char *errbuf)
{
    if (len == 0 || len > LIMITS_NAME_MAX) {
        seterr(errbuf, "limit name of %zu bytes: it must have 1 to %d", len, LIMITS_NAME_MAX);
        return -1;
    }
    uint64_t me = SLOT_WRITING | (uint32_t)getpid();
    unsigned first = (unsigned)(fnv1a(key, len) % LIMITS_SLOTS);
    for (unsigned k = 0; k < LIMITS_SLOTS; k++) {
        lslot_t *s = &l->slot[(first + k) % LIMITS_SLOTS];
        int64_t seen_writing = 0;
        for (;;) {
            /* acquire pairs with the namer's release store of PUBLISHED:
             * its name is visible. */
            uint64_t st = atomic_load_explicit(&s->state, memory_order_acquire);
            if (st & SLOT_PUBLISHED) {
                if (atomic_load_explicit(&s->name_len, memory_order_relaxed) == len &&
                    !memcmp(s->name, key, len))
                    return (int)((first + k) % LIMITS_SLOTS);
                break; /* another handler's: probe on */
            }
            if (st & SLOT_WRITING) {
                /* Being named: wait, unless its writer died (or stopped for
                 * a second) half-way, then take the naming over. */
                int64_t now = ring_now();
                if (!seen_writing)
                    seen_writing = now;
                uint32_t pid = (uint32_t)st;
                if (proc_alive(pid, 0) && now - seen_writing < SLOT_TAKEOVER_NS) {
                    usleep(100);
                    continue;
                }
            } else if (st != 0) {
                seterr(errbuf, "limits segment %s is corrupted: slot state %#llx", l->name,
                       (unsigned long long)st);
                return -1;
            }
            /* acq_rel: acquire as above (a previous writer's name bytes are
             * ours to overwrite); release: nothing yet. */
            if (!atomic_compare_exchange_strong_explicit(&s->state, &st, me,
                                                         memory_order_acq_rel,
                                                         memory_order_relaxed))
                continue;
            memset(s->name, 0, sizeof s->name);
            memcpy(s->name, key, len);
            /* relaxed: published by the release store of state below. */
            atomic_store_explicit(&s->name_len, (uint32_t)len, memory_order_relaxed);
            /* release pairs with the acquire load of state above (every
             * later looker sees the name). */
            atomic_store_explicit(&s->state, SLOT_PUBLISHED, memory_order_release);
            return (int)((first + k) % LIMITS_SLOTS);
        }
    }
    seterr(errbuf, "limits segment %s is full: %d limited handlers at most", l->name,
           LIMITS_SLOTS);
    return -1;
}

void limits_configure(limits_t *l, int slot, uint64_t interval_ns, uint64_t burst, uint32_t cap)
{
    lslot_t *s = &l->slot[slot];
    /* relaxed: informative for tools; no acquire path reads them. */
    atomic_store_explicit(&s->interval_ns, interval_ns, memory_order_relaxed);
    atomic_store_explicit(&s->burst, burst, memory_order_relaxed);
    atomic_store_explicit(&s->cap, cap, memory_order_relaxed);
}

/* ------------------------------------------------------------------ */
/* the token bucket                                                    */

/* When a refused caller should try again: the next token's time for the
 * first one refused, one interval later for each one refused after it, so
 * that refused tasks come back spread like the tokens instead of all at the
 * next one.  Not a reservation: a token goes to whoever asks first. */
static int64_t retry_at(lslot_t *s, int64_t now, int64_t wait, int64_t interval)
{
    /* relaxed: the horizon publishes nothing but itself; the CAS hands out
     * distinct times (pairs with the other refused callers' CASes). */
    int64_t h = atomic_load_explicit(&s->horizon, memory_order_relaxed), at;
    do {
        at = now + wait;
        if (h > at && h - at <= LIMITS_MAX_SPREAD_NS)
            at = h;
    } while (!atomic_compare_exchange_weak_explicit(&s->horizon, &h, at + interval,
                                                    memory_order_relaxed, memory_order_relaxed));
    return at;
}

int64_t limits_rate_acquire(limits_t *l, int slot, uint64_t interval_ns, uint64_t burst)
{
    lslot_t *s = &l->slot[slot];
    int64_t now = ring_now();
    int64_t allow = (int64_t)((burst - 1) * interval_ns); /* bounded by the binding */
    /* relaxed: the word publishes nothing but itself; the CAS below makes
     * every grant exact (pairs with the other takers' CASes on tat). */
    int64_t tat = atomic_load_explicit(&s->tat, memory_order_relaxed);
    for (;;) {
        int64_t base = tat > now ? tat : now;
        if (base - now > allow) {
            /* relaxed: a statistic. */
            atomic_fetch_add_explicit(&s->rate_refused, 1, memory_order_relaxed);
            return retry_at(s, now, base - now - allow, (int64_t)interval_ns) - now;
        }
        /* relaxed both ways: see the load above; a failed CAS reloads tat. */
        if (atomic_compare_exchange_weak_explicit(&s->tat, &tat, base + (int64_t)interval_ns,
                                                  memory_order_relaxed, memory_order_relaxed))
            break;
    }
    atomic_fetch_add_explicit(&s->rate_granted, 1, memory_order_relaxed); /* a statistic */
    return 0;
}

/* ------------------------------------------------------------------ */
/* the holder table                                                    */

/* This process's owner and stamp words, cached (getpid is a system call)
 * and computed again in a forked child.  Relaxed throughout: a benign race
 * computes the same words twice (fork_gen changes only in a fresh child,
 * before its threads run). */
static uint64_t self_words(limits_t *l, uint64_t *stamp)
{
    uint64_t fg = atomic_load_explicit(&fork_gen, memory_order_relaxed);
    uint64_t owner = atomic_load_explicit(&l->owner, memory_order_relaxed);
    if (owner == 0 || atomic_load_explicit(&l->fgen, memory_order_relaxed) != fg) {
        uint32_t pid = (uint32_t)getpid();
        owner = pid | (uint64_t)self_pidns() << 32;
        atomic_store_explicit(&l->owner, owner, memory_order_relaxed);
        atomic_store_explicit(&l->stamp, pid | (uint64_t)(uint32_t)self_start() << 32,
                              memory_order_relaxed);
        atomic_store_explicit(&l->fgen, fg, memory_order_relaxed);
    }
    if (stamp)
        *stamp = atomic_load_explicit(&l->stamp, memory_order_relaxed);
    return owner;
}

int limits_permit_acquire(limits_t *l, int slot, uint32_t cap)
{
    lslot_t *s = &l->slot[slot];
    if (cap == 0 || cap > LIMITS_HOLDERS)
        return 0;
    uint64_t stamp, me = self_words(l, &stamp);
    for (int pass = 0; pass < 2; pass++) {
        /* relaxed: a hint only spreads takers over the table. */
        uint32_t at = atomic_fetch_add_explicit(&l->hint, 1, memory_order_relaxed);
        for (uint32_t k = 0; k < cap; k++) {
            uint32_t i = (at + k) % cap;
            holder_t *e = &s->holder[i];
            /* relaxed: only decides whether to try the CAS. */
            uint64_t cur = atomic_load_explicit(&e->owner, memory_order_relaxed);
            if (cur != 0)
                continue;
            /* acq_rel: acquire pairs with the release CAS that gave the
             * entry back (its cleared stamp is visible); release publishes
             * nothing yet (the stamp follows). */
            if (!atomic_compare_exchange_strong_explicit(&e->owner, &cur, me,
                                                         memory_order_acq_rel,
                                                         memory_order_relaxed))
                continue;
            if (__builtin_expect(l->fault, 0))
                _exit(77); /* test: killed between the take and the stamp */
            /* release pairs with the reclaimer's acquire load of the stamp. */
            atomic_store_explicit(&e->stamp, stamp, memory_order_release);
            atomic_fetch_add_explicit(&s->permits_taken, 1, memory_order_relaxed); /* stat */
            return (int)i + 1;
        }
        /* All taken: look for dead holders, at most once per period per slot. */
        int64_t now = ring_now();
        /* relaxed: the gate only spaces out the scans. */
        int64_t when = atomic_load_explicit(&s->reclaim_at, memory_order_relaxed);
        if (pass == 1 || now < when ||
            !atomic_compare_exchange_strong_explicit(&s->reclaim_at, &when,
                                                     now + LIMITS_RECLAIM_EVERY_NS,
                                                     memory_order_relaxed,
                                                     memory_order_relaxed) ||
            limits_reclaim(l, slot) == 0)
            break;
    }
    atomic_fetch_add_explicit(&s->permits_refused, 1, memory_order_relaxed); /* a statistic */
    return 0;
}

int limits_permit_release(limits_t *l, int slot, int permit)
{
    if (permit < 1 || permit > LIMITS_HOLDERS)
        return 1;
    holder_t *e = &l->slot[slot].holder[permit - 1];
    uint64_t mine = self_words(l, NULL);
    /* relaxed: published by the release CAS below. */
    atomic_store_explicit(&e->stamp, 0, memory_order_relaxed);
    /* release pairs with the next taker's acquire CAS: it sees the stamp
     * cleared, so a reclaimer never reads our stamp under its owner word. */
    return atomic_compare_exchange_strong_explicit(&e->owner, &mine, 0, memory_order_release,
                                                   memory_order_relaxed)
               ? 0
               : 1;
}

static int holder_alive(uint64_t owner, uint64_t stamp)
{
    uint32_t pid = (uint32_t)owner, ns = (uint32_t)(owner >> 32), ours = self_pidns();
    if (ns && ours && ns != ours)
        return 1; /* another PID namespace: never judged here */
    if ((uint32_t)stamp != pid)
        return proc_alive(pid, 0); /* not stamped yet: alive while the pid is */
    uint64_t start = proc_start_time((pid_t)pid);
    if (start == 0 || (uint32_t)start != (uint32_t)(stamp >> 32))
        return 0; /* gone, or the pid was reused */
    return proc_alive(pid, start); /* a zombie is dead */
}

int limits_reclaim(limits_t *l, int slot)
{
    lslot_t *s = &l->slot[slot];
    int freed = 0;
    for (int i = 0; i < LIMITS_HOLDERS; i++) {
        holder_t *e = &s->holder[i];
        /* acquire pairs with the taker's acq_rel CAS: entries given back
         * before it are seen cleared. */
        uint64_t owner = atomic_load_explicit(&e->owner, memory_order_acquire);
        if (owner == 0)
            continue;
        /* acquire pairs with the taker's release store of its stamp. */
        uint64_t stamp = atomic_load_explicit(&e->stamp, memory_order_acquire);
        if (holder_alive(owner, stamp))
            continue;
        /* acq_rel: release pairs with the next taker's acquire CAS; only
         * the owner word we judged is freed (a permit is freed once). */
        if (!atomic_compare_exchange_strong_explicit(&e->owner, &owner, 0, memory_order_acq_rel,
                                                     memory_order_relaxed))
            continue;
        /* relaxed: clears the dead stamp unless a new taker stamped already
         * (that CAS then fails); a taker that follows overwrites it. */
        atomic_compare_exchange_strong_explicit(&e->stamp, &stamp, 0, memory_order_relaxed,
                                                memory_order_relaxed);
        freed++;
    }
    if (freed) /* relaxed: a statistic. */
        atomic_fetch_add_explicit(&s->reclaimed, (uint64_t)freed, memory_order_relaxed);
    return freed;
}

void limits_get_stats(limits_t *l, int slot, limits_stats_t *out)
{
    lslot_t *s = &l->slot[slot];
    memset(out, 0, sizeof *out);
    /* relaxed: a snapshot for tools, each value on its own. */
    out->interval_ns = atomic_load_explicit(&s->interval_ns, memory_order_relaxed);
    out->burst = atomic_load_explicit(&s->burst, memory_order_relaxed);
    out->cap = atomic_load_explicit(&s->cap, memory_order_relaxed);
    out->rate_granted = atomic_load_explicit(&s->rate_granted, memory_order_relaxed);
    out->rate_refused = atomic_load_explicit(&s->rate_refused, memory_order_relaxed);
    out->permits_taken = atomic_load_explicit(&s->permits_taken, memory_order_relaxed);
    out->permits_refused = atomic_load_explicit(&s->permits_refused, memory_order_relaxed);
    out->reclaimed = atomic_load_explicit(&s->reclaimed, memory_order_relaxed);
    for (int i = 0; i < LIMITS_HOLDERS; i++)
        out->held += atomic_load_explicit(&s->holder[i].owner, memory_order_relaxed) != 0;
}
