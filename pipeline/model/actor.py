"""The model stage's class as Ray Data sees it: torch-free, so that the driver planning a run never imports torch.

Ray Data pickles the class given to `map_batches` by reference, so the driver imports the module that defines it.
This one holds no model: each actor imports the worker (`pipeline.model.copy_aware_embed`, which brings torch and
the backbone) in its own process. A driver thus starts, refuses bad input and plans without torch (about 1.9 s of
every run on the CPUs of docs/benchmarks.md).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import pyarrow as pa

    from pipeline.model.settings import EmbedSettings


class EmbedActor:
    """Callable class for `Dataset.map_batches(EmbedActor, compute=ActorPoolStrategy(...), ...)`: one model per actor.

    `progress` receives the rows embedded (`pipeline.run.progress`); `counter` the rows that went through the image
    model (`pipeline.run.row_selection.SelectionCounter`).
    """

    def __init__(self, settings: EmbedSettings, progress: Any = None, counter: Any = None) -> None:
        from pipeline.model.copy_aware_embed import CopyAwareEmbedWorker

        self.worker = CopyAwareEmbedWorker(settings, progress, counter=counter)

    def __call__(self, batch: pa.Table) -> pa.Table:
        return self.worker(batch)
