"""Step 3 of an MoE forward: this rank's experts run on their rows (grouped by local expert, with a count each).

- ``StackedExperts``: bias-free gated experts whose activation DeepSpeed's registry has (SwiGLU, GeGLU-tanh), held
  stacked in DeepSpeed's own ``GroupedExperts`` (``deepspeed.moe.ep_experts``: [L, F, D] and [L, D, F] weights run as
  grouped GEMMs without copying them).
- ``GroupedFFNExperts``: every other FFN form grouped GEMMs can run (moe/ffn_form.py): fused gate_up projections,
  biases (added per route, by the route's expert), GPT-2's Conv1D, plain FFNs, the family's own activation.
- ``ExpertLoop``: any other FFN keeps its modules (DeepSpeed's list, under its name) and runs them one by one.

The grouped holders keep the per-expert state-dict names of the module list they replace
(``deepspeed_experts.{i}.{projection}.weight`` and ``.bias``), so DeepSpeed's checkpoints (one file per global
expert), resharding and export see the stock layer's names and tensors. ``local_experts`` picks one for a DeepSpeed
``Experts`` module. Shape letters: moe/__init__.py.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
from deepspeed.moe.ep_experts import GroupedExperts
from deepspeed.moe.experts import Experts
from torch import nn

from ..run.distributed import launched_rank
from .ffn_form import FFNForm, ffn_form, is_conv1d

_ANNOUNCED: set[str] = set()  # FFN classes whose fallback to the loop was said


def local_experts(experts: Experts, ffn_projections: Optional[tuple[tuple[str, ...], str]],
                  expert_group_name: str) -> nn.Module:
    """The grouped form of DeepSpeed's ``Experts`` when grouped GEMMs can express its FFN, else the loop (said once
    per FFN class on the console)."""
    expert = experts.deepspeed_experts[0]
    form = ffn_form(expert, ffn_projections) if ffn_projections else "its projections are not known"
    if isinstance(form, FFNForm) and not hasattr(torch, "_grouped_mm"):
        form = "this torch has no grouped GEMM (torch._grouped_mm)"
    if isinstance(form, FFNForm) and not _aligned(expert, form):
        form = "its sizes are not multiples of 8 (grouped GEMMs need 16-byte aligned rows)"
    if not isinstance(form, FFNForm):
        _announce_loop(type(expert).__name__, form)
        return ExpertLoop(experts)
    if _deepspeed_grouped_fits(expert, form):
        return StackedExperts(experts.deepspeed_experts, form, expert_group_name)
    return GroupedFFNExperts(experts.deepspeed_experts, form, expert_group_name)


def _announce_loop(ffn_class: str, reason: str) -> None:
    if ffn_class not in _ANNOUNCED and launched_rank() == 0:
        print(f"note: the experts of {ffn_class} run one after the other (--moe_impl grouped has no grouped GEMM "
              f"form for it: {reason})", flush=True)
    _ANNOUNCED.add(ffn_class)


def _aligned(expert: nn.Module, form: FFNForm) -> bool:
    # 8 elements = 16 bytes in bf16 (fp32 needs 4), so the check holds in either training dtype
    return all(size % 8 == 0 for name in form.projections for size in getattr(expert, name).weight.shape)


def _deepspeed_grouped_fits(expert: nn.Module, form: FFNForm) -> bool:
    """DeepSpeed's GroupedExperts: separate bias-free nn.Linear gate and up projections, a registered activation."""
    layers = [getattr(expert, name) for name in form.projections]
    return form.gated and len(form.inputs) == 2 and form.activation is not None and \
        all(isinstance(layer, nn.Linear) and layer.bias is None for layer in layers)


def per_expert_key(i: int, projection: str) -> str:
    """State-dict key, relative to the experts module, of local expert i's ``projection`` weight: the stock
    ``Experts`` module's name, which every expert holder here keeps."""
    return per_expert_name(i, f"{projection}.weight")


def per_expert_name(i: int, name_in_expert: str) -> str:
    """State-dict key, relative to the experts module, of local expert i's parameter ``name_in_expert``."""
    return f"deepspeed_experts.{i}.{name_in_expert}"


