# C declarations of csrc/ring.h, csrc/ring_limits.h and csrc/task_records.h only; the logic lives in _ring.pyx.
from libc.stdint cimport int64_t, uint8_t, uint16_t, uint32_t, uint64_t


cdef extern from "ring.h" nogil:
    int RING_LAYOUT_VERSION
    int RING_DEFAULT_CAPACITY
    int RING_DEFAULT_SLOT_SIZE
    int RING_DEFAULT_MAX_MESSAGE
    int RING_ERRBUF
    int RING_MAX_CAPACITY
    int64_t RING_NOWAIT
    int64_t RING_FOREVER

    enum ring_status:
        RING_OK
        RING_FULL
        RING_EMPTY
        RING_TIMEOUT
        RING_CLOSED
        RING_EINTR
        RING_ETOOBIG
        RING_ECORRUPT
        RING_EINVAL
        RING_ESYS
        RING_EUNDERFLOW

    enum ring_mode:
        RING_CREATE
        RING_ATTACH
        RING_OPEN

    ctypedef struct ring_t:
        pass

    ctypedef struct ring_params_t:
        uint64_t maxsize
        uint32_t slot_size
        uint32_t max_message_size

    ctypedef struct ring_iov_t:
        const void *base
        size_t len

    ctypedef struct ring_batch_t:
        uint64_t start
        uint64_t end
        uint64_t cursor
        size_t count
        size_t bytes

    ctypedef struct ring_stats_t:
        uint64_t capacity, limit, head, tail
        uint64_t puts, gets, bytes_in, bytes_out, waits_full, waits_empty
        uint64_t abandoned, recovered, segment_size, created_unix_ns
        int64_t unfinished
        uint32_t slot_size, max_message_size, layout_version, creator_uid, creator_pid, flags

    int RING_RECOVER_PRODUCERS
    int RING_RECOVER_CONSUMERS
    int RING_RECOVER_REQUEUE
    int RING_RECOVER_ALL

    ctypedef struct ring_recovery_t:
        uint64_t abandoned
        uint64_t recovered
        uint64_t reclaimed
        int deferred
        size_t n
        size_t cap
        ring_iov_t *iov

    ctypedef struct ring_participant_t:
        uint32_t pid
        uint32_t tid
        int alive
        int putting
        int getting

    int ring_recover(ring_t *r, int flags, ring_recovery_t *out)
    void ring_recovery_free(ring_recovery_t *out)
    size_t ring_participants(ring_t *r, ring_participant_t *out, size_t max)

    int ring_open(const char *name, int mode, const ring_params_t *params,
                  ring_t **out, char *errbuf)
    void ring_detach(ring_t *r)
    void ring_close(ring_t *r)
    int ring_is_closed(const ring_t *r)
    int ring_unlink(const char *name, char *errbuf)
    int ring_validate_name(const char *name, char *errbuf)
    uint64_t ring_capacity(const ring_t *r)
    uint64_t ring_limit(const ring_t *r)
    uint32_t ring_slot_size(const ring_t *r)
    uint32_t ring_max_message(const ring_t *r)
    const char *ring_name(const ring_t *r)
    int ring_is_owner(const ring_t *r)
    int64_t ring_now()
    int64_t ring_deadline_after(double seconds)
    void ring_set_spin(ring_t *r, int64_t spin_ns)
    int ring_put(ring_t *r, const ring_iov_t *iov, size_t n, size_t *done, int64_t deadline)
    int ring_claim(ring_t *r, size_t max, ring_batch_t *b, int64_t deadline)
    int ring_next(ring_t *r, ring_batch_t *b, const void **data, size_t *len)
    void ring_release(ring_t *r, const ring_batch_t *b)
    uint64_t ring_qsize(const ring_t *r)
    int ring_full(const ring_t *r)
    void ring_get_stats(const ring_t *r, ring_stats_t *s)
    void ring_task_add(ring_t *r, int64_t n)
    int ring_task_done(ring_t *r)
    int ring_task_join(ring_t *r, int64_t deadline)
    int64_t ring_unfinished(const ring_t *r)


cdef extern from "ring_limits.h" nogil:
    int LIMITS_SLOTS
    int LIMITS_HOLDERS
    int LIMITS_NAME_MAX
    int LIMITS_SEGMENT_SIZE

    ctypedef struct limits_t:
        pass

    ctypedef struct limits_stats_t:
        uint64_t interval_ns, burst, rate_granted, rate_refused
        uint64_t permits_taken, permits_refused, reclaimed
        uint32_t cap, held

    int limits_open(const char *name, limits_t **out, char *errbuf)
    void limits_close(limits_t *l)
    int limits_unlink(const char *name, char *errbuf)
    int limits_slot(limits_t *l, const char *key, size_t len, char *errbuf)
    void limits_configure(limits_t *l, int slot, uint64_t interval_ns, uint64_t burst,
                          uint32_t cap)
    int64_t limits_rate_acquire(limits_t *l, int slot, uint64_t interval_ns, uint64_t burst)
    int limits_permit_acquire(limits_t *l, int slot, uint32_t cap)
    int limits_permit_release(limits_t *l, int slot, int permit)
    int limits_reclaim(limits_t *l, int slot)
    void limits_get_stats(limits_t *l, int slot, limits_stats_t *s)


cdef extern from "task_records.h" nogil:
    int TASK_RECORD_NOT_MINE
    int TASK_RECORD_RESULT_OFFSET

    int task_record_usable(const void *rec, double now, int evict)
    void task_record_fill(void *rec, const uint8_t *id, uint8_t state, uint32_t dispatcher_pid,
                          uint64_t counter, double now)
    int task_record_begin(void *rec, const uint8_t *id, uint16_t attempt, uint32_t worker_pid,
                          double now)
    int task_record_finish(void *rec, const uint8_t *id, uint8_t state, double now, double keep,
                           const uint8_t *result, uint32_t len, uint32_t room)
    int task_record_cancel(void *rec, const uint8_t *id, uint8_t flag, double now, double hold)
    uint8_t task_record_cancel_flag(const void *rec)
