"""flexmf-assets: FlexMF matrix-factorization recommenders as Dagster assets.

The ML core (``flexmf``, ``datasets``, ``evaluation``) imports no Dagster; the Dagster layer
lives in ``flexmf_assets.defs``.

Importing the package sets ``OMP_WAIT_POLICY=passive`` unless it is set already (it only takes
effect when this happens before torch is first imported): OpenMP threads that spin while they wait
take the cores from the thread doing the work. The fused kernels run a parallel region per minibatch
with Python in between; with the default (spinning) policy two threads trained 3-5x slower than one
on a busy 2-vCPU machine, and within 1.25x of one with it passive (docs/benchmarks.md, "Performance
round 2").
"""

import os as _os

_os.environ.setdefault("OMP_WAIT_POLICY", "passive")

__version__ = "0.1.0"
