"""The built-in synthetic corpus: short, regular examples from a few clearly different domains (arithmetic,
sorting, brackets, key-value recall, prose), each tagged with its domain so that expert routing can be analysed
per domain. Used when no file or hub dataset is given."""

from __future__ import annotations

import random
from typing import Callable

from datasets import Dataset

_LETTERS = "abcdefghijklmnopqrstuvwxyz"
_CLOSER = {"(": ")", "[": "]", "{": "}"}
_SUBJECTS = ("the cat", "a dog", "my friend", "the old man", "a small bird", "the teacher", "our neighbour")
_VERBS = ("sees", "likes", "finds", "follows", "helps", "watches", "paints")
_OBJECTS = ("the red ball", "a green tree", "the quiet river", "a warm house", "the big city", "an open door")
_ENDINGS = ("today", "at night", "in the morning", "every day", "again", "near the sea")


def _arithmetic(rng: random.Random) -> str:
    """Two-digit addition: ``37+48=85``."""
    a, b = rng.randrange(100), rng.randrange(100)
    return f"{a}+{b}={a + b}"


def _sorting(rng: random.Random) -> str:
    """Digits and the same digits sorted: ``sort 9 2 7 -> 2 7 9``."""
    digits = [rng.randrange(10) for _ in range(rng.randint(3, 7))]
    return f"sort {' '.join(map(str, digits))} -> {' '.join(map(str, sorted(digits)))}"


def _brackets(rng: random.Random) -> str:
    """An unfinished bracket string and the closers that balance it: ``([]{ -> })``."""
    open_stack: list[str] = []
    prefix: list[str] = []
    for _ in range(rng.randint(2, 10)):
        if len(open_stack) > 1 and rng.random() < 0.4:  # keep at least one bracket open
            prefix.append(_CLOSER[open_stack.pop()])
        else:
            opener = rng.choice("([{")
            open_stack.append(opener)
            prefix.append(opener)
    closing = "".join(_CLOSER[opener] for opener in reversed(open_stack))
    return f"{''.join(prefix)} -> {closing}"


def _kv_recall(rng: random.Random) -> str:
    """Key-value pairs, then one key's value: ``k3=q k1=z k7=a ? k1 -> z``."""
    keys = rng.sample(range(10), rng.randint(3, 5))
    values = [rng.choice(_LETTERS) for _ in keys]
    asked = rng.randrange(len(keys))
    pairs = " ".join(f"k{key}={value}" for key, value in zip(keys, values))
    return f"{pairs} ? k{keys[asked]} -> {values[asked]}"


def _prose(rng: random.Random) -> str:
    """A template sentence from small word lists: ``The cat likes a green tree at night.``"""
    sentence = f"{rng.choice(_SUBJECTS)} {rng.choice(_VERBS)} {rng.choice(_OBJECTS)} {rng.choice(_ENDINGS)}."
    return sentence[0].upper() + sentence[1:]


_GENERATORS: dict[str, Callable[[random.Random], str]] = {
    "arithmetic": _arithmetic,
    "sorting": _sorting,
    "brackets": _brackets,
    "kv_recall": _kv_recall,
    "prose": _prose,
}
DOMAINS: tuple[str, ...] = tuple(_GENERATORS)
DOMAIN_INDEX = {domain: index for index, domain in enumerate(DOMAINS)}


def synthetic_corpus(num_examples: int, seed: int) -> Dataset:
    """``num_examples`` examples, as evenly spread over DOMAINS as possible and shuffled together.

    Columns: ``text`` and ``domain``. Deterministic in (num_examples, seed); global RNG state is untouched.
    """
    rng = random.Random(seed)
    domains = [DOMAINS[i % len(DOMAINS)] for i in range(num_examples)]
    rng.shuffle(domains)
    texts = [_GENERATORS[domain](rng) for domain in domains]
    return Dataset.from_dict({"text": texts, "domain": domains})
