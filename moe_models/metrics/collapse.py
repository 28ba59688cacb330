"""Router-collapse early warning: each training row's per-layer routing values checked against four conditions
(docs/metrics.md, "Router-collapse warnings").

- ``effective_experts``: exp(entropy of the load) below ``--collapse_effective_experts`` x E;
- ``imbalance``: the busiest expert's load over the mean load above ``--collapse_imbalance``, or above
  ``--collapse_imbalance_of_max`` of the way from even (1) to its maximum E / top_k, whichever is lower (so that it
  can fire for any E and top_k);
- ``dead_experts``: an expert routed fewer than ``--collapse_dead_expert_share`` x an even share of the logging
  interval's routes (none at all, or nearly none);
- ``router_logit_norm``: the mean router-logit norm grew in each of the last ``--collapse_logit_norm_intervals``
  logging intervals, by a factor above ``--collapse_logit_norm_growth`` over them, to above
  ``--collapse_logit_rms`` x sqrt(E) (a root-mean-square logit above that: a router that learns from small logits
  grows them fast too, but not that far).

A condition of a layer warns once when it starts and once more when it clears, never on every row in between.
Each warning and clearance is a row of its own (``{"step", "collapse": "warning" | "cleared", "layer", "condition",
"value", "threshold", "message"}``), which the sinks write to metrics.jsonl and print on rank 0's console; a warning
also goes to wandb as an alert.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from ..run.config import LogConfig, MoEConfig
from .rows import layer_values, moe_layer_ids


@dataclass(frozen=True)
class CollapseThresholds:
    """LogConfig's collapse settings; 0 turns a condition off."""

    effective_experts: float = 0.5      # fraction of E
    imbalance: float = 2.5              # max / mean load
    imbalance_of_max: float = 0.8       # or this far from even (1) to the maximum E / top_k, whichever is lower
    dead_expert_share: float = 0.1      # an expert under this x an even share of the interval's routes is dead
    logit_norm_intervals: int = 5       # consecutive growing intervals
    logit_norm_growth: float = 1.5      # total growth factor over them
    logit_rms: float = 2.0              # and the norm above this x sqrt(E)
    min_tokens: int = 1024              # an interval with fewer routed tokens per layer is not checked

    @classmethod
    def of(cls, log: LogConfig) -> "CollapseThresholds":
        return cls(log.collapse_effective_experts, log.collapse_imbalance, log.collapse_imbalance_of_max,
                   log.collapse_dead_expert_share, log.collapse_logit_norm_intervals, log.collapse_logit_norm_growth,
                   log.collapse_logit_rms, log.collapse_min_tokens)

    def imbalance_bound(self, num_experts: int, top_k: int) -> float:
        """The imbalance above which a layer of E experts, top-k, warns: the lower of the two thresholds that are on
        (0 when both are off). Its maximum E / k is every token on the same k experts; 1 is even."""
        bounds = ([self.imbalance] if self.imbalance > 0 else []) + (
            [1 + self.imbalance_of_max * (num_experts / top_k - 1)] if self.imbalance_of_max > 0 else [])
        return min(bounds, default=0.0)


