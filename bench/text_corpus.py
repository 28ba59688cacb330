"""A real-text corpus from the text files that ship with the machine's packages, one file per domain, for
`--train_file domain=file,...` (data/file_specs.py; each line of a .txt file is a text, its file's domain is its
domain):

  python       Python sources of the installed packages (site-packages/**/*.py)
  c            C and C++ headers of the installed packages (site-packages/**/*.h)
  licences     the packages' licence files (LICENSE*, COPYING*)
  man_en       English manual pages (/usr/share/man/man*/), roff markup removed
  man_de       German manual pages (/usr/share/man/de/)
  man_fr       French manual pages (/usr/share/man/fr/)

Files are taken in sorted path order, blank lines dropped, until a domain holds --megabytes_per_domain (so the
domains are balanced); a domain with no file on this machine is left out and said so.

    python bench/text_corpus.py --output data/packages --megabytes_per_domain 2
    python -m moe_models.payoff --train_file "$(cat data/packages/train_file.txt)" ...
"""

from __future__ import annotations

import argparse
import gzip
import re
import site
import sys
from pathlib import Path

ROFF_ESCAPES = re.compile(r"\\[fm](\[[^\]]*\]|.)|\\\((..)|\\\[[^\]]*\]|\\[&|^%:ud]|\\s[-+]?\d")
# roff's names of the characters of German and French text (groff_char(7)); any other \(xx is dropped
ROFF_CHARACTERS = {":a": "ä", ":o": "ö", ":u": "ü", ":A": "Ä", ":O": "Ö", ":U": "Ü", "ss": "ß", "'e": "é", "`e": "è",
                   "^e": "ê", ":e": "ë", "`a": "à", "^a": "â", "^i": "î", ":i": "ï", "^o": "ô", "`u": "ù", "^u": "û",
                   ",c": "ç", "'E": "É", "`A": "À", "aq": "'", "dq": '"', "em": "—", "en": "–", "lq": "“", "rq": "”",
                   "Fo": "«", "Fc": "»", "oe": "œ", "co": "©", "bu": "•", "hy": "-"}


def sources() -> dict[str, list[Path]]:
    packages = [Path(p) for p in site.getsitepackages()]
    man = Path("/usr/share/man")

    def under(roots: list[Path], *patterns: str) -> list[Path]:
        return sorted({p for root in roots if root.is_dir() for pattern in patterns for p in root.rglob(pattern)
                       if p.is_file()})
    return {"python": under(packages, "*.py"), "c": under(packages, "*.h"),
            "licences": under(packages, "LICENSE*", "COPYING*"),
            "man_en": under(sorted(man.glob("man[1-9]")), "*.gz"), "man_de": under([man / "de"], "*.gz"),
            "man_fr": under([man / "fr"], "*.gz")}


def text_lines(path: Path) -> list[str]:
    """The file's non-blank lines; a manual page's text without its roff requests and escapes."""
    if path.suffix == ".gz":
        raw = gzip.decompress(path.read_bytes()).decode("utf-8", errors="replace")
        lines = []
        for line in raw.splitlines():
            if line.startswith((".", "'")):  # a request: keep the text of the font and section ones
                request, _, rest = line.partition(" ")
                if request not in (".SH", ".SS", ".B", ".I", ".BR", ".IR", ".BI", ".IB", ".RB", ".RI", ".TP"):
                    continue
                line = rest.replace('"', "")
            line = re.sub(r"\\\[(..)\]|\\\((..)", lambda m: ROFF_CHARACTERS.get(m.group(1) or m.group(2), m.group(0)),
                          line)
            lines.append(ROFF_ESCAPES.sub("", line).replace("\\-", "-").replace("\\e", "\\"))
    else:
        lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    return [line.rstrip() for line in lines if line.strip()]


def gather(output: Path, megabytes_per_domain: float) -> dict[str, int]:
    """Write output/{domain}.txt per domain; returns the bytes written per domain."""
    output.mkdir(parents=True, exist_ok=True)
    limit = int(megabytes_per_domain * 1e6)
    written = {}
    for domain, paths in sources().items():
        if not paths:
            print(f"{domain}: no file on this machine; left out", file=sys.stderr)
            continue
        size, lines = 0, []
        for path in paths:
            for line in text_lines(path):
                lines.append(line)
                size += len(line.encode()) + 1
            if size >= limit:
                break
        (output / f"{domain}.txt").write_text("\n".join(lines) + "\n")
        written[domain] = size
    (output / "train_file.txt").write_text(",".join(f"{d}={output / d}.txt" for d in written))
    return written


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, required=True)
    parser.add_argument("--megabytes_per_domain", type=float, default=2.0)
    args = parser.parse_args()
    for domain, size in gather(args.output, args.megabytes_per_domain).items():
        print(f"{domain}: {size / 1e6:.2f} MB")
    print(f"--train_file {(args.output / 'train_file.txt').read_text()}")


if __name__ == "__main__":
    main()
