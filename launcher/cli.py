"""``unionfs run``: the click command, a thin wrapper over ``launcher.supervisor.run``.

Register it in the ``unionfs`` group with ``cli.add_command(run_command)``.
"""

from __future__ import annotations

import errno
import logging
import os
import re
import sys
from typing import TYPE_CHECKING

import click

from launcher.errors import EXIT_LAUNCH_FAILED, LaunchError
from launcher.union import BACKENDS, DEFAULT_BACKEND
from unionfs.cli import one_line
from unionfs.core.errors import QuietError, describe

if TYPE_CHECKING:
    from unionfs.images.store import Store

log = logging.getLogger(__name__)

_HOSTNAME = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9.-]{0,62})$")


def _hostname(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    if value is not None and not _HOSTNAME.match(value):
        raise click.BadParameter("letters, digits, '.' and '-', at most 64 characters")
    return value


@click.command(
    "run",
    context_settings={"help_option_names": ["-h", "--help"], "allow_interspersed_args": False},
)
@click.option("-v", "--volume", "volumes", multiple=True, metavar="HOST:CTR[:ro]",
              help="Bind mount a host file or directory at CTR (made in the init layer when the image lacks "
                   "it, never in the container layer); ':ro' read-only. Repeatable.")
@click.option("--tmpfs", "tmpfs", multiple=True, metavar="PATH[:OPTIONS]",
              help="Mount a tmpfs at PATH (mode 1777, nosuid, nodev, noexec; OPTIONS as size=64m,exec). "
                   "Repeatable.")
@click.option("-u", "--user", metavar="UID[:GID]|NAME[:GROUP]",
              help="Run COMMAND as this user; names and supplementary groups from the image's /etc/passwd "
                   "and /etc/group.")
@click.option("--read-only", is_flag=True,
              help="Mount the container's root read-only, with a tmpfs on /tmp, /var/tmp and /run "
                   "(as podman's --read-only-tmpfs).")
@click.option("--stop-timeout", type=click.FloatRange(min=0), default=10.0, show_default=True,
              metavar="SECONDS",
              help="On SIGTERM, PID 1 gets SIGTERM (if it handles it) and SIGKILL after this many seconds.")
@click.option("-i", "--interactive", is_flag=True,
              help="Accepted for docker's habit: stdin is always passed.")
@click.option("-t", "--tty", is_flag=True,
              help="Give COMMAND a terminal of the container's own (/dev/pts/0), relayed to ours; "
                   "the default when stdin is a terminal.")
@click.option("--rm", is_flag=True,
              help="IMAGE: remove the container when it exits.  BRANCHES: accepted for docker's habit (the "
                   "container layer is the given branch and is kept; --tmp-upper gives a throwaway one).")
@click.option("--name", help="IMAGE: the container's name (default: a generated adjective_noun).  "
                             "BRANCHES: accepted for docker's habit.")
@click.option("--store", "store_dir", type=click.Path(file_okay=False), default=None,
              help="IMAGE: the image store (default /var/lib/unionfs; rootless: $XDG_DATA_HOME/unionfs).")
@click.option("--entrypoint", metavar="CMD|JSON",
              help="IMAGE: replace the image's Entrypoint (a program, or a JSON array as podman takes it; "
                   "\"\" clears it); the image's Cmd is then dropped.")
@click.option("--env-file", "env_files", multiple=True, type=click.Path(dir_okay=False),
              help="Read KEY=VALUE lines (# comments) into the environment, before -e. Repeatable.")
@click.option("--hostname", callback=_hostname, help="Host name inside the container (default: a random id).")
@click.option("-e", "--env", "env", multiple=True, metavar="KEY[=VALUE]",
              help="Set an environment variable; KEY alone passes the launcher's value. Repeatable.")
@click.option("-w", "--workdir", default=None,
              help="Working directory inside the container (default: the image's WorkingDir, or /); made "
                   "(in the init layer) when missing.")
@click.option("--net", type=click.Choice(["none", "host"]), default="host", show_default=True,
              help="none: a new network namespace with only loopback up; host: share the host's network.")
@click.option("--tmp-upper", is_flag=True,
              help="Add a throwaway writable top layer (in memory, removed afterwards); all BRANCHES stay "
                   "read-only.")
@click.option("--rootless/--no-rootless", default=None,
              help="Run in a user namespace with the FUSE union mounted inside it (automatic when not root).")
@click.option("--init", "init", is_flag=True,
              help="A small init as PID 1 reaps orphans and forwards signals; COMMAND runs as PID 2.")
@click.option("--keep-mounted", is_flag=True,
              help="Debugging: after the command exits, keep the union mounted until Ctrl-C or SIGTERM.")
@click.option("--backend", type=click.Choice(BACKENDS), default=DEFAULT_BACKEND, hidden=True,
              help="Which union serves the root: the unionfs FUSE server, or kernel overlayfs.")
@click.option("--privileged", is_flag=True,
              help="All capabilities, no seccomp filter, nothing masked in /proc, /sys writable.")
@click.option("--cap-add", "cap_add", multiple=True, metavar="CAP",
              help="Add a capability to Docker's default set (SYS_ADMIN or CAP_SYS_ADMIN; ALL). Repeatable.")
@click.option("--cap-drop", "cap_drop", multiple=True, metavar="CAP",
              help="Drop a capability from Docker's default set (NET_RAW; ALL). Repeatable.")
@click.option("--security-opt", "security_opt", multiple=True, metavar="OPT",
              help="no-new-privileges (setuid programs no longer elevate), or seccomp=unconfined. "
                   "Repeatable.")
@click.option("-m", "--memory", metavar="SIZE",
              help="Memory limit (512m, 1g, bytes; at least 6m): past it the kernel's OOM killer ends a "
                   "process of the container.  Limits need root or a delegated cgroup v2 subtree.")
@click.option("--memory-swap", metavar="SIZE",
              help="Limit of memory plus swap (default: twice --memory; -1: swap unlimited).")
@click.option("--pids-limit", type=int, metavar="N",
              help="At most N processes and threads in the container (0 or -1: no limit).")
@click.option("--cpus", type=float, metavar="CPUS",
              help="CPU time as a number of CPUs (0.5: half of one), through the CFS quota.")
@click.option("--runtime", metavar="runc|crun|PATH",
              help="Start the container with this OCI runtime, from a bundle whose root is the union, "
                   "instead of unionfs run's own set-up (rootless: runc as root of our user namespace).")
@click.option("--verbose", is_flag=True, help="Log each setup step to stderr.")
@click.argument("branches", metavar="BRANCHES|IMAGE")
@click.argument("command", nargs=-1, metavar="[--] COMMAND [ARGS]...")
def run_command(
    branches: str,
    command: tuple[str, ...],
    hostname: str | None,
    env: tuple[str, ...],
    workdir: str | None,
    net: str,
    tmp_upper: bool,
    rootless: bool | None,
    init: bool,
    keep_mounted: bool,
    backend: str,
    verbose: bool,
    volumes: tuple[str, ...],
    tmpfs: tuple[str, ...],
    user: str | None,
    read_only: bool,
    stop_timeout: float,
    interactive: bool,
    tty: bool,
    rm: bool,
    name: str | None,
    privileged: bool,
    cap_add: tuple[str, ...],
    cap_drop: tuple[str, ...],
    security_opt: tuple[str, ...],
    memory: str | None,
    memory_swap: str | None,
    pids_limit: int | None,
    cpus: float | None,
    runtime: str | None,
    store_dir: str | None,
    entrypoint: str | None,
    env_files: tuple[str, ...],
) -> None:
    """Run COMMAND with the union of BRANCHES, or a new container of IMAGE, as its root filesystem.

    BRANCHES are top first, as for `unionfs mount`: the first is the
    container's writable layer, the rest are image layers that are never
    changed.  IMAGE is an image of the store (`unionfs images`), taken when
    no file or directory by that name exists: a new container (`unionfs ps -a`)
    gets a layer of its own over the image's, and the image's Entrypoint, Cmd,
    Env, WorkingDir and User apply unless overridden.  COMMAND runs as PID 1 of
    new PID, mount, UTS and IPC namespaces (and a user namespace when rootless),
    sees only the union plus /proc and a minimal /dev, and its exit status is
    ours (128+N when killed by signal N).  Every mount is gone when it ends.

    Example:

        unionfs run --hostname box -v ./data:/data -u nobody ./upper:./busybox -- /bin/sh
        unionfs run --rm -e GREETING=hi busybox sh -c 'echo $GREETING'
    """
    if verbose:
        logging.basicConfig(level=logging.DEBUG, format="unionfs run: %(name)s: %(message)s")
    else:
        logging.basicConfig(level=logging.WARNING, format="unionfs run: %(levelname)s: %(message)s")
    from launcher import cgroups, security
    from launcher.supervisor import RunConfig, run

    if command and command[0] == "--":  # options stop at BRANCHES, so click hands us the separator
        command = command[1:]
    image = _image_store(branches, store_dir)
    if image is None and not command:
        raise click.UsageError("no COMMAND after BRANCHES --")

    try:
        policy = security.policy(cap_add, cap_drop, security_opt, privileged)
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    try:
        limits = cgroups.make_limits(memory, memory_swap, pids_limit, cpus)
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    try:
        env = (*_env_files(env_files), *env)
    except QuietError as exc:
        raise click.UsageError(exc.message) from None
    cfg = RunConfig(branches=branches, command=command, hostname=hostname, env=env, workdir=workdir or "/",
                    net=net, tmp_upper=tmp_upper, rootless=rootless, keep_mounted=keep_mounted, init=init,
                    backend=backend, volumes=volumes, tmpfs=tmpfs, user=user, read_only=read_only,
                    stop_timeout=stop_timeout, policy=policy, tty=tty, limits=limits,
                    runtime=runtime)
    log.debug("interactive=%s rm=%s name=%s", interactive, rm, name)
    try:
        if image is not None:
            from launcher.images import run_image

            code = run_image(cfg, image[0], image[1], command, name=name, auto_remove=rm,
                             entrypoint=entrypoint, workdir=workdir, user=user)
        else:
            code = run(cfg)
    except QuietError as exc:
        click.echo(f"unionfs run: {one_line(exc.message)}", err=True)
        # The store's own errors (no such image, a name taken) are a launch that failed, as docker's.
        sys.exit(exc.exitcode if image is None or isinstance(exc, LaunchError) else EXIT_LAUNCH_FAILED)
    except OSError as exc:
        click.echo(f"unionfs run: {one_line(describe(exc))}", err=True)
        sys.exit(EXIT_LAUNCH_FAILED)
    sys.exit(code)


def _env_files(paths: tuple[str, ...]) -> list[str]:
    if not paths:
        return []
    from unionfs.images.containers import read_env_file

    return [item for path in paths for item in read_env_file(path)]


def _image_store(arg: str, store_dir: str | None) -> tuple[Store, str] | None:
    """(store, image) when *arg* names an image of the store and no file or directory: the rule that
    tells ``unionfs run IMAGE`` from ``unionfs run BRANCHES``; None for BRANCHES."""
    from unionfs.core.config import split_escaped

    parts = [p for p in split_escaped(arg, ":") if p]
    if any(os.path.lexists(p) or os.path.lexists(p.rpartition("=")[0]) for p in [arg, *parts]):
        return None
    from unionfs.images.store import Store

    store = Store(store_dir)
    try:
        store.resolve(arg)
    except QuietError:
        click.echo(f"unionfs run: {one_line(arg)}: no such image in {store.root}, and no directory of that "
                   "name", err=True)
        sys.exit(EXIT_LAUNCH_FAILED)
    return store, arg


@click.command(
    "unshare",
    context_settings={"help_option_names": ["-h", "--help"], "allow_interspersed_args": False},
)
@click.argument("command", nargs=-1, metavar="[--] [COMMAND [ARGS]...]")
def unshare_command(command: tuple[str, ...]) -> None:
    """Run COMMAND (default: $SHELL) in the user namespace rootless `unionfs run` uses, as `podman unshare`.

    You are root in it, and the ids of your /etc/subuid and /etc/subgid ranges are
    1, 2, ... there: the place to unpack an image with its owners, or to remove a
    container layer whose files belong to the container's users.  As root, COMMAND
    just runs.

    Example:

        unionfs unshare -- tar -xpf rootfs.tar -C ./image
        unionfs unshare rm -rf ./upper
    """

    from launcher import namespaces

    if command and command[0] == "--":
        command = command[1:]
    argv = list(command) or [os.environ.get("SHELL") or "/bin/sh"]
    if os.geteuid() != 0:
        try:
            namespaces.enter_launcher_namespaces(rootless=True)
        except OSError as exc:
            click.echo(f"unionfs unshare: {describe(exc)}", err=True)
            sys.exit(EXIT_LAUNCH_FAILED)
    try:
        os.execvp(argv[0], argv)
    except OSError as exc:
        click.echo(f"unionfs unshare: {argv[0]}: {os.strerror(exc.errno or 0)}", err=True)
        sys.exit(127 if exc.errno == errno.ENOENT else 126)
