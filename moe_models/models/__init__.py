"""The dense model: the architecture table (where each family's blocks and FFN live), model sources (presets,
config files, trained models) and tokenizers."""
