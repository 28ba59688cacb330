"""Train a Mixture-of-Experts language model on DeepSpeed: the `moe-train` command.

    moe-train                                        # tiny Llama-MoE on the built-in corpus (CPU or 1 GPU)
    moe-train --model_name_or_path PATH ...          # upcycle a dense HF model, or continue an HF MoE model
    deepspeed --num_gpus 8 $(which moe-train) --ep_size 4 ...   # expert + data parallel

`python train.py` (the repository's script) and `python -m moe_models.train` run the same code with the same
flags. Reads top to bottom: parse -> build (validate, tokenizer, model, surgery, data, engine) -> train.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shlex
import sys
from contextlib import nullcontext
from pathlib import Path

from transformers import set_seed

from .data.chat import chat_template
from .data.prepare import PreparedData, prepare_data
from .data.stream import StreamError
from .hf.export_fidelity import export_outlook
from .hf.in_place_run import continue_in_place, is_in_place_folder
from .metrics.throughput import active_parameters, attention_dims, flops_per_token
from .models.source import load_dense_model, model_source_text
from .models.tokenization import load_tokenizer
from .moe.model_layers import MoELayers
from .moe.saved_settings import settings_of
from .moe.surgery import convert_to_moe
from .run.checkpoint_folder import CheckpointError
from .run.cli import parse_args
from .run.config import RunConfig
from .run.distributed import (World, init_world, is_collective_timeout, launched_rank, launched_world_size,
                              main_process_first)
from .run.folder import CHECKPOINTS, Resolved, RunFolder, RunRecord
from .run.moe_layout import NO_MOE_LAYERS, MoELayout
from .run.nodes import gather_nodes, silent_nodes
from .run.startup import StartupLines
from .run.cpu_memory import keep_freed_memory
from .run.threads import choose_cpu_threads
from .run.writes import WriteError
from .training.checkpoint import dense_weights
from .training.clusters import planned_world_size
from .training.ds_config import training_dtype
from .training.layout_search import launch_command, launch_lines, search_plan, search_table
from .training.nonfinite import NonFiniteError
from .training.plan_table import plan_table
from .training.preflight import plan_with_fit
from .training.resumable import FinishedRun, resumed_record_path, resumed_settings
from .training.engine import build_engine
from .training.loop import TrainLoop
from .training.validate import check_same_settings, validate


def main(argv: list[str] | None = None) -> dict:
    cfg = parse_args(argv)
    try:
        if cfg.train.plan:  # the preflight plan: validate, count on the meta device, print; nothing is trained
            return preflight(cfg)
        world, trainer = build(cfg)
    except FinishedRun as finished:  # a relaunch of a finished run (a requeued job): nothing to do, not an error
        if launched_rank() == 0:
            print(finished)
        return {"steps": cfg.train.max_steps, "trained_steps": 0}
    except ValueError as err:  # ConfigError and the data/model loaders' errors say what to fix
        # One message per node, not one traceback per rank: a node's own problem (a file missing there) shows in
        # that node's launcher output.
        rank = launched_rank()
        if rank == 0 or os.environ.get("LOCAL_RANK", "0") == "0":
            print(f"error: {err}" if rank == 0 else f"error (rank {rank}): {err}", file=sys.stderr)
        sys.exit(1)
    try:
        summary = trainer.train()
    except (NonFiniteError, CheckpointError, WriteError) as err:  # a stop with its reason (a failed save: every rank)
        if world.is_main:
            print(f"error: {err}", file=sys.stderr)
        sys.exit(1)
    except StreamError as err:  # one rank's share of the stream reached a bad file; the others wait for it
        print(f"error: {err}" if world.is_main else f"error (rank {world.rank}): {err}", file=sys.stderr, flush=True)
        os._exit(1)  # the other ranks are inside a collective: exit handlers that wait on the group would hang
    except RuntimeError as err:
        if not is_collective_timeout(err):
            raise
        print(timeout_message(err, trainer, cfg.train.dist_timeout_s, world), file=sys.stderr, flush=True)
        os._exit(1)  # the process group is broken: exit handlers that wait on it would hang
    if world.is_main:
        exportable = cfg.moe.moe_layers != NO_MOE_LAYERS or is_in_place_folder(cfg.model.model_name_or_path)
        print_summary(summary, trainer.output_dir, next_steps(trainer.output_dir, exportable))
    return summary


def preflight(cfg: RunConfig) -> dict:
    """`train.py --plan`: print the plan and write plan.json to output_dir (rank 0); nothing is trained. It is for
    --plan_cluster's nodes, or --plan_world_size ranks, when given, else for the ranks this command was launched
    with."""
    world_size = planned_world_size(cfg.train, launched_world_size())
    ds_config = validate(cfg, world_size=world_size)  # a plan may be made beside an existing run
    result = plan_with_fit(cfg, ds_config, world_size)
    if cfg.train.plan_search:
        result["search"] = search_plan(cfg, result, ds_config)
        result["launch_command"] = launch_command(cfg, result["search"][0], world_size,
                                                  result["cluster"]["devices_per_node"]) if result["search"] else None
    if launched_rank() == 0:
        path = RunFolder(cfg.train.output_dir).write_plan(result)
        print(plan_table(result, result["device_memory_gb"], result["smallest_fitting_change"]))
        if "search" in result:
            print("\n".join([search_table(result["search"], result["cluster"]["name"], result["device_memory_gb"]),
                             *launch_lines(result)]))
        print(f"Wrote {path}")
    return result


def build(cfg: RunConfig) -> tuple[World, TrainLoop]:
    """Everything a run needs, in order; settings are checked before a process group, a model or data exist."""
    startup = StartupLines(launched_rank() == 0)
    startup.imports_done()
    for line in (choose_cpu_threads(), keep_freed_memory()):
        if line:
            startup.say(line)
    with startup.phase("settings checked"):
        ds_config = validate(cfg, world_size=launched_world_size())
        cfg, taken = resumed_settings(cfg)
    if taken and launched_rank() == 0:
        print(f"Resuming with the routing settings the run was trained with: {', '.join(taken)} "
              f"(from {resumed_record_path(cfg)})")

    if cfg.moe.benchmark_balanced_routing and launched_rank() == 0:
        print("Benchmark routing: --benchmark_balanced_routing spreads every token evenly over the experts; the "
              "router does not learn to route (metrics rows carry moe/layer_i/forced_balanced_routing)")
    with startup.phase("process group"):
        world = dataclasses.replace(init_world(cfg.train.dist_timeout_s), nodes=gather_nodes())  # named if one is lost
        check_same_settings(cfg)
    set_seed(cfg.train.seed)
    folder = RunFolder(cfg.train.output_dir)
    resume_tag = folder.checkpoints.resolve(cfg.train.resume_from_checkpoint) if cfg.train.resume_from_checkpoint \
        else None
    upcycle_tag = None if resume_tag else dense_checkpoint_to_upcycle(cfg, folder)  # upcycled once, at the start
    with startup.phase("tokenizer"):
        tokenizer = load_tokenizer(cfg.model)
        if cfg.data.chat_template:  # the run's tokenizer, and so its export, carries the template it trained with
            tokenizer.chat_template = chat_template(tokenizer, cfg.data.chat_template)
    in_place = is_in_place_folder(cfg.model.model_name_or_path)
    imported_from = cfg.model.model_name_or_path if in_place else None
    if in_place:  # continue an HF MoE in its own class: only its experts are swapped, each rank reads its own
        with startup.phase("model continued in place", begins=f"continuing {imported_from} in place (its own class "
                           "and routing; each rank reads its experts)", waits=f"reading {imported_from}"):
            model, moe, layout = continue_in_place(imported_from, cfg.moe, training_dtype(ds_config),
                                                   len(tokenizer), given=cfg.given)
            dense_params = sum(p.numel() for p in model.parameters())
        cfg = dataclasses.replace(cfg, moe=moe)
    else:
        dtype = training_dtype(ds_config)
        waits = f"{model_source_text(cfg.model, dtype)}; then the surgery"
        with startup.phase("model built and converted", waits=waits):
            model = load_dense_model(cfg.model, vocab_needed=len(tokenizer), dtype=dtype)
            dense_params = sum(p.numel() for p in model.parameters())
            if upcycle_tag:
                load_dense_weights(model, upcycle_tag)
            model = convert_to_moe(model, cfg.moe, seed=cfg.train.seed)
        layout = settings_of(model)[1]
    outlook = None if in_place else export_outlook(model.config, cfg.moe, layout)
    if outlook and launched_rank() == 0:  # now, not after training: a flag may still make it exact
        print(f"note: {outlook}", flush=True)

    with startup.phase("data"), main_process_first(world):  # rank 0 fills the cache, the others then read it
        data = prepare_data(cfg.data, tokenizer, seed=cfg.train.seed)
    if world.is_main and data.note():
        print(f"note: {data.note()}", flush=True)
    batches = data.train_batches(cfg.train.per_device_train_batch_size, world.rank, world.world_size,
                                 seed=cfg.train.seed)
    with startup.phase("engine"):
        engine = build_engine(model, ds_config, cfg.train.weight_decay, cfg.train.deepspeed)

    trainer = TrainLoop(cfg, engine, world, batches, data.validation, folder, domains=data.domains)
    with startup.phase("checkpoint loaded") if resume_tag or upcycle_tag else nullcontext():
        if resume_tag:
            trainer.resume(resume_tag)
        elif upcycle_tag:
            trainer.start_from_dense(upcycle_tag)
    if world.is_main:  # only now, with every check passed and the checkpoint loaded: a refusal changes nothing
        write_run_files(cfg, folder, tokenizer, model, layout, ds_config, world.world_size, dense_params, data,
                        fresh=resume_tag is None, imported_from=imported_from)
    return world, trainer


def dense_checkpoint_to_upcycle(cfg: RunConfig, folder: RunFolder) -> Path | None:
    """The dense run's tag folder --upcycle_from_checkpoint names (checked by validate), or None."""
    spec = cfg.train.upcycle_from_checkpoint
    return folder.checkpoints.resolve(spec) if spec else None


