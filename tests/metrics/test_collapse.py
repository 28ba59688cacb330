"""Router-collapse warnings: the conditions on hand-made rows, and runs of train.py whose router is forced to collapse
(warned on the console, in metrics.jsonl and as wandb alerts) or to route evenly (no warning)."""

import json
import math
import subprocess
import sys

import pytest
import torch

from moe_models.metrics.collapse import CollapseMonitor, CollapseThresholds, console_line
from moe_models.metrics.sinks import MetricsLog, open_sinks
from moe_models.moe.router import Router
from moe_models.run.cli import parse_args
from moe_models.run.config import MoEConfig
from moe_models.training.validate import validate
from train import main


def training_row(step: int, load: list[float], logit_norm: float = 4.0, layer: int = 0,
                 routed_tokens: int = 4096) -> dict:
    """A training row of one MoE layer with this router load; effective experts and imbalance by their definitions."""
    shares = [n / sum(load) for n in load]
    prefix = f"moe/layer_{layer}/"
    return {"step": step, "loss": 1.0, prefix + "routed_per_expert": load, prefix + "routed_tokens": routed_tokens,
            prefix + "effective_experts": math.exp(-sum(p * math.log(p) for p in shares if p > 0)),
            prefix + "imbalance": max(shares) * len(load), prefix + "router_logit_norm": logit_norm,
            prefix + "drop_fraction": 0.25}


EVEN, COLLAPSED = [100] * 8, [400, 400, 0, 0, 0, 0, 0, 0]  # top-2 over 8 experts: every token on experts 0 and 1


def monitor(**thresholds) -> CollapseMonitor:
    return CollapseMonitor(CollapseThresholds(**thresholds), MoEConfig(drop_tokens=True))  # the advice names capacity


def test_an_even_load_with_a_steady_router_does_not_warn():
    watch = monitor()
    for step in range(2, 40):
        assert watch.check(training_row(step, EVEN, logit_norm=4.0 + 0.01 * step)) == []  # slow growth: learning


def test_a_collapsed_layer_warns_once_per_condition_until_it_clears():
    watch = monitor(logit_norm_intervals=0)
    first = watch.check(training_row(10, COLLAPSED))
    assert [(w["collapse"], w["condition"], w["layer"]) for w in first] == [
        ("warning", "effective_experts", 0), ("warning", "imbalance", 0), ("warning", "dead_experts", 0)]
    effective, imbalance, dead = first
    assert effective["value"] == pytest.approx(2.0) and effective["threshold"] == 4.0  # 0.5 x 8 experts
    assert imbalance["value"] == pytest.approx(4.0) and imbalance["threshold"] == 2.5
    assert dead["value"] == 0.0 and dead["threshold"] == 0.1
    assert "6 of 8 experts (2, 3, 4, 5, 6, 7) got no routes" in dead["message"]
    for text in ("--aux_loss_coef (now 0.01)", "--router_bias_update_rate 1e-3 (now 0)", "--capacity_factor (now 1)"):
        assert all(text in w["message"] for w in first)
    assert watch.check(training_row(20, COLLAPSED)) == []  # still collapsed: no repeat
    cleared = watch.check(training_row(30, EVEN))
    assert [(w["collapse"], w["condition"]) for w in cleared] == [("cleared", "effective_experts"),
                                                                  ("cleared", "imbalance"), ("cleared", "dead_experts")]
    assert len(watch.check(training_row(40, COLLAPSED))) == 3  # collapsed again: warned again


def test_an_interval_of_too_few_tokens_is_not_checked():
    """The same collapsed load: not a warning over 1023 routed tokens (the default floor is 1024), a warning over
    1024; --collapse_min_tokens 0 checks every interval."""
    assert monitor().check(training_row(10, COLLAPSED, routed_tokens=1023)) == []
    assert len(monitor().check(training_row(10, COLLAPSED, routed_tokens=1024))) == 3
    assert len(monitor(min_tokens=0).check(training_row(10, COLLAPSED, routed_tokens=256))) == 3
    cfg = parse_args(["--collapse_min_tokens", "256"])
    assert CollapseThresholds.of(cfg.log).min_tokens == 256


def test_the_console_line_is_short_and_the_row_keeps_the_advice():
    warning = monitor(logit_norm_intervals=0).check(training_row(10, COLLAPSED))[1]
    line = console_line(warning)
    assert line == ("router collapse warning, moe layer 0 at step 10: imbalance 4 (above 2.5); what to try: its row "
                    "in metrics.jsonl, docs/metrics.md")
    assert len(line) < 130 and "--aux_loss_coef (now 0.01)" in warning["message"]


