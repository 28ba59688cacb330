"""Conversational and prompt/completion data: the labels token by token against a hand rendering, packing and padding
against the model run on each sequence alone, the over-long and bad records (CPU, offline)."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before datasets / transformers read them at import
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import itertools  # noqa: E402
import json  # noqa: E402
from dataclasses import replace  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from transformers import AutoModelForCausalLM, set_seed  # noqa: E402

from moe_models.data.batches import model_inputs  # noqa: E402
from moe_models.data.prepare import blocks_key, prepare_data  # noqa: E402
from moe_models.data.sequences import best_fit_decreasing  # noqa: E402
from moe_models.models.source import preset_config  # noqa: E402
from moe_models.models.tokenization import byte_level_tokenizer  # noqa: E402
from moe_models.run.config import DataConfig  # noqa: E402

EOT = "<|endoftext|>"
BLOCK = 160  # tokens per block: the three conversations below fit one
# A plain template: <|role|>content per message, the assistant's ended by <|endoftext|>.
PLAIN = ("{% for m in messages %}<|{{ m.role }}|>{{ m.content }}{% if m.role == 'assistant' %}<|endoftext|>"
         "{% endif %}{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}")
# The same rendering, with the assistant content and its end marked for the loss.
MARKED = ("{% for m in messages %}<|{{ m.role }}|>{% if m.role == 'assistant' %}{% generation %}{{ m.content }}"
          "<|endoftext|>{% endgeneration %}{% else %}{{ m.content }}{% endif %}{% endfor %}"
          "{% if add_generation_prompt %}<|assistant|>{% endif %}")

CONVERSATIONS = [
    [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}],
    [{"role": "system", "content": "be brief"}, {"role": "user", "content": "2+2?"},
     {"role": "assistant", "content": "4"}, {"role": "user", "content": "and 3+3?"},
     {"role": "assistant", "content": "6"}],
    [{"role": "user", "content": "é?"}, {"role": "assistant", "content": "ça va\nbien"}],
]
# The rendering of each conversation written out by hand: (text, whether the loss is on it).
HAND = [
    [("<|user|>hi<|assistant|>", False), ("yo" + EOT, True)],
    [("<|system|>be brief<|user|>2+2?<|assistant|>", False), ("4" + EOT, True),
     ("<|user|>and 3+3?<|assistant|>", False),
     ("6" + EOT, True)],
    [("<|user|>é?<|assistant|>", False), ("ça va\nbien" + EOT, True)],
]


@pytest.fixture(scope="module")
def tokenizer():
    return byte_level_tokenizer()


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


def hand_sequence(tokenizer, segments, all_tokens=False):
    """Ids and labels of a hand rendering: each part tokenised alone (the byte-level tokenizer has no merges), labels
    -100 outside the trained parts and on the sequence's first token."""
    ids, labels = [], []
    for text, trained in segments:
        part = tokenizer(text, add_special_tokens=False)["input_ids"]
        ids += part
        labels += part if trained or all_tokens else [-100] * len(part)
    return ids, [-100] + labels[1:]


def settings(tmp_path, train_file, **overrides):
    return DataConfig(train_file=train_file, validation_file=train_file, block_size=BLOCK,
                      data_cache_dir=str(tmp_path / "cache"), **overrides)


def template_file(tmp_path, text, name="chat.jinja"):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


@pytest.mark.parametrize("template", [PLAIN, MARKED], ids=["found_from_prefixes", "generation_markers"])
def test_labels_and_packing_are_the_hand_computation(template, tmp_path, tokenizer):
    train = write_jsonl(tmp_path / "chat.jsonl", [{"messages": m} for m in CONVERSATIONS])
    data = prepare_data(settings(tmp_path, train, chat_template=template_file(tmp_path, template)), tokenizer, seed=0)
    expected = [hand_sequence(tokenizer, segments) for segments in HAND]
    expected.sort(key=lambda sequence: -len(sequence[0]))  # packed longest first
    lengths = [len(ids) for ids, _ in expected]
    assert sum(lengths) <= BLOCK  # all three fit one block
    pad = BLOCK - sum(lengths)
    block = data.validation[0]
    assert len(data.validation) == 1 and set(block) == {"input_ids", "labels", "position_ids", "attention_mask"}
    assert block["input_ids"] == sum((ids for ids, _ in expected), []) + [tokenizer.pad_token_id] * pad
    assert block["labels"] == sum((labels for _, labels in expected), []) + [-100] * pad
    assert block["position_ids"] == sum((list(range(n)) for n in lengths), []) + list(range(pad))
    assert block["attention_mask"] == [1] * sum(lengths) + [0] * pad  # for the MoE layers: padding is not routed
    assert data.sequences["validation"] == {"sequences": 3, "overlong": 0, "untrained": 0, "blocks": 1}


