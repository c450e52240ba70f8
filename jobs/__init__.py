"""Entry points for Ray jobs: `python -m jobs.embed` (one job) and `python -m jobs.backfill` (partitioned backfill).

The embedding itself lives in `pipeline`; this package adds the command lines, exit codes, and the backfill
protocol (staging, commit with `_SUCCESS`, partition leases on object storage). See docs/backfill.md.
"""
