"""``unionfs conformance``: the differential oracle's command line."""

from __future__ import annotations

import logging
import os
import sys
import time

import click

from .impls import make_impl
from .layers import ENTRY_KINDS, CopiedLayers
from .machine import Case, Runner, parse_layers, run_sequence
from .machine import shrink as shrink_case
from .ops import WEIGHTS, Op
from .report import exit_on_sigterm, format_trace, script, write_script
from .snapshot import IGNORABLE

log = logging.getLogger(__name__)

IMPLS = click.Choice(["kernel", "unionfs", "fuse-overlayfs"])


def _layers(ctx: click.Context, param: click.Parameter, value: str) -> tuple[int, int]:
    try:
        return parse_layers(value)
    except ValueError as e:
        raise click.BadParameter(str(e)) from None


def _ops(ctx: click.Context, param: click.Parameter, value: str | None) -> set[str] | None:
    if not value:
        return None
    names = {n.strip() for n in value.split(",") if n.strip()}
    unknown = names - set(WEIGHTS)
    if unknown:
        raise click.BadParameter(f"unknown operation(s) {sorted(unknown)}; known: {', '.join(WEIGHTS)}")
    return names


def _seconds(ctx: click.Context, param: click.Parameter, value: float) -> float:
    if not 0 < value < 1e9:  # also false for nan
        raise click.BadParameter(f"{value} is not a number of seconds above 0")
    return value


def _kinds(ctx: click.Context, param: click.Parameter, value: str | None) -> set[str] | None:
    if not value:
        return None
    kinds = {k.strip() for k in value.split(",") if k.strip()}
    if kinds - set(ENTRY_KINDS):
        raise click.BadParameter(f"unknown kind(s) {sorted(kinds - set(ENTRY_KINDS))}")
    return kinds


