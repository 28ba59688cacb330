"""Typed run settings: one dataclass per concern, and validation that reports every problem at once.

Every field is a command-line flag of the same name (``--num_experts 8``, built in cli.py). Each field's
``help`` metadata is its documentation: ``docs/configuration.md`` is checked against it by a test.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional, Union

REPO_ROOT = Path(__file__).resolve().parent.parent
DS_CONFIG_DIR = REPO_ROOT / "ds_configs"


def _flag(default, help: str, **kw):
    """A dataclass field whose help text documents it (CLI --help and docs/configuration.md)."""
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata={"help": help, **kw})
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class ModelConfig:
    """Where the model comes from."""

    model_name_or_path: Optional[str] = _flag(
        None, "A dense HF causal LM (local folder or hub id). Its weights are loaded and its FFNs upcycled into experts. "
        "A local Mixtral, Qwen2-MoE or Qwen3-MoE folder is imported instead: its experts and routers are loaded as they "
        "are (see docs/export.md).")
    model_config: Optional[str] = _flag(
        None, "Train from scratch from a config: a built-in preset name (tiny-llama, tiny-mistral, tiny-qwen2, tiny-qwen3, tiny-gpt2; see moe_models/model_source.py) or a config.json "
        "path. Used when --model_name_or_path is not given; defaults to the 'tiny-llama' preset.")
    tokenizer_name: Optional[str] = _flag(
        None, "Tokenizer to use instead of the model's own. Fresh models without one get the built-in byte-level "
        "tokenizer, saved with the outputs.")


@dataclass
class DataConfig:
    """What the model reads."""

    train_file: Optional[str] = _flag(None, "Training text: .txt, .json/.jsonl, .parquet or .csv. "
                                      "Without it (and without --dataset_name) the built-in synthetic corpus is used.")
    validation_file: Optional[str] = _flag(None, "Evaluation text, same formats. Without it a held-out split of the "
                                           "training data is used (--validation_split_percentage).")
    dataset_name: Optional[str] = _flag(None, "A dataset on the HF hub (needs network access).")
    dataset_config_name: Optional[str] = _flag(None, "The hub dataset's configuration name.")
    text_column: str = _flag("text", "Column that holds the text (ignored for .txt files).")
    block_size: int = _flag(128, "Tokens per training sequence; documents are concatenated and cut into blocks.")
    validation_split_percentage: int = _flag(5, "Percent of the training data held out for eval when there is no "
                                             "validation file or split.")
    synthetic_examples: int = _flag(20000, "Number of examples the built-in synthetic multi-domain corpus generates.")
    preprocessing_num_workers: Optional[int] = _flag(None, "Processes for tokenisation (datasets.map num_proc).")


@dataclass
class MoEConfig:
    """How dense FFNs become DeepSpeed MoE layers (names follow deepspeed.moe.layer.MoE)."""

    num_experts: Union[int, list[int]] = _flag(
        8, "Experts per MoE layer; several values give one count per MoE layer (pyramid MoE).")
    top_k: int = _flag(2, "Experts each token is routed to (DeepSpeed's k).")
    ep_size: int = _flag(1, "Expert-parallel size: ranks that share one copy of the experts; each rank holds "
                         "num_experts / ep_size experts per layer.")
    moe_layers: Union[str, list[int]] = _flag(
        "all", "Which transformer blocks get an MoE FFN: 'all', 'every:N' (blocks N-1, 2N-1, ...), or block indices "
        "such as '1,3,5'.")
    capacity_factor: float = _flag(1.0, "Training capacity per expert, as a multiple of the even share of tokens.")
    eval_capacity_factor: float = _flag(1.0, "Capacity factor in eval mode.")
    min_capacity: int = _flag(4, "Minimum tokens an expert can take, whatever the capacity factor.")
    drop_tokens: bool = _flag(True, "Drop tokens above an expert's capacity. false = dropless (capacity grows to "
                              "the busiest expert).")
    noisy_gate_policy: Optional[Literal["Jitter", "RSample"]] = _flag(
        None, "Noise on the router during training: Jitter (multiplicative on the input) or RSample (Gumbel).")
    use_rts: bool = _flag(True, "Random token selection when dropping (top-1 only).")
    top2_2nd_expert_sampling: bool = _flag(True, "Top-2 only: pick the second expert with Gumbel noise during "
                                           "training (DeepSpeed's default); false = deterministic top-2.")
    use_residual: bool = _flag(False, "Residual MoE: keep the dense FFN beside the experts and mix the two.")
    moe_impl: Literal["deepspeed", "grouped"] = _flag(
        "grouped", "Expert implementation inside the DeepSpeed MoE layer: 'deepspeed' = the stock layer as is; "
        "'grouped' = tokens sorted by expert with index operations and all local experts as one grouped GEMM "
        "(SwiGLU families, weights held stacked; others run their experts one by one), dropless without host syncs "
        "at ep_size 1. Same checkpoint files and names, so a checkpoint's weights load into either (the optimizer "
        "state needs --reset_optimizer; docs/architecture.md; speed: docs/performance.md).")
    aux_loss_coef: float = _flag(0.01, "Weight of the load-balancing loss added to the LM loss.")
    expert_init: Literal["copy", "copy_noise", "random"] = _flag(
        "copy", "How experts start: copies of the dense FFN (sparse upcycling), copies plus noise, or fresh random "
        "weights. The router always starts fresh.")
    expert_noise_std: float = _flag(0.01, "For expert_init=copy_noise: noise std relative to each weight's std.")

    def __post_init__(self):
        if isinstance(self.num_experts, list) and len(self.num_experts) == 1:
            self.num_experts = self.num_experts[0]


@dataclass
class TrainConfig:
    """The training loop, its schedule and its outputs."""

    output_dir: str = _flag("outputs/run", "Where metrics.jsonl, run_config.json, the tokenizer and checkpoints/ go.")
    overwrite_output_dir: bool = _flag(False, "Allow writing into an output_dir that already holds a run.")
    deepspeed: str = _flag("zero1", "DeepSpeed JSON config: a path, or a name in ds_configs/ (zero0, zero1, zero2). "
                           "Values set to \"auto\" are filled from the flags below.")
    per_device_train_batch_size: int = _flag(8, "Sequences per rank per micro-step.")
    per_device_eval_batch_size: int = _flag(8, "Sequences per rank per eval step.")
    gradient_accumulation_steps: int = _flag(1, "Micro-steps per optimizer step.")
    learning_rate: float = _flag(1e-3, "Peak learning rate (AdamW).")
    weight_decay: float = _flag(0.1, "AdamW weight decay (not applied to biases and norms).")
    warmup_steps: int = _flag(10, "Linear warmup steps (from 0) before the cosine decay; at least 1.")
    min_lr_ratio: float = _flag(0.1, "The cosine decay ends at learning_rate * min_lr_ratio.")
    max_steps: int = _flag(300, "Optimizer steps to train for.")
    max_grad_norm: float = _flag(1.0, "Gradient clipping norm (0 disables).")
    seed: int = _flag(42, "Seed for model init, data order and the synthetic corpus.")
    logging_steps: int = _flag(10, "Log training metrics every N steps.")
    eval_steps: int = _flag(100, "Evaluate every N steps (and at the end); 0 = only at the end.")
    max_eval_batches: int = _flag(20, "Cap on eval batches per rank per evaluation (0 = the whole eval set).")
    save_steps: int = _flag(0, "Save a DeepSpeed checkpoint every N steps; 0 = only at the end (and on SIGTERM/SIGUSR1).")
    save_total_limit: int = _flag(0, "Keep only the newest N checkpoints (never the one `latest` names); 0 = keep all.")
    resume_from_checkpoint: Optional[str] = _flag(
        None, "Continue a run: 'latest' (this output_dir's newest checkpoint; starts fresh if there is none, so "
        "a requeued job can always pass it), a checkpoints folder, or one tag folder (checkpoints/global_stepN).")
    reset_optimizer: bool = _flag(False, "When resuming at another world size, ep_size or moe_impl: load the weights "
                                  "and start a fresh optimizer state (the LR schedule continues).")
    disable_tqdm: bool = _flag(False, "Hide the progress bar (rank 0 shows one by default).")


@dataclass
class LogConfig:
    """Where metrics go beside metrics.jsonl, and what MFU is measured against (docs/metrics.md)."""

    report_to: Literal["none", "wandb"] = _flag(
        "none", "Also log to Weights & Biases (rank 0). Offline, with the `wandb sync` command printed, when no API "
        "key is set (WANDB_API_KEY or `wandb login`).")
    wandb_project: Optional[str] = _flag(None, "wandb project; default WANDB_PROJECT, else 'moe-models'.")
    wandb_entity: Optional[str] = _flag(None, "wandb entity (team or user); default WANDB_ENTITY, else your default.")
    wandb_run_name: Optional[str] = _flag(None, "wandb run name; default WANDB_NAME, else a generated name.")
    wandb_tags: Optional[str] = _flag(None, "Comma-separated wandb tags; default WANDB_TAGS.")
    peak_tflops: Optional[float] = _flag(
        None, "Peak TFLOPS of one device for `mfu`. Default: the bf16 dense peak of a known GPU (docs/metrics.md); "
        "without either, `mfu` is not reported.")


@dataclass
class RunConfig:
    """Everything one run needs; saved as run_config.json."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    moe: MoEConfig = field(default_factory=MoEConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    log: LogConfig = field(default_factory=LogConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