def test_the_row_of_step_1_is_not_checked_and_zero_turns_a_condition_off():
    assert monitor().check(training_row(1, COLLAPSED)) == []
    assert monitor(effective_experts=0, imbalance=0, imbalance_of_max=0, dead_expert_share=0,
                   logit_norm_intervals=0).check(training_row(5, COLLAPSED)) == []
    only_relative = monitor(effective_experts=0, imbalance=0, dead_expert_share=0, logit_norm_intervals=0)
    assert [w["threshold"] for w in only_relative.check(training_row(5, COLLAPSED))] == [pytest.approx(3.4)]


def test_router_logits_growing_for_several_intervals_warn():
    watch = monitor(logit_norm_intervals=3, logit_norm_growth=1.5)
    norms = [4.0, 4.4, 5.3, 6.5, 6.4]  # grows x1.625 over intervals 2-4, then falls
    found = [watch.check(training_row(step, EVEN, logit_norm=norm)) for step, norm in enumerate(norms, start=2)]
    assert found[:3] == [[], [], []]
    warned, = found[3]
    assert warned["condition"] == "router_logit_norm" and warned["value"] == pytest.approx(6.5 / 4.0)
    assert "an RMS logit of 2.30; warns above 2" in warned["message"]  # 6.5 / sqrt(8)
    assert "--router_z_loss_coef 1e-3 or more (now 0)" in warned["message"]
    assert [w["collapse"] for w in found[4]] == ["cleared"]
    # Growth of x1.2 over three intervals, each one up: below the factor, no warning.
    slow = monitor(logit_norm_intervals=3, logit_norm_growth=1.5)
    assert not any(slow.check(training_row(step, EVEN, logit_norm=4.0 * 1.06 ** step)) for step in range(2, 12))
    # A router learning from small logits (a run with random experts: 0.32 -> 1.93 in 9 intervals): fast growth, but
    # the RMS logit stays below 2 (a norm of 2 x sqrt(8) = 5.66), so no warning.
    learning = monitor(logit_norm_intervals=3, logit_norm_growth=1.5)
    norms = [0.32, 0.54, 1.04, 1.18, 1.45, 1.60, 1.66, 1.76, 1.90, 1.93]
    assert not any(learning.check(training_row(step, EVEN, logit_norm=norm)) for step, norm in enumerate(norms, 2))


def test_a_resumed_run_does_not_warn_again_of_a_collapse_that_held_at_its_checkpoint(tmp_path):
    """As train.py's loop does it: each training row logged, then its warnings (the bookkeeping's monitor); on resume,
    the rows kept in metrics.jsonl go through a fresh monitor first."""
    cfg, path = parse_args(["--disable_tqdm"]), tmp_path / "metrics.jsonl"
    stopped = open_sinks(cfg, is_main=True, output_dir=tmp_path, jsonl=MetricsLog(path, enabled=True))
    stopped_monitor = CollapseMonitor(CollapseThresholds.of(cfg.log), cfg.moe)
    for step in (10, 20, 30):
        stopped.log(training_row(step, COLLAPSED))
        stopped.warn(stopped_monitor.check(training_row(step, COLLAPSED)))
    resumed = open_sinks(cfg, is_main=True, output_dir=tmp_path, jsonl=MetricsLog(path, enabled=True))
    resumed_monitor = CollapseMonitor(CollapseThresholds.of(cfg.log), cfg.moe)
    for row in resumed.resume(20):  # from the checkpoint of step 20: step 30 comes again
        resumed_monitor.check(row)
    for step in (30, 40):
        resumed.log(training_row(step, COLLAPSED))
        resumed.warn(resumed_monitor.check(training_row(step, COLLAPSED)))
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [10, 20, 30, 40]
    assert [(r["step"], r["condition"]) for r in rows if "collapse" in r] == [(10, "effective_experts"),
                                                                             (10, "imbalance"), (10, "dead_experts")]


def test_four_experts_top_2_on_two_experts_warns():
    """The case no default caught before: 4 experts, top-2, every token on experts 0 and 1 at every step. Effective
    experts is 2 = 0.5 x 4 (not below), the imbalance 2 = E / top_k, its maximum (below 2.5); it is above 1 + 0.8 x
    (2 - 1) = 1.8, and experts 2 and 3 have no routes."""
    watch = CollapseMonitor(CollapseThresholds(), MoEConfig(num_experts=4, top_k=2))
    load = [2048, 2048, 0, 0]
    first = watch.check(training_row(10, load))
    assert [(w["condition"], w["value"], w["threshold"]) for w in first] == [
        ("imbalance", pytest.approx(2.0), pytest.approx(1.8)), ("dead_experts", 0.0, 0.1)]
    assert "2 of 4 experts (2, 3) got no routes" in first[1]["message"]
    assert "warns above 1.8" in first[0]["message"]
    assert all(watch.check(training_row(step, load)) == [] for step in range(20, 100, 10))  # once, not every row


