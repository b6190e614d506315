/*
 * ringbus ring core: a bounded lock-free MPMC ring of variable-length
 * messages in one POSIX shared-memory segment.  C11, no Python.
 *
 * Segment layout (layout version 1; all integers little-endian, native)
 * ---------------------------------------------------------------------
 *  offset  size  field                      written by / when
 *  ------  ----  -------------------------  -------------------------------
 *  header page 0 (geometry is immutable once `magic` is published)
 *       0     8  magic "RINGBUS1"           creator, release-stored LAST
 *       8     4  layout_version (=1)        creator
 *      12     4  header_size (=8192)        creator
 *      16     8  capacity (slots, 2^n)      creator
 *      24     4  slot_size (bytes)          creator
 *      28     4  max_message_size (bytes)   creator
 *      32     8  limit (soft maxsize,slots) creator
 *      40     4  creator_uid                creator
 *      44     4  creator_pid                creator
 *      48     8  creator_start (clk ticks)  creator (against pid reuse)
 *      56     8  segment_size (bytes)       creator
 *      64     8  cells_offset (=8192)       creator
 *      72     8  data_offset (page aligned) creator
 *      80     8  created_unix_ns            creator
 *      88     4  flags (1: persistent)      creator (made by RING_OPEN)
 *   128..255     producer line: tail (u64 @128), puts (@136), bytes_in (@144)
 *   256..383     consumer line: head (u64 @256), gets (@264), bytes_out (@272)
 *   384..511     not-empty eventcount: seq (u32 @384), waiters (u32 @388),
 *                waits_empty (u64 @392)
 *   512..639     not-full eventcount: seq (u32 @512), waiters (u32 @516),
 *                waits_full (u64 @520)
 *   640..767     join line: unfinished (i64 @640), join seq (u32 @648),
 *                join waiters (u32 @652)
 *   768..895     recovery: abandoned (u64 @768), recovered (u64 @776),
 *                recovery_lock (u32 pid @784), anon_claims (u32 @788:
 *                claims in flight by threads without an attach entry),
 *                recovery_lease (i64 CLOCK_MONOTONIC ns @792: the lock is
 *                held only until then, and never more than 1 s ahead)
 *   896..1023    consumers' spin lease (i64 CLOCK_MONOTONIC ns @896)
 *  1024..1151    producers' spin lease (i64 CLOCK_MONOTONIC ns @1024)
 *  1152..4095    reserved (zero)
 *  page 1 (4096..8191): attach table, 64 entries x 64 bytes, one per thread:
 *       +0 pid u32 (0 = free)   +4 tid u32       +8 process start time u64
 *      +16 put_lo u64  +24 put_hi u64  +32 put_n u32  +36 put_done u32
 *      +40 get_lo u64  +48 get_hi u64  +56 handle u32 (owner's, per process)
 *      +60 pidns u32 (inode of the owner's /proc/self/ns/pid; 0 = unknown)
 *  (792 and +60 were always zero before ringbus wrote them, so the layout
 *  version did not change: an older ringbus reads +56 as a u64 handle
 *  whose high half it never compares with its own, and writes 0 = unknown.)
 *  cells_offset: capacity x 16-byte cells {u64 seq; u64 meta}
 *  data_offset:  capacity x slot_size bytes of message data
 *
 * Each hot counter group sits on its own 128-byte block (two cache lines,
 * because of the adjacent-line prefetcher), so producers, consumers and
 * sleepers never falsely share.
 *
 * Protocol (Vyukov's bounded MPMC, extended to records of k slots)
 * ----------------------------------------------------------------
 * Ticket t owns cell[t % cap] and data slot [t % cap].  cell.seq == t means
 * "free for the producer of ticket t"; t + 1 means "record starting at t is
 * published"; t + cap means "freed, free for the producer of t + cap".
 * A message of L bytes takes k = max(1, ceil(L / slot_size)) tickets whose
 * data slots are contiguous; a record that would cross the end of the array
 * is preceded by a padding record up to the end (as Agrona pads its ring).
 * Producers claim all tickets of a batch of records with ONE CAS on tail,
 * write, then publish each record by release-storing seq of its first cell.
 * Consumers claim a run of published records with ONE CAS on head, read the
 * bytes in place (zero copy), then free every ticket (seq = t + cap).
 * meta = payload length, or PAD | slots for a padding record, or
 * ABANDONED | slots for a claim whose producer died before publishing.
 *
 * Crash recovery
 * --------------
 * Before its CAS a thread writes the tickets it is about to claim into its
 * attach entry (its "intent"), and clears it after publishing / freeing.
 * A ticket claimed but unpublished whose claimants are all dead (pid gone,
 * a zombie, or reused: start time differs) becomes an ABANDONED record that
 * consumers skip.  A batch taken by a consumer that died before freeing it
 * is copied out (handed to the caller, or put back into the ring) and freed.
 * Waiters stuck on one ticket for 100 ms run the check; so can anyone,
 * with ring_recover().  No heartbeats: liveness is read from /proc.  An
 * entry written in another PID namespace (a container sharing /dev/shm)
 * is never judged: its pid names another process, or none, in our /proc,
 * so only a recoverer in its own namespace repairs it.  Recovery bounds
 * every walk to one lap (capacity tickets), whatever the counters and
 * intents say.
 */
