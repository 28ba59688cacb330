"""Native Hugging Face MoE classes: one adapter per family (weight names both ways), the configs both ways and
what is refused, export of a DeepSpeed checkpoint, and import of an HF MoE folder to train it further."""