def load_dense_weights(model, tag_dir: Path) -> None:
    """The dense run's weights at its checkpoint, into the dense model before surgery."""
    weights = dense_weights(tag_dir)
    try:
        model.load_state_dict({name: w.to(model.dtype) for name, w in weights.items()}, strict=True)
    except RuntimeError as err:
        raise ValueError(f"--upcycle_from_checkpoint {tag_dir} holds another model than this run builds "
                         f"({str(err).splitlines()[0]} ...): pass the dense run's --model_config / "
                         f"--model_name_or_path ({RunFolder.of_tag(tag_dir).record_path})") from None


def write_run_files(cfg: RunConfig, folder: RunFolder, tokenizer, model, layout: MoELayout, ds_config: dict,
                    world_size: int, dense_params: int, data: PreparedData, fresh: bool,
                    imported_from: str | None = None) -> None:
    """The run record (every setting, and what it resolved to), the tokenizer and the base model's HF config.
    ``fresh``: no checkpoint is resumed, so metrics of an earlier start in this folder go; ``imported_from``: the HF
    MoE folder the model was read from."""
    if fresh:  # a resumed run keeps (and trims) its metrics
        folder.metrics.remove()
    active = active_parameters(model, MoELayers(model).counted)
    resolved = Resolved(world_size=world_size, deepspeed_config=ds_config, moe_layout=layout,
                        dense_parameters=dense_params, imported_from=imported_from,
                        moe_parameters_per_rank=sum(p.numel() for p in model.parameters()),
                        flops_per_token=flops_per_token(active, *attention_dims(model.config), cfg.data.block_size),
                        **data.resolved())
    folder.write_record(RunRecord(cfg, resolved))
    folder.write_tokenizer(tokenizer)
    folder.write_base_model_config(model.config)


