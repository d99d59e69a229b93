/*
 * unionfs.server._fuse_shim: what pyfuse3 3.5 cannot ask libfuse for, added in front of it.
 *
 *  - fallocate(2): pyfuse3 registers no fallocate handler, so the kernel answers EOPNOTSUPP to
 *    every mode (punch hole, keep size, zero range).  The shim registers one that calls a Python
 *    function synchronously (pyfuse3 dispatches requests on the trio thread with the GIL held).
 *    The function answers at once by returning the errno (0: done), or returns None and answers
 *    later with reply_err(req, errno) — a long fallocate (punching a hole in a big file takes as
 *    long as an fsync) then runs on a worker thread while the loop serves other requests.
 *  - lseek(2) with SEEK_DATA or SEEK_HOLE: with no lseek handler the kernel takes every file for
 *    all data, so holes in a sparse file are never found.  The shim registers one that calls a
 *    Python function synchronously, as for fallocate; it answers from the open file's real fd.
 *    Without a function the kernel gets ENOSYS and falls back to its generic answer.
 *  - letting go of the branches at unmount: when the session loop's read finds the session ended
 *    (unmounted, or the connection aborted), every fd the server holds on the branches'
 *    filesystems (but those it says are not the union's) is pointed at a sink of its own (an
 *    unconnected socket), at once, from C, before pyfuse3 returns to Python: unwinding the Python
 *    side first takes long enough under load for `umount MNT && umount BASE` to find BASE busy.
 *    The fd numbers stay taken, so the server closes them later as usual and no number is reused
 *    under it; a request still being served then (only after a forced abort) reads, writes and
 *    changes nothing.
 *  - cache_readdir: pyfuse3's opendir replies with the fuse_file_info it was given, with only fh
 *    set, so the kernel never keeps a directory listing.  The shim sets cache_readdir and
 *    keep_cache on that fuse_file_info before pyfuse3 sees it; the kernel then answers a repeated
 *    listing from its page cache, and drops it itself when the directory changes through the mount
 *    (or its mtime does).
 *  - zero-message opendir: with stateless_dirs, the shim answers OPENDIR with ENOSYS, which a
 *    kernel offering FUSE_CAP_NO_OPENDIR_SUPPORT takes as "never send OPENDIR or RELEASEDIR again;
 *    keep every listing cached".  READDIRPLUS and FSYNCDIR then arrive with fh 0; the shim hands
 *    pyfuse3 the directory's inode number tagged with STATELESS_DIR as fh instead, so the Python
 *    handlers know which directory is meant.  A kernel cached listing then costs no request at all.
 *  - dont_mask: with POSIX ACLs (which pyfuse3 asks for itself), the kernel leaves new objects'
 *    modes to the server, but still strips the caller's umask from them unless the server asks for
 *    FUSE_CAP_DONT_MASK; a parent's default ACL must then be applied to a mode the umask has
 *    already cut (a group::rwx default would give group::r-x under umask 022).  The shim asks, and
 *    the server applies the umask itself where no default ACL replaces it, as a local filesystem does.
 *  - FUSE passthrough (Linux 6.9+): the kernel then reads and writes (and maps) an open file's
 *    backing file itself, without a READ or WRITE request.  libfuse 3.14 knows nothing of it, so
 *    the shim (1) sets FUSE_PASSTHROUGH and max_stack_depth in libfuse's INIT reply, seen on its way
 *    to /dev/fuse through a custom io (fuse_session_custom_io) put in place before the session's
 *    first read; (2) registers backing files with FUSE_DEV_IOC_BACKING_OPEN / _CLOSE for the
 *    server; (3) answers OPEN and CREATE itself, with FOPEN_PASSTHROUGH and the backing id, when
 *    the server said so for that file handle just before returning it (pyfuse3 replies in the same
 *    step, so one pending slot is enough); every other reply is libfuse's own.  Every write(2) to
 *    a passed-through file asks the server for security.capability (file_remove_privs: FUSE has no
 *    SB_NOSEC); for the files the server lists as having none, the shim answers ENODATA itself.
 *  - FUSE_HANDLE_KILLPRIV_V2, asked for beside passthrough in the same INIT reply: the kernel then
 *    leaves the clearing of set-id bits on write, truncate and chown to the server, and so (1) no
 *    longer asks for a file's attributes (GETATTR) before each chown of a regular file to work out
 *    the mode itself, and (2) marks the filesystem SB_NOSEC, so that a file found once without
 *    set-id bits or security.capability is not asked for it again at every write(2) until its
 *    attributes change (about two requests of five in an untar).  The server then clears the bits
 *    when the kernel sends a SETATTR of nothing to a non-directory (a write or fallocate by a caller
 *    without CAP_FSETID, or chown(f, -1, -1)) and when a truncate carries FATTR_KILL_SUIDGID, which
 *    pyfuse3 drops: the shim hands it on as st_mode KILL_SUIDGID_MARK (an impossible file type) in
 *    a SETATTR that does not set the mode.
 *
 *  - reply attributes built in C (entry_attributes): pyfuse3's EntryAttributes is a fuse_entry_param
 *    behind one Python property per field; a reply built through them costs about 0.7 us of the
 *    server's time per entry, most of a cold listing's union logic.  The shim makes the object and
 *    fills its fuse_entry_param from the union's packed stat in one call, at the place inside the
 *    object that unionfs.server.compat found by probing (attr_layout) and checked against the
 *    properties; without it the server sets the properties one by one.
 * How: this module defines fuse_session_new() (and fuse_session_receive_buf(), to see the session
 * end).  Loaded with RTLD_GLOBAL before pyfuse3 is imported, it is the definition pyfuse3's call
 * binds to.  It copies pyfuse3's operation table, puts its own entries in front, and hands the
 * copy to libfuse's own fuse_session_new.  If pyfuse3 was imported first, or a libfuse renames the
 * entry points, nothing is interposed: sessions() stays 0 (or received() False) and unionfs serves
 * without these features.  unionfs.server.compat loads this module and checks both at start-up.
 */
#define _GNU_SOURCE
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#define FUSE_USE_VERSION 35
#include <dirent.h>
#include <stddef.h>
#include <dlfcn.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdlib.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <unistd.h>
#include <errno.h>
#include <fuse_lowlevel.h>
#include "../core/packed_stat.h"
#include <linux/fuse.h>
#include <string.h>
#include <poll.h>
#include <sched.h>
#include <time.h>
#include <sys/file.h>
#include <sys/resource.h>
#include <sys/ioctl.h>
#include <sys/uio.h>

typedef struct fuse_session *(*session_new_fn)(struct fuse_args *, const struct fuse_lowlevel_ops *,
                                               size_t, void *);
typedef void (*init_fn)(void *, struct fuse_conn_info *);
typedef void (*opendir_fn)(fuse_req_t, fuse_ino_t, struct fuse_file_info *);
typedef void (*readdir_fn)(fuse_req_t, fuse_ino_t, size_t, off_t, struct fuse_file_info *);
typedef void (*fsyncdir_fn)(fuse_req_t, fuse_ino_t, int, struct fuse_file_info *);
typedef void (*getxattr_fn)(fuse_req_t, fuse_ino_t, const char *, size_t);
typedef void (*setattr_fn)(fuse_req_t, fuse_ino_t, struct stat *, int, struct fuse_file_info *);

#define STATELESS_DIR (1ULL << 63)

