/*
 * ringbus task records: the per-task status records of a bus's task table
 * (/dev/shm/ringbus-<bus>-tasktable, created and laid out by
 * src/ringbus/transport/shm_results.py).  These are the steps taken once
 * per task on the hot path -- a dispatcher filling a new record, a worker
 * starting and finishing the task, a canceller flagging it -- in C, so that
 * task identity costs nanoseconds, not microseconds of Python.
 *
 * Record (little-endian, 8-aligned; record_size bytes, a multiple of 8)
 * ---------------------------------------------------------------------
 *  offset  size  field                  written by
 *       0    16  task id (0s: none)     the dispatcher (last, after the fields)
 *      16     1  state                  dispatcher, worker, canceller (CAS)
 *      17     1  cancel flag            canceller
 *      18     2  attempt                worker
 *      20     4  worker pid             worker
 *      24     4  dispatcher pid         dispatcher
 *      28     4  kept result length     worker (0xFFFFFFFF: too large to keep)
 *      32     8  dispatcher's counter   dispatcher
 *      40     8  queued   (f64 Unix)    dispatcher
 *      48     8  started  (f64 Unix)    worker
 *      56     8  finished (f64 Unix)    worker, canceller
 *      64     8  expires  (f64 Unix; 0: not finished)
 *      72     4  progress (f32; NaN: none)   worker
 *      76     2  progress message length     worker
 *      80   128  progress message (UTF-8)    worker
 *     208     -  the kept result message (at most record_size - 208 bytes)
 *
 * A record's id says whose it is: every call names the id it expects and
 * does nothing (returns TASK_RECORD_NOT_MINE) when the record holds another
 * task (reused) or is empty.  Readers (Python, status queries) copy the
 * record and re-read until two copies agree.  State moves by CAS only where
 * two writers race: a worker starting the task against a canceller
 * cancelling it while queued -- exactly one of them wins.
 */
#ifndef RINGBUS_TASK_RECORDS_H
#define RINGBUS_TASK_RECORDS_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* cffi-begin: everything up to cffi-end is parsed by the test binding. */
/* States (src/ringbus/transport/task_table.py draws the same numbers). */
#define TASK_EMPTY 0
#define TASK_SCHEDULED 1
#define TASK_QUEUED 2
#define TASK_RUNNING 3
#define TASK_DONE 4
#define TASK_FAILED 5
#define TASK_CANCELLED 6

enum { TASK_RECORD_NOT_MINE = -1 }; /* an enum: the cffi binding reads it */
#define TASK_RECORD_RESULT_OFFSET 208
#define TASK_RECORD_NOT_KEPT 4294967295

/* Whether a new task may take the record: it is empty, or its task finished
 * (and was not cancelled while it waited) and its keep time passed -- or,
 * with `evict`, finished at all.  A record whose task is not finished is
 * never taken. */
int task_record_usable(const void *rec, double now, int evict);

/* A new task's record: every field, then the id (a reader that matches the
 * id sees the new fields). */
void task_record_fill(void *rec, const uint8_t id[16], uint8_t state, uint32_t dispatcher_pid,
                      uint64_t counter, double now);

/* A worker takes the task: RUNNING with its attempt, pid and start time.
 * 1: run it; 0: it was cancelled (do not run; the record is left as is);
 * TASK_RECORD_NOT_MINE: not tracked here (run it). */
int task_record_begin(void *rec, const uint8_t id[16], uint16_t attempt, uint32_t worker_pid,
                      double now);

/* The task ended in `state`.  keep <= 0: the record is freed now.  Else it
 * stays until now + keep, with `result` (len bytes) when it fits in `room`.
 * 0, or TASK_RECORD_NOT_MINE. */
int task_record_finish(void *rec, const uint8_t id[16], uint8_t state, double now, double keep,
                       const uint8_t *result, uint32_t len, uint32_t room);

/* Flag a cancel (`flag`: 1 cancel, 2 terminate); a task still SCHEDULED or
 * QUEUED becomes CANCELLED at once, held until now + hold.  The state before,
 * or TASK_RECORD_NOT_MINE. */
int task_record_cancel(void *rec, const uint8_t id[16], uint8_t flag, double now, double hold);

/* The cancel flag of a running task's record (its handler polls it). */
uint8_t task_record_cancel_flag(const void *rec);
/* cffi-end */

#ifdef __cplusplus
}
#endif
#endif
