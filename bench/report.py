"""Turn a pytest-benchmark JSON file into the ratio tables of bench/RESULTS.md.

    python -m pytest bench/bench_linear.py --benchmark-json=/tmp/b.json
    python bench/report.py /tmp/b.json [--match "forward"] [--stat median]

Every benchmark sets ``benchmark.group`` (one row of a table: the cases measured side by side)
and ``benchmark.extra_info["role"]`` ("rslora", "numpy", "base", or a peer's name). Within each
group, times are quoted as ratios to the ``rslora`` entry, measured in the same run. The
statistic is each entry's fastest round (``--stat median`` for medians): on a shared machine the
minimum is the least disturbed estimate of what the code itself costs.
"""

from __future__ import annotations

import json
import sys
from collections import OrderedDict


def tables(path: str, stat: str = "min", match: str = "") -> str:
    data = json.load(open(path))
    groups: "OrderedDict[str, dict]" = OrderedDict()
    for b in data["benchmarks"]:
        if match not in (b["group"] or b["name"]):
            continue
        role = b.get("extra_info", {}).get("role", b["name"])
        groups.setdefault(b["group"] or b["name"], {})[role] = b["stats"][stat]
    roles = []
    for g in groups.values():
        roles += [r for r in g if r not in roles and r != "rslora"]
    head = "| case | rslora (ms) | " + " | ".join(f"{r} / rslora" for r in roles) + " |"
    lines = [head, "|" + "---|" * (2 + len(roles))]
    for name, g in groups.items():
        ref = g.get("rslora")
        cells = [f"{ref * 1e3:.3f}" if ref else "-"]
        for r in roles:
            cells.append(f"{g[r] / ref:.2f}" if ref and r in g else "-")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    m = data.get("machine_info", {})
    lines.append("")
    lines.append(f"Statistic: {stat} of the rounds. Machine: {m.get('cpu', {}).get('brand_raw', '?')}, "
                 f"{m.get('cpu', {}).get('count', '?')} cores; {data.get('datetime', '')}")
    return "\n".join(lines)


if __name__ == "__main__":
    args = sys.argv[1:]
    opts = {"--stat": "min", "--match": ""}
    for flag in opts:
        if flag in args:
            i = args.index(flag)
            opts[flag] = args[i + 1]
            del args[i:i + 2]
    print(tables(args[0], opts["--stat"], opts["--match"]))