class StackedExperts(GroupedExperts):
    """DeepSpeed's ``GroupedExperts`` made from a list of gated expert modules (bias-free nn.Linear projections, an
    activation of DeepSpeed's registry), under their names in state dicts.

    ``w1`` (gate) and ``w3`` (up) are [L, F, D], ``w2`` (down) [L, D, F]: local expert i's weights are the i-th
    slices, so no step copies them. The parameters carry DeepSpeed's expert flags (``allreduce=False``, the expert
    group's name), so the engine reduces and clips their gradients as it does the stock layer's. State dicts show
    the stock layer's keys, ``deepspeed_experts.{i}.{projection}.weight`` per local expert, and take them back.
    """

    STACKED = ("w1", "w3", "w2")  # GroupedExperts' parameters for the (gate, up, down) projections

    def __init__(self, experts: nn.ModuleList, form: FFNForm, expert_group_name: str):
        projections = form.projections
        gate = getattr(experts[0], projections[0])
        with torch.device("meta"):  # GroupedExperts allocates its own weights; they are replaced just below
            super().__init__(gate.in_features, gate.out_features, len(experts), activation=form.activation)
        self.projections = projections
        for stacked, projection in zip(self.STACKED, projections):
            with torch.no_grad():
                weight = torch.stack([getattr(expert, projection).weight for expert in experts])
            setattr(self, stacked, nn.Parameter(weight, requires_grad=gate.weight.requires_grad))
            param = getattr(self, stacked)  # flags after registering: accelerate's meta init re-creates it there
            param.allreduce, param.group_name, param.is_expert_group = False, expert_group_name, True
        self.register_state_dict_post_hook(_per_expert_state)
        self.register_load_state_dict_pre_hook(_stacked_state)

    def stacked_names(self) -> dict[str, str]:
        """Each stacked parameter's name -> its name in one expert module (``gate_proj.weight``)."""
        return {stacked: f"{projection}.weight" for stacked, projection in zip(self.STACKED, self.projections)}

    def per_expert_keys(self, stacked: str) -> list[str]:
        """The state-dict keys (relative to this module) of the local experts' slices of parameter ``stacked``."""
        return [per_expert_name(i, self.stacked_names()[stacked]) for i in range(self.num_experts)]

    def expert_weights(self, i: int, of: Callable = lambda param: param) -> dict[str, torch.Tensor]:
        """Local expert i's slice of ``of(parameter)`` (default: the weights, as views) for each of its weights,
        named as in its module, in its order: gate, up, down."""
        return {f"{projection}.weight": of(getattr(self, stacked))[i]
                for stacked, projection in zip(self.STACKED, self.projections)}


def _per_expert_state(module: nn.Module, state_dict: dict, prefix: str, local_metadata) -> None:
    """state_dict hook: the stacked parameters become one entry per (local expert, projection), in module order."""
    names = module.stacked_names()
    stacked = {name: state_dict.pop(prefix + name) for name in names}
    for i in range(module.num_experts):
        for name, in_expert in names.items():
            state_dict[prefix + per_expert_name(i, in_expert)] = stacked[name][i]


def _stacked_state(module: nn.Module, state_dict: dict, prefix: str, *args) -> None:
    """load_state_dict pre-hook: per-expert entries are stacked back (a missing one fails a strict load)."""
    for name, in_expert in module.stacked_names().items():
        keys = [prefix + per_expert_name(i, in_expert) for i in range(module.num_experts)]
        if all(key in state_dict for key in keys):
            state_dict[prefix + name] = torch.stack([state_dict.pop(key) for key in keys])


