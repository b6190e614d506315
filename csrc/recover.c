/* ringbus ring core: crash recovery (the protocol is drawn in ring.h).
 * The recovery lock, turning dead producers' claims into skip records,
 * taking dead consumers' batches back, and the check a stuck waiter runs. */
#include "ring_internal.h"

#include <stdlib.h>
#include <string.h>

/* ------------------------------------------------------------------ */
/* crash recovery                                                      */

/* The recovery lock: recovery_lock holds the recoverer's pid, but a pid
 * proves nothing (a corrupted word could name a live process forever, and
 * a holder in another PID namespace cannot be checked in our /proc), so
 * the lock is a lease.  It is held while recovery_lease lies in the future
 * and at most RECOVERY_LEASE_NS ahead; anything else (expired, never
 * written, or further out than any holder writes) is free to take.  A
 * taker writes the lease BEFORE its CAS on the pid word, so a fresh holder
 * always has a fresh lease, and the holder renews it while it works.  A
 * recoverer that dies, or stalls for a whole lease, loses the lock within
 * one lease; a stalled one notices at its next renewal and stops. */
static int lease_valid(int64_t lease, int64_t now)
{
    return lease > now && lease - now <= RECOVERY_LEASE_NS;
}

static int lock_recovery(ring_t *r)
{
    header_t *h = r->hdr;
    uint32_t me = (uint32_t)getpid();
    /* any valid lease runs out within one lease from now */
    int64_t give_up = ring_now() + RECOVERY_LEASE_NS + RECOVERY_LEASE_NS / 4;
    for (;;) {
        /* acquire: see everything the previous recoverer did. */
        uint32_t cur = atomic_load_explicit(&h->recovery_lock, memory_order_acquire);
        /* The lease before the clock: a holder reads its clock and then
         * writes now + RECOVERY_LEASE_NS, so a lease read before our clock
         * is never further ahead than that.  (Clock first, a renewal landing
         * between the two reads looked further ahead than any holder
         * writes, a bogus lease, and a live holder lost its lock.)
         * acquire: keeps the clock read below (the vDSO reads its data
         * page) after this load; it pairs with no store, the lease itself
         * publishes nothing (renew_recovery's relaxed store). */
        int64_t lease = atomic_load_explicit(&h->recovery_lease, memory_order_acquire);
        int64_t now = ring_now();
        if (cur == 0 || !lease_valid(lease, now)) {
            /* relaxed: published by the CAS (acq_rel) just below. */
            atomic_store_explicit(&h->recovery_lease, now + RECOVERY_LEASE_NS,
                                  memory_order_relaxed);
            /* acq_rel: acquire as above; release publishes the lease. */
            if (atomic_compare_exchange_strong_explicit(&h->recovery_lock, &cur, me,
                                                        memory_order_acq_rel,
                                                        memory_order_relaxed))
                return 1;
            continue; /* someone else took it first: judge the new holder */
        }
        if (now > give_up)
            return 0;
        usleep(1000);
    }
}

/* The holder renews its lease; 0: the lock was taken over (we stalled for a
 * whole lease), so stop repairing. */
static int renew_recovery(ring_t *r)
{
    header_t *h = r->hdr;
    /* relaxed: only our own store could have set it to our pid. */
    if (atomic_load_explicit(&h->recovery_lock, memory_order_relaxed) != (uint32_t)getpid())
        return 0;
    /* relaxed: a renewal publishes nothing. */
    atomic_store_explicit(&h->recovery_lease, ring_now() + RECOVERY_LEASE_NS,
                          memory_order_relaxed);
    return 1;
}

static void unlock_recovery(ring_t *r)
{
    uint32_t me = (uint32_t)getpid();
    /* release: our repairs are visible to the next recoverer (its acquire
     * load of the lock).  A CAS: a lock taken over is not ours to free. */
    atomic_compare_exchange_strong_explicit(&r->hdr->recovery_lock, &me, 0,
                                            memory_order_release, memory_order_relaxed);
}

/* A dead producer's claim at ticket x: among dead intents covering x, the
 * true claim has the largest start (a stale intent read an older tail);
 * among equal starts take the shortest, so nothing beyond the true claim is
 * ever abandoned (the rest is found on the next pass). */
