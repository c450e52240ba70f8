"""Partition backfills: each partition embedded in a staging area, then committed all at once under a lease.

`runner.Backfill` drives the loop; `lease` (one writer per partition across processes and hosts), `staging`,
`commit` (`_SUCCESS` manifest written last) and `partitions` are the protocol's pieces. `python -m jobs.backfill`
is the entry point.
"""
