"""sam3core: SAM 3's vision-language backbone in plain PyTorch (no Ray, no I/O beyond checkpoint loading)."""