class GroupedFFNExperts(nn.Module):
    """The local experts of any FFN form (moe/ffn_form.py) as grouped GEMMs: each projection's weight (and bias)
    stacked over the L local experts, [L, *its shape], in its module's own layout (Conv1D's [in, out] too), so an
    expert's weights are the i-th slices and state dicts show the stock per-expert keys.

    Biases are added per route: row n gets the bias of the expert it was dispatched to. Parameters carry DeepSpeed's
    expert flags (``allreduce=False``, the expert group's name), as ``StackedExperts``' do.
    """

    def __init__(self, experts: nn.ModuleList, form: FFNForm, expert_group_name: str):
        super().__init__()
        self.form, self.num_experts = form, len(experts)
        self.act_fn = form.act_fn if isinstance(form.act_fn, nn.Module) else None  # parameter-free (ffn_form)
        self.transposed = {name: is_conv1d(getattr(experts[0], name)) for name in form.projections}
        self.weight, self.bias = nn.ParameterDict(), nn.ParameterDict()
        for name in form.projections:
            for kind, holder in (("weight", self.weight), ("bias", self.bias)):
                if getattr(getattr(experts[0], name), kind, None) is None:
                    continue
                params = [getattr(getattr(expert, name), kind) for expert in experts]
                with torch.no_grad():
                    holder[name] = nn.Parameter(torch.stack(params), requires_grad=params[0].requires_grad)
                param = holder[name]
                param.allreduce, param.group_name, param.is_expert_group = False, expert_group_name, True
        self.register_state_dict_post_hook(_per_expert_state)
        self.register_load_state_dict_pre_hook(_stacked_state)

    def stacked_names(self) -> dict[str, str]:
        """Each stacked parameter's name -> its name in one expert module (``c_fc.bias``)."""
        return {f"{kind}.{name}": f"{name}.{kind}" for kind, holder in (("weight", self.weight), ("bias", self.bias))
                for name in holder}

    def expert_weights(self, i: int, of: Callable = lambda param: param) -> dict[str, torch.Tensor]:
        """Local expert i's slice of ``of(parameter)`` for each of its parameters, named as in its module, in module
        order (weights and biases)."""
        params = dict(self.named_parameters())
        return {in_expert: of(params[name])[i] for name, in_expert in self.stacked_names().items()}

    def forward(self, x_ND: torch.Tensor, counts_L: torch.Tensor) -> torch.Tensor:
        offsets_L = torch.cumsum(counts_L, dim=0, dtype=torch.int32)
        # each row's local expert; rows past the last offset (padding) get L, whose bias is zero
        expert_N = torch.bucketize(torch.arange(x_ND.shape[0], device=x_ND.device), offsets_L, right=True)
        projected = [self._project(name, x_ND, offsets_L, expert_N) for name in self.form.inputs]
        out_ND = self._project(self.form.output, self.form.hidden_units(projected), offsets_L, expert_N)
        return torch.where((expert_N < self.num_experts).unsqueeze(-1), out_ND, 0.0)

    def _project(self, name: str, x_NI: torch.Tensor, offsets_L: torch.Tensor, expert_N: torch.Tensor) -> torch.Tensor:
        weight = self.weight[name].to(x_NI.dtype)
        weight_LIO = weight if self.transposed[name] else weight.transpose(-2, -1)
        y_NO = torch._grouped_mm(x_NI, weight_LIO, offs=offsets_L)
        if name in self.bias:
            bias = self.bias[name].to(x_NI.dtype)
            bias_with_padding = torch.cat([bias, bias.new_zeros(1, bias.shape[-1])])
            y_NO = y_NO + bias_with_padding[expert_N]
        return y_NO


class ExpertLoop(nn.Module):
    """Each local expert module on its rows, one after the other: for FFNs no grouped form expresses (a learnable
    activation, unaligned sizes, a forward that is neither gated nor plain). Holds DeepSpeed's module list under its
    name (``deepspeed_experts``), so state dicts keep the stock keys. Reads the counts to the host (one sync per
    layer)."""

    def __init__(self, experts: Experts):
        super().__init__()
        self.deepspeed_experts = experts.deepspeed_experts

    def forward(self, x_ND: torch.Tensor, counts_L: torch.Tensor) -> torch.Tensor:
        counts = counts_L.tolist()
        chunks = x_ND.split([*counts, x_ND.shape[0] - sum(counts)])
        outputs = [_first(expert(chunk)) for expert, chunk in zip(self.deepspeed_experts, chunks)]
        return torch.cat([*outputs, chunks[-1].new_zeros(chunks[-1].shape)])


def _first(output):
    return output[0] if isinstance(output, tuple) else output
