/* ringbus task records: the hot steps on a task table record (layout and
 * rules drawn in task_records.h). */
#include "task_records.h"

#include <math.h>
#include <stdatomic.h>
#include <string.h>

typedef struct {
    /* 0 */ uint8_t id[16];
    /* 16 */ _Atomic uint8_t state;
    /* 17 */ _Atomic uint8_t cancel;
    /* 18 */ uint16_t attempt;
    /* 20 */ uint32_t worker_pid;
    /* 24 */ uint32_t dispatcher_pid;
    /* 28 */ uint32_t result_len;
    /* 32 */ uint64_t counter;
    /* 40 */ double queued;
    /* 48 */ double started;
    /* 56 */ double finished;
    /* 64 */ double expires;
    /* 72 */ float progress;
    /* 76 */ uint16_t message_len;
    /* 78 */ uint16_t zero;
    /* 80 */ char message[128];
    /* 208 */ uint8_t result[];
} record_t;

_Static_assert(sizeof(_Atomic uint8_t) == 1, "state and cancel flag are single bytes");
_Static_assert(offsetof(record_t, state) == 16, "state at 16");
_Static_assert(offsetof(record_t, attempt) == 18, "attempt at 18");
_Static_assert(offsetof(record_t, counter) == 32, "counter at 32");
_Static_assert(offsetof(record_t, expires) == 64, "expires at 64");
_Static_assert(offsetof(record_t, progress) == 72, "progress at 72");
_Static_assert(offsetof(record_t, message) == 80, "message at 80");
_Static_assert(offsetof(record_t, result) == TASK_RECORD_RESULT_OFFSET, "result at 208");

/* The record holds task `id` and is in use.  A worker usually knows that
 * already (the dispatcher filled the record before the ring's release put
 * handed the task over); the checks are for reused and foreign records. */
static int mine(record_t *r, const uint8_t id[16], uint8_t *state) {
    if (memcmp(r->id, id, 16) != 0)
        return 0;
    /* Acquire: pairs with the release fence in fill() before the id is
     * written: the fields read after this are the ones under that id. */
    atomic_thread_fence(memory_order_acquire);
    /* Acquire: pairs with the release store of the state by whoever wrote
     * the record last (fill, begin, finish, cancel). */
    *state = atomic_load_explicit(&r->state, memory_order_acquire);
    return *state != TASK_EMPTY;
}

int task_record_usable(const void *rec, double now, int evict) {
    const record_t *r = rec;
    /* Acquire: pairs with the release store of the final state in finish()
     * (or EMPTY): the expiry read after it is that writer's. */
    uint8_t s = atomic_load_explicit(&r->state, memory_order_acquire);
    if (s == TASK_EMPTY)
        return 1;
    if (s != TASK_DONE && s != TASK_FAILED && s != TASK_CANCELLED)
        return 0;
    /* Relaxed: the flag only ever goes up; a cancelled-while-waiting record
     * is held for its hold time like a kept result. */
    if (atomic_load_explicit(&r->cancel, memory_order_relaxed))
        return 0;
    return evict || (r->expires > 0 && r->expires <= now);
}

void task_record_fill(void *rec, const uint8_t id[16], uint8_t state, uint32_t dispatcher_pid,
                      uint64_t counter, double now) {
    record_t *r = rec;
    memset(r->id, 0, 16); /* no reader takes the old id for the new fields */
    /* Release: pairs with a reader's second copy (it compares two copies, so
     * a copy that saw the new fields under the old id fails the compare). */
    atomic_thread_fence(memory_order_release);
    atomic_store_explicit(&r->cancel, 0, memory_order_relaxed); /* published by the fence below */
    r->attempt = 1;
    r->worker_pid = 0;
    r->dispatcher_pid = dispatcher_pid;
    r->result_len = 0;
    r->counter = counter;
    r->queued = now;
    r->started = r->finished = r->expires = 0.0;
    r->progress = NAN;
    r->message_len = 0;
    r->zero = 0;
    /* Release: pairs with the acquire load in mine() of a worker or a
     * canceller that finds this id (the id is written after the fence). */
    atomic_store_explicit(&r->state, state, memory_order_release);
    atomic_thread_fence(memory_order_release);
    memcpy(r->id, id, 16);
}

