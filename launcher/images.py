"""``unionfs run IMAGE``: a new container of an image in the store, the image's config applied.

The container (``unionfs.images.containers``) is made and held before the launch: its directory's
flock is what makes ``unionfs ps`` say Up, and its state file records the exit status.  The union
is the container's own layer over the image's layers (the init layer goes between, as for
BRANCHES); everything else is ``supervisor.run``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from launcher.errors import EXIT_LAUNCH_FAILED, LaunchError
from launcher.supervisor import RunConfig, run
from unionfs.core.config import BranchSpec, format_branch_spec

if TYPE_CHECKING:
    from unionfs.images.store import Store


def run_image(cfg: RunConfig, store: Store, image_ref: str, args: Sequence[str], *, name: str | None,
              auto_remove: bool, entrypoint: str | None, workdir: str | None, user: str | None) -> int:
    """Run a new container of *image_ref*; its exit status.

    *cfg* holds the run flags (its branches, command, workdir and user are replaced); *args*, *workdir*
    and *user* are what the command line gave, None where the image's config decides: Entrypoint and
    Cmd (as ``docker run``: *args* replace Cmd, ``--entrypoint`` replaces Entrypoint and drops Cmd),
    Env (under ``-e``), WorkingDir and User.
    """
    from unionfs.images.containers import Containers, command_for

    if cfg.tmp_upper:
        raise LaunchError("--tmp-upper is for BRANCHES: a container of an IMAGE has a layer of its own "
                          "(--rm removes it)", 2)
    image = store.image(image_ref)
    config = image.config.get("config") or {}
    argv = command_for(config, args, entrypoint)
    layers = [BranchSpec(str(p), "ro") for p in store.layer_dirs(image.id)]
    containers = Containers(store)
    with containers.create(image_ref, name, argv, auto_remove) as container:
        cfg = cfg._replace(
            branches=format_branch_spec([BranchSpec(str(container.upper), "rw"), *layers]),
            command=argv,
            container_id=container.id[:12],
            image_env=[str(e) for e in config.get("Env") or []],
            workdir=workdir or config.get("WorkingDir") or "/",
            user=user or config.get("User") or None,
        )
        containers.started(container)
        code = EXIT_LAUNCH_FAILED
        try:
            code = run(cfg)
        except LaunchError as exc:
            code = exc.exitcode
            raise
        finally:
            containers.finished(container, code)
    return code
