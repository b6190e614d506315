/*
 * ringbus limits: machine-wide rate limits and concurrency caps of a bus's
 * handlers, in one POSIX shared-memory segment per bus
 * (/dev/shm/ringbus-<bus>-limits).  C11, no Python; shares the ring core's
 * platform helpers (clock, /proc liveness, PID namespace).
 *
 * Segment layout (layout version 1; all integers little-endian, native)
 * ---------------------------------------------------------------------
 *  offset  size  field                      written by / when
 *  ------  ----  -------------------------  -------------------------------
 *  header page 0 (immutable once `magic` is published)
 *       0     8  magic "RBLIMIT1"           creator, release-stored LAST
 *       8     4  layout_version (=1)        creator
 *      12     4  header_size (=4096)        creator
 *      16     4  slots (=64)                creator
 *      20     4  holders per slot (=512)    creator
 *      24     4  slot_size (=9216)          creator
 *      28     4  creator_uid                creator
 *      32     4  creator_pid                creator
 *      40     8  creator_start (clk ticks)  creator
 *      48     8  segment_size (=593920)     creator
 *      56     8  created_unix_ns            creator
 *    64..4095    reserved (zero)
 *  slot i at 4096 + i x 9216: one limited handler, found by its name
 *  (FNV-1a hash modulo 64, then linear probing; slots are never freed):
 *      +0     8  state: 0 free; WRITING | pid while its name is written;
 *                PUBLISHED (release-stored after the name)
 *      +8     4  name_len               +12  4  (zero)
 *     +16   240  name (the registered type's module.qualname, NUL padded)
 *    +256     8  interval_ns  \  the last registered configuration, for
 *    +264     8  burst         > tools only: every acquire passes its own
 *    +272     4  cap          /   (0: no rate / no cap)
 *    +384     8  tat: the token bucket, one word (GCRA: the theoretical
 *                arrival time of the next token, CLOCK_MONOTONIC ns)
 *    +392     8  rate_granted  +400  8  rate_refused   (statistics)
 *    +408     8  horizon: when the next refused start is told to come back
 *                (CLOCK_MONOTONIC ns; refused starts are spread one interval
 *                apart, never more than LIMITS_MAX_SPREAD_NS past their token)
 *    +512     8  reclaim_at (CLOCK_MONOTONIC ns before which nobody scans
 *                the holders for dead ones again)
 *    +520     8  permits_taken  +528 8  permits_refused  +536 8  reclaimed
 *   +1024  8192  holder table: 512 entries x 16 bytes, one per permit held:
 *                +0 owner u64 = pid | pidns << 32 (0 = free; one CAS takes
 *                   or gives back the permit)
 *                +8 stamp u64 = pid | low 32 bits of the start time << 32
 *                   (written right after the take; another pid in it means
 *                   "not stamped yet")
 *
 * The token bucket (rate N per period P, burst B): interval T = ceil(P / N)
 * ns, tat starts at 0 (a full bucket).  A start at time `now` is granted iff
 * max(tat, now) - now <= (B - 1) x T, and then tat = max(tat, now) + T, in
 * one CAS: a process killed anywhere either took its token or did not.
 * That is a bucket of B tokens refilled one every T ns: over any window of
 * t ns at most B + t / T starts, and T >= P / N (rounded up) never lets
 * through more than N per period on average.  A refusal returns when to
 * try again: the next token's time for the first start refused, and one
 * interval later for each further one (the horizon), so that a crowd of
 * refused tasks comes back spread like the tokens, not all at once.
 *
 * The concurrency cap C: permits are the holder entries 0..C-1 (each caller
 * passes its own C), so at most C are ever held.  Giving one back clears the
 * stamp, then CASes the owner to 0.  A caller that finds all C taken looks
 * (at most once per 50 ms per slot) for holders that died: gone, a zombie,
 * or their pid reused (start time differs); an entry of another PID
 * namespace is never judged.  A dead holder's entry is freed by a CAS from
 * the owner word it judged, so a permit is never freed twice.
 *
 * CLOCK_MONOTONIC is machine-wide (outside time namespaces), so every
 * process on the machine reads the bucket against the same clock.
 */
#ifndef RINGBUS_RING_LIMITS_H
#define RINGBUS_RING_LIMITS_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* cffi-begin: everything up to cffi-end is parsed by the test binding. */
#define LIMITS_LAYOUT_VERSION 1
#define LIMITS_HEADER_SIZE 4096
#define LIMITS_SLOTS 64
#define LIMITS_HOLDERS 512
#define LIMITS_SLOT_SIZE 9216
#define LIMITS_HOLDERS_OFFSET 1024
#define LIMITS_SEGMENT_SIZE 593920
#define LIMITS_NAME_MAX 239
#define LIMITS_OFF_SLOT_TAT 384
#define LIMITS_RECLAIM_EVERY_NS 50000000
#define LIMITS_MAX_SPREAD_NS 10000000000

typedef struct limits limits_t;

typedef struct limits_stats {
    uint64_t interval_ns, burst, rate_granted, rate_refused;
    uint64_t permits_taken, permits_refused, reclaimed;
    uint32_t cap, held;
} limits_stats_t;

/* Open the segment `name` (a POSIX shm name, "/ringbus-<bus>-limits"):
 * attach, or create it (O_EXCL, 0600, fallocated) when missing.  RING_OK or
 * a ring_status with a sentence in errbuf (RING_ERRBUF bytes). */
int limits_open(const char *name, limits_t **out, char *errbuf);
void limits_close(limits_t *l);
int limits_unlink(const char *name, char *errbuf);
/* The slot of handler `key` (found, or taken and named): >= 0, or -1 with a
 * sentence in errbuf (name too long, every slot taken). */
int limits_slot(limits_t *l, const char *key, size_t len, char *errbuf);
/* Record the configuration this process registered (for tools only). */
void limits_configure(limits_t *l, int slot, uint64_t interval_ns, uint64_t burst,
                      uint32_t cap);
/* One start through the bucket: 0 = granted, else the nanoseconds after
 * which to try again (the next token's, spread: see the horizon).  Lock-free, no system call (the clock is the vDSO's). */
int64_t limits_rate_acquire(limits_t *l, int slot, uint64_t interval_ns, uint64_t burst);
/* A permit among the first `cap` holder entries: its number (>= 1), or 0
 * when all are held by live processes. */
int limits_permit_acquire(limits_t *l, int slot, uint32_t cap);
/* Give permit `permit` back: 0, or 1 if it was no longer ours (taken back
 * by a recoverer that judged this process dead: a pid namespace mix-up). */
int limits_permit_release(limits_t *l, int slot, int permit);
/* Free the permits of dead holders now; returns how many. */
int limits_reclaim(limits_t *l, int slot);
void limits_get_stats(limits_t *l, int slot, limits_stats_t *s);
/* cffi-end */

#ifdef __cplusplus
}
#endif
#endif /* RINGBUS_RING_LIMITS_H */
