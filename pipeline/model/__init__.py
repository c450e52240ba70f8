"""The model stage: the Ray Data actor that hosts the backbone and turns prepared records into feature columns.

- `actor`: `EmbedActor`, the class Ray Data starts per model actor; torch-free, so the driver never imports torch.
- `settings`: `EmbedSettings`, what an actor is built from (torch-free too).
- `embed`: `EmbedWorker`, the model and its batches, one per actor (also callable without Ray).
- `copy_aware_embed`: the worker every run's actor holds, which skips the image model for repeated images.
- `model_cache`: the checkpoint copied once per node and hashed once.
- `compile_share`: compiled code paid once per cluster.
- `neck_heads`, `arrow_features`: which neck head feeds each stored map; NumPy features to Arrow columns.
"""
