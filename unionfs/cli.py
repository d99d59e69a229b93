"""The `unionfs` command (a click group) and `unionfs-overlay` (fuse-overlayfs' command line).

Thin: parse, call the library, turn `QuietError` into one line on stderr and a non-zero exit.
Subcommands that live in other packages (run, conformance) load only when called.
"""
from __future__ import annotations

import importlib
import importlib.util
import logging
import re
import sys
from collections.abc import Callable
from typing import Any

import click

from unionfs.core.errors import QuietError

CONTEXT = {"help_option_names": ["-h", "--help"]}

LAZY_COMMANDS = {
    "run": ("launcher.cli", "run_command"),
    "unshare": ("launcher.cli", "unshare_command"),
    "conformance": ("unionfs.conformance.cli", "conformance_command"),
    "images": ("unionfs.images.cli", "images_command"),
    "image": ("unionfs.images.cli", "image_group"),
    "diff": ("unionfs.images.cli", "diff_command"),
    "commit": ("unionfs.images.cli", "commit_command"),
    "ps": ("unionfs.images.cli", "ps_command"),
    "rm": ("unionfs.images.cli", "container_rm_command"),
    "pull": ("unionfs.images.cli", "pull_command"),
    "push": ("unionfs.images.cli", "push_command"),
    "login": ("unionfs.images.cli", "login_command"),
    "logout": ("unionfs.images.cli", "logout_command"),
}


