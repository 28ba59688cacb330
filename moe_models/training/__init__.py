"""Training: validation of every setting, the DeepSpeed config (shipped JSON as package data), the engine loop,
checkpoints (one folder object owning tags, `latest`, completeness and retention) and clean preemption."""
