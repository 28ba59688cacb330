"""Where the dense model comes from: a trained HF model (upcycled), a config.json, or a built-in preset."""

from __future__ import annotations

import json
from pathlib import Path

import torch
import transformers
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig, PreTrainedModel
from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

from ..run.config import ModelConfig
from .architectures import ARCHITECTURES, architecture_of_config
from .discovery import counts_experts
from .hub import unreachable_hub_problem
from .tokenization import BYTE_VOCAB_SIZE

DEFAULT_PRESET = "tiny-llama"

_TINY = dict(vocab_size=BYTE_VOCAB_SIZE, hidden_size=128, intermediate_size=256, num_hidden_layers=4,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=True,
             bos_token_id=BYTE_VOCAB_SIZE - 1, eos_token_id=BYTE_VOCAB_SIZE - 1, pad_token_id=BYTE_VOCAB_SIZE - 1)

# Small configs for from-scratch runs and tests; sized for a 2-core CPU (see docs/quickstart.md).
PRESETS: dict[str, dict] = {
    "tiny-llama": dict(model_type="llama", **_TINY),
    "tiny-mistral": dict(model_type="mistral", sliding_window=None, **_TINY),
    "tiny-qwen2": dict(model_type="qwen2", **_TINY),
    "tiny-qwen3": dict(model_type="qwen3", head_dim=32, **_TINY),
    "tiny-gpt2": dict(model_type="gpt2", vocab_size=BYTE_VOCAB_SIZE, n_embd=128, n_inner=256, n_layer=4, n_head=4,
                      n_positions=512, bos_token_id=BYTE_VOCAB_SIZE - 1, eos_token_id=BYTE_VOCAB_SIZE - 1,
                      resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0),
}


def preset_config(name: str) -> PretrainedConfig:
    values = dict(PRESETS[name])
    return AutoConfig.for_model(values.pop("model_type"), **values)


def resolve_model_config(model: ModelConfig) -> PretrainedConfig:
    """The HF config of a from-scratch model: a preset name, or a config.json path."""
    source = model.model_config or DEFAULT_PRESET
    if source in PRESETS:
        return preset_config(source)
    return AutoConfig.from_pretrained(source)


def model_source_text(model: ModelConfig, dtype: torch.dtype) -> str:
    """What ``load_dense_model`` loads or builds, and from where, for the line that says start-up waits for it."""
    dtype_name = str(dtype).removeprefix("torch.")
    if model.model_name_or_path:
        path = model.model_name_or_path
        where = "a local folder" if Path(path).is_dir() else "a hub id: the hub or its local cache"
        return f"loading the dense model {path} ({where}) in {dtype_name}, every rank reading its weights"
    return f"building the model {model.model_config or DEFAULT_PRESET} from its config in {dtype_name}"


def load_dense_model(model: ModelConfig, vocab_needed: int, dtype: torch.dtype = torch.float32) -> PreTrainedModel:
    """Load (upcycling) or build (from scratch) the dense causal LM in ``dtype`` (the training dtype), ready for
    surgery. transformers memory-maps a folder's safetensors and casts each tensor as it is loaded, so the host
    holds the dense model once, in ``dtype``; surgery then adds only this rank's experts.

    The global torch seed must be set before calling: from-scratch weights come from it.
    """
    if model.model_name_or_path:
        try:
            dense = AutoModelForCausalLM.from_pretrained(model.model_name_or_path, dtype=dtype)
        except OSError as err:
            unreachable = unreachable_hub_problem(model.model_name_or_path, err, "--model_name_or_path")
            if unreachable:
                raise ValueError(f"could not load the model: {unreachable}") from None
            raise ValueError(f"could not load a causal LM from {model.model_name_or_path!r}: {err}. Give a folder "
                             "with config.json and weights, or a hub id (the hub needs network access; "
                             "HF_HUB_OFFLINE=1 forbids it).") from err
        except RuntimeError as err:
            if "mismatched_sizes" not in str(err):
                raise
            raise ValueError(f"the weights in {model.model_name_or_path!r} have other shapes than its config.json "
                             "says (the load report above lists them): that config.json does not belong to these "
                             "weights; put back the config.json saved with them") from None
    else:
        dense = AutoModelForCausalLM.from_config(resolve_model_config(model), dtype=dtype)
    check_vocabulary(dense, vocab_needed)
    return dense


