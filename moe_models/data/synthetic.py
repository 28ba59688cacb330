"""The built-in synthetic corpus: short, regular examples from clearly different domains, each tagged with its domain
so that expert routing can be analysed per domain. Used when no file or hub dataset is given.

Five domains are rules (arithmetic, sorting, brackets, key-value recall, prose); three are facts to memorise
(geography, biography, chemistry): a fixed made-up world of entities, each domain with its own letters and words,
where the value of an (entity, attribute) pair never changes. Rules reward depth, facts reward parameters, so the
corpus is one where the capacity of a model can matter.

Every random choice goes through ``Draws``, which adds up its information: ``entropy_floor`` is the corpus's own
entropy per token, the lowest loss any model can reach on it (docs/payoff.md).
"""

from __future__ import annotations

import functools
import math
import random
from dataclasses import dataclass
from typing import Callable, Sequence

from datasets import Dataset

_LETTERS = "abcdefghijklmnopqrstuvwxyz"
_CLOSER = {"(": ")", "[": "]", "{": "}"}
_SUBJECTS = ("the cat", "a dog", "my friend", "the old man", "a small bird", "the teacher", "our neighbour")
_VERBS = ("sees", "likes", "finds", "follows", "helps", "watches", "paints")
_OBJECTS = ("the red ball", "a green tree", "the quiet river", "a warm house", "the big city", "an open door")
_ENDINGS = ("today", "at night", "in the morning", "every day", "again", "near the sea")


class Draws:
    """A seeded ``random.Random`` for the generators that adds up the information of each choice in ``nats``.

    Each method is one uniform (or coin) choice whose outcome the text shows, so the text's information is the sum
    of its choices' (the generators are written so that no two choice sequences give the same text).
    """

    def __init__(self, rng: random.Random):
        self.rng, self.nats = rng, 0.0

    def below(self, n: int) -> int:
        self.nats += math.log(n)
        return self.rng.randrange(n)

    def between(self, low: int, high: int) -> int:
        self.nats += math.log(high - low + 1)
        return self.rng.randint(low, high)

    def choice(self, options):
        self.nats += math.log(len(options))
        return self.rng.choice(options)

    def coin(self, p: float) -> bool:
        heads = self.rng.random() < p
        self.nats -= math.log(p if heads else 1 - p)
        return heads

    def sample(self, population, k: int) -> list:
        self.nats += math.log(math.perm(len(population), k))
        return self.rng.sample(population, k)


def _arithmetic(rng: Draws) -> str:
    """Two-digit addition: ``37+48=85``."""
    a, b = rng.below(100), rng.below(100)
    return f"{a}+{b}={a + b}"


def _sorting(rng: Draws) -> str:
    """Digits and the same digits sorted: ``sort 9 2 7 -> 2 7 9``."""
    digits = [rng.below(10) for _ in range(rng.between(3, 7))]
    return f"sort {' '.join(map(str, digits))} -> {' '.join(map(str, sorted(digits)))}"


def _brackets(rng: Draws) -> str:
    """An unfinished bracket string and the closers that balance it: ``([]{ -> })``."""
    open_stack: list[str] = []
    prefix: list[str] = []
    for _ in range(rng.between(2, 10)):
        if len(open_stack) > 1 and rng.coin(0.4):  # keep at least one bracket open
            prefix.append(_CLOSER[open_stack.pop()])
        else:
            opener = rng.choice("([{")
            open_stack.append(opener)
            prefix.append(opener)
    closing = "".join(_CLOSER[opener] for opener in reversed(open_stack))
    return f"{''.join(prefix)} -> {closing}"


def _kv_recall(rng: Draws) -> str:
    """Key-value pairs, then one key's value: ``k3=q k1=z k7=a ? k1 -> z``."""
    keys = rng.sample(range(10), rng.between(3, 5))
    values = [rng.choice(_LETTERS) for _ in keys]
    asked = rng.below(len(keys))
    pairs = " ".join(f"k{key}={value}" for key, value in zip(keys, values))
    return f"{pairs} ? k{keys[asked]} -> {values[asked]}"


def _prose(rng: Draws) -> str:
    """A template sentence from small word lists: ``The cat likes a green tree at night.``"""
    sentence = f"{rng.choice(_SUBJECTS)} {rng.choice(_VERBS)} {rng.choice(_OBJECTS)} {rng.choice(_ENDINGS)}."
    return sentence[0].upper() + sentence[1:]


