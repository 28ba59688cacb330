"""What one run is, below every other part of the package: its settings (config.py), their command line (cli.py),
its process world (distributed.py), its MoE layout (moe_layout.py) and its output folder with every file in it
(folder.py, checkpoint_folder.py). Imports nothing of the package above it."""
