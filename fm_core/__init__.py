"""fm_core: synthetic RKHS dynamics, the foundation model, pretraining and fine-tuning.

Public names are imported lazily (PEP 562) so importing the package stays cheap."""

from __future__ import annotations

from rigs.lazy import lazy_exports

__getattr__, __all__ = lazy_exports(__name__, {
    "fm_core.rkhs": ("RKHSConfig", "generate_batch", "write_corpus", "read_corpus", "SyntheticBatch"),
    "fm_core.trajfile": ("load_trajectories", "save_trajectories", "TrajectoryFileError", "TrajectorySet",
                         "split_by_source"),
})
