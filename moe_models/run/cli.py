"""The command line of train.py: every field of every RunConfig section is a flag of the same name,
and docs/configuration.md is generated from the same fields."""

from __future__ import annotations

import argparse
import dataclasses
import re
import types
import typing
from pathlib import Path
from typing import Literal, Optional, Union

from .config import SECTION_TYPES, RunConfig
from .config_values import flag_text

# CLI: every field of every section becomes --field_name. Written here rather than taken from
# transformers.HfArgumentParser because that parser refuses Union[int, list[int]] fields
# (num_experts, moe_layers) and we want those to stay one flag each.


class ShortErrorParser(argparse.ArgumentParser):
    """An ArgumentParser whose error is the problem under a short usage (the usage itself when it is short, else
    one line saying where the flags are listed), not under the usage of every flag."""

    def error(self, message: str):
        usage = self.format_usage()
        if usage.count("\n") > 3:
            usage = f"usage: {self.prog} [flags] ({self.prog} --help lists them all)\n"
        self.exit(2, f"{usage}{self.prog}: error: {message}\n")


def parse_bool(text: str) -> bool:
    lowered = text.lower()
    if lowered in ("true", "1", "yes", "y"):
        return True
    if lowered in ("false", "0", "no", "n"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


# How "no value" is written for an Optional flag in DeepSpeed's and HF's docs (Python's None, JSON's null).
NONE_SPELLINGS = ("none", "null")


def choice_parser(choices: tuple[str, ...], optional: bool):
    """A flag's choices in any letter case (DeepSpeed writes 'Jitter', users copy 'jitter'), plus None/none for
    an Optional one."""
    by_lower = {choice.lower(): choice for choice in choices}

    def parse(text: str):
        if optional and text.lower() in NONE_SPELLINGS:
            return None
        if text.lower() in by_lower:
            return by_lower[text.lower()]
        allowed = [*choices, *(["None"] if optional else [])]
        raise argparse.ArgumentTypeError(f"invalid choice {text!r}; choose from {', '.join(allowed)}")
    return parse


def optional_parser(parse):
    """An Optional number flag: None/none/null give None, anything else goes to ``parse``."""
    def parse_optional(text: str):
        return None if text.lower() in NONE_SPELLINGS else parse(text)
    parse_optional.__name__ = parse.__name__  # argparse names the expected type after it ("invalid int value")
    return parse_optional


def _add_field(parser: argparse._ArgumentGroup, f: dataclasses.Field, hint) -> None:
    name, help_text = f"--{f.name}", f.metadata["help"]
    default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
    args = typing.get_args(hint)
    is_union = typing.get_origin(hint) in (Union, types.UnionType)
    optional = is_union and type(None) in args
    if optional:  # Optional[X]
        hint = next(a for a in args if a is not type(None))
        args = typing.get_args(hint)
        is_union = typing.get_origin(hint) in (Union, types.UnionType)
    kw = {"default": argparse.SUPPRESS, "help": f"{help_text} (default: {default})"}
    if hint is bool:
        parser.add_argument(name, type=optional_parser(parse_bool) if optional else parse_bool, nargs="?", const=True,
                            metavar="BOOL", **kw)
    elif typing.get_origin(hint) is Literal:
        metavar = "{" + ",".join([*args, *(["None"] if optional else [])]) + "}"
        parser.add_argument(name, type=choice_parser(args, optional), metavar=metavar, **kw)
    elif is_union and args == (int, list[int]):
        parser.add_argument(name, type=int, nargs="+", **kw)
    elif is_union and args == (str, list[int]):
        parser.add_argument(name, type=str, **kw)
    elif optional and hint in (int, float):
        parser.add_argument(name, type=optional_parser(hint), **kw)
    else:
        parser.add_argument(name, type=hint, **kw)


HELP_TOPICS = (f"a section ({', '.join(SECTION_TYPES)}) or a flag with the flags that work with it only (plan, "
               "streaming, num_null_experts, ...)")


def build_parser() -> argparse.ArgumentParser:
    parser = ShortErrorParser(
        description="Turn a Hugging Face causal LM into a DeepSpeed Mixture-of-Experts model and train it.",
        epilog=f"--help TOPIC lists fewer flags: {HELP_TOPICS}; --plan --help lists the plan's.",
        allow_abbrev=False, add_help=False)
    parser.add_argument("-h", "--help", nargs="?", const="", default=argparse.SUPPRESS, metavar="TOPIC",
                        help=f"Show this help and exit; with a TOPIC, only its flags: {HELP_TOPICS}.")
    parser.add_argument("--local_rank", type=int, default=argparse.SUPPRESS, help=argparse.SUPPRESS)  # deepspeed launcher
    for section, cls in SECTION_TYPES.items():
        group = parser.add_argument_group(section, cls.__doc__)
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            _add_field(group, f, hints[f.name])
    return parser


def _fields() -> dict[str, tuple[str, dataclasses.Field]]:
    return {f.name: (section, f) for section, cls in SECTION_TYPES.items() for f in dataclasses.fields(cls)}


def dependent_flags(name: str) -> list[str]:
    """``name`` and the flags that work with it only, those whose help starts "With --name" or "Needs --name" (and
    theirs in turn: --plan, --plan_cluster, --plan_search), in the order of the settings."""
    fields, names = _fields(), {name}
    while True:
        more = {other for other, (_, f) in fields.items() if other not in names
                and re.match(rf"(With|Needs) --({'|'.join(names)})\b", f.metadata["help"])}
        if not more:
            return [other for other in fields if other in names]
        names |= more


def topic_help(topics: list[str], prog: str | None = None) -> str:
    """The --help text of some topics only: sections (all their flags) or flags with the flags that work with them
    only (dependent_flags); a ValueError names an unknown topic."""
    parser = ShortErrorParser(prog=prog, add_help=False, allow_abbrev=False)
    parser.epilog = f"{parser.prog} --help lists every flag."
    fields = _fields()
    for topic in topics:
        name = topic.removeprefix("--")
        if name in SECTION_TYPES:
            cls = SECTION_TYPES[name]
            group, names = parser.add_argument_group(name, cls.__doc__), [f.name for f in dataclasses.fields(cls)]
        elif name in fields:
            names = dependent_flags(name)
            group = parser.add_argument_group(f"--{name}" + (" and the flags that work with it only"
                                                             if len(names) > 1 else ""))
        else:
            raise ValueError(f"--help {topic}: no such topic; give {HELP_TOPICS}, or --help alone for every flag")
        for flag in names:
            section, f = fields[flag]
            _add_field(group, f, typing.get_type_hints(SECTION_TYPES[section])[flag])
    return parser.format_help()


def _answer_help(parser: argparse.ArgumentParser, topic: str, given: set[str]) -> None:
    """Print the help --help asked for and exit: a topic's, else that of the given flags that others work with
    (--plan --help), else every flag's."""
    topics = [topic] if topic else [name for name in _fields() if name in given and len(dependent_flags(name)) > 1]
    if not topics:
        parser.print_help()
        parser.exit(0)
    try:
        text = topic_help(topics, parser.prog)
    except ValueError as err:
        parser.error(str(err))
    print(text, end="")
    parser.exit(0)


def parse_args(argv: Optional[list[str]] = None) -> RunConfig:
    """Build a RunConfig from command-line flags; unknown flags are an error (exit 2 with a short usage)."""
    parser = build_parser()
    namespace, unknown = parser.parse_known_args(argv)
    if "help" in namespace:
        _answer_help(parser, namespace.help, set(vars(namespace)))
    if unknown:
        expanded = any(not arg.startswith("-") and Path(arg).exists() for arg in unknown)
        parser.error(f"unrecognized arguments: {' '.join(unknown)}" + (
            "; these look like files of a glob the shell expanded: quote the glob (--train_file 'data/*.jsonl') or "
            "join the files with commas" if expanded else ""))
    namespace = vars(namespace)
    namespace.pop("local_rank", None)
    sections = {}
    for section, cls in SECTION_TYPES.items():
        names = {f.name for f in dataclasses.fields(cls)}
        sections[section] = cls(**{k: v for k, v in namespace.items() if k in names})
    return RunConfig(**sections, given=frozenset(namespace))


def given_flags(cfg: RunConfig, leave_out: frozenset[str] | set[str] = frozenset()) -> list[str]:
    """The flags the command line gave (``cfg.given``), with their values, in the order of the settings, as a command
    line's words again (a true bool as the bare flag); ``leave_out``: names to drop."""
    words = []
    for section, cls in SECTION_TYPES.items():
        for f in dataclasses.fields(cls):
            if f.name in cfg.given and f.name not in leave_out:
                value = getattr(getattr(cfg, section), f.name)
                words += [f"--{f.name}"] if value is True else [f"--{f.name}", *flag_text(value).split(" ")] \
                    if isinstance(value, list) else [f"--{f.name}", flag_text(value)]
    return words


def configuration_markdown() -> str:
    """docs/configuration.md, generated from the dataclasses so it cannot drift (a test compares the two).

    Regenerate with: UPDATE_DOCS=1 pytest tests/test_config.py -k configuration_doc
    """
    lines = ["# Configuration", "",
             "Every setting is a command-line flag of `train.py` with the same name as its field in",
             "`moe_models/run/config.py`. Booleans take `true`/`false` in any letter case (also `yes`/`no`, `1`/`0`; a",
             "bare `--flag` means true). Choices are matched in any letter case (`jitter` is `Jitter`), and a number",
             "or choice whose default is `None` takes `None` (or `none`, `null`) for no value. Unknown flags are",
             "refused. All settings are checked before anything heavy starts, and every problem is reported",
             "at once. The resolved settings of a run are saved as `run_config.json` in its output folder.", "",
             "`train.py --help` lists every flag; `--help TOPIC` fewer: a section (`--help moe`) or a flag with the",
             "flags that work with it only (`--help streaming`; `--plan --help` lists the plan's).", "",
             "The DeepSpeed JSON (`--deepspeed`) holds what no flag owns (ZeRO stage, optimizer betas, offload);",
             "its `\"auto\"` values are filled from the flags below, and a value that disagrees with its flag is",
             "refused.", "",
             "This page is generated from the code: `UPDATE_DOCS=1 pytest tests/test_config.py -k configuration_doc`.",
             ""]
    for section, cls in SECTION_TYPES.items():
        lines += [f"## {section}: {cls.__doc__}", "", "| flag | default | meaning |", "|---|---|---|"]
        for f in dataclasses.fields(cls):
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            lines.append(f"| `--{f.name}` | `{default}` | {f.metadata['help']} |")
        lines.append("")
    return "\n".join(lines)