static struct fuse_lowlevel_ops shim_ops; /* the table libfuse gets; must outlive the session */
static init_fn inner_init;
static opendir_fn inner_opendir;
static readdir_fn inner_readdirplus;
static fsyncdir_fn inner_fsyncdir;
static getxattr_fn inner_getxattr;
static setattr_fn inner_setattr;
static PyObject *fallocate_cb; /* (req, ino, fh, mode, offset, length) -> errno, or None: later */
static PyObject *lseek_cb;     /* (ino, fh, offset, whence) -> new offset, or -errno */
static int cache_dirs;
static int want_stateless_dirs;
static int want_dont_mask;
static int dont_mask; /* the kernel agreed: new objects' modes arrive with the umask not applied */
static int stateless_dirs; /* the kernel agreed: no OPENDIR/RELEASEDIR, fh 0 in READDIRPLUS */
static int sessions;
static int received; /* the session loop's read came through the shim (see fuse_session_receive_buf) */

static void shim_init(void *userdata, struct fuse_conn_info *conn)
{
    /* before pyfuse3's init, so that its Python init hook already sees what was agreed */
    dont_mask = 0;
    if (want_dont_mask && (conn->capable & FUSE_CAP_DONT_MASK)) {
        conn->want |= FUSE_CAP_DONT_MASK;
        dont_mask = 1;
    }
    inner_init(userdata, conn);
    if (want_stateless_dirs && cache_dirs && (conn->capable & FUSE_CAP_NO_OPENDIR_SUPPORT)) {
        conn->want |= FUSE_CAP_NO_OPENDIR_SUPPORT;
        stateless_dirs = 1;
    }
}

static void shim_opendir(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi)
{
    if (stateless_dirs) {
        fuse_reply_err(req, ENOSYS);
        return;
    }
    if (cache_dirs) {
        fi->cache_readdir = 1;
        fi->keep_cache = 1;
    }
    inner_opendir(req, ino, fi);
}

static void shim_readdirplus(fuse_req_t req, fuse_ino_t ino, size_t size, off_t off,
                             struct fuse_file_info *fi)
{
    if (stateless_dirs && fi->fh == 0)
        fi->fh = ino | STATELESS_DIR;
    inner_readdirplus(req, ino, size, off, fi);
}

static void shim_fsyncdir(fuse_req_t req, fuse_ino_t ino, int datasync, struct fuse_file_info *fi)
{
    if (stateless_dirs && fi->fh == 0)
        fi->fh = ino | STATELESS_DIR;
    inner_fsyncdir(req, ino, datasync, fi);
}

static void shim_fallocate(fuse_req_t req, fuse_ino_t ino, int mode, off_t offset, off_t length,
                           struct fuse_file_info *fi)
{
    long err = EOPNOTSUPP;
    int later = 0;
    PyGILState_STATE gil = PyGILState_Ensure();
    if (fallocate_cb != NULL) {
        PyObject *res = PyObject_CallFunction(fallocate_cb, "NKKiLL", PyLong_FromVoidPtr(req),
                                              (unsigned long long)ino, (unsigned long long)fi->fh,
                                              mode, (long long)offset, (long long)length);
        if (res == NULL) {
            PyErr_WriteUnraisable(fallocate_cb);
            err = EIO;
        } else if (res == Py_None) {
            later = 1; /* the callback owns req now: it answers with reply_err */
            Py_DECREF(res);
        } else {
            err = PyLong_AsLong(res);
            Py_DECREF(res);
            if (err == -1 && PyErr_Occurred()) {
                PyErr_WriteUnraisable(fallocate_cb);
                err = EIO;
            }
        }
    }
    PyGILState_Release(gil);
    if (!later)
        fuse_reply_err(req, (int)err);
}

static void shim_lseek(fuse_req_t req, fuse_ino_t ino, off_t off, int whence,
                       struct fuse_file_info *fi)
{
    long long res = -ENOSYS;
    PyGILState_STATE gil = PyGILState_Ensure();
    if (lseek_cb != NULL) {
        PyObject *ret = PyObject_CallFunction(lseek_cb, "KKLi", (unsigned long long)ino,
                                              (unsigned long long)fi->fh, (long long)off, whence);
        if (ret == NULL) {
            PyErr_WriteUnraisable(lseek_cb);
            res = -EIO;
        } else {
            res = PyLong_AsLongLong(ret);
            Py_DECREF(ret);
            if (res == -1 && PyErr_Occurred()) {
                PyErr_WriteUnraisable(lseek_cb);
                res = -EIO;
            }
        }
    }
    PyGILState_Release(gil);
    if (res < 0)
        fuse_reply_err(req, (int)-res);
    else
        fuse_reply_lseek(req, (off_t)res);
}

/* ------------------------------------------------------------------ passthrough */

/* Newer than the <linux/fuse.h> this builds against (7.38): the values of Linux 6.9's 7.40. */
#define PT_INIT_FLAGS2 (1u << (37 - 32)) /* FUSE_PASSTHROUGH, in fuse_init_in/out.flags2 */
#define PT_FOPEN (1u << 7)               /* FOPEN_PASSTHROUGH */
struct pt_backing_map {
    int32_t fd;
    uint32_t flags;
    uint64_t padding;
};
#define PT_IOC_BACKING_OPEN _IOW(229, 1, struct pt_backing_map)
#define PT_IOC_BACKING_CLOSE _IOW(229, 2, uint32_t)
/* Backing files on a filesystem of stacking depth 0 (ext4, xfs, tmpfs): the union's own depth is
   then 1, and an overlayfs may still be stacked on it. */
#define PT_STACK_DEPTH 1

static int want_passthrough;
static int passthrough;        /* this session's INIT reply asks for it */
static int passthrough_offered; /* the kernel offered it in INIT */
static struct fuse_session *io_session; /* the session our custom io is installed in */
static uint64_t init_unique;   /* the INIT request, until its reply goes out */
static int killpriv;           /* the kernel offered FUSE_HANDLE_KILLPRIV_V2; after INIT: agreed */
static uint64_t pending_fh;    /* the next OPEN/CREATE reply for this fh passes through... */
static int32_t pending_backing; /* ...to this backing file */
static int pending;
static int *backing_ids;       /* registered and not yet closed: closed at the session's end */
static size_t n_backing, cap_backing;

static ssize_t pt_read(int fd, void *buf, size_t len, void *userdata)
{
    (void)userdata;
    return read(fd, buf, len);
}

static ssize_t pt_splice(int fdin, off_t *offin, int fdout, off_t *offout, size_t len,
                         unsigned int flags, void *userdata)
{
    (void)userdata;
    return splice(fdin, offin, fdout, offout, len, flags);
}

/* Every reply libfuse writes: the INIT reply gets the passthrough flag on its way. */
static ssize_t pt_writev(int fd, struct iovec *iov, int count, void *userdata)
{
    (void)userdata;
    struct fuse_init_out out;
    if (init_unique != 0 && count >= 2 && iov[0].iov_len >= sizeof(struct fuse_out_header) &&
        ((struct fuse_out_header *)iov[0].iov_base)->unique == init_unique) {
        init_unique = 0;
        struct fuse_out_header *oh = iov[0].iov_base;
        if (passthrough && oh->error == 0 && iov[1].iov_len == sizeof out) {
            memcpy(&out, iov[1].iov_base, sizeof out);
            if (out.flags & FUSE_WRITEBACK_CACHE) {
                passthrough = 0; /* the kernel takes the two together as neither */
            } else {
                out.flags |= FUSE_INIT_EXT;
                out.flags2 |= PT_INIT_FLAGS2;
                out.unused[0] = PT_STACK_DEPTH; /* max_stack_depth */
                if (killpriv)
                    out.flags |= FUSE_HANDLE_KILLPRIV_V2;
                iov[1].iov_base = &out;
            }
        } else {
            passthrough = 0;
        }
        if (!passthrough)
            killpriv = 0;
    }
    return writev(fd, iov, count);
}