class LazyGroup(click.Group):
    """A group whose heavier subcommands are imported on first use."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        names = set(super().list_commands(ctx))
        for name, (module, _) in LAZY_COMMANDS.items():
            if importlib.util.find_spec(module.split(".")[0]) is not None and _module_exists(module):
                names.add(name)
        return sorted(names)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        cmd = super().get_command(ctx, cmd_name)
        if cmd is not None or cmd_name not in LAZY_COMMANDS:
            return cmd
        module, attr = LAZY_COMMANDS[cmd_name]
        if not _module_exists(module):
            return None
        found: click.Command = getattr(importlib.import_module(module), attr)
        return found


def _module_exists(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:
        return False


@click.group(cls=LazyGroup, context_settings=CONTEXT)
@click.version_option(package_name="unionfs")
def cli() -> None:
    """unionfs: a union filesystem in userspace with overlayfs and AUFS semantics.

    \b
    Mount two branches AUFS-style (A writable on top of read-only B):
        unionfs mount A:B /mnt/union
    or overlay-style, exactly as fuse-overlayfs takes it:
        unionfs mount -o lowerdir=L1:L2,upperdir=U,workdir=W /mnt/union
    Unmount:
        unionfs umount /mnt/union
    """


@cli.command(context_settings=CONTEXT)
@click.option("-o", "options", multiple=True, metavar="OPTS",
              help="Comma-separated options: lowerdir=, upperdir=, workdir=, whiteout=aufs|overlay, "
                   "ro, allow_other, timeout=SECONDS, fsname=NAME, max_cached_entries=N (listing "
                   "entries kept, default 1000000); udba=none|reval|notify (changes made directly in "
                   "the branches show: once the caches let go, at the next access, within 100 ms), "
                   "udba_max_watches=N (default 16384); redirect_dir=on|follow|nofollow|off (on: "
                   "rename merged directories in place, as overlayfs; default off); metacopy=on (a "
                   "chmod or chown copies no data, as overlayfs; implies redirect_dir=on); "
                   "passthrough=off (the server reads and writes every open file itself; on by "
                   "default where the kernel allows it, as root); writeback (the kernel's writeback "
                   "cache: small writes gathered; a same-size truncate keeps the mtime; no "
                   "passthrough); suid, dev, noexec (default nosuid,nodev; "
                   "a user other than root always gets nosuid,nodev).")
@click.option("-f", "--foreground", is_flag=True, help="Serve in the foreground until unmounted or Ctrl-C.")
@click.option("-d", "--debug", is_flag=True, help="Log every request (implies --foreground).")
@click.option("--log-file", type=click.Path(dir_okay=False), help="Where the daemon logs.")
@click.argument("args", nargs=-1, required=True, metavar="[BRANCHES] MOUNTPOINT")
def mount(options: tuple[str, ...], foreground: bool, debug: bool, log_file: str | None,
          args: tuple[str, ...]) -> None:
    """Mount a union of BRANCHES (top first) on MOUNTPOINT.

    \b
    BRANCHES is A:B:C, top first; each may carry a mode, A=rw:B=ro. Without modes the
    first branch is writable and the rest read-only, as AUFS does. Whiteouts default to
    the AUFS dialect (.wh.NAME) here and to the overlay dialect with -o lowerdir=...

    \b
    Example:
        unionfs mount ./A:./B /mnt/union && ls /mnt/union && unionfs umount /mnt/union
    """
    from unionfs.core.config import build_config, flag_notes
    from unionfs.server.daemon import mount as do_mount

    if len(args) == 1:
        if not any(part.startswith("lowerdir=") for o in options for part in o.split(",")):
            raise click.UsageError(f"missing MOUNTPOINT after {args[0]!r} (expected BRANCHES MOUNTPOINT, "
                                   "or -o lowerdir=... MOUNTPOINT)")
        spec, mp = None, args[0]
    elif len(args) == 2:
        spec, mp = args
    else:
        raise click.UsageError("expected [BRANCHES] MOUNTPOINT")
    foreground = foreground or debug
    try:
        cfg = build_config(spec, mp, options)
        notes = [f"unionfs: {n}" for n in flag_notes(cfg)]
        if foreground and notes:    # serves until unmounted: say it now
            print(*notes, sep="\n", file=sys.stderr)
        code = do_mount(cfg, foreground=foreground, debug=debug, log_file=log_file)
    except QuietError as e:
        raise click.ClickException(e.message) from None
    if not foreground and notes and code == 0:  # once the mount is ready: a failure stays one line
        print(*notes, sep="\n", file=sys.stderr)
    sys.exit(code)


@cli.command(context_settings=CONTEXT)
@click.argument("mountpoint", type=click.Path())
def umount(mountpoint: str) -> None:
    """Unmount MOUNTPOINT and wait for its daemon to let go of it.

    \b
    Example:
        unionfs umount /mnt/union
    """
    from unionfs.server.unmount import umount as do_umount

    try:
        do_umount(mountpoint)
    except QuietError as e:
        raise click.ClickException(e.message) from None


@cli.command(context_settings=CONTEXT)
@click.option("--json", "as_json", is_flag=True, help="One JSON object, for scripts.")
@click.argument("path", type=click.Path())
def explain(as_json: bool, path: str) -> None:
    """Say where PATH, on a mounted union, comes from: the branch that serves it, what each branch
    below holds and what hides it (a whiteout, an opaque directory, a non-directory above), whether
    it was copied up, and which branches a directory's listing merges.

    \b
    Example:
        unionfs explain /mnt/union/etc/passwd
    """
    import json

    from unionfs import explain as explaining

    try:
        report = explaining.explain_path(path)
    except QuietError as e:
        raise click.ClickException(one_line(e.message)) from None
    if as_json:
        click.echo(json.dumps(explaining.as_json(report), indent=2))
    else:
        for line in explaining.as_text(report):
            click.echo(one_line(line))


@cli.group(context_settings=CONTEXT)
def branch() -> None:
    """List or change the branches of a mounted union, as AUFS does (also: unionfs remount -o
    add:INDEX:DIR[=MODE],del:DIR,mod:DIR=MODE,append:DIR[=MODE],prepend:DIR[=MODE] MNT).

    \b
    Examples:
        unionfs branch list /mnt/union
        unionfs branch add /mnt/union /srv/patches --mode ro     (just below the top)
        unionfs branch mode /mnt/union /srv/base rr
        unionfs branch del /mnt/union /srv/patches
    """


def _branch_call(fn: Callable[[], dict[str, Any]], quiet: bool = True) -> None:
    from unionfs.branchctl import format_list

    try:
        reply = fn()
    except QuietError as e:
        raise click.ClickException(one_line(e.message)) from None
    if not quiet:
        click.echo(format_list(reply))


@branch.command("list", context_settings=CONTEXT)
@click.option("--json", "as_json", is_flag=True, help="One JSON object, for scripts.")
@click.argument("mountpoint", type=click.Path())
def branch_list(as_json: bool, mountpoint: str) -> None:
    """Print the branches of MOUNTPOINT, top first: index, mode (rw, ro, rr), directory."""
    import json

    from unionfs.branchctl import list_branches

    if as_json:
        try:
            reply = list_branches(mountpoint)
        except QuietError as e:
            raise click.ClickException(one_line(e.message)) from None
        click.echo(json.dumps({"branches": reply["branches"], "readonly": reply["readonly"]}))
        return
    _branch_call(lambda: list_branches(mountpoint), quiet=False)


@branch.command("add", context_settings=CONTEXT)
@click.option("--index", type=click.IntRange(min=0), default=None,
              help="Where: 0 is the top (default: just below the top).")
@click.option("--mode", type=click.Choice(["ro", "rr", "rw"]), default="ro", show_default=True,
              help="rw only for the top.")
@click.argument("mountpoint", type=click.Path())
@click.argument("directory", type=click.Path())
def branch_add(index: int | None, mode: str, mountpoint: str, directory: str) -> None:
    """Add DIRECTORY to the union at MOUNTPOINT; its names are visible at once."""
    from unionfs.branchctl import change

    _branch_call(lambda: change(mountpoint, [("add", directory, index, mode)]))


@branch.command("del", context_settings=CONTEXT)
@click.argument("mountpoint", type=click.Path())
@click.argument("directory", type=click.Path())
def branch_del(mountpoint: str, directory: str) -> None:
    """Remove the branch DIRECTORY from the union at MOUNTPOINT (refused while files in it are open)."""
    from unionfs.branchctl import change

    _branch_call(lambda: change(mountpoint, [("del", directory, None, None)]))


@branch.command("mode", context_settings=CONTEXT)
@click.argument("mountpoint", type=click.Path())
@click.argument("directory", type=click.Path())
@click.argument("mode", type=click.Choice(["ro", "rr", "rw"]))
def branch_mode(mountpoint: str, directory: str, mode: str) -> None:
    """Change the mode of the branch DIRECTORY (a read-only top makes the union read-only)."""
    from unionfs.branchctl import change

    _branch_call(lambda: change(mountpoint, [("mode", directory, None, mode)]))


@cli.command(context_settings=CONTEXT)
@click.option("--json", "as_json", is_flag=True, help="The snapshot as one JSON object, for scripts.")
@click.argument("mountpoint", type=click.Path())
def stats(as_json: bool, mountpoint: str) -> None:
    """Show what the daemon of MOUNTPOINT is doing: requests by type (count, errors, mean, p50/p99,
    max), copy-ups, lookups per branch, cache hits, open files, fds and memory. Only the mount's
    owner or root may ask.

    \b
    Example:
        unionfs stats /mnt/union
    """
    import json

    from unionfs.branchctl import request
    from unionfs.server.stats import format_snapshot

    try:
        snap = request(mountpoint, {"cmd": "stats"})["stats"]
    except QuietError as e:
        raise click.ClickException(one_line(e.message)) from None
    click.echo(json.dumps(snap, indent=1) if as_json else format_snapshot(snap))


@cli.group(context_settings=CONTEXT, invoke_without_command=True)
@click.option("-f", "--foreground", is_flag=True, help="Serve in the foreground (logging to stderr).")
@click.option("--idle", type=click.FloatRange(min=0), default=600.0, show_default=True,
              help="Exit after this many seconds without a mount handed over (0: never).")
@click.pass_context
def server(ctx: click.Context, foreground: bool, idle: float) -> None:
    """Start this user's resident server, which makes `unionfs mount` and `unionfs-overlay` fast.

    \b
    The first mount that finds none starts one (UNIONFS_SERVER=off: never). It serves
    each mount in a worker of its own; stopping it leaves the mounts served.
    Example:
        unionfs server && unionfs mount A:B /mnt/union && unionfs server stop
    """
    if ctx.invoked_subcommand is not None:
        return
    from unionfs.server import resident

    if foreground:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        code = resident.run(idle=idle, foreground=foreground)
    except QuietError as e:
        raise click.ClickException(e.message) from None
    sys.exit(code)


@server.command(context_settings=CONTEXT)
def stop() -> None:
    """Stop this user's resident server; the mounts it started keep being served.

    \b
    Example:
        unionfs server stop
    """
    from unionfs.server import resident

    try:
        if not resident.stop():
            print("unionfs: no server was running", file=sys.stderr)
    except QuietError as e:
        raise click.ClickException(e.message) from None


def main(argv: list[str] | None = None) -> None:
    """Run the CLI; a usage error is one line on stderr (exit 2), like every other user error.

    The console script and ``python -m unionfs`` come through ``unionfs.entry.main``, which forks
    ``unionfs run``'s server before this module loads.
    """
    args = mount_helper_form(list(sys.argv[1:] if argv is None else argv))
    try:
        cli.main(args=args, prog_name="unionfs", standalone_mode=False)
    except click.exceptions.Abort:
        print("unionfs: aborted", file=sys.stderr)
        sys.exit(1)
    except click.ClickException as e:
        print(f"unionfs: {one_line(e.format_message())}", file=sys.stderr)
        sys.exit(e.exit_code)
    except click.exceptions.Exit as e:
        sys.exit(e.exit_code)


def mount_helper_form(args: list[str]) -> list[str]:
    """The command line mount.fuse3 gives a ``fuse.unionfs`` mount, as a ``unionfs`` command.

    ``mount -t fuse.unionfs A:B MNT`` runs ``unionfs A:B MNT -o rw,dev,suid``: that is
    ``unionfs mount -o rw,dev,suid A:B MNT``; with ``remount`` among the options (``mount -o
    remount,ro MNT``) it is a remount.  Any other command line is left as it is.
    """
    if len(args) < 4 or args[0].startswith("-") or args[0] in cli.commands or args[0] in LAZY_COMMANDS:
        return args
    positional = [a for i, a in enumerate(args) if a != "-o" and (i == 0 or args[i - 1] != "-o")]
    options = [args[i + 1] for i, a in enumerate(args[:-1]) if a == "-o"]
    if len(positional) != 2 or not options or len(options) * 2 + 2 != len(args):
        return args
    from unionfs.remount import asked

    if asked(options):
        return ["remount", *(x for o in options for x in ("-o", o)), positional[1]]
    return ["mount", *(x for o in options for x in ("-o", o)), *positional]


@cli.command(context_settings=CONTEXT)
@click.option("-o", "options", multiple=True, metavar="OPTS",
              help="ro or rw, mount flags (nosuid, noexec, ...), and AUFS's branch changes "
                   "(add:INDEX:DIR[=MODE], del:DIR, mod:DIR=MODE, append:DIR[=MODE], prepend:DIR[=MODE]).")
@click.argument("mountpoint", type=click.Path())
def remount(options: tuple[str, ...], mountpoint: str) -> None:
    """Remount MOUNTPOINT read-only or read-write, as `mount -o remount,ro MOUNTPOINT` does.

    \b
    Example:
        unionfs remount -o ro /mnt/union && unionfs remount -o rw /mnt/union
    """
    from unionfs.remount import remount as do_remount

    try:
        do_remount(mountpoint, options)
    except QuietError as e:
        raise click.ClickException(e.message) from None


OVERLAY_USAGE = """\
usage: unionfs-overlay [-f] [-d] -o lowerdir=L1:L2[,upperdir=U,workdir=W][,OPTIONS] [SOURCE] MERGED

