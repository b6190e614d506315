/* ringbus ring core: waiting.  The sleeping side of the eventcounts
 * (the notifying side is inline in ring_internal.h), the per-side spin
 * lease, and the spin / yield / sleep ladder every blocking call climbs. */
#include "ring_internal.h"

#include <sched.h>

static void futex_wake_all(_Atomic uint32_t *word) { futex_wake(word, INT_MAX); }

/* The eventcount protocol is described above ec_notify_n in ring_internal.h. */
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
void ec_wake_everyone(eventcount_t *ec)
{
    /* release: same pairing as ec_notify; unconditional because close()
     * must reach sleepers that registered a moment ago. */
    atomic_fetch_add_explicit(&ec->seq, 1, memory_order_release);
    futex_wake_all(&ec->seq);
}

/* One step of the wait ladder: spin (bounded), then yield, then sleep.
 * Returns RING_OK to retry the operation, or a terminal status. */
int backoff(ring_t *r, backoff_t *b, eventcount_t *ec, int64_t deadline,
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
            entry_t *me = self_entry(r);
            int64_t owner = me ? (int64_t)(me - entries(r)) + 1 : 0;
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
