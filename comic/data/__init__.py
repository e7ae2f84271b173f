"""Data: source labels, the long-tail subsampler, the missing-label protocol, the synthetic source, the benchmark
builder (sources -> build -> card; reader), and the image cache, datasets and loaders. `python -m comic.data build`."""
