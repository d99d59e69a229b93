"""The union's core: branches, whiteouts, merged listings, nodes, copy-up and the union's operations.

It knows no FUSE: nothing here imports pyfuse3 or trio. The server (``unionfs.server``) presents it
through the kernel; the launcher and the image store use it directly.
"""
