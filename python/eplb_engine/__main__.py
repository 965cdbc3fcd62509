import os
import sys

# One BLAS thread a rank: N ranks already share the cores, and the matrices are small.
for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

from .engine import main  # noqa: E402

sys.exit(main())
