"""One table of a run as ProLong reports it (its Table 10 layout): HELMET's categories, each averaged over
the lengths evaluated (ProLong: 32K, 64K, 128K), their average, the short-context tasks and their average,
and for each model its difference from a base model.

A model is a folder holding any of our results (found recursively as ``results.json``): HELMET's (the
adapter's ``categories``), the short suite's (``short``), our own recall tasks and perplexity (``scores``,
``ppl``). A cell that cannot be computed is shown as ``-``; one computed from fewer lengths or categories than
asked is marked ``~`` (partial) and says what it lacks in the JSON. Where HELMET's Recall was not run, our
own recall tasks (JSON KV and RULER's needles, generated locally) stand in, marked ``*``.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

from megaprolong.config import ConfigError

LENGTHS = (32768, 65536, 131072)  # the HELMET lengths ProLong averages
CATEGORIES = ("Recall", "RAG", "Re-rank", "Cite", "LongQA", "Summ", "ICL")
OUR_RECALL = ("json_kv", "niah_single", "niah_multikey", "niah_uuid", "niah_multivalue", "variable_tracking")


@dataclass
class Cell:
    value: float | None
    partial: bool = False
    note: str = ""  # what a partial cell lacks, or where it comes from

    def text(self) -> str:
        if self.value is None:
            return "-"
        return f"{self.value:.1f}" + ("~" if self.partial else "") + ("*" if self.note.startswith("ours") else "")


def load_model(folder: str | Path) -> dict:
    """Every results.json under ``folder`` merged: HELMET categories, short tasks, our tasks and ppl."""
    folder = Path(folder)
    files = sorted(folder.rglob("results.json")) if folder.is_dir() else [folder] if folder.is_file() else []
    if not files:
        raise ConfigError(f"{folder}: no results.json (of megaprolong-eval, its short suite, or its HELMET adapter)")
    merged = {"name": folder.name, "categories": {}, "short": {}, "scores": {}, "ppl": {}}
    for f in files:
        r = json.loads(f.read_text())
        for key in ("categories", "short", "scores", "ppl"):
            for name, value in (r.get(key) or {}).items():
                if key == "scores" and name.startswith("helmet:"):
                    continue  # HELMET's per-dataset columns: its categories are what is reported
                merged[key][name] = value
    return merged


def _over_lengths(by_length: dict, lengths) -> Cell:
    have = [by_length[str(n)] for n in lengths if str(n) in by_length]
    if not have:
        return Cell(None)
    lacking = [n for n in lengths if str(n) not in by_length]
    return Cell(sum(have) / len(have), bool(lacking), f"lengths missing: {lacking}" if lacking else "")


def _mean(cells: list[Cell], what: str) -> Cell:
    present = [c for c in cells if c.value is not None]
    if not present:
        return Cell(None)
    partial = len(present) < len(cells) or any(c.partial for c in present)
    return Cell(sum(c.value for c in present) / len(present), partial,
                f"{len(present)}/{len(cells)} {what}" if partial else "")


def row(model: dict, lengths=LENGTHS, short_tasks=None) -> dict[str, Cell]:
    """The report's cells for one model."""
    from megaprolong.eval.short import PROLONG_TASKS

    cells = {c: _over_lengths(model["categories"].get(c, {}), lengths) for c in CATEGORIES}
    if cells["Recall"].value is None:  # our locally generated recall tasks, where HELMET's Recall did not run
        ours = [_over_lengths(model["scores"][t], lengths) for t in OUR_RECALL if t in model["scores"]]
        if ours:
            mean = _mean(ours, "tasks")
            cells["Recall"] = Cell(mean.value, mean.partial, f"ours ({', '.join(t for t in OUR_RECALL if t in model['scores'])})")
    cells["HELMET avg"] = _mean([cells[c] for c in CATEGORIES], "categories")
    for task in short_tasks or PROLONG_TASKS:
        r = model["short"].get(task)
        value = r["metrics"].get(r["primary"]) if r and r.get("primary") else None
        cells[task] = Cell(None if value is None else 100 * value)
    cells["short avg"] = _mean([cells[t] for t in short_tasks or PROLONG_TASKS], "tasks")
    return cells


def report(models: list[str | Path], base: str | Path | None = None, lengths=LENGTHS) -> dict:
    """{"columns", "rows": [{"model", "cells", "vs_base"}]}: each model's row and its differences from
    ``base`` (cells where both have a value)."""
    loaded = [load_model(m) for m in models]
    rows = [{"model": m["name"], "cells": row(m, lengths)} for m in loaded]
    base_row = row(load_model(base), lengths) if base else None
    for r in rows:
        if base_row is not None:
            r["vs_base"] = {c: (cell.value - base_row[c].value) if cell.value is not None and
                            base_row[c].value is not None else None for c, cell in r["cells"].items()}
    out = {"lengths": list(lengths), "columns": list(rows[0]["cells"]) if rows else [], "rows": rows}
    if base_row is not None:
        out["base"] = {"model": Path(base).name, "cells": base_row}
    return out


def text(rep: dict) -> str:
    from megaprolong.eval.run import length_label

    cols = rep["columns"]
    w = {c: max(9, len(c) + 2) for c in cols}
    width = max([12, *(len(r["model"]) + 2 for r in rep["rows"]), len(rep.get("base", {}).get("model", "")) + 9])
    lines = [f"HELMET categories averaged over {', '.join(length_label(n) for n in rep['lengths'])} tokens; short "
             f"tasks (lm-evaluation-harness, %); ~ partial, * our recall tasks, - missing",
             f"{'model':<{width}}" + "".join(f"{c:>{w[c]}}" for c in cols)]
    if "base" in rep:
        lines.append(f"{rep['base']['model'] + ' (base)':<{width}}" +
                     "".join(f"{rep['base']['cells'][c].text():>{w[c]}}" for c in cols))
    for r in rep["rows"]:
        lines.append(f"{r['model']:<{width}}" + "".join(f"{r['cells'][c].text():>{w[c]}}" for c in cols))
        if "vs_base" in r:
            lines.append(f"{'  vs base':<{width}}" + "".join(f"{_signed(r['vs_base'][c]):>{w[c]}}" for c in cols))
    return "\n".join(lines)


def _signed(v: float | None) -> str:
    return "-" if v is None else f"{v:+.1f}"


def to_json(rep: dict) -> dict:
    def cells(d):
        return {c: asdict(cell) for c, cell in d.items()}

    out = {**rep, "rows": [{**r, "cells": cells(r["cells"])} for r in rep["rows"]]}
    if "base" in rep:
        out["base"] = {**rep["base"], "cells": cells(rep["base"]["cells"])}
    return out


def write(rep: dict, out: Path) -> None:
    """OUT/report.json, report.txt and report.png (the categories and short tasks per model)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(to_json(rep), indent=2))
    (out / "report.txt").write_text(text(rep) + "\n")
    models = ([("base: " + rep["base"]["model"], rep["base"]["cells"])] if "base" in rep else []) + \
        [(r["model"], r["cells"]) for r in rep["rows"]]
    cols = rep["columns"]
    fig, ax = plt.subplots(figsize=(max(6, 0.9 * len(cols)), 3.8))
    width = 0.8 / max(1, len(models))
    for i, (name, cells) in enumerate(models):
        xs = [j + i * width for j in range(len(cols))]
        ax.bar(xs, [cells[c].value or 0 for c in cols], width, label=name)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(cols))], cols, rotation=35, ha="right")
    ax.set(ylabel="score", ylim=(0, 100), title="HELMET categories and short-context tasks")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "report.png", dpi=100)
    plt.close(fig)