int task_record_begin(void *rec, const uint8_t id[16], uint16_t attempt, uint32_t worker_pid,
                      double now) {
    record_t *r = rec;
    uint8_t s;
    if (!mine(r, id, &s))
        return TASK_RECORD_NOT_MINE;
    r->attempt = attempt;
    r->worker_pid = worker_pid;
    r->started = now;
    for (;;) {
        /* Acquire: pairs with the canceller's release store of the flag. */
        if (s == TASK_CANCELLED || atomic_load_explicit(&r->cancel, memory_order_acquire))
            return 0;
        /* Acq_rel CAS: pairs with the canceller's CAS of a queued task to
         * CANCELLED -- exactly one of the two moves the state; the release
         * half publishes attempt, pid and start time to readers. */
        if (atomic_compare_exchange_weak_explicit(&r->state, &s, TASK_RUNNING,
                                                  memory_order_acq_rel, memory_order_acquire))
            break;
    }
    /* A flag set after the CAS (the task was running by then): the handler
     * sees it too, but a task not begun yet need not run at all.  Acquire:
     * pairs with the canceller's release store of the flag. */
    return atomic_load_explicit(&r->cancel, memory_order_acquire) ? 0 : 1;
}

int task_record_finish(void *rec, const uint8_t id[16], uint8_t state, double now, double keep,
                       const uint8_t *result, uint32_t len, uint32_t room) {
    record_t *r = rec;
    uint8_t s;
    if (!mine(r, id, &s))
        return TASK_RECORD_NOT_MINE;
    if (keep <= 0) {
        memset(r->id, 0, 16);
        /* Release: pairs with the owning dispatcher's acquire read of EMPTY
         * before it fills the slot again (it must not see the old id). */
        atomic_store_explicit(&r->state, TASK_EMPTY, memory_order_release);
        return 0;
    }
    uint32_t n = 0;
    if (result != NULL) {
        n = len <= room ? len : TASK_RECORD_NOT_KEPT;
        if (n != TASK_RECORD_NOT_KEPT)
            memcpy(r->result, result, n);
    }
    r->result_len = n;
    r->finished = now;
    r->expires = now + keep;
    /* The flag's work is done once the task ended: cleared, so that the kept
     * record can be reused when its time passes (published by the store below). */
    atomic_store_explicit(&r->cancel, 0, memory_order_relaxed);
    /* Release: pairs with the acquire load in mine() / a reader's: the
     * result and times are there before the final state is. */
    atomic_store_explicit(&r->state, state, memory_order_release);
    return 0;
}

int task_record_cancel(void *rec, const uint8_t id[16], uint8_t flag, double now, double hold) {
    record_t *r = rec;
    uint8_t s;
    if (!mine(r, id, &s))
        return TASK_RECORD_NOT_MINE;
    uint8_t before = s;
    /* Release: pairs with the acquire loads of the flag in begin() and in a
     * running handler's poll (task_record_cancel_flag). */
    atomic_store_explicit(&r->cancel, flag, memory_order_release);
    while (s == TASK_QUEUED || s == TASK_SCHEDULED) {
        r->finished = now;
        r->expires = now + hold;
        /* Acq_rel CAS: pairs with the worker's CAS in begin(); if the worker
         * won, the task runs and its handler sees the flag instead. */
        if (atomic_compare_exchange_weak_explicit(&r->state, &s, TASK_CANCELLED,
                                                  memory_order_acq_rel, memory_order_acquire))
            break;
    }
    return before;
}

uint8_t task_record_cancel_flag(const void *rec) {
    const record_t *r = rec;
    /* Acquire: pairs with the canceller's release store of the flag. */
    return atomic_load_explicit(&r->cancel, memory_order_acquire);
}
