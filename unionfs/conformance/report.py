"""Reporting: the step-by-step trace of a failing case, and the runnable repro script.

The script is ordinary Python that spells out the lower layers (``lay_*`` builder calls) and the
steps (operation calls on a session ``s``), then hands both to :func:`repro_main`, which mounts the
two implementations on identical copies, runs every step on both, prints each outcome side by side
and the first difference, and exits 1 if there is one. Editing the script (dropping a step, changing
a flag) and re-running it is the intended way to study a finding.
"""

from __future__ import annotations

import argparse
import ast
import logging
import os
import signal
import sys
from collections.abc import Callable, Sequence
from typing import Any

from unionfs.conformance import ops as ops_mod

from .impls import make_impl
from .layers import Layers, Oct
from .machine import Case, Failure, Runner, ScriptCase, Trace
from .ops import Op, Outcome

log = logging.getLogger(__name__)

SCRIPT = '''#!/usr/bin/env python3
"""Minimal failing sequence found by the unionfs conformance oracle.

{provenance}

{failure}

Run as root from a checkout with unionfs installed:
    python3 {filename}                       # {impl_a} vs {impl_b}, as found
    python3 {filename} --impl-b kernel       # sanity check: the reference against itself
It prints every step's outcome on both sides and exits 1 while they still differ.
"""

from unionfs.conformance.layers import (  # noqa: F401
    lay_dir, lay_fifo, lay_file, lay_hardlink, lay_opaque_dir, lay_redirect_dir, lay_symlink, lay_whiteout)
from unionfs.conformance.report import repro_main

N_LAYERS = {n_layers}


def layers(L):
    """The lower layers, L[0] on top; whiteouts are written in each implementation's dialect."""
{layers}


STEPS = [
{steps}
]

if __name__ == "__main__":
    repro_main(N_LAYERS, layers, STEPS, impl_a={impl_a!r}, impl_b={impl_b!r}, whiteout={whiteout!r},
               lower_whiteout={lower_whiteout!r}, fault={fault!r}, options_a={options_a!r},
               options_b={options_b!r}, ignore={ignore!r})
'''


def _indent(text: str, prefix: str = "    ") -> str:
    return "\n".join(prefix + line for line in text.splitlines())


def script(case: Case, failure: Failure, *, impl_a: str, impl_b: str, whiteout: str,
           lower_whiteout: str | None, fault: str | None, provenance: str,
           filename: str = "repro.py", options_a: str = "", options_b: str = "",
           ignore: Sequence[str] = ()) -> str:
    """A runnable Python script that replays ``case`` and shows ``failure``."""
    failure_text = "\n".join(line.replace('"""', "'''") for line in str(failure).splitlines())
    return SCRIPT.format(
        provenance=provenance, failure=failure_text, filename=filename, impl_a=impl_a, impl_b=impl_b,
        n_layers=case.spec.n_layers, layers=_indent(case.spec.code()),
        steps="\n".join(f"    {op.code()!r}," for op in case.ops) or "",
        whiteout=whiteout, lower_whiteout=lower_whiteout, fault=fault, options_a=options_a,
        options_b=options_b, ignore=tuple(ignore),
    )


def parse_step(source: str) -> Op:
    """``"unlink(s, 'a')"`` -> ``Op('unlink', ('a',))``: the script's steps, read back."""
    scope: dict[str, Any] = {name: (lambda n: lambda _s, *args: Op(n, args))(name)
                             for name in ops_mod.OPERATIONS}
    scope["s"] = None
    scope["__builtins__"] = {}
    op = eval(source, scope)
    if not isinstance(op, Op):
        raise ValueError(f"not a step: {source!r}")
    # keep octal literals octal (modes), so replays print as the script reads
    call = ast.parse(source, mode="eval").body
    assert isinstance(call, ast.Call)
    args = list(op.args)
    for k, node in enumerate(call.args[1:]):
        text = ast.get_source_segment(source, node) or ""
        if isinstance(node, ast.Constant) and type(node.value) is int and text.lower().startswith("0o"):
            args[k] = Oct(node.value)
    return Op(op.name, tuple(args))


def format_trace(trace: Trace, name_a: str, name_b: str, failure: Failure | None) -> str:
    lines = []
    for i, (op, out_a, out_b) in enumerate(trace.steps, 1):
        if out_a is None or out_b is None:
            lines.append(f"  {i:3}. {op.code()}")
        else:
            mark = "  " if out_a == out_b else "!!"
            lines.append(f"{mark}{i:3}. {op.code():60}  {name_a}: {out_a}   {name_b}: {_short(out_b)}"
                         if out_a != out_b else f"  {i:3}. {op.code():60}  -> {_short(out_a)}")
    if failure is not None:
        lines.append(str(failure))
    return "\n".join(lines)


def _short(outcome: Outcome) -> str:
    text = str(outcome)
    return text if len(text) <= 60 else text[:57] + "..."


def exit_on_sigterm() -> None:
    """Turn SIGTERM (``timeout``, CI cancelling a job) into SystemExit, so that the finally blocks
    unmount and remove the scratch dirs instead of leaving mounts behind."""
    def handler(signum: int, frame: object) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, handler)


def repro_main(n_layers: int, layers: Callable[[Layers], None], steps: Sequence[str], *,
               impl_a: str = "kernel", impl_b: str = "unionfs", whiteout: str = "overlay",
               lower_whiteout: str | None = None, fault: str | None = None, options_a: str = "",
               options_b: str = "", ignore: Sequence[str] = (), argv: Sequence[str] | None = None) -> None:
    """Entry point of a repro script: replay, print side by side, exit 1 on a difference."""
    parser = argparse.ArgumentParser(description="Replay a conformance finding.")
    parser.add_argument("--impl-a", default=impl_a)
    parser.add_argument("--impl-b", default=impl_b)
    parser.add_argument("--whiteout", default=whiteout, choices=("overlay", "aufs"))
    parser.add_argument("--fault", default=fault,
                        help="a bug planted in unionfs (see unionfs.conformance.faults)")
    parser.add_argument("--options-a", default=options_a, help="extra mount options for A")
    parser.add_argument("--options-b", default=options_b, help="extra mount options for B")
    parser.add_argument("--base", default="/var/tmp", help="where scratch dirs go")
    args = parser.parse_args(argv)
    exit_on_sigterm()
    a = make_impl(args.impl_a, args.whiteout, lower_dialect=lower_whiteout, options=args.options_a)
    b = make_impl(args.impl_b, args.whiteout, lower_dialect=lower_whiteout, options=args.options_b,
                  fault=args.fault)
    runner = Runner(a, b, args.base, ignore=frozenset(ignore))
    case = ScriptCase(n_layers, layers, [parse_step(src) for src in steps])
    trace, failure = runner.replay(case)
    print(format_trace(trace, a.name, b.name, failure))
    if failure is None:
        print(f"no difference between {a.name} and {b.name}")
    sys.exit(1 if failure else 0)


def write_script(path: str, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)
    os.chmod(path, 0o755)