def check_vocabulary(model: PreTrainedModel, vocab_needed: int) -> None:
    """The model must embed every token id the tokenizer produces."""
    vocab = model.get_input_embeddings().num_embeddings
    if vocab < vocab_needed:
        raise ValueError(f"the model's vocabulary ({vocab}) is smaller than the tokenizer's ({vocab_needed}); "
                         "use the model's own tokenizer or a config with a larger vocab_size")


def model_problems(model: ModelConfig, block_size: int) -> list[str]:
    """Problems in the model settings that show before anything is loaded: the source exists, is a family this
    project converts, has weights when it is to be upcycled, and has positions for ``block_size`` tokens."""
    problems = []
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
    folder = Path(model.model_name_or_path).expanduser() if model.model_name_or_path else None
    if problems or (folder and folder.is_dir() and not (folder / "config.json").is_file()):
        return problems or [f"model folder {str(folder)!r} has no config.json; give a folder written by "
                            "save_pretrained (config.json and weights)"]
    config, where = local_config(model)
    if config is None:  # a hub id: checked when it loads
        return []
    problems += family_problems(config, where)
    if not problems and folder and folder.is_dir():
        problems += weight_problems(folder)
    return problems + position_problems(config, where, block_size)


# What from_pretrained reads weights from (single files or sharded with an index).
WEIGHT_PATTERNS = ("*.safetensors", "*.safetensors.index.json", "pytorch_model*.bin", "pytorch_model.bin.index.json")


def weight_problems(folder: Path) -> list[str]:
    """A local --model_name_or_path folder is read for its weights."""
    if not any(next(folder.glob(pattern), None) for pattern in WEIGHT_PATTERNS):
        return [f"model folder {str(folder)!r} has config.json but no weights (model.safetensors or "
                "pytorch_model.bin); copy the weights into it, or pass --model_config "
                f"{folder / 'config.json'} instead to train that architecture from scratch"]
    return []


def local_config(model: ModelConfig) -> tuple[dict | None, str]:
    """The model's config as a dict and where it comes from, when it is local (a preset, a config.json, a model
    folder); (None, "") for a hub id, which is only read when the model loads."""
    if model.model_name_or_path:
        path = Path(model.model_name_or_path).expanduser() / "config.json"
    else:
        source = model.model_config or DEFAULT_PRESET
        if source in PRESETS:
            return PRESETS[source], f"the {source} preset"
        path = Path(source)
    if not path.is_file():
        return None, ""
    try:
        return json.loads(path.read_text()), str(path)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        return {"model_type": None, "_error": f"{path} is not valid JSON: {err}"}, str(path)


def family_problems(config: dict, where: str) -> list[str]:
    """The model is a family surgery converts (listed, or a decoder-only causal LM whose block FFN inspection finds:
    checked on the meta device) or an HF MoE folder, continued in place."""
    if "_error" in config:
        return [config["_error"] + "; give a config.json written by save_pretrained"]
    model_type = config.get("model_type")
    if model_type in ARCHITECTURES:
        return []
    if model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and counts_experts(config):
        return []  # an MoE to continue in place (hf/in_place_run.py): its family's probe decides at the build
    if model_type not in CONFIG_MAPPING_NAMES:
        return [f"model type {model_type!r} ({where}) is unknown to transformers {transformers.__version__}; give "
                "a config.json of a transformers family (docs/models.md lists those that convert), or upgrade "
                "transformers if the family is newer"]
    if model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        return [f"model type {model_type!r} ({where}) has no causal-LM class in transformers "
                "(AutoModelForCausalLM), so it is not a decoder that surgery can convert; docs/models.md lists the "
                "families that convert"]
    try:
        values = {k: v for k, v in config.items() if k != "model_type"}
        architecture_of_config(AutoConfig.for_model(model_type, **values))
    except Exception as err:  # noqa: BLE001 - transformers' own refusal of the config is the reason too
        return [f"{str(err).rstrip('.')} (config: {where})."]
    return []


def position_problems(config: dict, where: str, block_size: int) -> list[str]:
    """A block must fit the model's position table (max_position_embeddings, or n_positions for GPT-2)."""
    name = next((n for n in ("max_position_embeddings", "n_positions") if isinstance(config.get(n), int)), None)
    if name is None or block_size <= config[name]:
        return []
    return [f"block_size ({block_size}) is longer than the model's {config[name]} positions ({name} of {where}); "
            f"use --block_size {config[name]} or less"]
