/*
 * unionfs._fuse_shim: what pyfuse3 3.5 cannot ask libfuse for, added in front of it.
 *
 *  - fallocate(2): pyfuse3 registers no fallocate handler, so the kernel answers EOPNOTSUPP to
 *    every mode (punch hole, keep size, zero range).  The shim registers one that calls a Python
 *    function synchronously (pyfuse3 dispatches requests on the trio thread with the GIL held, and
 *    fallocate is one short system call on the upper file).
 *  - lseek(2) with SEEK_DATA or SEEK_HOLE: with no lseek handler the kernel takes every file for
 *    all data, so holes in a sparse file are never found.  The shim registers one that calls a
 *    Python function synchronously, as for fallocate; it answers from the open file's real fd.
 *    Without a function the kernel gets ENOSYS and falls back to its generic answer.
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
 *
 * How: this module defines fuse_session_new().  Loaded with RTLD_GLOBAL before pyfuse3 is
 * imported, it is the definition pyfuse3's call binds to.  It copies pyfuse3's operation table,
 * puts its own entries in front, and hands the copy to libfuse's own fuse_session_new.  If pyfuse3
 * was imported first, or a libfuse renames the entry point, nothing is interposed: sessions() stays
 * 0 and unionfs serves as before without these features.
 */
#define _GNU_SOURCE
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#define FUSE_USE_VERSION 35
#include <dlfcn.h>
#include <errno.h>
#include <fuse_lowlevel.h>
#include <string.h>

typedef struct fuse_session *(*session_new_fn)(struct fuse_args *, const struct fuse_lowlevel_ops *,
                                               size_t, void *);
typedef void (*init_fn)(void *, struct fuse_conn_info *);
typedef void (*opendir_fn)(fuse_req_t, fuse_ino_t, struct fuse_file_info *);
typedef void (*readdir_fn)(fuse_req_t, fuse_ino_t, size_t, off_t, struct fuse_file_info *);
typedef void (*fsyncdir_fn)(fuse_req_t, fuse_ino_t, int, struct fuse_file_info *);

#define STATELESS_DIR (1ULL << 63)

static struct fuse_lowlevel_ops shim_ops; /* the table libfuse gets; must outlive the session */
static init_fn inner_init;
static opendir_fn inner_opendir;
static readdir_fn inner_readdirplus;
static fsyncdir_fn inner_fsyncdir;
static PyObject *fallocate_cb; /* (ino, fh, mode, offset, length) -> errno, 0 for success */
static PyObject *lseek_cb;     /* (ino, fh, offset, whence) -> new offset, or -errno */
static int cache_dirs;
static int want_stateless_dirs;
static int want_dont_mask;
static int dont_mask; /* the kernel agreed: new objects' modes arrive with the umask not applied */
static int stateless_dirs; /* the kernel agreed: no OPENDIR/RELEASEDIR, fh 0 in READDIRPLUS */
static int sessions;

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
    PyGILState_STATE gil = PyGILState_Ensure();
    if (fallocate_cb != NULL) {
        PyObject *res = PyObject_CallFunction(fallocate_cb, "KKiLL", (unsigned long long)ino,
                                              (unsigned long long)fi->fh, mode, (long long)offset,
                                              (long long)length);
        if (res == NULL) {
            PyErr_WriteUnraisable(fallocate_cb);
            err = EIO;
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

__attribute__((visibility("default"))) struct fuse_session *
fuse_session_new(struct fuse_args *args, const struct fuse_lowlevel_ops *op, size_t op_size,
                 void *userdata)
{
    session_new_fn real = (session_new_fn)dlvsym(RTLD_NEXT, "fuse_session_new", "FUSE_3.0");
    if (real == NULL)
        real = (session_new_fn)dlsym(RTLD_NEXT, "fuse_session_new");
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
    if (shim_ops.fallocate == NULL)
        shim_ops.fallocate = shim_fallocate;
    if (shim_ops.lseek == NULL)
        shim_ops.lseek = shim_lseek;
    sessions++;
    return real(args, &shim_ops, sizeof shim_ops, userdata);
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
    static char *kwlist[] = {"cache_dirs", "fallocate", "stateless_dirs", "dont_mask", "lseek", NULL};
    int cache = 0, stateless = 0, nomask = 0;
    PyObject *cb = Py_None, *seek = Py_None;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "|pOppO", kwlist, &cache, &cb, &stateless,
                                     &nomask, &seek))
        return NULL;
    if ((cb != Py_None && !PyCallable_Check(cb)) || (seek != Py_None && !PyCallable_Check(seek))) {
        PyErr_SetString(PyExc_TypeError, "fallocate and lseek must be callable or None");
        return NULL;
    }
    configure_lseek(seek);
    cache_dirs = cache;
    want_stateless_dirs = stateless;
    want_dont_mask = nomask;
    Py_XDECREF(fallocate_cb);
    fallocate_cb = NULL;
    if (cb != Py_None) {
        Py_INCREF(cb);
        fallocate_cb = cb;
    }
    Py_RETURN_NONE;
}

static PyObject *py_sessions(PyObject *self, PyObject *unused)
{
    return PyLong_FromLong(sessions);
}

static PyObject *py_dont_mask(PyObject *self, PyObject *unused)
{
    return PyBool_FromLong(dont_mask);
}

static PyMethodDef methods[] = {
    {"configure", (PyCFunction)(void (*)(void))py_configure, METH_VARARGS | METH_KEYWORDS,
     "configure(cache_dirs=False, fallocate=None, stateless_dirs=False, dont_mask=False, "
     "lseek=None): what the next FUSE session gets."},
    {"dont_mask", py_dont_mask, METH_NOARGS,
     "Whether the kernel agreed to send new objects' modes without the umask applied."},
    {"sessions", py_sessions, METH_NOARGS,
     "How many FUSE sessions were created through the shim (0: pyfuse3 bypassed it)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "unionfs._fuse_shim",
    "fallocate, lseek, cached directory listings and unmasked modes for pyfuse3 (see the C "
    "source's header)",
    -1, methods,
};

PyMODINIT_FUNC PyInit__fuse_shim(void)
{
    return PyModule_Create(&module);
}
