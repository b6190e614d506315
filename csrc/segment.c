/* ringbus ring core: the segment.  Name validation, the geometry derived
 * from (maxsize, slot_size, max_message_size), creating, attaching and
 * mapping a segment, and the handle's open / close / detach / unlink. */
#include "ring_internal.h"

#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <time.h>

static _Atomic uint64_t next_gen = 1; /* handle generations */

static uint64_t pow2_at_least(uint64_t v)
{
    uint64_t p = 1;
    while (p < v)
        p <<= 1;
    return p;
}

int ring_validate_name(const char *name, char *errbuf)
{
    const char *p = name;
    if (!name) {
        seterr(errbuf, "ring name is missing");
        return RING_EINVAL;
    }
    if (*p == '/')
        p++;
    size_t n = strlen(p);
    if (n == 0 || n > RING_NAME_MAX) {
        seterr(errbuf, "invalid ring name '%.210s': it must have 1 to %d characters after "
               "the leading '/'", name, RING_NAME_MAX);
        return RING_EINVAL;
    }
    if (!strcmp(p, ".") || !strcmp(p, "..")) {
        seterr(errbuf, "invalid ring name '%s'", name);
        return RING_EINVAL;
    }
    for (size_t i = 0; i < n; i++) {
        char c = p[i];
        if (!((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') ||
              c == '-' || c == '_' || c == '.')) {
            seterr(errbuf, "invalid ring name '%.210s': only letters, digits, '.', '_' and "
                   "'-' may follow the leading '/'", name);
            return RING_EINVAL;
        }
    }
    return RING_OK;
}

static void normalize(const char *name, char out[RING_NAME_MAX + 2])
{
    snprintf(out, RING_NAME_MAX + 2, "/%s", name[0] == '/' ? name + 1 : name);
}

typedef struct {
    uint64_t cap, limit, cells_off, data_off, total;
    uint32_t slot, max_msg;
} geometry_t;

/* Derives the whole geometry from three numbers; attach recomputes it from
 * the header and insists on equality, so a forged header cannot point
 * outside the mapping. */
static int geometry(uint64_t maxsize, uint32_t slot, uint32_t max_msg, geometry_t *g,
                    char *errbuf)
{
    if (slot < RING_MIN_SLOT_SIZE || slot > RING_MAX_SLOT_SIZE || slot % 8) {
        seterr(errbuf, "slot_size %u is invalid: it must be a multiple of 8 from %d to %d",
               slot, RING_MIN_SLOT_SIZE, RING_MAX_SLOT_SIZE);
        return RING_EINVAL;
    }
    if (max_msg < 1 || max_msg > RING_MAX_MESSAGE) {
        seterr(errbuf, "max_message_size %u is invalid: it must be from 1 to %d", max_msg,
               RING_MAX_MESSAGE);
        return RING_EINVAL;
    }
    if (maxsize > RING_MAX_CAPACITY) {
        seterr(errbuf, "maxsize %llu is too large (at most %d)", (unsigned long long)maxsize,
               RING_MAX_CAPACITY);
        return RING_EINVAL;
    }
    uint64_t kmax = ((uint64_t)max_msg + slot - 1) / slot;
    uint64_t cap = pow2_at_least(maxsize ? maxsize : RING_DEFAULT_CAPACITY);
    /* A record of k slots plus its padding (< k) must always fit an empty
     * ring, else a big message at the wrap could never be put. */
    uint64_t need = pow2_at_least(2 * kmax);
    if (need > cap)
        cap = need;
    if (cap < 2)
        cap = 2;
    if (cap > RING_MAX_CAPACITY) {
        seterr(errbuf, "geometry too large: %llu slots", (unsigned long long)cap);
        return RING_EINVAL;
    }
    g->cap = cap;
    g->limit = (maxsize && maxsize < cap) ? maxsize : cap;
    g->slot = slot;
    g->max_msg = max_msg;
    g->cells_off = RING_HEADER_SIZE;
    g->data_off = (g->cells_off + cap * sizeof(cell_t) + PAGE - 1) / PAGE * PAGE;
    g->total = g->data_off + cap * (uint64_t)slot;
    if (g->total > (1ULL << 40)) {
        seterr(errbuf, "ring of %llu bytes is too large", (unsigned long long)g->total);
        return RING_EINVAL;
    }
    return RING_OK;
}

static int map_handle(ring_t *r, int fd, const geometry_t *g, char *errbuf)
{
    void *base = mmap(NULL, g->total, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    if (base == MAP_FAILED) {
        seterr(errbuf, "cannot map ring %s (%llu bytes): %s", r->name,
               (unsigned long long)g->total, strerror(errno));
        return RING_ESYS;
    }
    r->hdr = base;
    r->cells = (cell_t *)((uint8_t *)base + g->cells_off);
    r->data = (uint8_t *)base + g->data_off;
    r->map_size = g->total;
    r->cap = g->cap;
    r->mask = g->cap - 1;
    r->limit = g->limit;
    r->slot_size = g->slot;
    r->max_msg = g->max_msg;
    return RING_OK;
}

static int create_ring(ring_t *r, const ring_params_t *p, int *exists, uint32_t flags,
                       char *errbuf)
{
    geometry_t g;
    int rc = geometry(p->maxsize, p->slot_size ? p->slot_size : RING_DEFAULT_SLOT_SIZE,
                      p->max_message_size ? p->max_message_size : RING_DEFAULT_MAX_MESSAGE,
                      &g, errbuf);
    if (rc)
        return rc;
    int fd = shm_open(r->name, O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC, 0600);
    if (fd < 0) {
        if (errno == EEXIST && exists) {
            *exists = 1;
            return RING_ESYS;
        }
        seterr(errbuf, "cannot create ring %s: %s", r->name, strerror(errno));
        return RING_ESYS;
    }
    fchmod(fd, 0600); /* the umask may not widen it, but make it exact */
    /* Reserve every page now: on a full /dev/shm this fails cleanly here
     * instead of raising SIGBUS at the first write into the ring. */
    int err = posix_fallocate(fd, 0, (off_t)g.total);
    if (err) {
        seterr(errbuf, "cannot create ring %s: no room for %llu bytes in /dev/shm (%s)",
               r->name, (unsigned long long)g.total, strerror(err));
        close(fd);
        shm_unlink(r->name);
        return RING_ESYS;
    }
    rc = map_handle(r, fd, &g, errbuf);
    close(fd);
    if (rc) {
        shm_unlink(r->name);
        return rc;
    }
    header_t *h = r->hdr;
    /* relaxed: only tells attachers to wait; MAGIC below is the publication. */
    atomic_store_explicit(&h->magic, INIT_MAGIC, memory_order_relaxed);
    h->layout_version = RING_LAYOUT_VERSION;
    h->header_size = RING_HEADER_SIZE;
    h->capacity = g.cap;
    h->slot_size = g.slot;
    h->max_message_size = g.max_msg;
    h->limit = g.limit;
    h->creator_uid = (uint32_t)geteuid();
    h->creator_pid = (uint32_t)getpid();
    h->creator_start = proc_start_time(getpid());
    h->segment_size = g.total;
    h->cells_offset = g.cells_off;
    h->data_offset = g.data_off;
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    h->created_unix_ns = (uint64_t)ts.tv_sec * 1000000000ULL + (uint64_t)ts.tv_nsec;
    h->flags = flags;
    for (uint64_t t = 0; t < g.cap; t++)
        /* relaxed: nobody may read cells before magic is published. */
        atomic_store_explicit(&r->cells[t].seq, t, memory_order_relaxed);
    /* release pairs with attach's acquire load of magic: an attacher that
     * sees the magic sees the whole initialized header and cells. */
    atomic_store_explicit(&h->magic, MAGIC, memory_order_release);
    r->owner = 1;
    return RING_OK;
}

static int attach_ring(ring_t *r, char *errbuf)
{
    int fd = shm_open(r->name, O_RDWR | O_CLOEXEC, 0);
    if (fd < 0) {
        if (errno == ENOENT)
            seterr(errbuf, "no ring named %s (missing segment /dev/shm%s)", r->name, r->name);
        else
            seterr(errbuf, "cannot open ring %s: %s", r->name, strerror(errno));
        return RING_ESYS;
    }
    struct stat st;
    int64_t give_up = ring_now() + 1000000000LL; /* a creator is at most this slow */
    union {
        header_t h;
        uint8_t raw[PAGE];
    } hb;
    for (;;) {
        if (check_segment_file(fd, &st, "ring", r->name, errbuf) < 0)
            goto fail;
        memset(&hb, 0, sizeof hb);
        uint64_t magic = 0;
        if (st.st_size >= (off_t)RING_HEADER_SIZE) {
            ssize_t n = pread(fd, hb.raw, PAGE, 0);
            if (n != (ssize_t)PAGE) {
                seterr(errbuf, "cannot read ring %s header", r->name);
                goto fail;
            }
            memcpy(&magic, hb.raw, sizeof magic);
        }
        if (magic == MAGIC)
            break;
        int blank = 1;
        for (size_t i = 0; i < sizeof hb.raw && blank; i++)
            blank = hb.raw[i] == 0;
        /* Only a creator caught between shm_open and publishing its header
         * leaves a segment that is empty, blank or marked RINGINIT; anything
         * else is refused at once. */
        int creating = st.st_size == 0 || (st.st_size >= (off_t)RING_HEADER_SIZE &&
                                          (blank || magic == INIT_MAGIC));
        if (!creating || ring_now() > give_up) {
            if (st.st_size < (off_t)RING_HEADER_SIZE)
                seterr(errbuf, "segment %s is truncated: %lld bytes, smaller than a ring "
                       "header (%d bytes)", r->name, (long long)st.st_size, RING_HEADER_SIZE);
            else if (blank || magic == INIT_MAGIC)
                seterr(errbuf, "segment %s was never initialized (its creator died while "
                       "creating it)", r->name);
            else
                seterr(errbuf, "segment %s is foreign: not a ringbus ring (bad magic)", r->name);
            goto fail;
        }
        usleep(1000);
    }
    /* The geometry was copied by pread after the magic was seen; re-read the
     * magic through the mapping with acquire below, before any cell use. */
    header_t *h = &hb.h;
    if (h->layout_version != RING_LAYOUT_VERSION) {
        seterr(errbuf, "ring %s has %s layout version %u (this ringbus reads version %d)",
               r->name, h->layout_version > RING_LAYOUT_VERSION ? "a newer" : "an older",
               h->layout_version, RING_LAYOUT_VERSION);
        goto fail;
    }
    if (h->creator_uid != (uint32_t)geteuid()) {
        seterr(errbuf, "ring %s was created by another user (uid %u): refused", r->name,
               h->creator_uid);
        goto fail;
    }
    geometry_t g;
    uint64_t cap = h->capacity;
    if (h->header_size != RING_HEADER_SIZE || cap < 2 || cap > RING_MAX_CAPACITY ||
        (cap & (cap - 1)) || h->limit < 1 || h->limit > cap ||
        geometry(h->limit < cap ? h->limit : cap, h->slot_size, h->max_message_size, &g,
                 NULL) != RING_OK) {
        seterr(errbuf, "ring %s has an invalid geometry in its header (capacity %llu, "
               "slot_size %u, max_message_size %u)", r->name, (unsigned long long)cap,
               h->slot_size, h->max_message_size);
        goto fail;
    }
    if (g.cap != cap || g.limit != h->limit || h->cells_offset != g.cells_off ||
        h->data_offset != g.data_off || h->segment_size != g.total) {
        seterr(errbuf, "ring %s has an inconsistent header (offsets or sizes do not match "
               "its geometry)", r->name);
        goto fail;
    }
    if ((uint64_t)st.st_size < g.total) {
        seterr(errbuf, "segment %s is truncated: %lld bytes, its header says %llu", r->name,
               (long long)st.st_size, (unsigned long long)g.total);
        goto fail;
    }
    int rc = map_handle(r, fd, &g, errbuf);
    close(fd);
    /* acquire pairs with the creator's release store of magic: the cells it
     * initialized are visible before this handle touches them. */
    if (rc == RING_OK && atomic_load_explicit(&r->hdr->magic, memory_order_acquire) != MAGIC) {
        munmap(r->hdr, r->map_size);
        seterr(errbuf, "segment %s changed while attaching (bad magic)", r->name);
        return RING_EINVAL;
    }
    return rc;
fail:
    close(fd);
    return RING_EINVAL;
}

int ring_open(const char *name, int mode, const ring_params_t *params, ring_t **out,
              char *errbuf)
{
    static const ring_params_t defaults = {0, 0, 0};
    *out = NULL;
    int rc = ring_validate_name(name, errbuf);
    if (rc)
        return rc;
    if (mode != RING_CREATE && mode != RING_ATTACH && mode != RING_OPEN) {
        seterr(errbuf, "invalid open mode %d", mode);
        return RING_EINVAL;
    }
    ring_t *r = calloc(1, sizeof *r);
    if (!r) {
        seterr(errbuf, "out of memory");
        return RING_ESYS;
    }
    normalize(name, r->name);
    r->spin_ns = DEFAULT_SPIN_NS;
    const char *env = getenv("RINGBUS_SPIN_NS");
    if (env && *env)
        r->spin_ns = atoll(env);
    /* relaxed: a unique number is all that is needed. */
    r->gen = atomic_fetch_add_explicit(&next_gen, 1, memory_order_relaxed);
    env = getenv("RINGBUS_FAULT");
    if (env && *env) {
        r->fault = !strcmp(env, "put-after-claim")      ? F_PUT_AFTER_CLAIM
                   : !strcmp(env, "put-mid-write")      ? F_PUT_MID_WRITE
                   : !strcmp(env, "get-before-release") ? F_GET_BEFORE_RELEASE
                                                        : F_NONE;
        env = getenv("RINGBUS_FAULT_AFTER");
        r->fault_skip = env ? atol(env) : 0;
    }
    install_fork_handler_once();
    atomic_init(&r->closed, 0);
    if (!params)
        params = &defaults;
    if (mode == RING_ATTACH) {
        rc = attach_ring(r, errbuf);
    } else if (mode == RING_CREATE) {
        rc = create_ring(r, params, NULL, 0, errbuf);
    } else {
        int exists = 0;
        rc = create_ring(r, params, &exists, RING_FLAG_PERSISTENT, errbuf);
        if (rc && exists)
            rc = attach_ring(r, errbuf);
        r->owner = 0; /* an opened ring is persistent: nobody auto-unlinks it */
    }
    if (rc) {
        free(r);
        return rc;
    }
    *out = r;
    return RING_OK;
}

void ring_detach(ring_t *r)
{
    if (!r)
        return;
    if (r->hdr) {
        release_entries(r);
        munmap(r->hdr, r->map_size);
    }
    free(r);
}

void ring_close(ring_t *r)
{
    /* relaxed store; the seq bumps below (release) order it for sleepers. */
    atomic_store_explicit(&r->closed, 1, memory_order_relaxed);
    ec_wake_everyone(&r->hdr->not_empty);
    ec_wake_everyone(&r->hdr->not_full);
    ec_wake_everyone(&r->hdr->joined);
}

int ring_is_closed(const ring_t *r) { return closed(r); }

int ring_unlink(const char *name, char *errbuf)
{
    char n[RING_NAME_MAX + 2];
    int rc = ring_validate_name(name, errbuf);
    if (rc)
        return rc;
    normalize(name, n);
    if (shm_unlink(n) < 0) {
        seterr(errbuf, errno == ENOENT ? "no ring named %s" : "cannot unlink ring %s: %s", n,
               strerror(errno));
        return RING_ESYS;
    }
    return RING_OK;
}

uint64_t ring_capacity(const ring_t *r) { return r->cap; }
uint64_t ring_limit(const ring_t *r) { return r->limit; }
uint32_t ring_slot_size(const ring_t *r) { return r->slot_size; }
uint32_t ring_max_message(const ring_t *r) { return r->max_msg; }
const char *ring_name(const ring_t *r) { return r->name; }
int ring_is_owner(const ring_t *r) { return r->owner; }
void ring_set_spin(ring_t *r, int64_t spin_ns) { r->spin_ns = spin_ns < 0 ? 0 : spin_ns; }

int check_segment_file(int fd, struct stat *st, const char *kind, const char *name, char *errbuf)
{
    if (fstat(fd, st) < 0) {
        seterr(errbuf, "cannot stat %s %s: %s", kind, name, strerror(errno));
        return -1;
    }
    if (st->st_uid != geteuid()) {
        seterr(errbuf, "%s %s belongs to another user (uid %u, we are uid %u): refused", kind,
               name, (unsigned)st->st_uid, (unsigned)geteuid());
        return -1;
    }
    if (st->st_mode & 077) {
        seterr(errbuf, "%s %s has unsafe permissions %03o (ringbus segments are 0600): refused",
               kind, name, (unsigned)(st->st_mode & 0777));
        return -1;
    }
    return 0;
}