static const struct fuse_custom_io pt_io = {
    .writev = pt_writev, .read = pt_read, .splice_receive = pt_splice, .splice_send = pt_splice,
};

/* Before the session's first read (the INIT request): our io in libfuse's place. */
static void pt_install(struct fuse_session *se)
{
    if (!want_passthrough || io_session == se)
        return;
    io_session = se;
    n_backing = 0;
    passthrough = passthrough_offered = 0;
    killpriv = 0;
    init_unique = 0;
    pending = 0;
    if (fuse_session_custom_io(se, &pt_io, fuse_session_fd(se)) != 0)
        io_session = NULL;
}

/* After a read: the INIT request says whether the kernel offers passthrough. */
static void pt_received(struct fuse_session *se, const struct fuse_buf *buf, int res)
{
    if (io_session != se || res < (int)(sizeof(struct fuse_in_header) + sizeof(struct fuse_init_in)) ||
        (buf->flags & FUSE_BUF_IS_FD))
        return;
    const struct fuse_in_header *in = buf->mem;
    if (in->opcode != FUSE_INIT)
        return;
    const struct fuse_init_in *arg = (const struct fuse_init_in *)(in + 1);
    passthrough_offered = (arg->flags & FUSE_INIT_EXT) && (arg->flags2 & PT_INIT_FLAGS2);
    passthrough = passthrough_offered;
    killpriv = (arg->flags & FUSE_HANDLE_KILLPRIV_V2) != 0;
    init_unique = in->unique;
}

static void *next_symbol(const char *name)
{
    void *sym = dlvsym(RTLD_NEXT, name, "FUSE_3.0");
    return sym != NULL ? sym : dlsym(RTLD_NEXT, name);
}

static int take_pending(uint64_t fh, int32_t *backing)
{
    if (!pending || pending_fh != fh)
        return 0;
    pending = 0;
    *backing = pending_backing;
    return 1;
}

/* libfuse 3.14's fill_open, with the passthrough flag and the backing id, and only the flags the
   kernel takes beside it (FOPEN_PASSTHROUGH_MASK: others make the open fail with EIO; keep_cache
   means nothing for a file whose pages are the backing file's). */
static void pt_fill_open(struct fuse_open_out *arg, const struct fuse_file_info *f, int32_t backing)
{
    memset(arg, 0, sizeof *arg);
    arg->fh = f->fh;
    arg->open_flags = PT_FOPEN;
    if (f->direct_io)
        arg->open_flags |= FOPEN_DIRECT_IO;
    if (f->noflush)
        arg->open_flags |= FOPEN_NOFLUSH;
    arg->padding = (uint32_t)backing; /* backing_id */
}

static uint64_t timeout_sec(double t)
{
    return t > 1e18 ? (uint64_t)1e18 : t < 0.0 ? 0 : (uint64_t)t;
}

static uint32_t timeout_nsec(double t)
{
    double f = t - (double)timeout_sec(t);
    return f < 0.0 ? 0 : f >= 0.999999999 ? 999999999 : (uint32_t)(f * 1.0e9);
}

typedef int (*reply_open_fn)(fuse_req_t, const struct fuse_file_info *);
typedef int (*reply_create_fn)(fuse_req_t, const struct fuse_entry_param *,
                               const struct fuse_file_info *);

__attribute__((visibility("default"))) int fuse_reply_open(fuse_req_t req,
                                                           const struct fuse_file_info *f)
{
    static reply_open_fn real;
    int32_t backing;
    if (take_pending(f->fh, &backing)) {
        struct fuse_open_out arg;
        pt_fill_open(&arg, f, backing);
        return fuse_reply_buf(req, (const char *)&arg, sizeof arg);
    }
    if (real == NULL && (real = (reply_open_fn)next_symbol("fuse_reply_open")) == NULL)
        return fuse_reply_err(req, EIO);
    return real(req, f);
}

__attribute__((visibility("default"))) int fuse_reply_create(fuse_req_t req,
                                                             const struct fuse_entry_param *e,
                                                             const struct fuse_file_info *f)
{
    static reply_create_fn real;
    int32_t backing;
    if (take_pending(f->fh, &backing)) {
        struct {
            struct fuse_entry_out entry;
            struct fuse_open_out open;
        } arg;
        memset(&arg, 0, sizeof arg);
        const struct stat *st = &e->attr;
        arg.entry.nodeid = e->ino;
        arg.entry.generation = e->generation;
        arg.entry.entry_valid = timeout_sec(e->entry_timeout);
        arg.entry.entry_valid_nsec = timeout_nsec(e->entry_timeout);
        arg.entry.attr_valid = timeout_sec(e->attr_timeout);
        arg.entry.attr_valid_nsec = timeout_nsec(e->attr_timeout);
        struct fuse_attr *a = &arg.entry.attr;
        a->ino = st->st_ino;
        a->mode = st->st_mode;
        a->nlink = (uint32_t)st->st_nlink;
        a->uid = st->st_uid;
        a->gid = st->st_gid;
        a->rdev = (uint32_t)st->st_rdev;
        a->size = (uint64_t)st->st_size;
        a->blksize = (uint32_t)st->st_blksize;
        a->blocks = (uint64_t)st->st_blocks;
        a->atime = (uint64_t)st->st_atim.tv_sec;
        a->mtime = (uint64_t)st->st_mtim.tv_sec;
        a->ctime = (uint64_t)st->st_ctim.tv_sec;
        a->atimensec = (uint32_t)st->st_atim.tv_nsec;
        a->mtimensec = (uint32_t)st->st_mtim.tv_nsec;
        a->ctimensec = (uint32_t)st->st_ctim.tv_nsec;
        pt_fill_open(&arg.open, f, backing);
        return fuse_reply_buf(req, (const char *)&arg, sizeof arg);
    }
    if (real == NULL && (real = (reply_create_fn)next_symbol("fuse_reply_create")) == NULL)
        return fuse_reply_err(req, EIO);
    return real(req, e, f);
}

/* Nodes without security.capability, as the server says: the kernel asks at every write(2) of a
   file (FUSE has no SB_NOSEC) and a diff of a container's layer asks for every entry, and the answer
   is nearly always "none".  An open-addressing set of node ids (0: an empty slot, NOCAP_GONE: a
   removed one), doubled when half full, up to MAX_NOCAPS entries (past that, nothing is added: the
   server answers). */
#define MAX_NOCAPS (1 << 22)
#define NOCAP_GONE UINT64_MAX
static uint64_t *nocaps;   /* the slots */
static size_t nocap_slots; /* a power of two, or 0 */
static size_t nocap_used;  /* slots not empty: entries and removed ones */
static size_t n_nocaps;    /* entries */

static size_t nocap_hash(uint64_t ino)
{
    ino ^= ino >> 33;
    ino *= 0xff51afd7ed558ccdULL;
    ino ^= ino >> 33;
    return (size_t)ino;
}

/* The slot of *ino*, or of the empty one where it would go (the first removed one on the way). */
static size_t nocap_find(uint64_t ino)
{
    size_t mask = nocap_slots - 1, i = nocap_hash(ino) & mask, removed = SIZE_MAX;
    while (nocaps[i] != 0) {
        if (nocaps[i] == ino)
            return i;
        if (nocaps[i] == NOCAP_GONE && removed == SIZE_MAX)
            removed = i;
        i = (i + 1) & mask;
    }
    return removed != SIZE_MAX ? removed : i;
}

static int nocap_has(uint64_t ino)
{
    return n_nocaps > 0 && nocaps[nocap_find(ino)] == ino;
}

static void nocap_clear(void)
{
    free(nocaps);
    nocaps = NULL;
    nocap_slots = nocap_used = n_nocaps = 0;
}

