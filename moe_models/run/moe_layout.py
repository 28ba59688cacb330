"""The MoE shape of a run, resolved once: which transformer blocks get an MoE FFN, how many experts each, how wide an
expert is, the shared experts, and how many experts each expert-parallel rank holds.

``MoELayout`` is the one answer to "what do the MoE layers look like": surgery builds them from it, train.py saves it
in run_config.json (``resolved.moe_layout``), and the preflight plan, export, import, the resume checks and the
shared experts read it. The checks of the MoE settings live in moe/checks.py.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Union

from .config import ConfigError, MoEConfig

# --moe_layers for no MoE layer: the dense model trained as it is (the control run of a payoff comparison).
NO_MOE_LAYERS = "none"


@dataclass(frozen=True)
class MoELayout:
    """MoE layer i sits in transformer block ``blocks[i]`` and has ``num_experts[i]`` experts (model order, which
    is also DeepSpeed's numbering of MoE layers in checkpoint file names).

    ``granularity`` G: every routed expert holds 1/G of the dense FFN's hidden units (G > 1 only for
    ``--expert_init granular``). ``num_shared_experts`` N shared experts are each as wide as a routed expert.
    ``ep_size``: each rank holds num_experts[i] / ep_size experts of layer i (``local_experts``); each of DeepSpeed's
    expert-parallel groups (ep_size consecutive ranks) holds every expert once.
    """

    blocks: tuple[int, ...]
    num_experts: tuple[int, ...]
    granularity: int = 1
    num_shared_experts: int = 0
    ep_size: int = 1

    @classmethod
    def resolve(cls, moe: MoEConfig, num_blocks: int) -> MoELayout:
        """The layout ``moe`` gives a model of ``num_blocks`` blocks; a ConfigError when its --moe_layers or
        --num_experts do not fit the model."""
        try:
            blocks = resolve_moe_layers(moe.moe_layers, num_blocks)
        except ValueError as err:
            raise ConfigError([str(err)]) from None
        counts = expert_counts(moe)
        if len(counts) == 1:
            counts = counts * len(blocks)
        if len(counts) != len(blocks):
            raise ConfigError([f"num_experts lists {len(counts)} counts but moe_layers selects {len(blocks)} "
                               "blocks; give one count per MoE layer or a single count"])
        return cls(tuple(blocks), tuple(counts), **_width_and_parallelism(moe))

    @classmethod
    def of_layer(cls, moe: MoEConfig, num_experts: int) -> MoELayout:
        """The layout of one MoE layer of ``num_experts`` experts built with ``moe`` (what a layer alone knows)."""
        return cls((0,), (num_experts,), **_width_and_parallelism(moe))

    # -- per layer and per rank --------------------------------------------------------------------------------

    @property
    def uniform_num_experts(self) -> int | None:
        """The expert count when every MoE layer has the same one (what HF MoE classes need), else None."""
        return self.num_experts[0] if len(set(self.num_experts)) == 1 else None

    @property
    def is_dense(self) -> bool:
        """No MoE layer (``--moe_layers none``): the dense model trained as it is."""
        return not self.blocks

    @property
    def local_experts(self) -> tuple[int, ...]:
        """The experts of each MoE layer one rank holds."""
        return tuple(count // self.ep_size for count in self.num_experts)

    def expert_width(self, dense_width: int) -> int:
        """An expert's hidden units, for a dense FFN of ``dense_width``: all of them, or 1/G with granular experts.
        A shared expert is as wide."""
        return dense_width // self.granularity

    @property
    def shared_copies(self) -> int:
        """How many copies of the dense FFN the N shared experts hold together (N, or N / G with granular experts)."""
        return self.num_shared_experts // self.granularity

    # -- run_config.json ---------------------------------------------------------------------------------------

    def to_dict(self) -> dict:
        return {key: list(value) if isinstance(value, tuple) else value for key, value in asdict(self).items()}

    @classmethod
    def from_dict(cls, values: dict, moe: MoEConfig) -> MoELayout:
        """A saved layout. Fields it lacks (a layout saved before they were recorded held only the blocks and the
        expert counts) come from the run's settings ``moe``, by the rule ``resolve`` applies."""
        known = {f.name for f in fields(cls)}
        saved = {key: tuple(value) if isinstance(value, list) else value for key, value in values.items()
                 if key in known}
        if "num_experts" not in saved:
            counts = expert_counts(moe)
            saved["num_experts"] = tuple(counts * len(saved["blocks"]) if len(counts) == 1 else counts)
        return cls(**{**_width_and_parallelism(moe), **saved})


def expert_counts(moe: MoEConfig) -> list[int]:
    """--num_experts as a list: one count, or one per MoE layer (pyramid MoE)."""
    return list(moe.num_experts) if isinstance(moe.num_experts, (list, tuple)) else [moe.num_experts]


def _width_and_parallelism(moe: MoEConfig) -> dict:
    """What the settings say beside the blocks and counts: the granularity (1 unless --expert_init granular), the
    shared experts and ep_size."""
    granularity = moe.granularity if moe.expert_init == "granular" else 1
    return {"granularity": granularity, "num_shared_experts": moe.num_shared_experts, "ep_size": moe.ep_size}


def resolve_moe_layers(spec: Union[str, list[int]], num_layers: int) -> list[int]:
    """Turn 'all' / 'every:N' / '1,3,5' / [1, 3, 5] into sorted block indices, and 'none' into []; raise ValueError
    when malformed."""
    if isinstance(spec, (list, tuple)):
        indices = [int(i) for i in spec]
    elif spec == NO_MOE_LAYERS:
        return []
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
            raise ValueError(f"moe_layers {spec!r} is not 'all', 'every:N', 'none' or comma-separated block "
                             "indices such as '1,3,5'") from None
    bad = [i for i in indices if not 0 <= i < num_layers]
    if bad:
        raise ValueError(f"moe_layers {spec!r} names blocks {bad}, but the model has blocks 0..{num_layers - 1}")
    if not indices:
        raise ValueError(f"moe_layers {spec!r} selects no block; the model has {num_layers} blocks (for a dense "
                         f"run without MoE layers say so: --moe_layers {NO_MOE_LAYERS})")
    if len(set(indices)) != len(indices):
        raise ValueError(f"moe_layers {spec!r} names a block twice")
    return sorted(indices)
