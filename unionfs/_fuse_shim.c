/*
 * unionfs._fuse_shim: two things pyfuse3 3.5 cannot ask libfuse for, added in front of it.
 *
 *  - fallocate(2): pyfuse3 registers no fallocate handler, so the kernel answers EOPNOTSUPP to
 *    every mode (punch hole, keep size, zero range).  The shim registers one that calls a Python
 *    function synchronously (pyfuse3 dispatches requests on the trio thread with the GIL held, and
 *    fallocate is one short system call on the upper file).
 *  - cache_readdir: pyfuse3's opendir replies with the fuse_file_info it was given, with only fh
 *    set, so the kernel never keeps a directory listing.  The shim sets cache_readdir and
 *    keep_cache on that fuse_file_info before pyfuse3 sees it; the kernel then answers a repeated
 *    listing from its page cache, and drops it itself when the directory changes through the mount
 *    (or its mtime does).
 *
 * How: this module defines fuse_session_new().  Loaded with RTLD_GLOBAL before pyfuse3 is
 * imported, it is the definition pyfuse3's call binds to.  It copies pyfuse3's operation table,
 * adds the two entries, and hands the copy to libfuse's own fuse_session_new.  If pyfuse3 was
 * imported first, or a libfuse renames the entry point, nothing is interposed: sessions() stays 0
 * and unionfs serves as before without the two features.
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
typedef void (*opendir_fn)(fuse_req_t, fuse_ino_t, struct fuse_file_info *);

static struct fuse_lowlevel_ops shim_ops; /* the table libfuse gets; must outlive the session */
static opendir_fn inner_opendir;
static PyObject *fallocate_cb; /* (ino, fh, mode, offset, length) -> errno, 0 for success */
static int cache_dirs;
static int sessions;

static void shim_opendir(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi)
{
    if (cache_dirs) {
        fi->cache_readdir = 1;
        fi->keep_cache = 1;
    }
    inner_opendir(req, ino, fi);
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
    if (shim_ops.opendir != NULL) {
        inner_opendir = shim_ops.opendir;
        shim_ops.opendir = shim_opendir;
    }
    if (shim_ops.fallocate == NULL)
        shim_ops.fallocate = shim_fallocate;
    sessions++;
    return real(args, &shim_ops, sizeof shim_ops, userdata);
}

/* ------------------------------------------------------------------ Python side */

static PyObject *py_configure(PyObject *self, PyObject *args, PyObject *kwargs)
{
    static char *kwlist[] = {"cache_dirs", "fallocate", NULL};
    int cache = 0;
    PyObject *cb = Py_None;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "|pO", kwlist, &cache, &cb))
        return NULL;
    if (cb != Py_None && !PyCallable_Check(cb)) {
        PyErr_SetString(PyExc_TypeError, "fallocate must be callable or None");
        return NULL;
    }
    cache_dirs = cache;
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

static PyMethodDef methods[] = {
    {"configure", (PyCFunction)(void (*)(void))py_configure, METH_VARARGS | METH_KEYWORDS,
     "configure(cache_dirs=False, fallocate=None): what the next FUSE session gets."},
    {"sessions", py_sessions, METH_NOARGS,
     "How many FUSE sessions were created through the shim (0: pyfuse3 bypassed it)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "unionfs._fuse_shim",
    "fallocate and cached directory listings for pyfuse3 (see the C source's header)", -1, methods,
};

PyMODINIT_FUNC PyInit__fuse_shim(void)
{
    return PyModule_Create(&module);
}
