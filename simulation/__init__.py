"""A whole federation simulated on this machine (``fedmed-sim``).

The same server and client apps as a deployment run on Flower's simulation engine
(:mod:`.engine`); sites come from their own folders, the demo generator, or one pooled folder
split by patient (:mod:`.partition`, :mod:`.sites`); :mod:`.centralized` trains the pooled
baseline and :mod:`.report` compares the runs.
"""

from .partition import SPLIT_METHODS, dirichlet_counts, split_patients

__all__ = ["SPLIT_METHODS", "dirichlet_counts", "split_patients"]