#ifndef RINGBUS_RING_H
#define RINGBUS_RING_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* cffi-begin: everything up to cffi-end is parsed by the test binding. */
#define RING_LAYOUT_VERSION 1
#define RING_HEADER_SIZE 8192
#define RING_DEFAULT_CAPACITY 8192
#define RING_DEFAULT_SLOT_SIZE 256
#define RING_DEFAULT_MAX_MESSAGE 1048576
#define RING_MIN_SLOT_SIZE 16
#define RING_MAX_SLOT_SIZE 1048576
#define RING_MAX_MESSAGE 1073741824
#define RING_MAX_CAPACITY 1073741824
#define RING_NAME_MAX 200
#define RING_ERRBUF 256

/* Header byte offsets (the drawing above), for tools and tests. */
#define RING_OFF_MAGIC 0
#define RING_OFF_VERSION 8
#define RING_OFF_HEADER_SIZE 12
#define RING_OFF_CAPACITY 16
#define RING_OFF_SLOT_SIZE 24
#define RING_OFF_MAX_MESSAGE 28
#define RING_OFF_LIMIT 32
#define RING_OFF_CREATOR_UID 40
#define RING_OFF_SEGMENT_SIZE 56
#define RING_OFF_CELLS 64
#define RING_OFF_DATA 72
#define RING_OFF_FLAGS 88
#define RING_FLAG_PERSISTENT 1

/* Deadlines are absolute CLOCK_MONOTONIC nanoseconds, or one of these. */
#define RING_NOWAIT 0
#define RING_FOREVER 9223372036854775807

enum ring_status {
    RING_OK = 0,
    RING_FULL = 1,       /* no room and the caller would not wait */
    RING_EMPTY = 2,      /* nothing published and the caller would not wait */
    RING_TIMEOUT = 3,    /* the deadline passed while waiting */
    RING_CLOSED = 4,     /* this handle was closed (by another thread) */
    RING_EINTR = 5,      /* a signal interrupted the wait: check and retry */
    RING_ETOOBIG = 6,    /* message larger than max_message_size */
    RING_ECORRUPT = 7,   /* segment corrupted: a record header, counter or
                          * sequence word is impossible */
    RING_EINVAL = 8,     /* bad argument or geometry (see errbuf) */
    RING_ESYS = 9,       /* a system call failed (see errbuf / errno) */
    RING_EUNDERFLOW = 10 /* task_done() called more times than items put */
};

enum ring_mode { RING_CREATE = 0, RING_ATTACH = 1, RING_OPEN = 2 };

typedef struct ring ring_t;

typedef struct ring_params {
    uint64_t maxsize;          /* slots; 0 = RING_DEFAULT_CAPACITY */
    uint32_t slot_size;        /* 0 = RING_DEFAULT_SLOT_SIZE */
    uint32_t max_message_size; /* 0 = RING_DEFAULT_MAX_MESSAGE */
} ring_params_t;

typedef struct ring_iov {
    const void *base;
    size_t len;
} ring_iov_t;

/* A run of records claimed by a consumer; held until ring_release(). */
typedef struct ring_batch {
    uint64_t start;  /* first ticket of the run */
    uint64_t end;    /* one past the last ticket */
    uint64_t cursor; /* next ticket ring_next() looks at */
    size_t count;    /* records (not padding) in the run */
    size_t bytes;    /* payload bytes in the run */
    void *part;      /* the attach entry holding the claim's intent... */
    int anon;        /* ...or 1: none (table full), counted in anon_claims */
} ring_batch_t;

typedef struct ring_stats {
    uint64_t capacity, limit, head, tail;
    uint64_t puts, gets, bytes_in, bytes_out, waits_full, waits_empty;
    uint64_t abandoned, recovered, segment_size, created_unix_ns;
    int64_t unfinished;
    uint32_t slot_size, max_message_size, layout_version, creator_uid, creator_pid, flags;
} ring_stats_t;

