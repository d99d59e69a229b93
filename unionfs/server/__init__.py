"""The FUSE server: pyfuse3 ``Operations`` over the core, the libfuse shim and the daemon's life."""