@dataclass(frozen=True)
class FactDomain:
    """A domain of facts: ``entities`` made-up names, each with one fixed value per attribute, written from the
    domain's own letters. An example states one fact: ``dakor capital bogar``."""

    name: str
    consonants: str
    vowels: str
    attributes: tuple[str, ...]
    entities: int = 96
    values_per_attribute: int = 32

    @functools.cached_property
    def world(self) -> tuple[list[str], dict[tuple[str, str], str]]:
        """The entity names and the value of each (entity, attribute): the same in every run and for every seed
        (drawn from the domain's name), so that held-out examples ask about the facts training showed."""
        rng = random.Random(f"moe-models world: {self.name}")
        words = _distinct_words(rng, self.consonants, self.vowels,
                                self.entities + len(self.attributes) * self.values_per_attribute)
        names, rest = words[:self.entities], words[self.entities:]
        values = {attribute: rest[i * self.values_per_attribute:(i + 1) * self.values_per_attribute]
                  for i, attribute in enumerate(self.attributes)}
        return names, {(name, attribute): rng.choice(values[attribute])
                       for name in names for attribute in self.attributes}

    def __call__(self, rng: Draws) -> str:
        names, facts = self.world
        name, attribute = rng.choice(names), rng.choice(self.attributes)
        return f"{name} {attribute} {facts[name, attribute]}"


def _distinct_words(rng: random.Random, consonants: str, vowels: str, count: int) -> list[str]:
    """``count`` different words of two or three consonant-vowel syllables (some closed by a consonant)."""
    words: dict[str, None] = {}
    while len(words) < count:
        syllables = [rng.choice(consonants) + rng.choice(vowels) for _ in range(rng.randint(2, 3))]
        words[("".join(syllables) + rng.choice(("", *consonants)))] = None
    return list(words)


FACT_DOMAINS = (
    FactDomain("geography", consonants="bdgkr", vowels="ao", attributes=("capital", "river", "export")),
    FactDomain("biography", consonants="lmnsv", vowels="ei", attributes=("city", "trade", "teacher")),
    FactDomain("chemistry", consonants="ptfhz", vowels="uy", attributes=("colour", "state", "partner")),
)
_GENERATORS: dict[str, Callable[[Draws], str]] = {
    "arithmetic": _arithmetic,
    "sorting": _sorting,
    "brackets": _brackets,
    "kv_recall": _kv_recall,
    "prose": _prose,
    **{domain.name: domain for domain in FACT_DOMAINS},
}
DOMAINS: tuple[str, ...] = tuple(_GENERATORS)


def synthetic_corpus(num_examples: int, seed: int, domains: Sequence[str] = DOMAINS) -> Dataset:
    """``num_examples`` examples, as evenly spread over ``domains`` (default: all of DOMAINS) as possible and shuffled
    together.

    Columns: ``text`` and ``domain``. Deterministic in (num_examples, seed, domains); global RNG state is untouched.
    """
    texts, chosen, _ = _generate(num_examples, seed, domains)
    return Dataset.from_dict({"text": texts, "domain": chosen})


def synthetic_domain_problems(spec: str | None) -> list[str]:
    """What is wrong with a --synthetic_domains list."""
    if spec is None:
        return []
    names = [name.strip() for name in spec.split(",")]
    unknown = [name for name in names if name not in _GENERATORS]
    if unknown or len(set(names)) != len(names):
        return [f"synthetic_domains {spec!r}: give distinct names among {', '.join(DOMAINS)}"
                + (f" ({', '.join(map(repr, unknown))} is not one)" if unknown else "")]
    return []


def synthetic_domains(spec: str | None) -> tuple[str, ...]:
    """The domains a --synthetic_domains value names (None: all of DOMAINS)."""
    return DOMAINS if spec is None else tuple(name.strip() for name in spec.split(","))


def _generate(num_examples: int, seed: int, names: Sequence[str] = DOMAINS
              ) -> tuple[list[str], list[str], list[float]]:
    """The corpus's texts, their domains and each text's information in nats (its generator's choices)."""
    rng = random.Random(seed)
    domains = [names[i % len(names)] for i in range(num_examples)]
    rng.shuffle(domains)
    texts, nats = [], []
    for domain in domains:
        draws = Draws(rng)
        texts.append(_GENERATORS[domain](draws))
        nats.append(draws.nats)
    return texts, domains, nats


@dataclass(frozen=True)
class EntropyFloor:
    """The corpus's information per token with the built-in byte-level tokenizer (one token per UTF-8 byte and one
    end-of-text token per example), overall and per domain: the loss a perfect model reaches."""

    nats_per_token: float
    by_domain: dict[str, float]


def entropy_floor(num_examples: int = 20000, seed: int = 0, names: Sequence[str] = DOMAINS) -> EntropyFloor:
    """The entropy floor of ``synthetic_corpus(num_examples, seed, names)``: the sum over examples of the information of
    the example's domain (log of the number of domains: the shuffled, evenly spread domains are close to uniform
    draws) and of its generator's choices, over the sum of the examples' tokens. Measured on packed blocks, a
    model's loss sits slightly above it: the first tokens of a block have lost the start of their example."""
    texts, domains, nats = _generate(num_examples, seed, names)
    domain_nats = math.log(len(names))
    tokens = [len(text.encode("utf-8")) + 1 for text in texts]
    by_domain = {}
    for domain in names:
        picked = [i for i, d in enumerate(domains) if d == domain]
        by_domain[domain] = sum(nats[i] + domain_nats for i in picked) / sum(tokens[i] for i in picked)
    return EntropyFloor(sum(nats) / sum(tokens) + domain_nats * len(texts) / sum(tokens), by_domain)
