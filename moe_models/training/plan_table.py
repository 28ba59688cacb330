"""The plan (training/preflight.py) as `train.py --plan` prints it on the console: one column, since every rank
holds the same."""

from __future__ import annotations

from .preflight import GIB


def plan_table(result: dict, device_gib: float | None, advice: str | None) -> str:
    """The plan as the console shows it (every rank holds the same: one column)."""
    p, m, s = result["parameters"], result["bytes_per_rank"], result["setup"]
    precision = "bf16" if s["bf16"] else "fp32"
    rows = [f"Preflight plan: {s['world_size']} ranks, ep_size {s['ep_size']}, ZeRO {s['zero_stage']}"
            f"{' + optimizer offload' if s['offload_optimizer'] else ''}, {precision}, micro-batch {s['micro_batch']} x "
            f"{s['block_size']} tokens{', activation checkpointing' if s['activation_checkpointing'] else ''}",
            f"  parameters: {_count(p['total'])} total ({_count(p['dense'])} dense, {_count(p['experts'])} in experts), "
            f"{_count(p['local'])} on each rank, {_count(p['active'])} active per token",
            "  per rank (GiB):"]
    rows += [f"    {name:<18} {m[name] / GIB:10.3f}" for name in ("weights", "gradients", "optimizer_states",
                                                                 "activations", "total")]
    other = "with" if not s["activation_checkpointing"] else "without"
    rows.append(f"    (activations {other} activation checkpointing: {result['activations_other_way'] / GIB:.3f})")
    dispatcher = ", --dispatcher node_once" if s.get("dispatcher") == "node_once" else ""
    rows.append(f"  all-to-all per step and rank: {result['all_to_all_bytes_per_step'] / GIB:.3f} GiB (even routing"
                f"{dispatcher})")
    rows.append(f"  training FLOPs per token: {result['flops_per_token']:.4g}")
    rows += _adaptive_rows(result.get("adaptive_compute"))
    step = result.get("step_time")
    if step is not None:
        seconds, shares = step["seconds"], step["shares"]
        rows.append(f"  predicted on {result['cluster']['name']} ({s['world_size'] // result['cluster']['devices_per_node']}"
                    f" nodes x {result['cluster']['devices_per_node']}): step {1e3 * step['step_time']:.2f} ms, "
                    f"{step['tokens_per_sec']:.4g} tokens/s, MFU {100 * step['mfu']:.1f}%")
        rows.append("    " + ", ".join(f"{part.replace('_', '-')} {1e3 * seconds[part]:.2f} ms ({100 * shares[part]:.0f}%)"
                                       for part in seconds) + " (no overlap assumed unless overlap_comm)")
    elif "cluster" in result:
        rows.append("  step time: not predicted with optimizer offload (its CPU Adam is not modelled)")
    if result.get("precision_note"):
        rows.append(f"  precision: {result['precision_note']}")
    if device_gib is not None:
        fits = m["total"] <= device_gib * GIB
        if result.get("search"):  # --plan_search: its fastest layout is the answer, fitting or not
            rows.append(f"  fits {device_gib:g} GiB: {'yes' if fits else 'no'}; the fastest layout that fits "
                        f"(--plan_search, below): {result['search'][0]['flags']}")
        else:
            rows.append(f"  fits {device_gib:g} GiB: {'yes' if fits else 'no'}"
                        + ("" if fits else f"; smallest change that fits: {advice or 'none of the listed changes'}"))
    return "\n".join(rows)


def _adaptive_rows(adaptive: dict | None) -> list[str]:
    if not adaptive:
        return []
    k, target = adaptive["max_real_experts_per_token"], adaptive["target_real_experts_per_token"]
    rows = [f"  adaptive compute ({adaptive['rule']}): at most {k} real experts per token and MoE layer, so expert "
            f"FLOPs per token at most {adaptive['expert_flops_per_token_at_most']:.4g} and the FLOPs above a bound"]
    if target is not None:
        rows.append(f"    predicted compute uses the compute target, {target:g} real experts per token "
                    f"(--null_expert_target_real_k): {adaptive['predicted_flops_per_token']:.4g} training FLOPs per "
                    "token; all-to-all bytes and activations are counted at the bound")
    else:
        rows.append("    no compute target (--null_expert_target_real_k): the predicted compute counts the bound")
    return rows


def _count(n: float) -> str:
    return f"{n / 1e9:.3f} B" if n >= 1e9 else f"{n / 1e6:.2f} M"
