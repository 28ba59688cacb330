"""train.py continues an HF MoE folder in place (hf/in_place_run.py): a DeepSeek-V3-shaped checkpoint (MLA attention,
a dense first block, group-limited sigmoid routing with a correction bias, a shared expert) trains at ep_size 2
through the launcher with ZeRO 2 with the ep_size 1 losses and its correction bias moving (aux-loss-free
balancing), resumes exactly, logs its layers' routing metrics, is planned from its config (--plan), exports back to
its own class (which stock transformers loads with the run's loss, and which continues in place again), and refuses
what it cannot do with one line, writing nothing."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from helpers import REPO, launch
from safetensors import safe_open
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

import train
from examples import small_moe_folder
from moe_models.data.batches import model_inputs
from moe_models.data.prepare import prepare_data
from moe_models.hf.exporter import export
from moe_models.hf.in_place_export import exported_config
from moe_models.hf.in_place_load import load_in_place
from moe_models.hf.in_place_run import continue_in_place, is_in_place_folder
from moe_models.models.probe import small_moe_config
from moe_models.models.tokenization import byte_level_tokenizer
from moe_models.moe.model_layers import MoELayers
from moe_models.run.cli import parse_args
from moe_models.run.config import ConfigError, MoEConfig
from moe_models.run.folder import RunFolder
from moe_models.training.validate import validate

FLAGS = ["--max_steps", "4", "--logging_steps", "1", "--eval_steps", "0", "--synthetic_examples", "300",
         "--block_size", "32", "--per_device_train_batch_size", "2", "--warmup_steps", "1", "--disable_tqdm",
         "--deepspeed", "zero2", "--save_steps", "2"]
# Conversations one per row (--packing false), padded to 128 tokens.
PADDED_CHAT = ["--train_file", str(REPO / "examples" / "chat" / "conversations.jsonl"), "--chat_template",
               str(REPO / "examples" / "chat" / "chat.jinja"), "--packing", "false", "--block_size", "128"]


@pytest.fixture(scope="module")
def deepseek_folder(tmp_path_factory):
    """A DeepSeek-V3 checkpoint as save_pretrained writes it (its config made small, fresh weights), with a
    tokenizer: what the quickstart's examples/small_moe_folder.py writes."""
    folder = tmp_path_factory.mktemp("deepseek_v3") / "folder"
    small_moe_folder.main(["--model_type", "deepseek_v3", "--output", str(folder)])
    return folder


def losses(output_dir) -> dict[int, float]:
    return {row["step"]: row["loss"] for row in RunFolder(output_dir).metrics.rows() if "loss" in row}


def biases(output_dir) -> dict[int, list[float]]:
    return {row["step"]: row["moe/layer_0/score_bias"] for row in RunFolder(output_dir).metrics.rows() if "loss" in row}


@pytest.mark.distributed
@pytest.mark.slow
def test_a_deepseek_v3_folder_trains_in_place_at_ep2_as_at_ep1_and_resumes_exactly(deepseek_folder, tmp_path,
                                                                                    capsys):
    # aux-loss-free balancing moves the family's correction bias by every rank's loads: the same at ep_size 1 and 2
    common = ["--model_name_or_path", str(deepseek_folder), *FLAGS, "--router_bias_update_rate", "1e-3"]
    # one process reading both ranks' sequences: a batch of 4 is the two ranks' batches of 2 (data/batches.py)
    one = train.main([*common, "--per_device_train_batch_size", "4", "--output_dir", str(tmp_path / "ep1")])
    assert f"python -m moe_models.export --checkpoint {tmp_path / 'ep1' / 'checkpoints'}" in capsys.readouterr().out
    launch(["train.py", *common, "--ep_size", "2", "--output_dir", str(tmp_path / "ep2")])
    ep1, ep2 = losses(tmp_path / "ep1"), losses(tmp_path / "ep2")
    assert ep1.keys() == ep2.keys() == {1, 2, 3, 4} and one["steps"] == 4
    assert ep2 == pytest.approx(ep1, rel=1e-5)
    record = RunFolder(tmp_path / "ep2").record()
    moe = record.settings.moe
    assert (moe.num_experts, moe.top_k, moe.ep_size) == (8, 2, 2) and record.resolved.imported_from == \
        str(deepseek_folder)
    assert list(record.resolved.moe_layout.blocks) == [1]  # the first block stays dense (first_k_dense_replace)
    row = [r for r in RunFolder(tmp_path / "ep2").metrics.rows() if "loss" in r][-1]
    routes = 2 * 2 * 32 * 2  # ranks x sequences x tokens x top-2, one step
    assert sum(row["moe/layer_0/routed_per_expert"]) == routes and "moe/layer_0/router_entropy" in row
    bias = biases(tmp_path / "ep1")
    assert biases(tmp_path / "ep2") == bias and any(bias[4])  # it moved, and as at ep_size 1
    # an exact resume: steps 3 and 4 again from the checkpoint of step 2, whose bias it restores (steps 3 and 4 move
    # it on from there: a bias restarted from the folder's zeros would end elsewhere)
    train.main([*common, "--per_device_train_batch_size", "4", "--output_dir", str(tmp_path / "ep1"),
                "--resume_from_checkpoint",
                str(tmp_path / "ep1" / "checkpoints" / "global_step2")])
    assert losses(tmp_path / "ep1") == ep1 and biases(tmp_path / "ep1") == bias
    exported_in_its_class(tmp_path, deepseek_folder, ep2)


