"""Training: validation of every setting, the DeepSpeed config (shipped JSON as package data), the preflight plan,
the engine loop, a checkpoint tag's contents, the non-finite guard and clean preemption; MoETrainer, the same MoE step
in the stock transformers Trainer."""
