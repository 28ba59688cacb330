"""Every MoE causal-LM family of the installed transformers, continued in place (moe_models/hf/in_place.py): each
family's probe (its config made small, 8 experts) with its experts swapped keeps the stock class's logits and
gradients (moe_models/hf/in_place_proof.py), or the family is refused with the reason. docs/models.md carries the
table (UPDATE_DOCS=1 rewrites it). The families share one survey; each proof is one small forward and backward."""

from __future__ import annotations

from pathlib import Path

import pytest
from family_survey import in_place_families, in_place_markdown, in_place_survey, refresh_doc_table

DOC = Path(__file__).resolve().parents[2] / "docs" / "models.md"
BEGIN, END = "<!-- in place table: begin -->", "<!-- in place table: end -->"


@pytest.mark.slow  # the survey: every MoE family's probe proven (shared with the docs test)
def test_at_least_40_moe_families_continue_in_place_and_every_refusal_says_why():
    outcomes = in_place_survey()
    assert len(outcomes) >= 49, [o.model_type for o in outcomes]
    assert len(in_place_families()) >= 40, [o for o in outcomes if not o.in_place]
    for name in ("deepseek_v3", "gpt_oss", "qwen3_moe", "qwen3_next", "olmoe", "mixtral", "jamba", "nemotron_h",
                 "granitemoehybrid", "minimax_m2", "glm4_moe", "qwen3_5_moe_text"):
        assert name in in_place_families(), next(o.how for o in outcomes if o.model_type == name)
    for outcome in outcomes:
        if not outcome.in_place:
            assert "\n" not in outcome.how and "start from a dense model" in outcome.how, outcome


def test_docs_models_carries_the_in_place_table():
    assert refresh_doc_table(DOC, BEGIN, END, in_place_markdown()), ("docs/models.md's in-place table is stale: "
                           "UPDATE_DOCS=1 pytest tests/models/test_in_place_coverage.py -k docs")