def test_the_tokenizers_own_template_agrees_with_transformers_assistant_mask(tmp_path):
    """No --chat_template: the tokenizer's own (with generation blocks) renders; the trained tokens are those of
    apply_chat_template(..., return_assistant_tokens_mask=True), and the hand computation."""
    tokenizer = byte_level_tokenizer()
    tokenizer.chat_template = MARKED
    train = write_jsonl(tmp_path / "chat.jsonl", [{"messages": m} for m in CONVERSATIONS])
    data = prepare_data(settings(tmp_path, train, packing=False), tokenizer, seed=0)
    for row, messages, segments in zip(data.validation, CONVERSATIONS, HAND):
        stock = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True,
                                              return_assistant_tokens_mask=True)
        length = len(stock["input_ids"])
        assert row["input_ids"][:length] == stock["input_ids"]
        assert [label != -100 for label in row["labels"][:length]] == [bool(m) for m in stock["assistant_masks"]]
        assert row["labels"][:length] == hand_sequence(tokenizer, segments)[1]


def test_conversational_prompt_completion_trains_on_the_completion_only(tmp_path, tokenizer):
    """A prompt that holds an assistant turn: only the completion's assistant turn is trained on."""
    record = {"prompt": CONVERSATIONS[1][:4], "completion": CONVERSATIONS[1][4:]}
    train = write_jsonl(tmp_path / "pc.jsonl", [record])
    for template in (PLAIN, MARKED):
        data = prepare_data(settings(tmp_path, train, chat_template=template_file(tmp_path, template)), tokenizer, 0)
        segments = [(text, trained and text.startswith("6")) for text, trained in HAND[1]]
        ids, labels = hand_sequence(tokenizer, segments)
        assert data.validation[0]["input_ids"][:len(ids)] == ids
        assert data.validation[0]["labels"][:len(ids)] == labels


def test_loss_on_all_tokens_and_padded_rows(tmp_path, tokenizer):
    train = write_jsonl(tmp_path / "chat.jsonl", [{"messages": m} for m in CONVERSATIONS])
    data = prepare_data(settings(tmp_path, train, chat_template=template_file(tmp_path, PLAIN),
                                 loss_on_all_tokens=True, packing=False), tokenizer, seed=0)
    assert len(data.validation) == 3
    for row, segments in zip(data.validation, HAND):
        ids, labels = hand_sequence(tokenizer, segments, all_tokens=True)
        pad = BLOCK - len(ids)
        assert row["input_ids"] == ids + [tokenizer.pad_token_id] * pad
        assert row["labels"] == labels + [-100] * pad
        assert row["attention_mask"] == [1] * len(ids) + [0] * pad


def test_domain_entries_tag_the_tokens_and_not_the_padding(tmp_path, tokenizer):
    train = write_jsonl(tmp_path / "chat.jsonl", [{"messages": m} for m in CONVERSATIONS])
    data = prepare_data(settings(tmp_path, f"qa={train}", chat_template=template_file(tmp_path, PLAIN)), tokenizer, 0)
    lengths = [len(hand_sequence(tokenizer, segments)[0]) for segments in HAND]
    assert data.domains == ["qa"]
    assert data.validation[0]["domain_ids"] == [0] * sum(lengths) + [-1] * (BLOCK - sum(lengths))


def test_prompt_completion_strings_need_no_template(tmp_path, tokenizer):
    rows = [{"prompt": "Q: 1+1=", "completion": "2"}, {"prompt": "Q: say hi", "completion": " hi!"}]
    train = write_jsonl(tmp_path / "pc.jsonl", rows)
    data = prepare_data(settings(tmp_path, train), tokenizer, seed=0)
    eos = tokenizer.eos_token_id
    block = data.validation[0]
    ids, labels = [], []
    for row in reversed(rows):  # packed longest first: the second pair (14 tokens), then the first (9)
        prompt = tokenizer(row["prompt"], add_special_tokens=False)["input_ids"]
        completion = tokenizer(row["completion"], add_special_tokens=False)["input_ids"] + [eos]
        ids += prompt + completion
        labels += [-100] * len(prompt) + completion
    assert block["input_ids"][:len(ids)] == ids
    assert block["labels"][:len(ids)] == labels