@click.command("conformance", context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--seed", default=0, show_default=True, help="Campaign seed; sequence i is fixed by (seed, i).")
@click.option("--sequences", default=100, show_default=True, type=click.IntRange(min=0),
              help="How many random sequences to run.")
@click.option("--first", default=0, show_default=True, type=click.IntRange(min=0),
              help="Index of the first sequence (re-run sequence N alone: --first N --sequences 1).")
@click.option("--steps", default=50, show_default=True, type=click.IntRange(min=1),
              help="Operations per sequence.")
@click.option("--layers", "layers", default="1-3", show_default=True, callback=_layers,
              help="Lower layers per sequence: N or LO-HI.")
@click.option("--whiteout", type=click.Choice(["overlay", "aufs"]), default="overlay", show_default=True,
              help="Whiteout dialect unionfs writes (-o whiteout=...).")
@click.option("--lower-whiteout", type=click.Choice(["overlay", "aufs"]), default=None,
              help="Dialect of whiteouts inside unionfs's lower layers [default: as --whiteout]. "
                   "The kernel's copy always uses overlay.")
@click.option("--impl-a", type=IMPLS, default="kernel", show_default=True, help="Reference.")
@click.option("--impl-b", type=IMPLS, default="unionfs", show_default=True, help="Under test.")
@click.option("--options-a", default="", help="Extra mount options for implementation A.")
@click.option("--options-b", default="", help="Extra mount options for implementation B.")
@click.option("--metacopy", is_flag=True,
              help="Both mounted with metadata-only copy-up (-o metacopy=on; the kernel's with "
                   "redirect_dir=on, which metacopy needs).")
@click.option("--redirect-dir", is_flag=True,
              help="Both mounted with -o redirect_dir=on (merged directories renamed in place); half "
                   "the renames then move an existing directory.")
@click.option("--fault", default=None,
              help="Plant a bug in the unionfs under test (skip-whiteout-on-unlink): the oracle must "
                   "find it.")
@click.option("--ops", "allow", default=None, callback=_ops,
              help="Comma-separated operations to draw from (default: all).")
@click.option("--layer-kinds", "entry_kinds", default=None, callback=_kinds,
              help=f"Comma-separated kinds of lower-layer entries (default: all of {','.join(ENTRY_KINDS)}).")
@click.option("--ignore", multiple=True, type=click.Choice(sorted(IGNORABLE)),
              help="Exploration only: do not compare this class of field (repeatable). Not a verdict.")
@click.option("--keep-going", is_flag=True, help="Run every sequence even after a failure.")
@click.option("--shrink/--no-shrink", default=True, show_default=True, help="Minimise a failing sequence.")
@click.option("--shrink-runs", default=400, show_default=True, type=click.IntRange(min=0),
              help="Most replays spent shrinking one.")
@click.option("--shrink-seconds", default=300.0, show_default=True, callback=_seconds,
              help="Most time spent shrinking one.")
@click.option("--out", "out_dir", type=click.Path(file_okay=False), default=".", show_default=True,
              help="Where repro scripts are written.")
@click.option("--base", default="/var/tmp", show_default=True, type=click.Path(exists=True, file_okay=False),
              help="Where scratch dirs and mounts go.")
@click.option("--run", "run_cmd", default=None, metavar="COMMAND",
              help="Instead of random sequences: run this shell command in each union (cwd = the mount, "
                   "$UNION = its path) on copies of the --lower dirs, and compare.")
@click.option("--lower", "lowers", multiple=True, type=click.Path(exists=True, file_okay=False),
              help="With --run: a lower layer to copy, top first (repeat).")
@click.option("--run-timeout", default=300.0, show_default=True, callback=_seconds,
              help="With --run: seconds per command.")
@click.option("-v", "--verbose", count=True, help="-v: a line per sequence; -vv: debug log.")
def conformance_command(seed: int, sequences: int, first: int, steps: int, layers: tuple[int, int],
                        whiteout: str,
                        lower_whiteout: str | None, impl_a: str, impl_b: str, options_a: str,
                        options_b: str, metacopy: bool, redirect_dir: bool, fault: str | None,
                        allow: set[str] | None, entry_kinds: set[str] | None, ignore: tuple[str, ...],
                        keep_going: bool, shrink: bool, shrink_runs: int,
                        shrink_seconds: float, out_dir: str, base: str, run_cmd: str | None,
                        lowers: tuple[str, ...], run_timeout: float, verbose: int) -> None:
    """Throw random system-call sequences at two unions side by side; report where they differ.

    Builds random lower layers, mounts kernel overlayfs (--impl-a) and unionfs (--impl-b) on two
    identical copies, runs the same operations on both and compares after every step the errno,
    the visible tree and, at the end and at every remount, the upper layers. The first difference
    is shrunk to a minimal sequence and written as a runnable script. Needs root.

    Example: unionfs conformance --seed 1 --sequences 500 --steps 50 --whiteout aufs

    Your own program on the same layers, both ways, compared (exit status, output, visible tree,
    upper layer):

    Example: unionfs conformance --lower img/top --lower img/base --run 'sh ./build.sh'
    """
    if verbose >= 2:
        logging.basicConfig(level=logging.DEBUG)
    if os.geteuid() != 0:
        raise click.ClickException("conformance needs root (it mounts kernel overlayfs)")
    exit_on_sigterm()
    extra = "redirect_dir=on" if redirect_dir else ""
    options_a, options_b = _join(options_a, extra), _join(options_b, extra)
    if metacopy:
        options_a = _with_metacopy(impl_a, options_a)
        options_b = _with_metacopy(impl_b, options_b)
    a = make_impl(impl_a, whiteout, lower_dialect=lower_whiteout, options=options_a)
    try:
        b = make_impl(impl_b, whiteout, lower_dialect=lower_whiteout, options=_join(options_b, extra),
                      fault=fault)
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint="--fault") from None
    runner = Runner(a, b, base, ignore=frozenset(ignore))
    if run_cmd is not None:
        _run_program(runner, run_cmd, lowers, run_timeout)
        return
    passed = failed = 0
    start = time.monotonic()
    click.echo(f"conformance: {a.name} vs {b.name}, seed {seed}, {sequences} sequences x {steps} steps, "
               f"layers {layers[0]}-{layers[1]}, whiteout={whiteout}", err=True)
    if ignore:
        click.echo(f"EXPLORATORY RUN, not comparing: {', '.join(IGNORABLE[i] for i in ignore)}", err=True)
    for index in range(first, first + sequences):
        result = run_sequence(runner, seed, index, steps, layers, allow, entry_kinds, redirect_dir)
        if result.failure is None:
            passed += 1
            if verbose:
                click.echo(f"sequence {index}: ok ({len(result.trace.steps)} steps)", err=True)
            continue
        failed += 1
        click.echo(f"\nsequence {index} (seed {seed}): {result.failure}", err=True)
        case, trace, failure = result.case, result.trace, result.failure
        note = ""
        if shrink:
            click.echo(f"shrinking {len(case.ops)} steps, {len(case.spec.entries)} layer entries ...",
                       err=True)
            shrunk = shrink_case(runner, case, failure, trace, shrink_runs, shrink_seconds)
            case, trace, failure = shrunk.case, shrunk.trace, shrunk.failure
            note = f", shrunk in {shrunk.runs} replays ({shrunk.seconds:.0f}s)"
        label = "minimal" if shrink else "failing"
        click.echo(f"{label} sequence ({len(case.ops)} steps, {len(case.spec.entries)} layer entries{note}):")
        click.echo(format_trace(trace, a.name, b.name, failure))
        provenance = (f"Found by: unionfs conformance --seed {seed} --steps {steps} --layers "
                      f"{layers[0]}-{layers[1]} --whiteout {whiteout} --impl-a {impl_a} --impl-b {impl_b}"
                      + (f" --options-a {options_a}" if options_a else "")
                      + (f" --options-b {options_b}" if options_b else "")
                      + (" --redirect-dir" if redirect_dir else "")
                      + (f" --ops {','.join(sorted(allow))}" if allow else "")
                      + (f" --layer-kinds {','.join(sorted(entry_kinds))}" if entry_kinds else "")
                      + "".join(f" --ignore {i}" for i in ignore)
                      + (f" --fault {fault}" if fault else "") + f"\n(sequence {index}{note}).")
        filename = f"conformance-seed{seed}-seq{index}.py"
        text = script(Case(case.spec, case.ops), failure, impl_a=impl_a, impl_b=impl_b, whiteout=whiteout,
                      lower_whiteout=lower_whiteout, fault=fault, provenance=provenance, filename=filename,
                      options_a=_join(options_a, extra), options_b=_join(options_b, extra), ignore=ignore)
        os.makedirs(out_dir, exist_ok=True)
        path = os.path.join(out_dir, filename)
        write_script(path, text)
        click.echo(f"\n# ---- repro script, also written to {path} ----\n{text}")
        if not keep_going:
            break
    elapsed = time.monotonic() - start
    click.echo(f"({elapsed:.1f}s, {runner.runs} runs)", err=True)
    click.echo(f"{passed} passed, {failed} failed")
    sys.stdout.flush()
    if failed:
        sys.exit(1)