SECTION_TYPES = {"model": ModelConfig, "data": DataConfig, "moe": MoEConfig, "train": TrainConfig, "log": LogConfig}


class ConfigError(ValueError):
    """Raised once with every problem found, one per line, each saying how to fix it."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("Invalid settings:\n" + "\n".join(f"  - {p}" for p in problems))


def config_from_dict(values: dict) -> RunConfig:
    """Rebuild a RunConfig from run_config.json's nested dict; unknown sections or keys are refused."""
    unknown = set(values) - set(SECTION_TYPES)
    problems = [f"unknown section {name!r}; expected one of {sorted(SECTION_TYPES)}" for name in sorted(unknown)]
    sections = {}
    for section, cls in SECTION_TYPES.items():
        given = values.get(section, {})
        names = {f.name for f in dataclasses.fields(cls)}
        problems += [f"unknown key {section}.{k}" for k in sorted(set(given) - names)]
        sections[section] = cls(**{k: v for k, v in given.items() if k in names})
    if problems:
        raise ConfigError(problems)
    return RunConfig(**sections)


# ---------------------------------------------------------------------------------------------
# Validation: everything checkable before a model is built or a process group started.


def _positive(problems: list[str], cfg, names: tuple[str, ...], allow_zero: tuple[str, ...] = ()) -> None:
    for name in names:
        value = getattr(cfg, name)
        low = 0 if name in allow_zero else 1
        if value is not None and value < low:
            problems.append(f"{name} ({value}) must be >= {low}")