def test_overlong_sequences_are_truncated_or_dropped_and_counted(tmp_path, tokenizer):
    long = [{"role": "user", "content": "x" * 40}, {"role": "assistant", "content": "y" * 40}]
    no_answer_left = [{"role": "user", "content": "z" * 70}, {"role": "assistant", "content": "w"}]
    train = write_jsonl(tmp_path / "chat.jsonl", [{"messages": m} for m in [CONVERSATIONS[0], long, no_answer_left]])
    template = template_file(tmp_path, PLAIN)
    truncated = prepare_data(replace(settings(tmp_path, train, chat_template=template), block_size=64), tokenizer, 0)
    assert truncated.sequences["train"] == {"sequences": 3, "overlong": 2, "untrained": 1, "blocks": 2}
    starts = [list(block["position_ids"]).count(0) for block in truncated.train]
    assert truncated.train[0]["input_ids"] == hand_sequence(tokenizer, [(
        "<|user|>" + "x" * 40 + "<|assistant|>" + "y" * 40, True)])[0][:64]  # the long one, cut at 64
    assert starts == [1, 2]  # the long one fills its block; the first conversation, then padding
    dropped = prepare_data(replace(settings(tmp_path, train, chat_template=template), block_size=64,
                                   overlong_sequences="drop"), tokenizer, 0)
    assert dropped.sequences["train"] == {"sequences": 3, "overlong": 2, "untrained": 0, "blocks": 1}


def test_packing_is_best_fit_decreasing():
    # lengths 6, 5, 4, 3, 2 into blocks of 10: 6 opens a block, 5 another; 4 goes where it leaves the least room (with
    # the 6: 0 left); 3 and 2 join the 5. In order they would take three blocks: [6], [5, 4], [3, 2].
    assert best_fit_decreasing([0, 1, 2, 3, 4], [6, 5, 4, 3, 2], 10) == [[0, 2], [1, 3, 4]]
    assert best_fit_decreasing([2, 0], [9, 2, 7, 5], 10) == [[0], [2]]  # only the rows given, longest first


def test_settings_that_change_the_blocks_change_the_cache_key(tmp_path, tokenizer):
    train = write_jsonl(tmp_path / "chat.jsonl", [{"messages": m} for m in CONVERSATIONS])
    base = settings(tmp_path, train, chat_template=template_file(tmp_path, PLAIN))
    keys = {json.dumps(blocks_key(data, tokenizer, 0), sort_keys=True) for data in [
        base, replace(base, loss_on_all_tokens=True), replace(base, packing=False),
        replace(base, overlong_sequences="drop"), replace(base, chat_template=template_file(tmp_path, MARKED, "b"))]}
    assert len(keys) == 5


# --------------------------------------------------------------------------------------------- the model's view


