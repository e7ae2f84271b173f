"""Data: source labels (`labels`), long-tail subsampler (`longtail`), missing-label protocol (`partial`),
benchmark builders, the synthetic source and the image cache. Submodules are imported where used."""
