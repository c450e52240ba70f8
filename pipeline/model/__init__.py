"""The model stage: the Ray Data actor that hosts the backbone and turns prepared records into feature columns.

- `embed`: `EmbedWorker`, one per model actor (also callable without Ray).
- `copy_aware_embed`: the actor of an incremental run, which skips the image model for repeated images.
- `model_cache`: the checkpoint copied once per node and hashed once.
- `compile_share`: compiled code paid once per cluster.
- `neck_heads`, `arrow_features`: which neck head feeds each stored map; NumPy features to Arrow columns.
"""
