"""Resume within a run through Ray Data's own checkpointing (`ray.data.checkpoint`).

Ray Data filters already-written rows right after the read, by the id column, and records the ids of every
written file with a two-phase commit (pending, then committed once the data file exists; on restart, data files
of pending entries are deleted). Its stock filter reads the id column from the freshly read block, but ids here
may be derived from the source and the manifest's id column may have another name; so the filter below computes
each read row's id with the same function the pipeline uses, then drops the rows already checkpointed.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa
from ray.data.block import Block
from ray.data.checkpoint import CheckpointConfig
from ray.data.checkpoint.checkpoint_filter import NumpyArrayBasedCheckpointFilter

from pipeline.dataset import schema
from pipeline.input.sources import SourceSpec, block_ids
from pipeline.storage import arrow_filesystem, parse_uri


class SourceIdCheckpointConfig(CheckpointConfig):
    """A CheckpointConfig that also carries how read rows map to ids (the filter actors receive it)."""

    def __init__(self, source: SourceSpec, checkpoint_path: str, **kwargs: Any) -> None:
        super().__init__(
            id_column=schema.ID,
            checkpoint_path=checkpoint_path,
            checkpoint_filter_cls=SourceIdCheckpointFilter,
            **kwargs,
        )
        self.source = source


class SourceIdCheckpointFilter(NumpyArrayBasedCheckpointFilter):
    def filter_rows_for_block(self, block: Block) -> Block:
        if self.checkpointed_ids.shape[0] == 0 or len(block) == 0:
            return block
        source: SourceSpec = self.ckpt_config.source
        ids = np.asarray(block_ids(block, source), dtype=object)
        position = np.searchsorted(self.checkpointed_ids, ids)
        in_range = position < len(self.checkpointed_ids)
        done = np.zeros(len(ids), dtype=bool)
        done[in_range] = self.checkpointed_ids[position[in_range]] == ids[in_range]
        if isinstance(block, pa.Table):
            return block.filter(pa.array(~done))
        return block[~done].reset_index(drop=True)


def checkpoint_config(
    source: SourceSpec, resume_path: str, storage_options: dict[str, Any] | None
) -> SourceIdCheckpointConfig:
    location = parse_uri(resume_path)
    config = SourceIdCheckpointConfig(
        source,
        location.uri if not location.is_local else location.path,
        override_filesystem=arrow_filesystem(location.protocol, storage_options),
        # Keep the ids after success: rerunning a finished job must add nothing, not start over.
        delete_checkpoint_on_success=False,
    )
    # One filter actor is plenty (it only compares ids) and leaves the CPUs to decoding.
    config.checkpoint_actor_pool_max_size = 1
    return config
