"""``python -m moe_models.export``: the command that writes a checkpoint as a native HF MoE model (hf/export.py)."""

from .hf.export import main

if __name__ == "__main__":
    main()
