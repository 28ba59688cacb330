"""The run's domain names: the list whose positions are the per-token ``domain_ids`` (-1 for a text without a domain
or with one not in the list). It is saved in run_config.json (``resolved.domains``) so that the ids can be read back
as names.

Where the list comes from, first match wins:

1. ``--domains code,prose,...``: exactly that list;
2. the built-in corpus: its own domains (synthetic.DOMAINS);
3. the names of per-domain files (``--train_file code=a.jsonl,prose=b.jsonl``, then --validation_file's), in the order
   given, followed by the sorted values of a ``domain`` column that are not among them (map-style data only: a
   stream cannot list its values without reading all of it, so with --streaming such a column needs --domains).
"""

from __future__ import annotations

from typing import Iterable, Optional, Sequence

from .file_specs import DataFile


def listed_domains(spec: Optional[str]) -> Optional[list[str]]:
    """The --domains list, or None when it is not given."""
    return None if spec is None else [name.strip() for name in spec.split(",")]


def domains_problems(spec: Optional[str]) -> list[str]:
    names = listed_domains(spec)
    if names is None:
        return []
    if not all(names):
        return [f"domains {spec!r} has an empty name; give names separated by commas, such as code,prose"]
    repeated = sorted({name for name in names if names.count(name) > 1})
    return [f"domains {spec!r} names {', '.join(repeated)} more than once; give each domain once"] if repeated else []


def file_domains(files: Iterable[DataFile]) -> list[str]:
    """The domains that per-domain file entries name, in order of first appearance."""
    return list(dict.fromkeys(file.domain for file in files if file.domain))


def resolve_domains(listed: Optional[Sequence[str]], from_files: Sequence[str], column_values: Iterable) -> list[str]:
    """The domain list (rules 1 and 3 above; the built-in corpus passes its DOMAINS as ``listed``)."""
    if listed is not None:
        return list(listed)
    named = list(from_files)
    return named + sorted({str(value) for value in column_values if value is not None} - set(named))


def domain_index(domains: Sequence[str]) -> dict[str, int]:
    return {name: index for index, name in enumerate(domains)}
