/* ringbus ring core: what it needs from the OS.  The monotonic clock,
 * futex wait / wake, process liveness from /proc, the thread id, and the
 * fork hook that tells cached per-process values to be read again. */
#include "ring_internal.h"

#include <errno.h>
#include <fcntl.h>
#include <linux/futex.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <time.h>

_Atomic uint64_t fork_gen = 0; /* bumped in every forked child */
static pthread_once_t fork_once = PTHREAD_ONCE_INIT;
static RING_TLS uint32_t my_tid;      /* gettid() is a syscall: cached... */
static RING_TLS uint64_t my_tid_fgen; /* ...and re-read in a forked child */

/* relaxed: only this process's threads compare it, after the fork. */
static void on_fork_child(void) { atomic_fetch_add_explicit(&fork_gen, 1, memory_order_relaxed); }
static void install_fork_handler(void) { pthread_atfork(NULL, NULL, on_fork_child); }
void install_fork_handler_once(void) { pthread_once(&fork_once, install_fork_handler); }

void seterr(char *errbuf, const char *fmt, ...)
{
    if (!errbuf)
        return;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(errbuf, RING_ERRBUF, fmt, ap);
    va_end(ap);
}

int64_t ring_now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

int64_t ring_deadline_after(double seconds)
{
    if (seconds <= 0)
        return ring_now(); /* already due: one attempt, no sleep */
    if (seconds > 9.0e9)
        return RING_FOREVER;
    return ring_now() + (int64_t)(seconds * 1e9);
}

int futex_wait(_Atomic uint32_t *word, uint32_t expect, int64_t deadline)
{
    struct timespec ts, *tp = NULL;
    if (deadline != RING_FOREVER) {
        ts.tv_sec = deadline / 1000000000LL;
        ts.tv_nsec = deadline % 1000000000LL;
        tp = &ts;
    }
    /* FUTEX_WAIT_BITSET takes an absolute CLOCK_MONOTONIC deadline, so
     * spurious wakeups never stretch the caller's timeout. Not PRIVATE:
     * the word is shared between processes. */
    long rc = syscall(SYS_futex, (uint32_t *)(void *)word, FUTEX_WAIT_BITSET, expect,
                      tp, NULL, FUTEX_BITSET_MATCH_ANY);
    if (rc == 0 || errno == EAGAIN)
        return RING_OK;
    if (errno == ETIMEDOUT)
        return RING_TIMEOUT;
    if (errno == EINTR)
        return RING_EINTR;
    return RING_ESYS;
}

void futex_wake(_Atomic uint32_t *word, int n)
{
    syscall(SYS_futex, (uint32_t *)(void *)word, FUTEX_WAKE, n, NULL, NULL, 0);
}

/* Start time (clock ticks since boot) and state letter of a process, from
 * /proc/<pid>/stat; 0 if it does not exist. */
static uint64_t proc_info(pid_t pid, char *state)
{
    char path[64], buf[1024];
    snprintf(path, sizeof path, "/proc/%d/stat", (int)pid);
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return 0;
    ssize_t n = read(fd, buf, sizeof buf - 1);
    close(fd);
    if (n <= 0)
        return 0;
    buf[n] = 0;
    char *p = strrchr(buf, ')'); /* comm may contain spaces and ')' */
    if (!p || p[1] != ' ')
        return 0;
    unsigned long long start = 0;
    char st = 0;
    /* after ") " come the state (field 3) ... starttime (field 22) */
    if (sscanf(p + 2, "%c %*d %*d %*d %*d %*d %*u %*u %*u %*u %*u %*u %*u %*d %*d %*d %*d "
               "%*d %*d %llu", &st, &start) != 2)
        return 0;
    if (state)
        *state = st;
    return start;
}

uint64_t proc_start_time(pid_t pid) { return proc_info(pid, NULL); }

/* Dead: gone, a zombie, or its pid reused by a process started later. */
int proc_alive(uint32_t pid, uint64_t start)
{
    char state = 0;
    if (pid == 0)
        return 0;
    uint64_t now = proc_info((pid_t)pid, &state);
    if (now == 0)
        return 0;
    if (state == 'Z' || state == 'X')
        return 0;
    return start == 0 || now == start; /* start 0: entry still being filled in */
}

uint64_t self_start(void)
{
    static _Atomic uint64_t cached;       /* per process... */
    static _Atomic uint64_t cached_fgen;  /* ...re-read after a fork */
    uint64_t fg = atomic_load_explicit(&fork_gen, memory_order_relaxed);
    /* relaxed: a benign race computes the same value twice. */
    uint64_t v = atomic_load_explicit(&cached, memory_order_relaxed);
    if (v == 0 || atomic_load_explicit(&cached_fgen, memory_order_relaxed) != fg) {
        v = proc_start_time(getpid());
        atomic_store_explicit(&cached, v, memory_order_relaxed);
        atomic_store_explicit(&cached_fgen, fg, memory_order_relaxed);
    }
    return v;
}

/* This process's PID namespace: the inode of /proc/self/ns/pid (nsfs
 * inode numbers are 32-bit), 0 if it cannot be read (no /proc).  Pids,
 * /proc/<pid> and start times are only comparable within one namespace. */
uint32_t self_pidns(void)
{
    static _Atomic uint32_t cached;      /* per process... */
    static _Atomic uint64_t cached_fgen; /* ...re-read after a fork (a child
                                          * may be in a new namespace) */
    uint64_t fg = atomic_load_explicit(&fork_gen, memory_order_relaxed);
    /* relaxed: a benign race computes the same value twice. */
    uint32_t v = atomic_load_explicit(&cached, memory_order_relaxed);
    if (v == 0 || atomic_load_explicit(&cached_fgen, memory_order_relaxed) != fg) {
        struct stat st;
        v = stat("/proc/self/ns/pid", &st) == 0 ? (uint32_t)st.st_ino : 0;
        atomic_store_explicit(&cached, v, memory_order_relaxed);
        atomic_store_explicit(&cached_fgen, fg, memory_order_relaxed);
    }
    return v;
}

uint32_t self_tid(void)
{
    /* relaxed: fork_gen changes only in a fresh child, before its threads run. */
    uint64_t fg = atomic_load_explicit(&fork_gen, memory_order_relaxed);
    if (my_tid == 0 || my_tid_fgen != fg) {
        my_tid = (uint32_t)syscall(SYS_gettid);
        my_tid_fgen = fg;
    }
    return my_tid;
}

/* Has thread tid of live process pid exited?  Its idle entry can then be
 * given to another thread: threads come and go (a thread per request, an
 * executor's pool) and an entry per thread ever seen would fill the table.
 * A tid is recycled only after the kernel's pid space wraps. */
int thread_gone(uint32_t pid, uint32_t tid)
{
    char path[64];
    if (tid == 0 || tid == pid)
        return 0; /* unknown yet, or the main thread (dies with the process) */
    snprintf(path, sizeof path, "/proc/%u/task/%u", pid, tid);
    return access(path, F_OK) != 0 && errno == ENOENT;
}

