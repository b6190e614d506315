/* ringbus ring core: the ring itself.  Put, claim, next, release (the hot
 * path: everything they do per message is here or inline in
 * ring_internal.h), queue-size queries, statistics, and the JoinableQueue
 * task counters. */
#include "ring_internal.h"

#include <string.h>

/* ------------------------------------------------------------------ */
/* producer                                                            */

/* A claim found a sequence word ahead of its ticket while head / tail did
 * not move.  That cannot happen in a sound ring: whoever moved the word on
 * claimed the ticket first (its CAS happened before the release store our
 * acquire load saw), so the counter we re-read would be past our ticket.
 * Only corruption does this, and retrying would spin forever. */
#define CLAIM_CORRUPT ((size_t)-1)

/* Claims tickets for the longest prefix of iov that fits now, with one CAS
 * on tail.  Returns how many records were claimed (0: full; CLAIM_CORRUPT:
 * the ring is corrupted) and their ticket range. */
static size_t claim_put(ring_t *r, entry_t *e, const ring_iov_t *iov, size_t n,
                        uint64_t *start, uint64_t *end)
{
    header_t *h = r->hdr;
    int stuck = 0; /* tries that saw a word ahead of an unmoved tail */
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
            if (now == pos && (!stale || ++stuck > CORRUPT_RETRIES)) {
                if (e) /* a failed CAS left an intent on others' tickets: a
                        * sleeping "live claimant" would block their recovery */
                    atomic_store_explicit(&e->put_hi,
                                          atomic_load_explicit(&e->put_lo, memory_order_relaxed),
                                          memory_order_release);
                return stale ? CLAIM_CORRUPT : 0;
            }
            if (now == pos)
                cpu_relax(); /* see CLAIM_CORRUPT: re-read a few times first */
            pos = now;
            continue;
        }
        if (e) {
            /* relaxed: published by the release CAS just below. */
            atomic_store_explicit(&e->put_lo, pos, memory_order_relaxed);
            atomic_store_explicit(&e->put_hi, t, memory_order_relaxed);
            atomic_store_explicit(&e->put_n, (uint32_t)i, memory_order_relaxed);
            atomic_store_explicit(&e->put_done, 0, memory_order_relaxed);
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

static void write_records(ring_t *r, entry_t *e, const ring_iov_t *iov, size_t n, uint64_t t)
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
        if (e)
            /* relaxed: read by a recoverer only once we are dead. */
            atomic_store_explicit(&e->put_done, (uint32_t)(i + 1), memory_order_relaxed);
        bytes += iov[i].len;
        t += k;
    }
    header_t *h = r->hdr;
    /* relaxed: statistics; qsize() tolerates a momentary lag. */
    atomic_fetch_add_explicit(&h->puts, n, memory_order_relaxed);
    atomic_fetch_add_explicit(&h->bytes_in, bytes, memory_order_relaxed);
    if (e)
        /* release: a recoverer that sees the claim cleared sees it published. */
        atomic_store_explicit(&e->put_hi, atomic_load_explicit(&e->put_lo, memory_order_relaxed),
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
    entry_t *e = self_entry(r);
    _Atomic uint32_t *anon = &r->hdr->anon_claims;
    while (off < n) {
        if (closed(r))
            return RING_CLOSED;
        uint64_t start = 0, end = 0; /* set when a claim succeeds */
        if (!e)
            /* relaxed: the claiming CAS (release) publishes it. */
            atomic_fetch_add_explicit(anon, 1, memory_order_relaxed);
        size_t got = claim_put(r, e, iov + off, n - off, &start, &end);
        if (__builtin_expect(got == CLAIM_CORRUPT, 0)) {
            if (!e) /* release: as below (nothing was claimed) */
                atomic_fetch_sub_explicit(anon, 1, memory_order_release);
            return RING_ECORRUPT;
        }
        if (got) {
            FAULT(r, F_PUT_AFTER_CLAIM);
            write_records(r, e, iov + off, got, start);
            if (!e)
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
        if (!e) /* release: as above (nothing was claimed) */
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


static void clear_get_intent(entry_t *e)
{
    if (e) /* as in claim_put: never sleep holding a stale intent */
        atomic_store_explicit(&e->get_hi, atomic_load_explicit(&e->get_lo, memory_order_relaxed),
                              memory_order_release); /* pairs with snapshot_entries' acquire */
}

static int claim_get(ring_t *r, entry_t *e, size_t max, ring_batch_t *b)
{
    header_t *h = r->hdr;
    int stuck = 0; /* tries that saw a word ahead of an unmoved head */
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
                clear_get_intent(e);
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
            if (now == pos && (!stale || ++stuck > CORRUPT_RETRIES)) {
                clear_get_intent(e);
                return stale ? RING_ECORRUPT : RING_EMPTY; /* see CLAIM_CORRUPT */
            }
            if (now == pos)
                cpu_relax();
            pos = now;
            continue;
        }
        if (e) {
            /* relaxed: published by the release CAS just below. */
            atomic_store_explicit(&e->get_lo, pos, memory_order_relaxed);
            atomic_store_explicit(&e->get_hi, t, memory_order_relaxed);
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
    entry_t *e = self_entry(r);
    _Atomic uint32_t *anon = &r->hdr->anon_claims;
    for (;;) {
        if (closed(r))
            return RING_CLOSED;
        if (!e) /* relaxed: as in ring_put */
            atomic_fetch_add_explicit(anon, 1, memory_order_relaxed);
        int rc = claim_get(r, e, max, b);
        if (rc == RING_OK) {
            b->part = e;
            b->anon = !e; /* ring_release decrements */
            if (b->count)
                return RING_OK;
            ring_release(r, b); /* only padding was ready: free it, go on */
            continue;
        }
        if (!e) /* release: as in ring_put */
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
        /* claim_get validated this header before its CAS, but it lives in
         * shared memory: validate the one value read here, which is all
         * that is used below, and never step outside the batch. */
        uint64_t span = meta & META_SKIP ? meta & META_SPAN_MASK : slots_for(r, meta);
        if (__builtin_expect(!meta_ok(r, t, meta) || span > b->end - t, 0)) {
            b->cursor = b->end;
            return -1;
        }
        b->cursor = t + span;
        if (meta & META_SKIP)
            continue;
        *data = slot_at(r, t);
        *len = (size_t)meta;
        return 1;
    }
    return 0;
}


void ring_release(ring_t *r, const ring_batch_t *b)
{
    FAULT(r, F_GET_BEFORE_RELEASE);
    free_tickets(r, b->start, b->end);
    /* The entry that holds the intent, not self_entry(): code run between
     * claim and release (an unpickler) may have made this thread's cache
     * forget it. */
    entry_t *e = b->part;
    if (e)
        /* release: whoever sees the claim cleared sees the slots freed. */
        atomic_store_explicit(&e->get_hi, atomic_load_explicit(&e->get_lo, memory_order_relaxed),
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