static int nocap_grow(void)
{
    size_t slots = nocap_slots ? nocap_slots * 2 : 1024;
    if (n_nocaps * 4 < nocap_slots)   /* mostly removed slots: rehash at the same size */
        slots = nocap_slots;
    uint64_t *old = nocaps;
    size_t old_slots = nocap_slots;
    nocaps = calloc(slots, sizeof *nocaps);
    if (nocaps == NULL) {
        nocaps = old;
        return 0;
    }
    nocap_slots = slots;
    nocap_used = 0;
    for (size_t i = 0; i < old_slots; i++) {
        if (old[i] != 0 && old[i] != NOCAP_GONE) {
            nocaps[nocap_find(old[i])] = old[i];
            nocap_used++;
        }
    }
    free(old);
    return 1;
}

/* 1 when *ino* is in the set afterwards, 0 when it could not be added. */
static int nocap_add(uint64_t ino)
{
    if (ino == 0 || ino == NOCAP_GONE)
        return 0;
    if (nocap_slots > 0) {
        size_t i = nocap_find(ino);
        if (nocaps[i] == ino)
            return 1;
    }
    if (n_nocaps >= MAX_NOCAPS)
        return 0;
    if ((nocap_used + 1) * 2 > nocap_slots && !nocap_grow())
        return 0;
    size_t i = nocap_find(ino);
    if (nocaps[i] == 0)
        nocap_used++;
    nocaps[i] = ino;
    n_nocaps++;
    return 1;
}

static void nocap_del(uint64_t ino)
{
    if (n_nocaps == 0)
        return;
    size_t i = nocap_find(ino);
    if (nocaps[i] == ino) {
        nocaps[i] = NOCAP_GONE;
        n_nocaps--;
    }
}

static void shim_getxattr(fuse_req_t req, fuse_ino_t ino, const char *name, size_t size)
{
    if (n_nocaps > 0 && strcmp(name, "security.capability") == 0 && nocap_has(ino)) {
        fuse_reply_err(req, ENODATA);
        return;
    }
    inner_getxattr(req, ino, name, size);
}

/* ------------------------------------------------------------------ the end of the session */

#define MAX_RELEASE 64
static dev_t release_devs[MAX_RELEASE]; /* the branches' filesystems */
static int n_release_devs;
static int *keep_fds; /* fds on them that are not the union's (its log, its state dir) */
static Py_ssize_t n_keep_fds;
static int released;

/* 1: a file or directory to let go of now (on a branch's filesystem, or on one mounted inside a
   branch: anything of the union's; the daemon's own files are in keep_fds); 2: the same, but the
   last reference to an unlinked file (closing it may free many blocks: done last, at ordinary
   priority); 3: an fd on a branch's filesystem that stays (one in keep_fds, or not a file or
   directory); 0: any other. */
static int releasable(int fd)
{
    struct stat st;
    if (fd <= 2 || fstat(fd, &st) != 0)
        return 0;
    int on_branch = 0, kept = 0;
    for (int i = 0; i < n_release_devs && !on_branch; i++)
        on_branch = release_devs[i] == st.st_dev;
    for (Py_ssize_t i = 0; i < n_keep_fds && !kept; i++)
        kept = keep_fds[i] == fd;
    if (kept || !(S_ISREG(st.st_mode) || S_ISDIR(st.st_mode)))
        return on_branch ? 3 : 0;
    return S_ISREG(st.st_mode) && st.st_nlink == 0 ? 2 : 1;
}

/* The mount of fd, or of path from the root when fd is -1 (statx's mount id); 0 when unknown. */
static uint64_t mount_id(int fd)
{
#ifdef STATX_MNT_ID
    struct statx stx;
    if (statx(fd < 0 ? AT_FDCWD : fd, fd < 0 ? "/" : "", fd < 0 ? 0 : AT_EMPTY_PATH, STATX_MNT_ID,
              &stx) == 0 && (stx.stx_mask & STATX_MNT_ID))
        return stx.stx_mnt_id;
#endif
    (void)fd;
    return 0;
}

/* Whether an fd that stays on a branch's filesystem keeps a mount busy that its user could mean to
   unmount next: any but the root's (a state directory in /run where /run is no mount of its own,
   the resident server's log there: they stay, and the root mount is never unmounted anyway). */
static int keeps_busy(int fd)
{
    static uint64_t root;
    if (root == 0)
        root = mount_id(-1);
    uint64_t id = mount_id(fd);
    return id == 0 || root == 0 || id != root;
}

/* Point the releasable fds of one kind at *sink*; how many fds on a branch's filesystem stay,
   keeping busy a mount other than the root's. */
static int release_pass(int sink, int kind)
{
    DIR *d = opendir("/proc/self/fd");
    if (d == NULL)
        return -1;
    int staying = 0;
    struct dirent *e;
    while ((e = readdir(d)) != NULL) {
        int fd = atoi(e->d_name);
        if (fd == sink || fd == dirfd(d))
            continue;
        int kind_of = releasable(fd);
        if (kind_of == kind)
            dup3(sink, fd, O_CLOEXEC);
        else if (kind_of == 3 && kind == 1 && keeps_busy(fd))
            staying++;
    }
    closedir(d);
    return staying;
}

/* The sink is an unconnected socket of our own, never a shared file such as /dev/null: a request
   still being served after a forced abort may fchmod, fchown or fsetxattr what it takes for a
   branch fd, and on the socket that changes nothing but the socket (reads, writes, xattrs and
   *at() calls fail). */
static int release_branch_fds(void)
{
    int sink = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (sink < 0)
        return -1;
    int staying = release_pass(sink, 1);
    release_pass(sink, 2);
    close(sink);
    return staying;
}

/* Letting go of the pidfile's lock at the session's end (py_let_go_at_session_end): its fd, the
   state directory's, and the names there to remove first, each only while it is still the file
   this mount made (a later mount on the same point may have made its own); a name with an fd (the
   log) only while that file is empty and no other daemon holds it (flock, shared: statedir.py). */
#define MAX_NAMES 4
#define NO_NICE (-100)
static int unlock_fd = -1;
static int names_dir_fd = -1;
static int n_names;
static char *names[MAX_NAMES];
static dev_t name_devs[MAX_NAMES];
static ino_t name_inos[MAX_NAMES];
static int name_fds[MAX_NAMES];
static int work_parent_fd = -1; /* an AUFS-style work dir's parent (the top branch) ... */
static char *work_name;          /* ... and its name there, removed first */
static int let_go_early; /* done: the lock was let go of when the session ended */
static int work_dropped; /* done: drop_work_dir */
static int ended_by_kernel; /* the session's end came from the kernel (an unmount, an abort) */
static int nice_after = NO_NICE; /* the priority to unwind at (setpriority) */
static long pause_us;            /* or else a pause first (microseconds) */

static void forget_names(void)
{
    for (int i = 0; i < n_names; i++)
        PyMem_RawFree(names[i]);
    n_names = 0;
    unlock_fd = names_dir_fd = work_parent_fd = -1;
    PyMem_RawFree(work_name);
    work_name = NULL;
}

/* Before the branches are let go of, when the pidfile's lock is to go at the session's end: the
   AUFS-style work dir goes from the top branch (as LayerStack.drop_work does, if it is empty), and
   the top branch's fd, kept for it, is let go of with the others. */
static void drop_work_dir(void)
{
    if (work_parent_fd < 0)
        return;
    unlinkat(work_parent_fd, work_name, AT_REMOVEDIR);
    for (Py_ssize_t i = 0; i < n_keep_fds; i++)
        if (keep_fds[i] == work_parent_fd)
            keep_fds[i] = -1;
    work_dropped = 1;
}