fuse-overlayfs' command line, served by unionfs. SOURCE (given by mount.fuse3) is ignored.
Options unionfs does not implement are accepted and ignored with one line on stderr.
"""


def overlay_main(argv: list[str] | None = None) -> None:
    """`unionfs-overlay`: fuse-overlayfs' command line, for podman's mount_program and mount(8).

    A malformed command line exits 2, any other error 1, each with one line on stderr.
    """
    from unionfs.core.config import build_config, flag_notes
    from unionfs.server.daemon import mount as do_mount

    args = list(sys.argv[1:] if argv is None else argv)
    options: list[str] = []
    positional: list[str] = []
    foreground = debug = False
    i = 0
    while i < len(args):
        a = args[i]
        if a in ("-h", "--help"):
            print(OVERLAY_USAGE, end="")
            sys.exit(0)
        if a in ("-V", "--version"):
            print("unionfs-overlay: fuse-overlayfs compatible, unionfs 0.1.0")
            sys.exit(0)
        if a == "-o":
            if i + 1 >= len(args):
                _fail("-o needs an argument", 2)
            options.append(args[i + 1])
            i += 2
            continue
        if a.startswith("-o"):
            options.append(a[2:])
        elif a == "-f":
            foreground = True
        elif a == "-d" or a == "--debug":
            debug = foreground = True
        elif a == "-s":
            pass   # libfuse's single-threaded flag: unionfs serves in one thread anyway
        elif a.startswith("-") and a != "-":
            _fail(f"unknown flag {a!r} (see unionfs-overlay --help)", 2)
        else:
            positional.append(a)
        i += 1
    if not positional:
        _fail("no mountpoint given (see unionfs-overlay --help)", 2)
    if len(positional) > 2:
        _fail(f"too many arguments: {' '.join(map(repr, positional))} (want [SOURCE] MERGED)", 2)
    mp = positional[-1]   # mount.fuse3 passes the source first; fuse-overlayfs ignores it too
    from unionfs.remount import asked, remount

    try:
        if asked(options):   # mount -o remount,ro MNT, through mount.fuse3
            remount(mp, options)
            sys.exit(0)
        cfg = build_config(None, mp, options, strict=False)
        notes = [f"unionfs-overlay: ignoring unsupported option {opt}" for opt in cfg.ignored]
        notes += [f"unionfs-overlay: {n}" for n in flag_notes(cfg)]
        if foreground and notes:  # serves until unmounted: say it now
            print(*notes, sep="\n", file=sys.stderr)
        code = do_mount(cfg, foreground=foreground, debug=debug)
    except QuietError as e:
        _fail(e.message)
    if not foreground and notes:  # said once the mount is ready, so that a failure is one line alone
        print(*notes, sep="\n", file=sys.stderr)
    sys.exit(code)


def one_line(msg: str) -> str:
    """*msg* as one printable line: a byte of a name that is not UTF-8 (a lone surrogate from
    os.fsdecode, or its repr ``\\udcff``) shows as ``\\xff``, a line break as ``\\n``."""
    msg = re.sub(r"\\udc([89a-f][0-9a-f])", r"\\x\1", msg)
    msg = re.sub("[\udc80-\udcff]", lambda m: f"\\x{ord(m.group()) - 0xdc00:02x}", msg)
    return msg.replace("\r", "\\r").replace("\n", "\\n")


def _fail(msg: str, code: int = 1) -> Any:
    print(f"unionfs-overlay: {one_line(msg)}", file=sys.stderr)
    sys.exit(code)