def resolve_moe_layers(spec: Union[str, list[int]], num_layers: int) -> list[int]:
    """Turn 'all' / 'every:N' / '1,3,5' / [1, 3, 5] into sorted block indices; raise ValueError when malformed."""
    if isinstance(spec, (list, tuple)):
        indices = [int(i) for i in spec]
    elif spec == "all":
        indices = list(range(num_layers))
    elif spec.startswith("every:"):
        try:
            step = int(spec.split(":", 1)[1])
        except ValueError:
            raise ValueError(f"moe_layers {spec!r}: N in 'every:N' must be an integer, e.g. 'every:2'") from None
        if step < 1:
            raise ValueError(f"moe_layers {spec!r}: N in 'every:N' must be >= 1")
        indices = list(range(step - 1, num_layers, step))
    else:
        try:
            indices = [int(part) for part in spec.replace(" ", "").split(",") if part]
        except ValueError:
            raise ValueError(f"moe_layers {spec!r} is not 'all', 'every:N' or comma-separated block indices "
                             "such as '1,3,5'") from None
    bad = [i for i in indices if not 0 <= i < num_layers]
    if bad:
        raise ValueError(f"moe_layers {spec!r} names blocks {bad}, but the model has blocks 0..{num_layers - 1}")
    if not indices:
        raise ValueError(f"moe_layers {spec!r} selects no block; the model has {num_layers} blocks")
    if len(set(indices)) != len(indices):
        raise ValueError(f"moe_layers {spec!r} names a block twice")
    return sorted(indices)


