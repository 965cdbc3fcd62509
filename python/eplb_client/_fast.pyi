"""Stub of the C extension ``eplb_client._fast`` (``_fast.c``)."""

from typing import Any, Callable, Optional, Tuple

class StepEnd:
    attached: bool

    def __init__(self, lib_path: str, region: int, counts: Any, agree: Optional[Callable[[int], Tuple[int, int]]],
                 slow: Callable[..., int], boundary: Callable[[int], int],
                 check_agree: Callable[[Any], Tuple[int, int]]) -> None: ...
    def __call__(self, step: int, phase: str = ..., tokens: int = ..., moe_ns: int = ...) -> int: ...
    def detach(self) -> None: ...
