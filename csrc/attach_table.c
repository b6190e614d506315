/* ringbus ring core: the attach table (page 1 of the header).  One entry
 * per attached thread holds its claim intents for crash recovery; this
 * file takes, finds, snapshots and gives back entries. */
#include "ring_internal.h"

#include <stdio.h>

RING_TLS entry_cache_t entry_cache[ENTRY_CACHE];
static RING_TLS unsigned entry_cache_next;

int entry_idle(const entry_t *e)
{
    /* acquire pairs with the release stores that clear intents. */
    return atomic_load_explicit(&e->put_lo, memory_order_acquire) ==
               atomic_load_explicit(&e->put_hi, memory_order_acquire) &&
           atomic_load_explicit(&e->get_lo, memory_order_acquire) ==
               atomic_load_explicit(&e->get_hi, memory_order_acquire);
}

void free_entry(entry_t *e, uint32_t pid)
{
    /* relaxed stores: the release CAS on pid below publishes them. */
    atomic_store_explicit(&e->start, 0, memory_order_relaxed);
    atomic_store_explicit(&e->tid, 0, memory_order_relaxed);
    atomic_store_explicit(&e->pidns, 0, memory_order_relaxed);
    uint32_t expect = pid;
    atomic_compare_exchange_strong_explicit(&e->pid, &expect, 0, memory_order_release,
                                            memory_order_relaxed);
}

/* Is the owner of an entry alive?  Dead: gone, a zombie, or its pid reused
 * (start time differs).  An owner in another PID namespace cannot be
 * checked (its pid names another process, or none, in our /proc), so it
 * counts as alive: only a recoverer in its own namespace may repair it. */
static int foreign_ns(uint32_t pidns)
{
    uint32_t ours = self_pidns();
    return pidns && ours && pidns != ours; /* 0: unknown, judged as ours */
}

int entry_owner_alive(uint32_t pid, uint64_t start, uint32_t pidns)
{
    if (pid == 0)
        return 0;
    return foreign_ns(pidns) || proc_alive(pid, start);
}

static entry_t *register_entry(ring_t *r)
{
    entry_t *t = entries(r);
    uint32_t me = (uint32_t)getpid(), tid = self_tid();
    uint64_t mine = atomic_load_explicit(&r->mine, memory_order_relaxed);
    /* Our own entry, if this thread took one through this handle before
     * its cache forgot it (it uses more rings than the cache holds).
     * Taking a second one would leak it until the handle detaches. */
    for (int i = 0; i < MAX_ENTRIES; i++) {
        if (!((mine >> i) & 1))
            continue;
        /* relaxed: fields this thread wrote itself (pid checked first: a
         * fork child inherits the bitmask, not the entries). */
        if (atomic_load_explicit(&t[i].pid, memory_order_relaxed) == me &&
            atomic_load_explicit(&t[i].tid, memory_order_relaxed) == tid &&
            atomic_load_explicit(&t[i].handle, memory_order_relaxed) == (uint32_t)r->gen)
            return &t[i];
    }
    for (int pass = 0; pass < 2; pass++) {
        for (int i = 0; i < MAX_ENTRIES; i++) {
            /* acquire: see the previous owner's final stores. */
            uint32_t cur = atomic_load_explicit(&t[i].pid, memory_order_acquire);
            if (pass == 0 && cur != 0)
                continue;
            if (pass == 1) {
                /* table full: take over idle entries of dead processes or
                 * of exited threads (a claim waits for ring_recover). */
                if (cur == 0 || !entry_idle(&t[i]))
                    continue;
                if (foreign_ns(atomic_load_explicit(&t[i].pidns, memory_order_relaxed)))
                    continue; /* relaxed: see entry_owner_alive */
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
            atomic_store_explicit(&t[i].handle, (uint32_t)r->gen, memory_order_relaxed);
            atomic_store_explicit(&t[i].pidns, self_pidns(), memory_order_relaxed);
            atomic_store_explicit(&t[i].put_lo, 0, memory_order_relaxed);
            atomic_store_explicit(&t[i].put_hi, 0, memory_order_relaxed);
            atomic_store_explicit(&t[i].get_lo, 0, memory_order_relaxed);
            atomic_store_explicit(&t[i].get_hi, 0, memory_order_relaxed);
            /* release: the cleared intents and the namespace are visible
             * before the start time that makes the entry count as fully
             * alive. */
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

/* self_entry()'s miss path (the cached lookup is inline in ring_internal.h):
 * find or take this thread's entry and remember it. */
entry_t *self_entry_slow(ring_t *r, uint64_t fg)
{
    entry_t *e = register_entry(r);
    entry_cache_t *c = &entry_cache[entry_cache_next++ % ENTRY_CACHE];
    c->r = r;
    c->gen = r->gen;
    c->fgen = fg;
    c->e = e;
    return e;
}

void release_entries(ring_t *r)
{
    entry_t *t = entries(r);
    uint32_t me = (uint32_t)getpid();
    uint64_t mine = atomic_load_explicit(&r->mine, memory_order_relaxed);
    for (int i = 0; i < MAX_ENTRIES; i++)
        /* relaxed handle: our own store; an entry another handle of this
         * process took over (from an exited thread) is not ours to free. */
        if ((mine >> i) & 1 &&
            atomic_load_explicit(&t[i].handle, memory_order_relaxed) == (uint32_t)r->gen &&
            entry_idle(&t[i]))
            free_entry(&t[i], me); /* a CAS: entries a fork child inherited stay */
}

void snapshot_entries(ring_t *r, entry_snap_t *sn)
{
    entry_t *t = entries(r);
    for (int i = 0; i < MAX_ENTRIES; i++) {
        /* acquire pairs with register_entry's release of start. */
        sn[i].pid = atomic_load_explicit(&t[i].pid, memory_order_acquire);
        uint64_t start = atomic_load_explicit(&t[i].start, memory_order_acquire);
        /* relaxed: ordered by the acquire of start (stored before it). */
        uint32_t ns = atomic_load_explicit(&t[i].pidns, memory_order_relaxed);
        sn[i].alive = entry_owner_alive(sn[i].pid, start, ns);
        sn[i].put_lo = atomic_load_explicit(&t[i].put_lo, memory_order_acquire);
        sn[i].put_hi = atomic_load_explicit(&t[i].put_hi, memory_order_acquire);
        sn[i].put_n = atomic_load_explicit(&t[i].put_n, memory_order_relaxed);
        sn[i].put_done = atomic_load_explicit(&t[i].put_done, memory_order_relaxed);
        sn[i].get_lo = atomic_load_explicit(&t[i].get_lo, memory_order_acquire);
        sn[i].get_hi = atomic_load_explicit(&t[i].get_hi, memory_order_acquire);
    }
}


size_t ring_participants(ring_t *r, ring_participant_t *out, size_t max)
{
    entry_snap_t sn[MAX_ENTRIES];
    size_t n = 0;
    entry_t *t = entries(r);
    snapshot_entries(r, sn);
    for (int i = 0; i < MAX_ENTRIES && n < max; i++) {
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