def timeout_message(err: RuntimeError, trainer: TrainLoop, timeout_s: int, world: World) -> str:
    silent = silent_nodes(world.nodes)
    cause = (f"Node{'s' if len(silent) > 1 else ''} not answering from this rank's node: {'; '.join(silent)}: check "
             "that node's network link, power and processes" if silent else
             "A rank is frozen or its node stopped answering: check every node's processes, devices and network")
    return (f"error: rank {world.rank}: {trainer.phase} waited more than --dist_timeout_s ({timeout_s} s) for the "
            f"other ranks ({str(err).splitlines()[0]}). {cause}. The last complete checkpoint is "
            f"{trainer.checkpoints.latest() or 'none yet'}; relaunch with --resume_from_checkpoint latest.")


def print_summary(summary: dict, output_dir: Path, next_lines: list[str]) -> None:
    def number(value, digits=4):
        return "n/a" if value is None else f"{value:.{digits}f}"

    stopped = f" (stopped early: {summary['stopped_by']}; checkpoint saved)" if summary["stopped_by"] else ""
    print(f"\nDone: {summary['steps']} steps{stopped}, loss {number(summary['first_loss'])} -> "
          f"{number(summary['last_loss'])}, eval_loss {number(summary['eval_loss'])}, "
          f"{summary['tokens_per_sec']:.0f} tokens/s (whole run) over {summary['train_seconds']:.0f} s.\n"
          f"Outputs in {output_dir}/: metrics.jsonl, run_config.json, tokenizer/, base_model/, checkpoints/")
    print("\n".join(next_lines))
    print(json.dumps(summary))


def next_steps(output_dir: Path, exportable: bool) -> list[str]:
    """The commands that come after a run, with its folder: the report, and the export of an MoE model to its HF
    class (a model continued in place: its own class; not of a dense run)."""
    folder = shlex.quote(str(output_dir))
    lines = [f"Report (plots, summary.txt): python -m moe_models.report {folder}"]
    if exportable:
        hf_folder = shlex.quote(f"{str(output_dir).rstrip('/')}-hf")
        lines.append(f"Export (an HF model and its tokenizer): python -m moe_models.export --checkpoint "
                     f"{shlex.quote(str(Path(output_dir) / CHECKPOINTS))} --output {hf_folder}")
    return lines


def command() -> None:
    """The `moe-train` console script: `main` without its return value (which the script would take for an exit
    status)."""
    main()


if __name__ == "__main__":
    command()