def exported_in_its_class(tmp_path, source, ep2_losses):
    """The EP2 run's checkpoint of step 2 exported: the stock class loads it with the loss the run logged at step 3
    (the step that started from those weights), in the files stock save_pretrained writes, and it continues in place
    again; an expert file missing is refused, nothing written."""
    exported = tmp_path / "exported"
    export(tmp_path / "ep2" / "checkpoints", exported, tag="global_step2")
    stock = AutoModelForCausalLM.from_pretrained(exported)
    step3 = batches_of(tmp_path / "ep1", 4, 3)[-1]  # both ranks' sequences of a step, as at EP1
    with torch.no_grad():
        assert stock(**model_inputs(step3, "cpu")).loss.item() == pytest.approx(ep2_losses[3], rel=1e-5)
    reference = tmp_path / "stock"  # what stock save_pretrained writes for the config, and the source's config
    AutoModelForCausalLM.from_config(stock.config).save_pretrained(reference)
    assert saved_keys(exported) == saved_keys(reference)
    assert json.loads((exported / "config.json").read_text()) == json.loads((source / "config.json").read_text())
    assert AutoTokenizer.from_pretrained(exported)("héllo").input_ids == byte_level_tokenizer()("héllo").input_ids
    # it continues in place again: its own experts 4-7 on the second of two ranks
    assert is_in_place_folder(str(exported))
    validate(parse_args(["--model_name_or_path", str(exported), "--output_dir", str(tmp_path / "again"),
                         "--ep_size", "2"]), world_size=2)
    again = load_in_place(exported, ep_size=2, ep_rank=1)
    assert torch.equal(again.model.layers[1].mlp.experts.experts.gate_up_proj,
                       stock.model.layers[1].mlp.experts.gate_up_proj[4:])
    next((tmp_path / "ep2" / "checkpoints").glob("global_step2/layer_0_expert_7_*")).unlink()
    with pytest.raises(ValueError, match="lacks expert 7 of MoE layer 0"):
        export(tmp_path / "ep2" / "checkpoints", tmp_path / "refused", tag="global_step2")
    assert not (tmp_path / "refused").exists()


def batches_of(run_dir, batch_size: int, steps: int) -> list[dict]:
    """The training batches of a run's first ``steps`` steps, read again from its data settings in one process."""
    run = RunFolder(run_dir)
    settings = run.record().settings
    data = prepare_data(settings.data, AutoTokenizer.from_pretrained(run.tokenizer_dir), seed=settings.train.seed)
    batches = data.train_batches(batch_size, rank=0, world_size=1, seed=settings.train.seed)
    return [next(batches) for _ in range(steps)]


def test_a_run_in_place_on_padded_conversations_routes_their_real_tokens(deepseek_folder, tmp_path):
    """train.py gives each batch's attention mask to the swapped experts: every step's routes are its real tokens'
    (moe/padding.py; the counts against the stock model: tests/hf/test_in_place_padding.py)."""
    train.main(["--model_name_or_path", str(deepseek_folder), *FLAGS, *PADDED_CHAT,
                "--max_steps", "2", "--save_steps", "0", "--output_dir", str(tmp_path)])
    rows = [row for row in RunFolder(tmp_path).metrics.rows() if "loss" in row]
    real = [int(batch["attention_mask"].sum()) for batch in batches_of(tmp_path, 2, 2)]
    assert all(tokens < 2 * 128 for tokens in real)  # padding in every step
    assert [row["moe/layer_0/routed_tokens"] for row in rows] == real
    assert [sum(row["moe/layer_0/routed_per_expert"]) for row in rows] == [2 * tokens for tokens in real]


def saved_keys(folder) -> set[str]:
    return {key for path in folder.glob("*.safetensors") for key in safe_open(path, "pt").keys()}


def test_what_an_in_place_run_cannot_do_is_refused_writing_nothing(deepseek_folder, tmp_path, capsys):
    olmoe = tmp_path / "olmoe"  # a family whose router has no correction bias
    AutoModelForCausalLM.from_config(small_moe_config(AutoConfig.for_model("olmoe"))).save_pretrained(olmoe)
    byte_level_tokenizer().save_pretrained(olmoe)
    for folder, flags, message in ((deepseek_folder, ["--num_experts", "4"], "--num_experts: "),
                                   (deepseek_folder, ["--score_function", "sigmoid"], "--score_function: "),
                                   (olmoe, ["--router_bias_update_rate", "1e-3"], "--router_bias_update_rate: "
                                    f"{olmoe} (olmoe) has no correction bias (e_score_correction_bias, expert_bias, "
                                    "balancing_biases) at model.layers.0.mlp")):
        out = tmp_path / "refused"
        with pytest.raises(SystemExit):
            train.main(["--model_name_or_path", str(folder), *FLAGS, *flags, "--output_dir", str(out)])
        assert message in capsys.readouterr().err
        assert not out.exists()


