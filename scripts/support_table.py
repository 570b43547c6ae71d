#!/usr/bin/env python3
"""The README's family support table, made from test results (never written by hand).

    python -m pytest --support-json build/support.json ...      # tagged tests record what they proved
    python scripts/support_table.py build/support.json [more.json ...] --readme README.md

Each JSON file is what tests/conftest.py writes (tests/support.py: features, registered families, and per
(family, feature) the tests that passed and failed). Several files (e.g. one per test file run) are merged.
A cell is "✓" when at least one test proving the feature passed and none failed, "✗" when one failed, and
"—" when no test of it ran. With --readme the table replaces what stands between
`<!-- support-table:start -->` and `<!-- support-table:end -->`; everything else is kept byte for byte.
Without it the table is printed. --check: exit 1 (writing nothing) when the README's table is not this one.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

START, END = "<!-- support-table:start -->", "<!-- support-table:end -->"


class Bad(Exception):
    pass


def read_results(paths: list[Path]) -> dict:
    """Merge result files: features in first-seen order, families, and passed / failed test ids per cell."""
    feats: dict[str, dict] = {}
    fams: dict[str, dict] = {}
    cells: dict[tuple[str, str], dict[str, set]] = {}
    for p in paths:
        try:
            data = json.loads(Path(p).read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise Bad(f"{p}: no such file (run pytest with --support-json {p} first)") from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise Bad(f"{p}: not a support-results JSON file ({type(e).__name__}: {str(e).splitlines()[0]})") from None
        try:
            if not isinstance(data, dict) or data.get("version") != 1:
                raise TypeError("expected an object with version 1")
            for f in data["features"]:
                feats.setdefault(str(f["key"]), {"label": str(f["label"]), "doc": str(f.get("doc", ""))})
            for arch, info in data["families"].items():
                fams.setdefault(str(arch), {"name": str(info.get("name") or arch)})
            for arch, by_feat in data["results"].items():
                fams.setdefault(str(arch), {"name": str(arch)})
                for feat, r in by_feat.items():
                    feats.setdefault(str(feat), {"label": str(feat), "doc": ""})
                    c = cells.setdefault((str(arch), str(feat)), {"passed": set(), "failed": set()})
                    for k in ("passed", "failed"):
                        if not isinstance(r.get(k, []), list):
                            raise TypeError(f"results.{arch}.{feat}.{k}: expected a list of test ids")
                        c[k].update(str(t) for t in r.get(k, []))
        except (KeyError, TypeError, AttributeError) as e:
            raise Bad(f"{p}: not a support-results JSON file ({type(e).__name__}: {e})") from None
    return {"features": feats, "families": fams, "cells": cells}


def cell(res: dict, arch: str, feat: str) -> str:
    c = res["cells"].get((arch, feat))
    if not c or not (c["passed"] or c["failed"]):
        return "—"
    return "✗" if c["failed"] else "✓"


def table(res: dict) -> str:
    feats, fams = res["features"], res["families"]
    head = ["family", "arch"] + [feats[f]["label"] for f in feats]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * 2 + ":-:|" * len(feats)]
    for arch in sorted(fams, key=lambda a: (fams[a]["name"].lower(), a)):
        lines.append("| " + " | ".join([fams[arch]["name"], f"`{arch}`"] + [cell(res, arch, f) for f in feats]) + " |")
    n_pass = len(set().union(*(c["passed"] for c in res["cells"].values()))) if res["cells"] else 0
    n_fail = len(set().union(*(c["failed"] for c in res["cells"].values()))) if res["cells"] else 0
    legend = ["", f"✓ a test proving it passed and none failed; ✗ a test proving it failed; — not tested. "
                  f"Made by `scripts/support_table.py` from {n_pass} passing and {n_fail} failing tagged tests "
                  "(`@pytest.mark.support`, tests/support.py). Columns:", ""]
    legend += [f"- **{v['label']}**: {v['doc']}" for v in feats.values() if v["doc"]]
    return "\n".join(lines + legend)


def rewrite(readme: str, tbl: str, where: str) -> str:
    if readme.count(START) != 1 or readme.count(END) != 1 or readme.index(START) > readme.index(END):
        raise Bad(f"{where}: needs exactly one '{START}' followed by one '{END}'")
    a = readme.index(START) + len(START)
    b = readme.index(END)
    return readme[:a] + "\n" + tbl + "\n" + readme[b:]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("results", nargs="+", type=Path, help="JSON written by pytest --support-json")
    ap.add_argument("--readme", type=Path, default=None, help="rewrite the table between the markers of this file")
    ap.add_argument("--check", action="store_true", help="with --readme: exit 1 if the table is out of date")
    a = ap.parse_args(argv)
    try:
        tbl = table(read_results(a.results))
        if a.readme is None:
            print(tbl)
            return 0
        try:
            old = a.readme.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise Bad(f"{a.readme}: cannot read ({type(e).__name__}: {e})") from None
        new = rewrite(old, tbl, str(a.readme))
        if a.check:
            if new != old:
                print(f"{a.readme}: the support table is out of date (run scripts/support_table.py)", file=sys.stderr)
                return 1
            return 0
        if new != old:
            tmp = a.readme.with_name(f".{a.readme.name}.partial")
            tmp.write_text(new, encoding="utf-8")
            tmp.replace(a.readme)
        print(f"{a.readme}: support table of {len(tbl.splitlines())} lines written")
        return 0
    except Bad as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    try:
        sys.exit(main())
    except BrokenPipeError:  # e.g. piped into head
        sys.exit(0)