@pytest.mark.parametrize("preset", ["tiny-llama", "tiny-qwen3"])
@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_packed_and_padded_rows_give_each_sequence_its_own_logits(preset, attention, tmp_path, tokenizer):
    """A packed block's logits for each conversation, and a padded row's, equal that conversation's logits alone."""
    set_seed(0)
    model = AutoModelForCausalLM.from_config(preset_config(preset), attn_implementation=attention).eval()
    train = write_jsonl(tmp_path / "chat.jsonl", [{"messages": m} for m in CONVERSATIONS])
    template = template_file(tmp_path, PLAIN)
    packed = prepare_data(settings(tmp_path, train, chat_template=template), tokenizer, 0).validation
    padded = prepare_data(settings(tmp_path, train, chat_template=template, packing=False), tokenizer, 0).validation
    alone = [torch.tensor([hand_sequence(tokenizer, segments)[0]]) for segments in HAND]
    with torch.no_grad():
        expected = [model(input_ids=ids).logits[0] for ids in alone]
        packed_logits = model(**model_inputs(packed.with_format("torch")[:1], "cpu")).logits[0]
        padded_logits = model(**model_inputs(padded.with_format("torch")[:3], "cpu")).logits
    starts = dict(zip(sorted(range(3), key=lambda number: -len(expected[number])), itertools.accumulate(
        sorted((len(logits) for logits in expected), reverse=True), initial=0)))  # packed longest first
    for number, logits in enumerate(expected):
        start = starts[number]
        torch.testing.assert_close(packed_logits[start:start + len(logits)], logits, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(padded_logits[number, :len(logits)], logits, atol=1e-5, rtol=1e-4)


# --------------------------------------------------------------------------------------------- refusals


def test_conversations_without_a_template_are_refused(tmp_path, tokenizer):
    train = write_jsonl(tmp_path / "chat.jsonl", [{"messages": m} for m in CONVERSATIONS])
    with pytest.raises(ValueError, match="the tokenizer has no chat template to render them: pass --chat_template"):
        prepare_data(settings(tmp_path, train), tokenizer, 0)


def test_mixed_formats_are_refused_naming_the_files(tmp_path, tokenizer):
    chat = write_jsonl(tmp_path / "chat.jsonl", [{"messages": m} for m in CONVERSATIONS])
    text = tmp_path / "plain.txt"
    text.write_text("some text\n" * 5)
    with pytest.raises(ValueError, match=f"{chat} holds messages, {text} holds text\\); one run reads one format"):
        prepare_data(settings(tmp_path, f"{chat},{text}"), tokenizer, 0)
    data = replace(settings(tmp_path, chat), validation_file=str(text))
    with pytest.raises(ValueError, match="--train_file holds messages, --validation_file holds text"):
        prepare_data(data, tokenizer, 0)


BAD_RECORDS = {
    "unknown_role": ({"messages": [{"role": "robot", "content": "x"}, {"role": "assistant", "content": "y"}]},
                     "message 1 has an unknown role 'robot'; the roles are system, developer, user, assistant, tool"),
    "empty": ({"messages": []}, "the conversation is empty"),
    "not_a_list": ({"messages": "hello"}, r"the conversation is str, not a list of \{role, content\} messages"),
    "no_assistant": ({"messages": [{"role": "user", "content": "x"}]},
                     "the conversation has no assistant turn: nothing to train on"),
    "content_not_text": ({"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": ["y"]}]},
                         r"message 2 \(assistant\): content is list, not a string"),
}


@pytest.mark.parametrize("case", BAD_RECORDS)
def test_bad_records_are_refused_naming_the_file_and_record(case, tmp_path, tokenizer):
    record, expected = BAD_RECORDS[case]
    train = write_jsonl(tmp_path / "chat.jsonl", [{"messages": CONVERSATIONS[0]}, record])
    with pytest.raises(ValueError, match=f"{train} record 2: {expected}; fix or remove that record"):
        prepare_data(settings(tmp_path, train, chat_template=template_file(tmp_path, PLAIN)), tokenizer, 0)


def test_a_template_that_fails_to_render_is_refused(tmp_path, tokenizer):
    train = write_jsonl(tmp_path / "chat.jsonl", [{"messages": m} for m in CONVERSATIONS])
    failing = "{% if messages[0].role == 'system' %}{{ raise_exception('no system turns') }}{% endif %}" + PLAIN
    expected = rf"{train} record 2: the chat template fails to render it \(TemplateError: no system turns\)"
    with pytest.raises(ValueError, match=expected):
        prepare_data(settings(tmp_path, train, chat_template=template_file(tmp_path, failing)), tokenizer, 0)


def test_conversations_are_not_streamed(tmp_path, tokenizer):
    train = write_jsonl(tmp_path / "chat.jsonl", [{"messages": m} for m in CONVERSATIONS])
    data = replace(settings(tmp_path, train), validation_file=None, streaming=True, streaming_validation_texts=1)
    with pytest.raises(ValueError, match=f"{train} holds messages records, and --streaming reads text only"):
        prepare_data(data, tokenizer, 0)


def test_a_missing_template_file_is_a_settings_problem(tmp_path):
    from moe_models.data.text import data_problems
    missing = str(tmp_path / "chat.jinja")
    assert f"--chat_template {missing!r} is not a file; give a Jinja chat template file" in data_problems(
        DataConfig(chat_template=missing))