@pytest.mark.parametrize("num_experts,top_k", [(2, 1), (4, 1), (4, 2), (6, 4), (8, 2), (16, 8), (64, 8), (128, 8)])
def test_every_token_on_the_same_experts_warns_for_any_e_and_k(num_experts, top_k):
    """All routes on k experts: imbalance E / k, the rest dead; warned by the bound written out here, min(2.5,
    1 + 0.8 x (E / k - 1)). An even load (with the noise of 10% either way) is not warned of."""
    moe = MoEConfig(num_experts=num_experts, top_k=top_k)
    collapsed = [4096] * top_k + [0] * (num_experts - top_k)
    found = CollapseMonitor(CollapseThresholds(), moe).check(training_row(10, collapsed))
    bound = min(2.5, 1 + 0.8 * (num_experts / top_k - 1))
    imbalance, = [w for w in found if w["condition"] == "imbalance"]
    assert imbalance["value"] == pytest.approx(num_experts / top_k) and imbalance["threshold"] == pytest.approx(bound)
    assert "dead_experts" in {w["condition"] for w in found}
    noisy = [4096 * (0.9 if e % 2 else 1.1) for e in range(num_experts)]
    assert CollapseMonitor(CollapseThresholds(), moe).check(training_row(10, noisy)) == []


def test_an_expert_with_almost_no_routes_is_dead():
    """Under 0.1 x the mean load (the default share): 50 of a mean of 762.5 routes (6.6%) warns; 100 of 775 (12.9%)
    does not."""
    watch = CollapseMonitor(CollapseThresholds(), MoEConfig(num_experts=4, top_k=1))
    assert watch.check(training_row(10, [1000, 1000, 1000, 100])) == []
    dead, = watch.check(training_row(20, [1000, 1000, 1000, 50]))
    assert dead["condition"] == "dead_experts" and dead["value"] == pytest.approx(50 / 762.5)
    assert "1 of 4 experts (3) got almost no routes" in dead["message"]
    assert console_line(dead) == ("router collapse warning, moe layer 0 at step 20: least-loaded expert's share "
                                  "0.0656 (below 0.1); what to try: its row in metrics.jsonl, docs/metrics.md")


def test_the_new_thresholds_are_flags():
    """train.py's flags reach CollapseThresholds (the one MoETrainer takes), and bad values are refused."""
    cfg = parse_args(["--collapse_imbalance_of_max", "0.5", "--collapse_dead_expert_share", "0.02"])
    thresholds = CollapseThresholds.of(cfg.log)
    assert (thresholds.imbalance_of_max, thresholds.dead_expert_share) == (0.5, 0.02)
    assert thresholds.imbalance_bound(4, 2) == 1.5 and CollapseThresholds.of(parse_args([]).log) == CollapseThresholds()
    with pytest.raises(ValueError) as err:
        validate(parse_args(["--collapse_imbalance_of_max", "1.5", "--collapse_dead_expert_share", "-0.1"]),
                 world_size=1)
    assert "collapse_imbalance_of_max (1.5) is a fraction" in str(err.value)
    assert "collapse_dead_expert_share (-0.1) must be >= 0" in str(err.value)


def test_collapse_thresholds_are_checked():
    with pytest.raises(ValueError) as err:
        validate(parse_args(["--collapse_effective_experts", "2", "--collapse_imbalance", "-1",
                             "--collapse_logit_norm_growth", "0.5", "--collapse_logit_rms", "-2"]), world_size=1)
    message = str(err.value)
    assert "collapse_effective_experts (2.0) is a fraction" in message
    assert "collapse_imbalance (-1.0) must be >= 0" in message
    assert "collapse_logit_norm_growth (0.5) must be >= 1" in message
    assert "collapse_logit_rms (-2.0) must be >= 0" in message


FLAGS = ["--num_experts", "8", "--top_k", "2", "--max_steps", "8", "--logging_steps", "1", "--eval_steps", "0",
         "--max_eval_batches", "1", "--warmup_steps", "1", "--synthetic_examples", "600", "--block_size", "32",
         "--per_device_train_batch_size", "4", "--disable_tqdm", "--collapse_min_tokens", "0"]  # 128 tokens a step