def moe_problems(moe: MoEConfig) -> list[str]:
    """Problems in MoE settings alone (no model or world needed)."""
    problems: list[str] = []
    counts = moe.num_experts if isinstance(moe.num_experts, list) else [moe.num_experts]
    for count in counts:
        if count < 1:
            problems.append(f"num_experts ({count}) must be >= 1")
            continue
        if moe.ep_size >= 1 and count % moe.ep_size:
            problems.append(f"num_experts ({count}) must be divisible by ep_size ({moe.ep_size}): "
                            f"pick num_experts as a multiple of {moe.ep_size} or an ep_size that divides {count}")
        if moe.top_k > count:
            problems.append(f"top_k ({moe.top_k}) must be <= num_experts ({count})")
    _positive(problems, moe, ("top_k", "ep_size"))
    _positive(problems, moe, ("min_capacity",), allow_zero=("min_capacity",))
    for name in ("capacity_factor", "eval_capacity_factor"):
        if getattr(moe, name) <= 0:
            problems.append(f"{name} ({getattr(moe, name)}) must be > 0")
    if moe.aux_loss_coef < 0:
        problems.append(f"aux_loss_coef ({moe.aux_loss_coef}) must be >= 0")
    if moe.expert_noise_std < 0:
        problems.append(f"expert_noise_std ({moe.expert_noise_std}) must be >= 0")
    if moe.noisy_gate_policy not in (None, "Jitter", "RSample"):
        problems.append(f"noisy_gate_policy ({moe.noisy_gate_policy!r}) must be None, 'Jitter' or 'RSample'")
    if moe.expert_init not in ("copy", "copy_noise", "random"):
        problems.append(f"expert_init ({moe.expert_init!r}) must be 'copy', 'copy_noise' or 'random'")
    if isinstance(moe.moe_layers, str) and moe.moe_layers != "all":
        try:  # shape only; indices are checked against the model once its depth is known
            resolve_moe_layers(moe.moe_layers, num_layers=10**6)
        except ValueError as err:
            problems.append(str(err))
    return problems