METACOPY_OPTIONS = {"kernel": "redirect_dir=on,metacopy=on", "unionfs": "metacopy=on"}


def _with_metacopy(impl: str, options: str) -> str:
    """*options* with metadata-only copy-up asked of *impl* (later options win)."""
    if impl not in METACOPY_OPTIONS:
        raise click.BadParameter(f"{impl} has no metadata-only copy-up", param_hint="--metacopy")
    return _join(options, METACOPY_OPTIONS[impl])


def _join(options: str, extra: str) -> str:
    return ",".join(o for o in (options, extra) if o)


def _run_program(runner: Runner, command: str, lowers: tuple[str, ...], timeout: float) -> None:
    """``--run``: one step, the user's command, on copies of the user's layers."""
    if not lowers:
        raise click.UsageError("--run needs at least one --lower directory")
    runner.step_timeout = timeout + 30
    op = Op("run", (command, timeout))
    spec = CopiedLayers([os.path.abspath(p) for p in lowers])
    trace, failure = runner.run(spec, lambda i, _snap: op if i == 0 else None)
    for _op, out_a, out_b in trace.steps:
        for impl, out in ((runner.impl_a, out_a), (runner.impl_b, out_b)):
            if out is not None and not out.errno:
                rc, stdout, stderr = out.result
                click.echo(f"--- {impl}: exit status {rc}\n{stdout}{stderr}")
    if failure is not None:
        click.echo(str(failure))
    click.echo(f"{0 if failure else 1} passed, {1 if failure else 0} failed")
    sys.stdout.flush()
    if failure:
        sys.exit(1)
