"""launcher: run a command with a union as its root (``unionfs run``).

The public surface, imported from its module so the launch path stays lean:

- ``launcher.cli.run_command``: the click command ``run``; register it with
  ``cli.add_command(run_command)`` (or lazily, by module name).
- ``launcher.supervisor.run(RunConfig(...)) -> int``: the same as a library call;
  returns the command's exit status, raises ``QuietError`` (one line + exit code;
  ``launcher.errors.LaunchError`` is the launcher's, exit 125 unless told) or ``OSError``
  naming a step and a path (render with ``unionfs.core.errors.describe``).
- ``launcher.union.mount_union(branches, mountpoint, rootless=, logfile=, backend=)``:
  the one place that starts the union's server: it builds the ``MountConfig`` through
  ``unionfs.core.config`` and hands it to the server (``unionfs.server.protocol``);
  ``handle.close()`` unmounts and waits.
- ``launcher.prefork.start(argv)``: the entry points' first call; forks the server
  child early so that its imports overlap the launcher's start-up (``mount_union``
  takes it; without it the child is forked at mount time).
- ``launcher.rootfs.container_steps()`` / ``apply()`` / ``enter_root()``: the
  container's mounts as data, applied in order, then pivot_root.
- ``launcher.namespaces`` and ``launcher.syscalls``: the namespace plumbing and
  the ctypes calls (unshare, mount, umount2, pivot_root, prctl).
"""
