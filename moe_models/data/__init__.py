"""What the model reads: the synthetic corpus, text loading and packing into blocks, per-rank batches."""
