"""The run: refuse what can be known before Ray starts, wire the stages, show progress, summarize and commit.

- `preflight`: every check that needs no cluster, each mistake refused with one line to act on.
- `job`: `run_job`, the Ray Data graph from the manifest to partitioned Parquet.
- `incremental` and `row_selection`: runs that grow one dataset (new rows, retried errors, changed images).
- `resume`: Ray Data's checkpointing for a run that was stopped.
- `progress`, `console`: what the user reads while it runs; `run_summary`, `outcome`: how it ended.
- `demo`: a small real dataset for `sam3-embed demo`.
"""
