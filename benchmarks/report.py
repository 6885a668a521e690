"""Turn benchmarks/results/*.json into the tables and the plot of docs/performance.md.

``python benchmarks/report.py`` rewrites the part of docs/performance.md between the
``<!-- results:begin -->`` and ``<!-- results:end -->`` markers and writes docs/performance.png.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402

REPOSITORY = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPOSITORY))
from kdcore.io import atomic_write_text  # noqa: E402

RESULTS = REPOSITORY / "benchmarks" / "results"
DOC = REPOSITORY / "docs" / "performance.md"
PLOT = REPOSITORY / "docs" / "performance.png"
BEGIN, END = "<!-- results:begin -->", "<!-- results:end -->"
MIB = 1 << 20


def _load(name: str) -> list[dict]:
    path = RESULTS / f"{name}.json"
    return json.loads(path.read_text())["rows"] if path.exists() else []


def _shape(row: dict) -> tuple[int, int, int]:
    return row["tokens"], row["vocab"], row["hidden"]


def _by_shape(rows: list[dict]) -> dict[tuple[int, int, int], dict[str, dict]]:
    table: dict[tuple[int, int, int], dict[str, dict]] = {}
    for row in rows:
        table.setdefault(_shape(row), {})[row["variant"]] = row
    return dict(sorted(table.items()))


def _cell(row: dict | None, key: str, scale: float = 1.0, digits: int = 2) -> str:
    if row is None:
        return "–"
    return f"{row[key] / scale:.{digits}f}"


def logit_table(rows: list[dict]) -> str:
    lines = ["| N | V | H | naive time (s) | fused time (s) | naive CPU (s) | fused CPU (s) | naive peak (MiB) | "
             "fused peak (MiB) | fused/naive time | fused/naive CPU | fused/naive memory |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for (n, v, h), variants in _by_shape(rows).items():
        naive, fused = variants.get("naive"), variants.get("fused")
        ratios = ["–", "–", "–"]
        if naive and fused:
            ratios = [f"{fused['time_s'] / naive['time_s']:.2f}", f"{fused['cpu_time_s'] / naive['cpu_time_s']:.2f}",
                      f"{fused['peak_bytes'] / naive['peak_bytes']:.3f}"]
        lines.append(f"| {n} | {v} | {h} | {_cell(naive, 'time_s')} | {_cell(fused, 'time_s')} | "
                     f"{_cell(naive, 'cpu_time_s')} | {_cell(fused, 'cpu_time_s')} | "
                     f"{_cell(naive, 'peak_bytes', MIB, 0)} | {_cell(fused, 'peak_bytes', MIB, 0)} | "
                     f"{' | '.join(ratios)} |")
    return "\n".join(lines)


def acceptance_table(rows: list[dict]) -> str:
    if not rows:
        return "(not measured yet)"
    row = rows[-1]
    lines = ["| variant | best wall time (s) | best CPU time (s) | peak memory (MiB) | loss |", "|---|---|---|---|---|"]
    for variant in ("naive", "dense", "fused"):
        result = row[variant]
        lines.append(f"| {variant} | {result['time_s']:.2f} | {result['cpu_time_s']:.2f} | "
                     f"{result['peak_bytes'] / MIB:.0f} | {result['loss']:.7f} |")
    machine = row["machine"]
    lines += ["", f"fused/naive: memory **{row['memory_fused_over_naive']:.3f}** (target ≤ 0.10), wall time "
              f"**{row['time_fused_over_naive']:.2f}** (target ≤ 0.40), CPU time {row['cpu_time_fused_over_naive']:.2f}; "
              f"fused/dense: memory {row['memory_fused_over_dense']:.3f}, wall time {row['time_fused_over_dense']:.2f}. "
              f"Acceptance {'met' if row['passed'] else 'NOT met'}.",
              "", f"Machine: {machine['cores']} cores ({machine['cpu']}), {machine['ram_gib']} GiB RAM, torch "
              f"{machine['torch']}, {machine['threads']} thread(s); load average (1/5/15 min) when naive was measured: "
              f"{machine['load_average_1_5_15']}; measured {row['measured_at']}."]
    return "\n".join(lines)


def hidden_table(rows: list[dict]) -> str:
    if not rows:
        return "(not measured yet)"
    lines = ["| variant | wall time (s) | CPU time (s) | peak memory (MiB) |", "|---|---|---|---|"]
    for row in rows:
        lines.append(f"| {row['variant']} | {row['time_s']:.2f} | {row['cpu_time_s']:.2f} | "
                     f"{row['peak_bytes'] / MIB:.0f} |")
    return "\n".join(lines)


def cuda_table(rows: list[dict]) -> str:
    if not rows:
        return ("(not measured: no CUDA device was available to this work; run the command in the CUDA section "
                "on a GPU machine)")
    lines = ["| variant | device | dtype | N | V | H | time (s) | peak (MiB) |", "|---|---|---|---|---|---|---|---|"]
    for row in rows:
        measured = (f"{row['time_s']:.3f} | {row['peak_bytes'] / MIB:.0f}" if "error" not in row
                    else f"{row['error']} | –")
        lines.append(f"| {row['variant']} | {row['device_name']} | {row['dtype']} | {row['tokens']} | {row['vocab']} | "
                     f"{row['hidden']} | {measured} |")
    return "\n".join(lines)


def plot(rows: list[dict]) -> None:
    table = _by_shape(rows)
    labels = [f"N={n}\nV={v // 1000}k\nH={h}" for n, v, h in table]
    figure, (time_axis, memory_axis) = plt.subplots(1, 2, figsize=(13, 4.5))
    width = 0.4
    for offset, variant, colour in ((-width / 2, "naive", "#c0504d"), (width / 2, "fused", "#4f81bd")):
        positions = [i + offset for i in range(len(labels))]
        times = [table[shape].get(variant, {}).get("cpu_time_s", 0.0) for shape in table]
        peaks = [table[shape].get(variant, {}).get("peak_bytes", 0) / MIB for shape in table]
        time_axis.bar(positions, times, width, label=variant, color=colour)
        memory_axis.bar(positions, peaks, width, label=variant, color=colour)
    for axis, title in ((time_axis, "forward+backward CPU time (s, 1 thread)"),
                        (memory_axis, "peak memory growth (MiB, RSS)")):
        axis.set_xticks(range(len(labels)), labels, fontsize=7)
        axis.set_yscale("log")
        axis.set_title(title)
        axis.legend()
    figure.suptitle("Fused projection + JSD vs materialised logits (naive: missing bar = does not fit in RAM)")
    figure.tight_layout()
    figure.savefig(PLOT, dpi=110)


def main() -> None:
    cpu = _load("cpu")
    sections = ["### Acceptance: N=4096, V=32000, H=512, JSD β=0.5 (CPU)", "", acceptance_table(_load("acceptance")),
                "", "### All CPU shapes (JSD β=0.5, float32)", "", logit_table(cpu), "",
                "![fused vs naive](performance.png)", "",
                "### Multi-layer hidden-state loss (3 layers x 16000 frames x 768, l1_logsigmoid_cos)", "",
                hidden_table(_load("hidden")), "", "### CUDA (bf16, N=8192, V=128256, H=4096)", "",
                cuda_table(_load("cuda"))]
    if cpu:
        plot(cpu)
    text = DOC.read_text()
    if BEGIN not in text or END not in text:
        raise SystemExit(f"{DOC} lacks the {BEGIN} / {END} markers")
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    atomic_write_text(DOC, head + BEGIN + "\n" + "\n".join(sections) + "\n" + END + tail)
    print(f"updated {DOC.relative_to(REPOSITORY)} and {PLOT.relative_to(REPOSITORY)}")


if __name__ == "__main__":
    main()
