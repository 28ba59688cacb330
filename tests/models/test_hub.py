"""A name that is no local folder: a hub id while the hub is unreachable, or a missing path, says so and how to use a
local folder (the tokenizer is loaded first, then the model)."""

import huggingface_hub.constants
import pytest

from moe_models.models.source import load_dense_model
from moe_models.models.tokenization import load_tokenizer
from moe_models.run.config import ModelConfig

HUB_ID = "Qwen/Qwen3-0.6B"  # not in the local cache


@pytest.fixture
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


def test_a_hub_id_offline_says_the_hub_is_unreachable_and_how_to_use_a_folder(offline):
    with pytest.raises(ValueError) as err:
        load_tokenizer(ModelConfig(model_name_or_path=HUB_ID))
    message = str(err.value)
    assert message == (f"could not load a tokenizer: --model_name_or_path '{HUB_ID}' is no local folder, so it was "
                       "taken as a hub id, and the HF hub is unreachable (HF_HUB_OFFLINE=1 is set) with no copy in the "
                       f"local cache: on a machine that reaches the hub, download it (hf download {HUB_ID} --local-dir "
                       "DIR, or save_pretrained(DIR)), copy DIR here and pass --model_name_or_path DIR")
    assert "\n" not in message and "--tokenizer_name" not in message  # a tokenizer alone would not bring the model
    with pytest.raises(ValueError) as err:
        load_dense_model(ModelConfig(model_name_or_path=HUB_ID), vocab_needed=257)
    assert str(err.value).startswith(f"could not load the model: --model_name_or_path '{HUB_ID}' is no local folder")


def test_a_missing_tokenizer_folder_is_not_called_a_hub_id(offline, tmp_path):
    with pytest.raises(ValueError) as err:
        load_tokenizer(ModelConfig(tokenizer_name=str(tmp_path / "tokenizer")))
    assert str(err.value) == (f"could not load a tokenizer: --tokenizer_name '{tmp_path / 'tokenizer'}': no such "
                              "folder (nor a hub id); give a folder written by save_pretrained")