/* The kernel ended the session and nothing on a branch's filesystem is held any more: what a user
   sees of the mount goes (its pidfile, its control socket), then the pidfile's lock, which
   `unionfs umount` waits for.  The log, the trio loop and the rest unwind afterwards. */
static void let_go_of_mount(void)
{
    for (int i = 0; i < n_names; i++) {
        struct stat st;
        int fd = name_fds[i];
        if (fd >= 0) {   /* held exclusively first: no other daemon writes a line meanwhile */
            if (flock(fd, LOCK_EX | LOCK_NB) != 0) {   /* another daemon's log too: it stays */
                flock(fd, LOCK_SH | LOCK_NB);
                continue;
            }
            if (fstat(fd, &st) != 0 || st.st_size != 0) {
                flock(fd, LOCK_SH | LOCK_NB);
                continue;
            }
        }
        if (fstatat(names_dir_fd, names[i], &st, AT_SYMLINK_NOFOLLOW) == 0 &&
            st.st_dev == name_devs[i] && st.st_ino == name_inos[i])
            unlinkat(names_dir_fd, names[i], 0);
    }
    flock(unlock_fd, LOCK_UN);
    let_go_early = 1;
    /* What follows (the log, trio's unwinding, a reused worker's checks: about a millisecond of
       CPU) waits for whoever unmounted: at normal priority it took the CPU from the `unionfs
       umount` just woken, or from its caller, for up to a scheduler slice. */
    if (nice_after != NO_NICE) {
        setpriority(PRIO_PROCESS, 0, nice_after);
    } else if (pause_us > 0) {
        /* Where the priority could not be had back (a user's worker, RLIMIT_NICE 0): off the CPU
           for a moment, so that the unmounter runs first, and the unwinding, woken, may go to an
           idle CPU. */
        struct timespec t = {.tv_sec = pause_us / 1000000, .tv_nsec = (pause_us % 1000000) * 1000};
        nanosleep(&t, NULL);
    }
    forget_names();
}

/* The backing files still registered: the kernel holds them open until /dev/fuse is closed, which
   comes later (pyfuse3 unwinds first); RELEASEs still queued at the unmount are never served. */
static void close_backing_files(struct fuse_session *se)
{
    if (io_session != se)
        return;
    for (size_t i = 0; i < n_backing; i++) {
        uint32_t arg = (uint32_t)backing_ids[i];
        ioctl(fuse_session_fd(se), PT_IOC_BACKING_CLOSE, &arg);
    }
    n_backing = 0;
}

/* The session loop's read: when it finds the session ended (the kernel unmounted it or the
   connection was aborted; libfuse then marks the session exited), the branches are let go of
   right there, before pyfuse3 returns to Python.  Doing it here rather than in a thread of our own
   keeps the server single-threaded while it serves: a second thread, even asleep, made cold
   lookups 1.5-2x slower (measured). */
typedef int (*receive_fn)(struct fuse_session *, struct fuse_buf *);

static struct fuse_session *last_session; /* the session made through the shim last */
static int guarded_reads;                 /* its reads only happen when a request waits */
static int seen_waiting;                  /* request_waiting() said so, and no read came since */

/* Whether the kernel has ended the connection (an unmount, an abort): the device then polls as an
   error, whatever libfuse made of the read that found it so. */
static int connection_gone(struct fuse_session *se)
{
    struct pollfd p = {.fd = fuse_session_fd(se), .events = POLLIN};
    return poll(&p, 1, 0) > 0 && (p.revents & (POLLERR | POLLHUP)) != 0;
}

static int request_waiting(struct fuse_session *se)
{
    struct pollfd p = {.fd = fuse_session_fd(se), .events = POLLIN};
    return poll(&p, 1, 0) > 0; /* POLLIN, or POLLERR once the session ended */
}

/* A truncate by a caller without CAP_FSETID (FATTR_KILL_SUIDGID, libfuse's FUSE_SET_ATTR_KILL_SUID)
   reaches the server as this st_mode in a SETATTR that does not set the mode. */
#define KILL_SUIDGID_MARK 0170000

static void shim_setattr(fuse_req_t req, fuse_ino_t ino, struct stat *attr, int to_set,
                         struct fuse_file_info *fi)
{
    if (killpriv && (to_set & FUSE_SET_ATTR_KILL_SUID) && !(to_set & FUSE_SET_ATTR_MODE)) {
        struct stat marked = *attr;
        marked.st_mode = KILL_SUIDGID_MARK;
        inner_setattr(req, ino, &marked, to_set, fi);
        return;
    }
    inner_setattr(req, ino, attr, to_set, fi);
}

__attribute__((visibility("default"))) int fuse_session_receive_buf(struct fuse_session *se,
                                                                    struct fuse_buf *buf)
{
    static receive_fn real;
    if (real == NULL) {
        real = (receive_fn)next_symbol("fuse_session_receive_buf");
        if (real == NULL)
            return -ENOSYS;
    }
    pt_install(se);
    if (guarded_reads && se == last_session) {
        /* Only read when a request waits (or the session ended): the session loop may come here
           without trio's wait (see py_guard_reads), and a blocking read would stall the loop. */
        if (!seen_waiting && !request_waiting(se))
            return -EINTR;
        seen_waiting = 0;
    }
    int exited_before = fuse_session_exited(se);
    int res = real(se, buf);
    if (res == -EAGAIN && guarded_reads && se == last_session)
        res = -EINTR; /* the request that was waiting went (its caller was killed): wait again */
    pt_received(se, buf, res);
    received = 1;
    if (n_release_devs > 0 && !released && fuse_session_exited(se)) {
        released = 1;
        close_backing_files(se);
        int kernel_ended = !exited_before && (res == 0 || res == -ENODEV) && connection_gone(se);
        ended_by_kernel = kernel_ended;
        if (kernel_ended && unlock_fd >= 0)
            drop_work_dir();
        int staying = release_branch_fds();
        /* Only when the kernel ended it (libfuse 3.14 returns 0 for a read that failed with ENODEV,
           and the device polls as an error; the session was not ended by pyfuse3.terminate, after
           which a signalled worker unmounts), and only when no fd that stays keeps a branch's
           filesystem busy (a state directory there, mounted other than as the root: the daemon
           lets go of the lock last). */
        if (kernel_ended && staying == 0 && unlock_fd >= 0)
            let_go_of_mount();
    }
    return res;
}

__attribute__((visibility("default"))) struct fuse_session *
fuse_session_new(struct fuse_args *args, const struct fuse_lowlevel_ops *op, size_t op_size,
                 void *userdata)
{
    session_new_fn real = (session_new_fn)next_symbol("fuse_session_new");
    if (real == NULL) {
        fprintf(stderr, "unionfs: libfuse's fuse_session_new not found\n");
        return NULL;
    }
    memset(&shim_ops, 0, sizeof shim_ops);
    memcpy(&shim_ops, op, op_size < sizeof shim_ops ? op_size : sizeof shim_ops);
    stateless_dirs = 0;
    if (shim_ops.opendir != NULL && shim_ops.init != NULL && shim_ops.readdirplus != NULL &&
        shim_ops.fsyncdir != NULL) {
        inner_init = shim_ops.init;
        inner_opendir = shim_ops.opendir;
        inner_readdirplus = shim_ops.readdirplus;
        inner_fsyncdir = shim_ops.fsyncdir;
        shim_ops.init = shim_init;
        shim_ops.opendir = shim_opendir;
        shim_ops.readdirplus = shim_readdirplus;
        shim_ops.fsyncdir = shim_fsyncdir;
    }
    nocap_clear();
    killpriv = 0;
    if (shim_ops.getxattr != NULL) {
        inner_getxattr = shim_ops.getxattr;
        shim_ops.getxattr = shim_getxattr;
    }
    if (shim_ops.setattr != NULL) {
        inner_setattr = shim_ops.setattr;
        shim_ops.setattr = shim_setattr;
    }
    if (shim_ops.fallocate == NULL)
        shim_ops.fallocate = shim_fallocate;
    if (shim_ops.lseek == NULL)
        shim_ops.lseek = shim_lseek;
    sessions++;
    /* What the last session left (a resident server's worker serves one mount after another in
       one process; a new session may even get the freed one's address). */
    guarded_reads = 0;
    seen_waiting = 0;
    received = 0;
    released = 0;
    dont_mask = 0;
    io_session = NULL;
    passthrough = passthrough_offered = 0;
    init_unique = 0;
    pending = 0;
    n_backing = 0;
    last_session = real(args, &shim_ops, sizeof shim_ops, userdata);
    return last_session;
}