@pytest.mark.parametrize("ep_size", [1, 2])
def test_the_plan_counts_an_in_place_folder_from_its_config(deepseek_folder, tmp_path, ep_size):
    """--plan builds the family's class on the meta device: its weights per rank are the stock class's parameters,
    the routed experts split over ep_size and the rest replicated (fp32 here: no GPU with bf16); its active
    parameters count the family's top-k of its experts per token."""
    config = AutoConfig.from_pretrained(deepseek_folder)
    with torch.device("meta"):
        stock = AutoModelForCausalLM.from_config(config)
    experts = sum(p.numel() for name, p in stock.named_parameters() if ".mlp.experts." in name)
    dense = sum(p.numel() for p in stock.parameters()) - experts
    embedding = stock.get_input_embeddings().weight.numel()
    planned = train.main(["--model_name_or_path", str(deepseek_folder), "--plan", "--ep_size", str(ep_size),
                          "--plan_world_size", "2", "--block_size", "32", "--output_dir", str(tmp_path)])
    parameters = planned["parameters"]
    assert (parameters["dense"], parameters["experts"]) == (dense, experts) and experts > 0
    assert parameters["local"] == dense + experts // ep_size
    assert planned["bytes_per_rank"]["weights"] == 4 * (dense + experts / ep_size)
    top_k, num_experts = config.num_experts_per_tok, config.n_routed_experts
    assert parameters["active"] == dense - embedding + experts * top_k // num_experts


def test_the_correction_bias_moves_by_the_rate_and_the_sign_of_each_experts_load_gap(deepseek_folder):
    """One step of aux-loss-free balancing in one process: bias_e += rate x sign(mean load - load_e), the loads
    counted from what the family's router chose (its top-k indices, read by a hook on the stock router). A bf16 model:
    the bias is held in fp32, where a step of 0.01 is exact (in bf16 it would be 0.01001)."""
    rate = 0.01
    model, _, _ = continue_in_place(str(deepseek_folder), MoEConfig(router_bias_update_rate=rate), torch.bfloat16,
                                    257, given=frozenset({"router_bias_update_rate"}))
    router = model.model.layers[1].mlp.gate
    assert router.e_score_correction_bias.dtype == torch.float32 and router.weight.dtype == torch.bfloat16
    chosen = []
    router.register_forward_hook(lambda module, args, output: chosen.append(output[2]))
    layers = MoELayers(model)
    model.train()
    ids = torch.randint(0, 257, (4, 32), generator=torch.Generator().manual_seed(0))
    model(input_ids=ids, labels=ids)
    load = torch.bincount(chosen[0].reshape(-1), minlength=8).double()
    before = router.e_score_correction_bias.clone()
    layers.after_optimizer_step(applied=False)  # a skipped step moves nothing, and the next one counts anew
    assert torch.equal(router.e_score_correction_bias, before)
    chosen.clear()
    model(input_ids=ids, labels=ids)
    layers.after_optimizer_step(applied=True)
    expected = before + rate * torch.sign(load.mean() - load).float()
    assert load.sum() == 4 * 32 * 2 and (load != load.mean()).any()
    assert torch.allclose(router.e_score_correction_bias, expected, rtol=0, atol=1e-9)


def test_expert_parallelism_is_checked_against_the_checkpoints_experts(tmp_path):
    """--num_experts is not the model's when its folder is an MoE checkpoint: 12 experts take ep_size 3 (the flag's
    default of 8 would not), and 12 experts refuse ep_size 8 naming 12."""
    folder = tmp_path / "twelve"
    config = small_moe_config(AutoConfig.for_model("deepseek_v3"))
    config.n_routed_experts = 12
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    flags = ["--model_name_or_path", str(folder), "--output_dir", str(tmp_path / "out")]
    validate(parse_args([*flags, "--ep_size", "3"]), world_size=3)
    with pytest.raises(ConfigError, match=r"num_experts \(12\) must be divisible by ep_size \(8\)"):
        validate(parse_args([*flags, "--ep_size", "8"]), world_size=8)


def test_the_exported_config_has_output_router_logits_as_the_source_had_it(tmp_path):
    """The run turns output_router_logits on (the family's balance loss joins its loss); the export's config has it
    as the source folder had it, or the class's default when that folder is gone, and the run's other settings."""
    source = small_moe_config(AutoConfig.for_model("qwen3_moe"))
    source.output_router_logits = False
    source.save_pretrained(tmp_path / "source")
    run = copy.deepcopy(source)
    run.output_router_logits, run.norm_topk_prob = True, not source.norm_topk_prob
    exported = exported_config(run, str(tmp_path / "source"))
    assert (exported.output_router_logits, exported.norm_topk_prob) == (False, run.norm_topk_prob)
    assert exported_config(run, str(tmp_path / "gone")).output_router_logits is False
    assert run.output_router_logits  # the run's config is left as it was
