"""The dataset side: what a committed output holds and how it grows.

- `schema`: column and metadata names (the contract docs/schema.md describes).
- `markers`: `_SUCCESS` commit markers, which files a reader may trust.
- `reader`: reading a dataset back (Arrow tables, NumPy matrices).
- `sizes`: what each stored feature costs per row.
- `identity`: the model identity a dataset is bound to (config, checkpoint digest, image size, features, dtype).
- `runs`: the dataset record `_dataset.json`: its identity and every committed run.
- `id_set`: the ids already present, read from the id / status / digest columns only.
- `replacement`: the commit of an incremental run: staged rows become new files and in-place rewrites, applied
  from a journal so a killed commit is finished by the next writer.
- `copies`: rows that repeat an image get its image features at the commit, without the model.
- `lock`: one writer per dataset (a lease).
"""