/* ------------------------------------------------------------------ Python side */

static void configure_lseek(PyObject *seek)
{
    Py_XDECREF(lseek_cb);
    lseek_cb = NULL;
    if (seek != Py_None) {
        Py_INCREF(seek);
        lseek_cb = seek;
    }
}

static PyObject *py_configure(PyObject *self, PyObject *args, PyObject *kwargs)
{
    static char *kwlist[] = {"cache_dirs", "fallocate", "stateless_dirs", "dont_mask", "lseek",
                             "passthrough", NULL};
    int cache = 0, stateless = 0, nomask = 0, pt = 0;
    PyObject *cb = Py_None, *seek = Py_None;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "|pOppOp", kwlist, &cache, &cb, &stateless,
                                     &nomask, &seek, &pt))
        return NULL;
    if ((cb != Py_None && !PyCallable_Check(cb)) || (seek != Py_None && !PyCallable_Check(seek))) {
        PyErr_SetString(PyExc_TypeError, "fallocate and lseek must be callable or None");
        return NULL;
    }
    configure_lseek(seek);
    cache_dirs = cache;
    want_stateless_dirs = stateless;
    want_dont_mask = nomask;
    want_passthrough = pt;
    Py_XDECREF(fallocate_cb);
    fallocate_cb = NULL;
    if (cb != Py_None) {
        Py_INCREF(cb);
        fallocate_cb = cb;
    }
    Py_RETURN_NONE;
}

static PyObject *py_reply_err(PyObject *self, PyObject *args)
{
    PyObject *req;
    int err;
    if (!PyArg_ParseTuple(args, "Oi", &req, &err))
        return NULL;
    void *p = PyLong_AsVoidPtr(req);
    if (p == NULL) {
        if (!PyErr_Occurred())
            PyErr_SetString(PyExc_ValueError, "no request");
        return NULL;
    }
    fuse_reply_err((fuse_req_t)p, err);
    Py_RETURN_NONE;
}

static PyObject *py_release_on_session_end(PyObject *self, PyObject *args)
{
    PyObject *devs, *keep;
    if (!PyArg_ParseTuple(args, "OO", &devs, &keep))
        return NULL;
    PyObject *dl = PySequence_Fast(devs, "devices must be a sequence");
    PyObject *kl = dl == NULL ? NULL : PySequence_Fast(keep, "keep must be a sequence");
    if (kl == NULL) {
        Py_XDECREF(dl);
        return NULL;
    }
    n_release_devs = 0;
    n_keep_fds = 0;
    PyMem_RawFree(keep_fds);
    keep_fds = PyMem_RawMalloc(sizeof(int) * (size_t)(PySequence_Fast_GET_SIZE(kl) + 1));
    if (PySequence_Fast_GET_SIZE(dl) > MAX_RELEASE) {
        PyErr_SetString(PyExc_ValueError, "more filesystems than the shim keeps");
    } else if (keep_fds == NULL) {
        PyErr_NoMemory();
    } else {
        for (Py_ssize_t i = 0; i < PySequence_Fast_GET_SIZE(kl) && !PyErr_Occurred(); i++)
            keep_fds[n_keep_fds++] = (int)PyLong_AsLong(PySequence_Fast_GET_ITEM(kl, i));
        for (Py_ssize_t i = 0; i < PySequence_Fast_GET_SIZE(dl) && !PyErr_Occurred(); i++)
            release_devs[n_release_devs++] =
                (dev_t)PyLong_AsUnsignedLongLong(PySequence_Fast_GET_ITEM(dl, i));
        if (PyErr_Occurred())
            n_release_devs = 0;
    }
    Py_DECREF(dl);
    Py_DECREF(kl);
    if (PyErr_Occurred())
        return NULL;
    Py_RETURN_NONE;
}

static PyObject *py_let_go_at_session_end(PyObject *self, PyObject *args)
{
    int lock_fd, dir_fd, nice = NO_NICE, work_fd = -1;
    long pause = 0;
    const char *work = NULL;
    PyObject *given;
    if (!PyArg_ParseTuple(args, "iiO|iiyl", &lock_fd, &dir_fd, &given, &nice, &work_fd, &work, &pause))
        return NULL;
    forget_names();
    let_go_early = work_dropped = ended_by_kernel = 0;
    nice_after = nice;
    pause_us = pause > 0 && pause < 1000000 ? pause : 0;
    if (lock_fd < 0)
        Py_RETURN_NONE;
    PyObject *list = PySequence_Fast(given, "names must be a sequence");
    if (list == NULL)
        return NULL;
    if (PySequence_Fast_GET_SIZE(list) > MAX_NAMES) {
        Py_DECREF(list);
        PyErr_SetString(PyExc_ValueError, "more names than the shim keeps");
        return NULL;
    }
    for (Py_ssize_t i = 0; i < PySequence_Fast_GET_SIZE(list); i++) {
        const char *name;
        unsigned long long dev, ino;
        int fd = -1;
        if (!PyArg_ParseTuple(PySequence_Fast_GET_ITEM(list, i), "yKK|i", &name, &dev, &ino, &fd))
            break;
        size_t len = strlen(name) + 1;
        names[n_names] = PyMem_RawMalloc(len);
        if (names[n_names] == NULL) {
            PyErr_NoMemory();
            break;
        }
        memcpy(names[n_names], name, len);
        name_devs[n_names] = (dev_t)dev;
        name_inos[n_names] = (ino_t)ino;
        name_fds[n_names] = fd;
        n_names++;
    }
    Py_DECREF(list);
    if (PyErr_Occurred()) {
        forget_names();
        return NULL;
    }
    if (work_fd >= 0 && work != NULL) {
        size_t len = strlen(work) + 1;
        work_name = PyMem_RawMalloc(len);
        if (work_name == NULL) {
            forget_names();
            return PyErr_NoMemory();
        }
        memcpy(work_name, work, len);
        work_parent_fd = work_fd;
    }
    unlock_fd = lock_fd;
    names_dir_fd = dir_fd;
    Py_RETURN_NONE;
}

static PyObject *py_let_go_early(PyObject *self, PyObject *unused)
{
    return Py_BuildValue("(iii)", let_go_early, work_dropped, ended_by_kernel);
}

static PyObject *py_passthrough(PyObject *self, PyObject *unused)
{
    return Py_BuildValue("(ii)", passthrough_offered, passthrough);
}

static PyObject *py_killpriv(PyObject *self, PyObject *unused)
{
    return PyBool_FromLong(killpriv && io_session != NULL && init_unique == 0);
}