/* Open a ring.  On failure returns NULL-handle status != RING_OK and a
 * sentence in errbuf (RING_ERRBUF bytes) that says what is wrong. */
int ring_open(const char *name, int mode, const ring_params_t *params,
              ring_t **out, char *errbuf);
/* Unmap and free the handle.  No thread may be inside a call on it. */
void ring_detach(ring_t *r);
/* Mark the handle closed and wake every waiter (safe from any thread). */
void ring_close(ring_t *r);
int ring_is_closed(const ring_t *r);
int ring_unlink(const char *name, char *errbuf);
int ring_validate_name(const char *name, char *errbuf);

/* Geometry of this handle (copied at attach, never re-read from shm). */
uint64_t ring_capacity(const ring_t *r);
uint64_t ring_limit(const ring_t *r);
uint32_t ring_slot_size(const ring_t *r);
uint32_t ring_max_message(const ring_t *r);
const char *ring_name(const ring_t *r);
int ring_is_owner(const ring_t *r);

int64_t ring_now(void);                     /* CLOCK_MONOTONIC ns */
int64_t ring_deadline_after(double seconds); /* now + s, saturating */
/* How long a waiter spins (bounded, one spinner per side) before it yields
 * and then sleeps on the futex.  A handle starts with RINGBUS_SPIN_NS from
 * the environment at ring_open (nanoseconds), else 20000 (20 us); 0 never
 * spins.  Test fault points are armed at ring_open the same way:
 * RINGBUS_FAULT=put-after-claim|put-mid-write|get-before-release makes the
 * process _exit(77) there (after RINGBUS_FAULT_AFTER=n passes). */
void ring_set_spin(ring_t *r, int64_t spin_ns);

/* Put n messages in order; *done = how many are in the ring on return.
 * Size-checks every message before claiming anything. */
int ring_put(ring_t *r, const ring_iov_t *iov, size_t n, size_t *done,
             int64_t deadline);
/* Claim up to max published records (at least one, waiting until the
 * deadline).  Read them with ring_next, then give them back with
 * ring_release; until then their slots stay owned by the caller. */
int ring_claim(ring_t *r, size_t max, ring_batch_t *b, int64_t deadline);
/* Next record of a claimed batch: 1 and (*data, *len), 0 at its end, or -1
 * if its header became impossible since the claim (segment corrupted; the
 * batch is then at its end, still to be released). */
int ring_next(ring_t *r, ring_batch_t *b, const void **data, size_t *len);
void ring_release(ring_t *r, const ring_batch_t *b);

/* Crash recovery: see the comment at the top.  With RING_RECOVER_REQUEUE
 * the recovered messages are put back into the ring (blocking until they
 * fit); otherwise they are handed to the caller in out->iov (heap copies,
 * give them back with ring_recovery_free). */
#define RING_RECOVER_PRODUCERS 1
#define RING_RECOVER_CONSUMERS 2
#define RING_RECOVER_REQUEUE 4
#define RING_RECOVER_ALL 3
typedef struct ring_recovery {
    uint64_t abandoned; /* messages lost with producers that died mid-put */
    uint64_t recovered; /* messages taken back from consumers that died */
    uint64_t reclaimed; /* attach entries of dead processes (threads) freed */
    int deferred;       /* 1: a thread without an attach entry was mid-claim,
                         * so nothing was repaired; try again later */
    size_t n, cap;
    ring_iov_t *iov;
} ring_recovery_t;
int ring_recover(ring_t *r, int flags, ring_recovery_t *out);
void ring_recovery_free(ring_recovery_t *out);

typedef struct ring_participant {
    uint32_t pid, tid;
    int alive, putting, getting;
} ring_participant_t;
size_t ring_participants(ring_t *r, ring_participant_t *out, size_t max);

uint64_t ring_qsize(const ring_t *r); /* messages published and not taken */
int ring_full(const ring_t *r);
void ring_get_stats(const ring_t *r, ring_stats_t *s);

/* JoinableQueue accounting, shared by every handle on the ring. */
void ring_task_add(ring_t *r, int64_t n);
int ring_task_done(ring_t *r);
int ring_task_join(ring_t *r, int64_t deadline);
int64_t ring_unfinished(const ring_t *r);
/* cffi-end */

#ifdef __cplusplus
}
#endif
#endif /* RINGBUS_RING_H */
