"""Native Hugging Face MoE classes: export of a DeepSpeed checkpoint to them (one adapter per class for the weights'
names, the configs and what is refused), and any HF MoE folder continued in place, in its own class."""