static PyObject *py_backing_open(PyObject *self, PyObject *args)
{
    int fd;
    if (!PyArg_ParseTuple(args, "i", &fd))
        return NULL;
    if (!passthrough || io_session == NULL)
        return PyLong_FromLong(-EPERM);
    if (n_backing == cap_backing) {
        size_t cap = cap_backing ? 2 * cap_backing : 64;
        int *more = PyMem_RawRealloc(backing_ids, cap * sizeof *more);
        if (more == NULL)
            return PyErr_NoMemory();
        backing_ids = more;
        cap_backing = cap;
    }
    struct pt_backing_map map = {.fd = fd};
    int id = ioctl(fuse_session_fd(io_session), PT_IOC_BACKING_OPEN, &map);
    if (id < 0)
        return PyLong_FromLong(-errno);
    backing_ids[n_backing++] = id;
    return PyLong_FromLong(id);
}

static PyObject *py_backing_close(PyObject *self, PyObject *args)
{
    int id;
    if (!PyArg_ParseTuple(args, "i", &id))
        return NULL;
    if (io_session == NULL)
        return PyLong_FromLong(-EBADF);
    for (size_t i = 0; i < n_backing; i++) {
        if (backing_ids[i] == id) {
            backing_ids[i] = backing_ids[--n_backing];
            break;
        }
    }
    uint32_t arg = (uint32_t)id;
    int res = ioctl(fuse_session_fd(io_session), PT_IOC_BACKING_CLOSE, &arg);
    return PyLong_FromLong(res < 0 ? -errno : 0);
}

static PyObject *py_pass_through(PyObject *self, PyObject *args)
{
    unsigned long long fh;
    int id;
    if (!PyArg_ParseTuple(args, "Ki", &fh, &id))
        return NULL;
    pending_fh = fh;
    pending_backing = id;
    pending = 1;
    Py_RETURN_NONE;
}

static PyObject *py_no_capability(PyObject *self, PyObject *args)
{
    unsigned long long ino;
    int none;
    if (!PyArg_ParseTuple(args, "Kp", &ino, &none))
        return NULL;
    if (!none) {
        nocap_del(ino);
        Py_RETURN_TRUE;
    }
    return PyBool_FromLong(nocap_add(ino));
}

/* The session loop asks trio whether /dev/fuse is readable before every read: a lock, a yield and
   an epoll registration and wait, about a quarter of what a request costs the server.  The server's
   loop then asks request_waiting() first (unionfs.server.compat.quicken_session_loop); from here on, a read
   finding no request returns EINTR (which pyfuse3's loop takes as "wait again") instead of
   blocking, so a read after a stale answer can never stall the loop. */
static PyObject *py_guard_reads(PyObject *self, PyObject *unused)
{
    if (last_session == NULL || sessions == 0)
        return PyLong_FromLong(-1);
    /* Non-blocking too: a request seen waiting can still go before the read (the kernel drops
       one whose caller was killed), and a blocking read would then stall the loop. */
    int fd = fuse_session_fd(last_session);
    int flags = fcntl(fd, F_GETFL);
    if (flags < 0 || fcntl(fd, F_SETFL, flags | O_NONBLOCK) < 0)
        return PyLong_FromLong(-1);
    guarded_reads = 1;
    return PyLong_FromLong(fd);
}

static PyObject *py_request_waiting(PyObject *self, PyObject *unused)
{
    if (!guarded_reads || last_session == NULL)
        Py_RETURN_FALSE;
    seen_waiting = request_waiting(last_session);
    return PyBool_FromLong(seen_waiting);
}

/* Wait up to *us* microseconds for a request by asking the device again and again, the GIL let go,
   instead of sleeping in trio's epoll_wait.  A server that sleeps between the requests of a caller
   that sends them one after the other (a walk, an untar, a process start) lets its CPU go idle, and
   waking it costs more than the request: on a VM whose idle CPUs halt, about 40 us of the 100 a
   lookup took.  The caller of this (unionfs.server.compat.quicken_session_loop) only spins while
   requests come close together. */
static PyObject *py_spin_for_request(PyObject *self, PyObject *arg)
{
    long us = PyLong_AsLong(arg);
    if (us == -1 && PyErr_Occurred())
        return NULL;
    if (!guarded_reads || last_session == NULL)
        Py_RETURN_FALSE;
    struct fuse_session *se = last_session;
    int found = 0;
    struct timespec start, now;
    Py_BEGIN_ALLOW_THREADS
    clock_gettime(CLOCK_MONOTONIC, &start);
    for (;;) {
        if (request_waiting(se)) {
            found = 1;
            break;
        }
        clock_gettime(CLOCK_MONOTONIC, &now);
        if ((now.tv_sec - start.tv_sec) * 1000000L + (now.tv_nsec - start.tv_nsec) / 1000 >= us)
            break;
        sched_yield(); /* whatever else is runnable on this CPU runs first */
    }
    Py_END_ALLOW_THREADS
    seen_waiting = found;
    return PyBool_FromLong(found);
}

/* Read the session's first request, the kernel's INIT (queued by the mount itself), and answer it
   here, through the shim as the session loop would, before any event loop runs: a mount is usable
   as soon as this returns.  Only for a session whose mount exists already (a resident server's
   worker).  False when no request came within the time given, or the read failed. */
static PyObject *py_answer_init(PyObject *self, PyObject *arg)
{
    long ms = PyLong_AsLong(arg);
    if (ms == -1 && PyErr_Occurred())
        return NULL;
    if (last_session == NULL)
        Py_RETURN_FALSE;
    struct fuse_session *se = last_session;
    struct pollfd p = {.fd = fuse_session_fd(se), .events = POLLIN};
    struct fuse_buf buf;
    int res;
    memset(&buf, 0, sizeof buf);
    Py_BEGIN_ALLOW_THREADS
    res = poll(&p, 1, (int)ms);
    if (res > 0 && (p.revents & POLLIN)) {
        seen_waiting = 1;
        res = fuse_session_receive_buf(se, &buf);
    } else {
        res = -1;
    }
    Py_END_ALLOW_THREADS
    if (res <= 0) {
        free(buf.mem);
        Py_RETURN_FALSE;
    }
    const struct fuse_in_header *in = buf.mem;
    int init = (size_t)res >= sizeof *in && !(buf.flags & FUSE_BUF_IS_FD) && in->opcode == FUSE_INIT;
    fuse_session_process_buf(se, &buf); /* (the GIL held: pyfuse3's INIT handler is Python) */
    free(buf.mem);
    if (PyErr_Occurred())
        return NULL;
    return PyBool_FromLong(init);
}

static PyObject *py_session_exited(PyObject *self, PyObject *unused)
{
    return PyBool_FromLong(last_session == NULL || fuse_session_exited(last_session));
}

static PyObject *py_sessions(PyObject *self, PyObject *unused)
{
    return PyLong_FromLong(sessions);
}

static PyObject *py_received(PyObject *self, PyObject *unused)
{
    return PyBool_FromLong(received);
}

static PyObject *py_dont_mask(PyObject *self, PyObject *unused)
{
    return PyBool_FromLong(dont_mask);
}

/* ------------------------------------------------------------------ reply attributes */

static PyTypeObject *entry_type;    /* pyfuse3.EntryAttributes, once attr_layout() was told */
static Py_ssize_t entry_offset = -1; /* where its fuse_entry_param starts inside the object */

static void set_time(struct timespec *ts, int64_t ns)
{
    int64_t sec = ns / 1000000000, rem = ns % 1000000000;
    if (rem < 0) { /* floor, as pyfuse3's setters (Python's // and %) do */
        sec -= 1;
        rem += 1000000000;
    }
    ts->tv_sec = sec;
    ts->tv_nsec = rem;
}

