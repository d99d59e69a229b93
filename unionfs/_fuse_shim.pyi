from collections.abc import Callable

def configure(
    cache_dirs: bool = ...,
    fallocate: Callable[[int, int, int, int, int], int] | None = ...,
    stateless_dirs: bool = ...,
    dont_mask: bool = ...,
    lseek: Callable[[int, int, int, int], int] | None = ...,
) -> None: ...
def sessions() -> int: ...
def dont_mask() -> bool: ...