def resolve_deepspeed_config_path(name_or_path: str) -> Path:
    """'zero2' -> ds_configs/zero2.json; an existing path is returned as is."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    shipped = DS_CONFIG_DIR / f"{name_or_path}.json"
    if shipped.is_file():
        return shipped
    raise FileNotFoundError(name_or_path)


def shipped_deepspeed_configs() -> list[str]:
    return sorted(p.stem for p in DS_CONFIG_DIR.glob("*.json"))


def validate(cfg: RunConfig, world_size: int = 1) -> None:
    """Check every setting that can be checked before anything heavy starts; raise one ConfigError listing all.

    ``world_size`` is the number of ranks the launcher started (1 for ``python train.py``).
    """
    from .model_source import PRESETS  # local import: it imports transformers

    problems = moe_problems(cfg.moe)
    model, data, train = cfg.model, cfg.data, cfg.train
    if cfg.moe.ep_size >= 1 and world_size % cfg.moe.ep_size:
        problems.append(f"ep_size ({cfg.moe.ep_size}) must divide the number of ranks ({world_size}): "
                        + (f"launch with `deepspeed --num_gpus {cfg.moe.ep_size} train.py ...`" if world_size == 1
                           else f"use an ep_size that divides {world_size}"))

    if model.model_name_or_path and model.model_config:
        problems.append("give either --model_name_or_path (upcycle a trained model) or --model_config "
                        "(train from scratch), not both")
    if model.model_config and model.model_config not in PRESETS and not Path(model.model_config).is_file():
        problems.append(f"model_config {model.model_config!r} is neither a built-in preset "
                        f"({', '.join(sorted(PRESETS))}) nor an existing config.json file")
    if model.model_name_or_path and model.model_name_or_path.startswith((".", "/", "~")) and \
            not Path(model.model_name_or_path).expanduser().exists():
        problems.append(f"model_name_or_path {model.model_name_or_path!r} does not exist; give a model folder "
                        "(with config.json) or a hub id")

    if data.train_file and data.dataset_name:
        problems.append("give either --train_file or --dataset_name, not both")
    for name in ("train_file", "validation_file"):
        path = getattr(data, name)
        if path is None:
            continue
        if not Path(path).is_file():
            problems.append(f"{name} {path!r} does not exist")
        elif Path(path).suffix.lower() not in (".txt", ".text", ".json", ".jsonl", ".parquet", ".csv"):
            problems.append(f"{name} {path!r}: unsupported extension {Path(path).suffix!r}; "
                            "use .txt, .json, .jsonl, .parquet or .csv")
    if data.validation_file and not (data.train_file or data.dataset_name):
        problems.append("--validation_file needs --train_file or --dataset_name (the built-in corpus has its own "
                        "held-out split)")
    _positive(problems, data, ("block_size", "synthetic_examples"))
    if not 0 < data.validation_split_percentage < 100:
        problems.append(f"validation_split_percentage ({data.validation_split_percentage}) must be in 1..99")

    _positive(problems, train, ("per_device_train_batch_size", "per_device_eval_batch_size",
                                "gradient_accumulation_steps", "max_steps", "logging_steps"))
    _positive(problems, train, ("eval_steps", "save_steps", "max_eval_batches", "save_total_limit"),
              allow_zero=("eval_steps", "save_steps", "max_eval_batches", "save_total_limit"))
    resume = train.resume_from_checkpoint
    if resume and resume != "latest" and not Path(resume).is_dir():
        problems.append(f"resume_from_checkpoint {resume!r} does not exist; give 'latest', a checkpoints folder or "
                        "a tag folder")
    if train.warmup_steps < 1:
        problems.append(f"warmup_steps ({train.warmup_steps}) must be >= 1 (DeepSpeed's WarmupCosineLR needs at "
                        "least one warmup step); use 1 for the shortest warmup")
    if train.learning_rate <= 0:
        problems.append(f"learning_rate ({train.learning_rate}) must be > 0")
    if train.max_grad_norm < 0:
        problems.append(f"max_grad_norm ({train.max_grad_norm}) must be >= 0")
    if cfg.log.peak_tflops is not None and cfg.log.peak_tflops <= 0:
        problems.append(f"peak_tflops ({cfg.log.peak_tflops}) must be > 0, or leave it out")
    if not 0 <= train.min_lr_ratio <= 1:
        problems.append(f"min_lr_ratio ({train.min_lr_ratio}) must be in [0, 1]")
    try:
        resolve_deepspeed_config_path(train.deepspeed)
    except FileNotFoundError:
        problems.append(f"deepspeed config {train.deepspeed!r} is neither a file nor a shipped config "
                        f"({', '.join(shipped_deepspeed_configs())})")
    output = Path(train.output_dir)
    if output.is_file():
        problems.append(f"output_dir {train.output_dir!r} is a file; give a folder")
    elif (output / "run_config.json").exists() and not (train.overwrite_output_dir or resume):
        problems.append(f"output_dir {train.output_dir!r} already holds a run; pass --resume_from_checkpoint latest "
                        "to continue it, --overwrite_output_dir to start over in it, or choose another --output_dir")

    if problems:
        raise ConfigError(problems)


def save_run_config(cfg: RunConfig, path: Path, extra: Optional[dict] = None) -> None:
    payload = cfg.to_dict()
    if extra:
        payload["resolved"] = extra
    path.write_text(json.dumps(payload, indent=2, sort_keys=False) + "\n")
