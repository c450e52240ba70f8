"""The read side for SAM 3's heads: stored trunk maps back as `backbone_out` dictionaries (`feature_cache`).

It imports torch, so it is imported on its own, never by `pipeline` itself."""