static PyObject *py_attr_layout(PyObject *self, PyObject *args)
{
    PyObject *type;
    Py_ssize_t shown_ino_offset;
    if (!PyArg_ParseTuple(args, "O!n", &PyType_Type, &type, &shown_ino_offset))
        return NULL;
    Py_ssize_t base = shown_ino_offset - (Py_ssize_t)offsetof(struct fuse_entry_param, attr.st_ino);
    PyTypeObject *t = (PyTypeObject *)type;
    if (base < (Py_ssize_t)sizeof(PyObject) ||
        base + (Py_ssize_t)sizeof(struct fuse_entry_param) > t->tp_basicsize) {
        PyErr_SetString(PyExc_ValueError, "no fuse_entry_param fits there");
        return NULL;
    }
    Py_XSETREF(entry_type, (PyTypeObject *)Py_NewRef(type));
    entry_offset = base;
    Py_RETURN_NONE;
}

/* entry_attributes(stat, node_id, shown_ino, nlink, timeout): a new EntryAttributes for a reply;
   nlink < 0 takes the stat's own; generation 0, st_dev 0, the other fields from the stat. */
static PyObject *py_entry_attributes(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 5) {
        PyErr_SetString(PyExc_TypeError, "entry_attributes takes 5 arguments");
        return NULL;
    }
    if (entry_type == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "attr_layout() was not called");
        return NULL;
    }
    char *raw;
    Py_ssize_t len;
    if (PyBytes_AsStringAndSize(args[0], &raw, &len) < 0)
        return NULL;
    if (len != (Py_ssize_t)sizeof(struct packed_stat)) {
        PyErr_SetString(PyExc_ValueError, "not a packed stat");
        return NULL;
    }
    unsigned long long node_id = PyLong_AsUnsignedLongLong(args[1]);
    unsigned long long shown = PyLong_AsUnsignedLongLong(args[2]);
    long long nlink = PyLong_AsLongLong(args[3]);
    double timeout = PyFloat_AsDouble(args[4]);
    if (PyErr_Occurred())
        return NULL;
    PyObject *a = PyObject_CallNoArgs((PyObject *)entry_type);
    if (a == NULL)
        return NULL;
    struct packed_stat st;
    memcpy(&st, raw, sizeof st);
    struct fuse_entry_param *e = (struct fuse_entry_param *)((char *)a + entry_offset);
    e->ino = node_id;
    e->generation = 0;
    e->attr.st_ino = shown;
    e->attr.st_mode = st.mode;
    e->attr.st_nlink = nlink < 0 ? st.nlink : (nlink_t)nlink;
    e->attr.st_uid = st.uid;
    e->attr.st_gid = st.gid;
    e->attr.st_rdev = st.rdev;
    e->attr.st_size = st.size;
    e->attr.st_blksize = st.blksize;
    e->attr.st_blocks = st.blocks;
    set_time(&e->attr.st_atim, st.atime);
    set_time(&e->attr.st_mtim, st.mtime);
    set_time(&e->attr.st_ctim, st.ctime);
    e->attr_timeout = timeout;
    e->entry_timeout = timeout;
    return a;
}

static PyMethodDef methods[] = {
    {"configure", (PyCFunction)(void (*)(void))py_configure, METH_VARARGS | METH_KEYWORDS,
     "configure(cache_dirs=False, fallocate=None, stateless_dirs=False, dont_mask=False, "
     "lseek=None, passthrough=False): what the next FUSE session gets."},
    {"dont_mask", py_dont_mask, METH_NOARGS,
     "Whether the kernel agreed to send new objects' modes without the umask applied."},
    {"reply_err", py_reply_err, METH_VARARGS,
     "reply_err(req, errno): answer a fallocate request the callback took (returned None for); "
     "once per request, from the thread that runs the FUSE loop."},
    {"let_go_at_session_end", py_let_go_at_session_end, METH_VARARGS,
     "let_go_at_session_end(lock_fd, dir_fd, names[, nice, work_fd, work, pause_us]): when the "
     "kernel ends the session and "
     "the branches were let go of with nothing on their filesystems left, remove each (name, dev, "
     "ino[, fd]) of names from dir_fd that is still that file (with fd, a log: only while empty "
     "and not held by another, flock), unlock lock_fd (flock), then set this "
     "process's priority to nice (setpriority; -100: leave it, and sleep pause_us instead); "
     "lock_fd -1: none of it.  With "
     "work_fd and work: first remove the directory work (an AUFS-style work dir, if empty) from "
     "work_fd, and let go of work_fd with the branches even when it is one release_on_session_end "
     "keeps."},
    {"let_go_early", py_let_go_early, METH_NOARGS,
     "let_go_early() -> (let go, work dir removed, ended by the kernel): what the last session's "
     "end did (let_go_at_session_end)."},
    {"release_on_session_end", py_release_on_session_end, METH_VARARGS,
     "release_on_session_end(devices, keep): when the session loop finds the session ended, point "
     "every fd on those filesystems (st_dev), but 0-2 and those in keep, at a private sink."},
    {"passthrough", py_passthrough, METH_NOARGS,
     "(offered, asked): whether the kernel offered FUSE passthrough at INIT, and whether the "
     "session asks for it."},
    {"killpriv", py_killpriv, METH_NOARGS,
     "Whether the session agreed FUSE_HANDLE_KILLPRIV_V2: the server clears set-id bits itself."},
    {"backing_open", py_backing_open, METH_VARARGS,
     "backing_open(fd) -> backing id, or -errno: register fd as a backing file (root only)."},
    {"backing_close", py_backing_close, METH_VARARGS,
     "backing_close(id) -> 0 or -errno: drop a backing id (open files keep their backing file)."},
    {"pass_through", py_pass_through, METH_VARARGS,
     "pass_through(fh, id): the OPEN or CREATE reply about to be sent for fh passes through to "
     "backing file id."},
    {"no_capability", py_no_capability, METH_VARARGS,
     "no_capability(ino, none) -> bool: whether the shim now answers ENODATA itself for node ino's "
     "security.capability (none=True: it has none; False: ask the server again)."},
    {"guard_reads", py_guard_reads, METH_NOARGS,
     "guard_reads() -> fd: from now on the session loop's read returns EINTR when no request "
     "waits; the session's /dev/fuse fd (-1: no session made through the shim)."},
    {"spin_for_request", py_spin_for_request, METH_O,
     "Wait up to N microseconds for a request without sleeping; whether one waits."},
    {"request_waiting", py_request_waiting, METH_NOARGS,
     "Whether a request waits to be read (or the session ended): the next read then needs no "
     "second look (after guard_reads(); False before)."},
    {"answer_init", py_answer_init, METH_O,
     "answer_init(ms) -> bool: read the session's INIT request (waiting up to ms) and answer it now; "
     "whether it was INIT."},
    {"session_exited", py_session_exited, METH_NOARGS,
     "Whether the session made through the shim last has ended (or there is none)."},
    {"sessions", py_sessions, METH_NOARGS,
     "How many FUSE sessions were created through the shim (0: pyfuse3 bypassed it)."},
    {"received", py_received, METH_NOARGS,
     "Whether the session loop has read a request through the shim (False: it bypassed it)."},
    {"attr_layout", py_attr_layout, METH_VARARGS,
     "attr_layout(EntryAttributes, offset): the class whose fuse_entry_param entry_attributes fills, "
     "and where its attr.st_ino lies inside an instance (found by probing)."},
    {"entry_attributes", (PyCFunction)(void (*)(void))py_entry_attributes, METH_FASTCALL,
     "entry_attributes(stat, node_id, shown_ino, nlink, timeout) -> EntryAttributes: a reply's "
     "attributes from a packed stat (nlink < 0: the stat's)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "unionfs.server._fuse_shim",
    "fallocate, lseek, cached directory listings and unmasked modes for pyfuse3 (see the C "
    "source's header)",
    -1, methods,
};

PyMODINIT_FUNC PyInit__fuse_shim(void)
{
    return PyModule_Create(&module);
}