def forced_logits(rule, num_experts: int = 8):
    """Router.logits replaced by ``rule(router, the real logits [T, E], how many forwards this router has run)``, for
    the run's routers of ``num_experts`` (the conversion's proof, on a 2-expert probe model, routes as it does)."""
    real = Router.logits

    def logits(self, x_TD):
        if self.wg.out_features != num_experts:
            return real(self, x_TD)
        self.forwards_seen = getattr(self, "forwards_seen", 0) + 1
        return rule(self, real(self, x_TD), self.forwards_seen)
    return logits


def rows_of(out) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_a_router_forced_to_collapse_is_warned_of(world, tmp_path, monkeypatch, capsys):
    # Every token's logits favour experts 0 and 1 by 10 and all logits grow x1.25 per forward: the load collapses
    # onto two experts and the logit norm grows at every interval.
    favour_E = torch.tensor([10.0, 10.0] + [0.0] * 6)
    collapsing = forced_logits(lambda router, logits_TE, n: (logits_TE + favour_E) * 1.25 ** n)
    monkeypatch.setattr(Router, "logits", collapsing)
    out = tmp_path / "run"
    main([*FLAGS, "--output_dir", str(out), "--report_to", "wandb"])
    printed = capsys.readouterr().out
    warnings = [r for r in rows_of(out) if r.get("collapse") == "warning"]
    found = {(w["layer"], w["condition"]) for w in warnings}
    assert found == {(i, c) for i in range(4)
                     for c in ("effective_experts", "imbalance", "dead_experts", "router_logit_norm")}
    assert len(warnings) == len(found)  # once each: the collapse lasts, the warning is not repeated
    assert {w["step"] for w in warnings if w["condition"] != "router_logit_norm"} == {2}  # the first row checked
    assert {w["step"] for w in warnings if w["condition"] == "router_logit_norm"} == {7}  # 5 growing intervals
    for w in warnings:
        assert printed.count(console_line(w)) == 1 and w["message"] not in printed  # the advice: in the row
    run_dir, = (out / "wandb").glob("offline-run-*")
    records = subprocess.run([sys.executable, "-m", "wandb", "leet", "inspect", str(run_dir), "--json"],
                             capture_output=True, text=True, timeout=120, check=True).stdout.splitlines()
    alerts = [json.loads(line)["alert"] for line in records if '"type":"alert"' in line]
    assert sorted(a["title"] for a in alerts) == sorted(f"Router collapse: MoE layer {w['layer']}, {w['condition']}"
                                                        for w in warnings)
    assert all(a["level"] == "WARN" for a in alerts)


def test_an_even_routing_is_not_warned_of(world, tmp_path, monkeypatch, capsys):
    # Logits drawn afresh for every token: each expert gets an even share, and the logit norm stays put.
    monkeypatch.setattr(Router, "logits", forced_logits(lambda router, logits_TE, n: torch.randn_like(logits_TE)))
    out = tmp_path / "run"
    main([*FLAGS, "--output_dir", str(out)])
    rows = rows_of(out)
    assert not [r for r in rows if "collapse" in r] and "collapse" not in capsys.readouterr().out
    last = [r for r in rows if "loss" in r][-1]
    assert last["moe/layer_0/effective_experts"] > 7.5 and last["moe/layer_0/imbalance"] < 1.5


def test_four_experts_top_2_forced_onto_two_is_warned_of_by_train_py(world, tmp_path, monkeypatch):
    """The issue's run through train.py: 4 experts, top-2, every token on experts 0 and 1 (tokens_per_expert [n, n, 0,
    0] at every step): warned as imbalance and dead experts, as the flags set them."""
    favour_E = torch.tensor([10.0, 10.0, 0.0, 0.0])
    monkeypatch.setattr(Router, "logits", forced_logits(lambda router, logits_TE, n: logits_TE + favour_E, 4))
    out = tmp_path / "run"
    main([*FLAGS, "--num_experts", "4", "--max_steps", "3", "--output_dir", str(out),
          "--collapse_dead_expert_share", "0.05"])
    rows = rows_of(out)
    assert [r["moe/layer_0/tokens_per_expert"] for r in rows if "loss" in r][-1][2:] == [0, 0]
    warnings = [r for r in rows if r.get("collapse") == "warning"]
    assert {(w["layer"], w["condition"]) for w in warnings} == {(i, c) for i in range(4)
                                                                for c in ("imbalance", "dead_experts")}
    assert {w["threshold"] for w in warnings if w["condition"] == "dead_experts"} == {0.05}
