"""Train a Mixture-of-Experts language model on DeepSpeed: the script form of the `moe-train` command.

    python train.py                                  # tiny Llama-MoE on the built-in corpus (CPU or 1 GPU)
    python train.py --model_name_or_path PATH ...    # upcycle a dense HF model, or continue an HF MoE model
    deepspeed --num_gpus 8 train.py --ep_size 4 ...  # expert + data parallel

The code lives in moe_models/train.py (installed as `moe-train`, also `python -m moe_models.train`); the names
below are what scripts and tests import from here.
"""

from moe_models.train import build, main, parse_args

__all__ = ["build", "main", "parse_args"]

if __name__ == "__main__":
    main()
