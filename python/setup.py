"""The optional C extension of the client (``eplb_client._fast``: the end of an engine step in one
call into libeplb_client; docs/python-client.md). Everything else is in pyproject.toml.

It compiles against the C API's header, ``client/include/eplb_client.h`` of the eplb repository
(generated from the library's one definition of the contract). Where there is no C compiler, no
Python headers or no header (an install outside the repository), the package installs without it
and ``EngineRegion.step_end`` runs the same steps through ctypes.
"""

from pathlib import Path

from setuptools import Extension, setup

header_dir = Path(__file__).resolve().parent.parent / "client" / "include"

setup(
    ext_modules=[
        Extension(
            "eplb_client._fast",
            ["eplb_client/_fast.c"],
            include_dirs=[str(header_dir)],
            extra_compile_args=["-O2", "-std=gnu11", "-Wall", "-Wextra", "-Wno-missing-field-initializers",
                                "-Wno-cast-function-type"],
            libraries=["dl"],
            optional=True,
        )
    ]
)
