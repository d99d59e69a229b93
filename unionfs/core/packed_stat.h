/* The union's packed stat, unionfs.core.attrs.Stat: struct.Struct("=QQIQqqIqqqIII"), 84 bytes.
   Written by unionfs/core/_native.c, read by unionfs/server/_fuse_shim.c; attrs.py's layout must
   stay the same (tests/unit/test_lstat_packed.py and tests/ops/test_reply_attributes.py compare). */
#ifndef UNIONFS_PACKED_STAT_H
#define UNIONFS_PACKED_STAT_H

#include <stdint.h>

struct packed_stat {
    uint64_t dev, ino;
    uint32_t nlink;
    uint64_t rdev;
    int64_t size, blocks;
    uint32_t blksize;
    int64_t atime, mtime, ctime;
    uint32_t mode, uid, gid;
} __attribute__((packed));
_Static_assert(sizeof(struct packed_stat) == 84, "unionfs.core.attrs packs 84 bytes");

#endif
