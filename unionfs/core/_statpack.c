/*
 * unionfs.core._statpack: lstat of one name under a directory fd, straight into the union's packed
 * stat (unionfs.core.attrs.Stat), without the os.stat_result in between.
 *
 * A cold listing stats every entry it returns.  os.stat builds a stat_result (a struct sequence with
 * a float and two ints per time), which Stat.of then reads field by field and packs: together about
 * 1 us of the server's time per entry on a 2-core VM, as much as the system call.  Here fstatat's
 * struct stat is packed in C, and the three fields the node table needs at once (st_dev, st_ino,
 * st_mode) come beside it.  Nothing here resolves more than one name, and never follows a symlink
 * (AT_SYMLINK_NOFOLLOW): unionfs.core.branches.DirFd is its only caller.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include "packed_stat.h"

#include <fcntl.h>
#include <limits.h>
#include <stdint.h>
#include <string.h>
#include <sys/stat.h>

static int64_t ns_of(const struct timespec *ts)
{
    return (int64_t)ts->tv_sec * 1000000000 + ts->tv_nsec;
}

/* lstat_at(cls, dirfd, name) -> (cls(packed), st_dev, st_ino, st_mode); OSError as os.stat's. */
static PyObject *py_lstat_at(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    (void)self;
    if (nargs != 3) {
        PyErr_SetString(PyExc_TypeError, "lstat_at takes 3 arguments");
        return NULL;
    }
    long fd = PyLong_AsLong(args[1]);
    if (fd == -1 && PyErr_Occurred())
        return NULL;
    if (fd < INT_MIN || fd > INT_MAX) {
        PyErr_SetString(PyExc_OverflowError, "fd out of range");
        return NULL;
    }
    int dirfd = (int)fd;
    if (!PyBytes_Check(args[2])) {
        PyErr_SetString(PyExc_TypeError, "name must be bytes");
        return NULL;
    }
    const char *name = PyBytes_AS_STRING(args[2]);
    if (strlen(name) != (size_t)PyBytes_GET_SIZE(args[2])) {
        PyErr_SetString(PyExc_ValueError, "embedded null byte");
        return NULL;
    }
    struct stat st;
    int res;
    Py_BEGIN_ALLOW_THREADS
    res = fstatat(dirfd, name, &st, AT_SYMLINK_NOFOLLOW);
    Py_END_ALLOW_THREADS
    if (res != 0)
        return PyErr_SetFromErrnoWithFilenameObject(PyExc_OSError, args[2]);
    struct packed_stat p = {
        .dev = st.st_dev, .ino = st.st_ino, .nlink = (uint32_t)st.st_nlink, .rdev = st.st_rdev,
        .size = st.st_size, .blocks = st.st_blocks, .blksize = (uint32_t)st.st_blksize,
        .atime = ns_of(&st.st_atim), .mtime = ns_of(&st.st_mtim), .ctime = ns_of(&st.st_ctim),
        .mode = st.st_mode, .uid = st.st_uid, .gid = st.st_gid,
    };
    PyObject *raw = PyBytes_FromStringAndSize((const char *)&p, sizeof p);
    if (raw == NULL)
        return NULL;
    PyObject *packed = PyObject_CallOneArg(args[0], raw);
    Py_DECREF(raw);
    if (packed == NULL)
        return NULL;
    return Py_BuildValue("(NKKI)", packed, (unsigned long long)st.st_dev,
                         (unsigned long long)st.st_ino, (unsigned int)st.st_mode);
}

static PyMethodDef methods[] = {
    {"lstat_at", (PyCFunction)(void (*)(void))py_lstat_at, METH_FASTCALL,
     "lstat_at(cls, dirfd, name) -> (cls(packed stat), st_dev, st_ino, st_mode): fstatat without "
     "following a symlink, packed as unionfs.core.attrs.Stat."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "unionfs.core._statpack",
    "lstat into the union's packed stat (see the C source's header)", -1, methods, NULL, NULL, NULL,
    NULL,
};

PyMODINIT_FUNC PyInit__statpack(void)
{
    return PyModule_Create(&module);
}
