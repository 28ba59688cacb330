"""Fine-tuning on conversations through train.py: the loss is on the answers (a learning check where only the answers
can be learned), the logged counts are the answer tokens, the run says what became of over-long ones, its export
answers through stock apply_chat_template and generate, and a resume of the run on padded rows (--packing false)
continues exactly."""

import contextlib
import io
import json
import random

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import train
from moe_models import export

# Rendered: <|user|>{20 random letters}<|assistant|>ok!<|endoftext|>, 45 tokens of the byte-level tokenizer.
TEMPLATE = ("{% for m in messages %}<|{{ m.role }}|>{{ m.content }}{% if m.role == 'assistant' %}<|endoftext|>"
            "{% endif %}{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}")
ANSWER_TOKENS = 4  # "ok!" and <|endoftext|>
BATCH = 4
FLAGS = ["--num_experts", "4", "--max_steps", "30", "--warmup_steps", "2", "--learning_rate", "3e-3",
         "--block_size", "64", "--per_device_train_batch_size", str(BATCH), "--max_eval_batches", "2",
         "--eval_steps", "0", "--logging_steps", "1", "--disable_tqdm"]


@pytest.fixture(scope="module")
def chat_files(tmp_path_factory):
    """64 conversations whose user turn is noise and whose answer is always "ok!"; one more whose answer is past
    --block_size."""
    folder = tmp_path_factory.mktemp("chat")
    rng = random.Random(0)
    rows = [{"messages": [{"role": "user", "content": "".join(rng.choice("abcdefghijklmnopqrstuvwxyz")
                                                              for _ in range(20))},
                          {"role": "assistant", "content": "ok!"}]} for _ in range(64)]
    rows.append({"messages": [{"role": "user", "content": "x" * 60}, {"role": "assistant", "content": "y"}]})
    (folder / "chat.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    (folder / "chat.jinja").write_text(TEMPLATE)
    return ["--train_file", str(folder / "chat.jsonl"), "--chat_template", str(folder / "chat.jinja")]


def rows(output_dir):
    return [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def masked(world, tmp_path_factory, chat_files):
    """The run on the answers, one conversation per row padded to the block (--packing false: the forward takes the
    attention mask), with a checkpoint half-way; and what it printed."""
    folder = tmp_path_factory.mktemp("answers")
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        train.main([*FLAGS, *chat_files, "--packing", "false", "--save_steps", "15", "--output_dir", str(folder)])
    return folder, printed.getvalue()


@pytest.mark.slow
def test_the_answers_are_learned_where_the_noise_cannot_be(masked, tmp_path, chat_files):
    masked, out = masked
    unmasked = tmp_path / "all"
    assert "sequences are longer than --block_size 64 and were truncated" in out
    assert "1 sequences have no token to train on within the block and were dropped" in out
    train.main([*FLAGS, *chat_files, "--loss_on_all_tokens", "true", "--output_dir", str(unmasked)])
    train_rows = [row for row in rows(masked) if "loss" in row]
    # every row holds one conversation, so each step trains on its 4 answer tokens per row
    assert {row["trained_tokens"] for row in train_rows} == {BATCH * ANSWER_TOKENS}
    # ...and the MoE layers route its 45 tokens, not the 19 of padding after them
    assert {row["moe/layer_0/routed_tokens"] for row in train_rows} == {BATCH * 45}
    assert train_rows[0]["loss"] > 3.0
    answers_loss = [row for row in rows(masked) if "eval_loss" in row][-1]["eval_loss"]
    all_loss = [row for row in rows(unmasked) if "eval_loss" in row][-1]["eval_loss"]
    assert answers_loss < 0.5
    # the 20 noise letters of the 44 targets cost ln 26 each at best: 20 x 3.26 / 44 = 1.48 nats a token
    assert all_loss > 20 * 3.258 / 44
    record = json.loads((masked / "run_config.json").read_text())["resolved"]["sequences"]
    assert sum(split["overlong"] for split in record.values()) == 1

    # the export carries the template: stock apply_chat_template and generate answer a new noise prompt
    export.main(["--checkpoint", str(masked / "checkpoints"), "--output", str(tmp_path / "hf")])
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "hf")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "qwertyuiopasdfghjklz"}],
                                           add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**prompt, max_new_tokens=4, do_sample=False)
    assert tokenizer.decode(out[0, prompt["input_ids"].shape[1]:]) == "ok!<|endoftext|>"


@pytest.mark.slow
def test_a_chat_run_resumes_exactly(masked, tmp_path, chat_files):
    masked, _ = masked
    resumed = tmp_path / "resumed"
    train.main([*FLAGS, *chat_files, "--packing", "false", "--output_dir", str(resumed), "--resume_from_checkpoint",
                str(masked / "checkpoints" / "global_step15")])
    losses = {row["step"]: row["loss"] for row in rows(masked) if "loss" in row}
    after = {row["step"]: row["loss"] for row in rows(resumed) if "loss" in row}
    assert sorted(after) == list(range(16, 31))
    assert after == {step: losses[step] for step in after}
