"""Tools that compose the whole compiler for one job: `diff` (where two implementations of a model part ways,
layer by layer) and `export` (any source written back as a Hugging Face checkpoint)."""