class CollapseMonitor:
    """Reads training rows in step order and returns the warning rows they start or clear (rank 0; no collective)."""

    def __init__(self, thresholds: CollapseThresholds, moe: MoEConfig, family_fixes: Optional[list[str]] = None):
        """``family_fixes``: what counters a collapsing load in a model that keeps its family's routing and balance
        loss (continued in place), instead of our layer's flags, which such a run refuses."""
        self.thresholds, self.moe, self.family_fixes = thresholds, moe, family_fixes
        self.active: dict[tuple[int, str], bool] = {}    # (layer, condition) -> warned and not cleared since
        self.logit_norms: dict[int, list[float]] = {}   # layer -> its last router_logit_norm values

    def check(self, row: dict) -> list[dict]:
        """The warning rows of a training row: one per condition of a layer that starts or clears at it. The row of
        step 1 is not checked: it holds a single step of the untrained router; nor is a layer's load of fewer than
        ``min_tokens`` tokens (its routed_tokens), too few for a load to mean anything."""
        found = []
        if row["step"] <= 1:
            return found
        for i in moe_layer_ids([row]):
            layer = layer_values(row, i)
            if "routed_per_expert" not in layer or layer.get("routed_tokens", 0) < self.thresholds.min_tokens:
                continue
            for condition, (firing, value, threshold) in self.conditions(i, layer).items():
                key = (i, condition)
                if firing == self.active.get(key, False):
                    continue
                message = (self.advice(i, condition, value, threshold, layer) if firing else
                           f"moe layer {i}: {LABELS[condition]} is back within its threshold ({value:.3g}; threshold "
                           f"{threshold:.3g})")
                self.active[key] = firing
                found.append({"step": row["step"], "collapse": "warning" if firing else "cleared", "layer": i,
                              "condition": condition, "value": value, "threshold": threshold, "message": message})
        return found

    def conditions(self, i: int, layer: dict) -> dict[str, tuple[bool, float, float]]:
        """condition -> (whether it holds, the value, its threshold) for the conditions that are on."""
        t, num_experts = self.thresholds, len(layer["routed_per_expert"])
        found = {}
        if t.effective_experts > 0 and "effective_experts" in layer:
            bound = t.effective_experts * num_experts
            found["effective_experts"] = (layer["effective_experts"] < bound, layer["effective_experts"], bound)
        bound = t.imbalance_bound(num_experts, self.moe.top_k)
        if bound > 0 and "imbalance" in layer:
            found["imbalance"] = (layer["imbalance"] > bound, layer["imbalance"], bound)
        if t.dead_expert_share > 0:
            least = least_share(layer["routed_per_expert"])
            found["dead_experts"] = (least < t.dead_expert_share, least, t.dead_expert_share)
        if t.logit_norm_intervals > 0 and "router_logit_norm" in layer:
            norms = self.logit_norms.setdefault(i, [])
            norms.append(layer["router_logit_norm"])
            del norms[:-(t.logit_norm_intervals + 1)]
            growth = norms[-1] / norms[0] if norms[0] > 0 else float("inf")
            growing = (len(norms) == t.logit_norm_intervals + 1 and all(b > a for a, b in zip(norms, norms[1:]))
                       and growth > t.logit_norm_growth and norms[-1] > t.logit_rms * num_experts ** 0.5)
            found["router_logit_norm"] = (growing, growth, t.logit_norm_growth)
        return found

    def advice(self, i: int, condition: str, value: float, threshold: float, layer: dict) -> str:
        """What the warning says: the condition with its numbers, and the settings that counter it, with their
        values now."""
        moe, num_experts = self.moe, len(layer["routed_per_expert"])
        if condition == "router_logit_norm":
            norm, t = layer["router_logit_norm"], self.thresholds
            what = (f"the mean router-logit norm grew in each of the last {t.logit_norm_intervals} logging intervals, "
                    f"x{value:.2f} in all (warns above x{threshold:g}), to {norm:.3g} (an RMS logit of "
                    f"{norm / num_experts ** 0.5:.2f}; warns above {t.logit_rms:g})")
            fixes = [f"the router z-loss, --router_z_loss_coef 1e-3 or more (now {moe.router_z_loss_coef:g})",
                     "a lower --learning_rate"]
        else:
            fixes = self.balance_fixes(layer)
            if condition == "dead_experts":
                load = layer["routed_per_expert"]
                dead = dead_experts(load, threshold)
                what = (f"{len(dead)} of {num_experts} experts ({', '.join(map(str, dead))}) got "
                        f"{'almost no' if any(load[e] for e in dead) else 'no'} routes in this logging interval (the "
                        f"least loaded {value:.1%} of an even share; warns below {threshold:.0%})")
            elif condition == "effective_experts":
                what = (f"effective experts {layer['effective_experts']:.2f} of {num_experts} (warns below "
                        f"{self.thresholds.effective_experts:g} x E = {self.thresholds.effective_experts * num_experts:g})")
            else:
                what = (f"imbalance (max/mean load) {layer['imbalance']:.2f} (1 is even, {num_experts / moe.top_k:g} = "
                        f"E/top_k is every token on the same experts; warns above {threshold:.3g})")
        return f"router collapse warning, moe layer {i}: {what}. Try {'; '.join(fixes)}."

    def balance_fixes(self, layer: dict) -> list[str]:
        """The settings that counter a collapsing load, with their values now."""
        if self.family_fixes is not None:
            return self.family_fixes
        moe = self.moe
        fixes = [f"a larger --aux_loss_coef (now {moe.aux_loss_coef:g})",
                 f"aux-loss-free balancing, --router_bias_update_rate 1e-3 (now {moe.router_bias_update_rate:g})",
                 f"router noise, --noisy_gate_policy Jitter (now {moe.noisy_gate_policy})"]
        if moe.drop_tokens:
            fixes.append(f"and, while it lasts, a larger --capacity_factor (now {moe.capacity_factor:g}) or "
                         f"--drop_tokens false, so that overloaded experts drop fewer tokens (drop fraction now "
                         f"{layer.get('drop_fraction', 0.0):.1%})")
        return fixes


def least_share(load_E: list[float]) -> float:
    """The least-loaded expert's routes over an even share (the mean load): 1 when even, 0 for an expert with none."""
    mean = sum(load_E) / len(load_E)
    return min(load_E) / mean if mean > 0 else 1.0


def dead_experts(load_E: list[float], share: float) -> list[int]:
    """The experts routed fewer than ``share`` x an even share."""
    mean = sum(load_E) / len(load_E)
    return [e for e, n in enumerate(load_E) if n < share * mean]


LABELS = {"effective_experts": "the effective expert count", "imbalance": "the imbalance",
          "router_logit_norm": "the router-logit norm's growth", "dead_experts": "the least-loaded expert's share"}


def console_line(warning: dict) -> str:
    """A warning row as one short console line: the condition and its numbers; what to try is in its ``message``
    (metrics.jsonl, the wandb alert, TensorBoard). A clearance's message is short already."""
    if warning["collapse"] != "warning":
        return warning["message"]
    below = warning["condition"] in ("effective_experts", "dead_experts")
    return (f"router collapse warning, moe layer {warning['layer']} at step {warning['step']}: "
            f"{LABELS[warning['condition']].removeprefix('the ')} {warning['value']:.3g} ({'below' if below else 'above'} "
            f"{warning['threshold']:.3g}); what to try: its row in metrics.jsonl, docs/metrics.md")