static int dead_put_claim(const entry_snap_t *sn, uint64_t x, uint64_t tail, uint64_t cap)
{
    int best = -1;
    for (int i = 0; i < MAX_ENTRIES; i++) {
        if (!sn[i].pid || sn[i].alive || !(sn[i].put_lo <= x && x < sn[i].put_hi) ||
            sn[i].put_hi > tail || sn[i].put_hi - sn[i].put_lo > cap) /* > cap: corrupted */
            continue;
        if (best < 0 || sn[i].put_lo > sn[best].put_lo ||
            (sn[i].put_lo == sn[best].put_lo && sn[i].put_hi < sn[best].put_hi))
            best = i;
    }
    return best;
}

static int live_covers(const entry_snap_t *sn, uint64_t lo, uint64_t hi, int get)
{
    for (int i = 0; i < MAX_ENTRIES; i++) {
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
    entry_t *e = &entries(r)[i];
    /* release: pairs with snapshot's acquire. */
    atomic_store_explicit(&e->put_hi, atomic_load_explicit(&e->put_lo, memory_order_relaxed),
                          memory_order_release);
}

static void clear_get(ring_t *r, int i)
{
    entry_t *e = &entries(r)[i];
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
    entry_snap_t sn[MAX_ENTRIES];
    memset(out, 0, sizeof *out);
    if (!lock_recovery(r))
        return RING_TIMEOUT;
    /* acquire pairs with the release CASes on head/tail: every claim they
     * reflect has its intent visible in the snapshot taken after. */
    uint64_t head = atomic_load_explicit(&h->head, memory_order_acquire);
    uint64_t tail = atomic_load_explicit(&h->tail, memory_order_acquire);
    snapshot_entries(r, sn);
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
     * unconsumed tickets and turn each dead claim into a skip record.  At
     * most one lap: more than cap tickets between head and tail is
     * corruption (nothing sound lies beyond). */
    uint64_t stop = tail - head <= r->cap ? tail : head + r->cap;
    unsigned steps = 0;
    for (uint64_t x = head; (flags & RING_RECOVER_PRODUCERS) && x < stop;) {
        if (++steps % 1024 == 0 && !renew_recovery(r)) {
            rc = RING_TIMEOUT; /* the lock was taken over: leave the rest */
            goto done;
        }
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
        int i = dead_put_claim(sn, x, tail, r->cap);
        if (i < 0 || live_covers(sn, x, x + 1, 0)) {
            /* a live claimant will publish: skip past its claim if known */
            uint64_t next = x;
            for (int j = 0; j < MAX_ENTRIES; j++)
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
    for (int i = 0; (flags & RING_RECOVER_CONSUMERS) && i < MAX_ENTRIES; i++) {
        if (!sn[i].pid || sn[i].alive || sn[i].get_lo >= sn[i].get_hi)
            continue;
        uint64_t lo = sn[i].get_lo, hi = sn[i].get_hi;
        /* Its CAS never happened (hi > head), or the intent is impossible:
         * a batch spans at most cap tickets, and head cannot have passed
         * its first ticket by more than a lap while it was held.  Walking
         * a corrupted range could take 2^40 steps; it is dropped instead. */
        if (hi > head || hi - lo > r->cap || head - lo > r->cap) {
            clear_get(r, i);
            continue;
        }
        if (!renew_recovery(r)) {
            rc = RING_TIMEOUT; /* as above */
            goto done;
        }
        if (live_covers(sn, lo, hi, 1))
            continue;
        for (uint64_t t = lo; t < hi;) {
            if (++steps % 4096 == 0 && !renew_recovery(r)) {
                rc = RING_TIMEOUT; /* as above */
                goto done;
            }
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
    for (int i = 0; i < MAX_ENTRIES; i++) {
        if (sn[i].pid && !sn[i].alive && entry_idle(&entries(r)[i])) {
            free_entry(&entries(r)[i], sn[i].pid);
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

void check_stuck(ring_t *r, int64_t now, uint64_t *ticket, int64_t *since)
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

