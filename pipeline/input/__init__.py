"""The input stage: from a manifest in object storage to prepared records, one row per input row.

- `manifest_layout`, `columns`: what the driver learns about a manifest before Ray starts.
- `sources`: the input layouts read with Ray Data's readers, and the canonical view of one read block.
- `ids`, `duplicate_ids`: every row's id, and the refusal of an input whose ids repeat.
- `decode`, `records`: image bytes to model input on the CPUs, each row's status kept.
- `utf8`: captions that are not valid UTF-8 are read, never dropped.
"""
