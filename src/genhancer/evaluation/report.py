"""Base vs enhanced: run the chosen evaluations on both models and write a report.

``report.md`` holds an MMVP-VLM table laid out like the paper's Table 1 (nine categories + average, the enhanced
row's average with its delta) and a zero-shot / retrieval table like Table 3 (top-1 per classification dataset,
text->image "Image@5" and image->text "Text@5" per retrieval dataset); ``mmvp_radar.png`` plots the nine categories;
``report.json`` holds every number; ``base/`` and ``enhanced/`` hold each model's MMVP predictions.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from genhancer.evaluation import mmvp, retrieval, write_json, zeroshot
from genhancer.evaluation.models import load_model
from genhancer.evaluation.zeroshot import ENSEMBLE_TEMPLATES

# short column names for the nine MMVP-VLM visual patterns (the paper uses pictograms)
SHORT = dict(zip(mmvp.CATEGORIES, ["Orient.", "Presence", "State", "Quantity", "Position", "Color", "Structure",
                                   "Text", "Viewpoint"]))  # fmt: skip


@dataclass
class Comparison:
    """What to evaluate: ``zeroshot`` / ``retrieval`` map a dataset name to its folder / CSV or shards."""

    mmvp: str | None = None
    zeroshot: dict[str, str] = field(default_factory=dict)
    retrieval: dict[str, str] = field(default_factory=dict)
    templates: tuple[str, ...] = ENSEMBLE_TEMPLATES
    classnames: str | None = None
    image_root: str | None = None
    batch_size: int = 32

    def check(self) -> None:
        """Read every benchmark and dataset index, so that bad data fails before the first model loads."""
        if self.mmvp:
            mmvp.load_benchmark(self.mmvp)
        for root in self.zeroshot.values():
            zeroshot.load_image_folder(root, self.classnames)
        for spec in self.retrieval.values():
            retrieval.load_pairs(spec, self.image_root)


def evaluate_model(path: str, plan: Comparison, device: str, dtype: str, out_dir: Path) -> dict:
    """Every evaluation of ``plan`` on one model; MMVP predictions go to ``out_dir``."""
    model = load_model(path, device, dtype)
    result: dict = {"model": path, "zeroshot": {}, "retrieval": {}}
    if plan.mmvp:
        scores = mmvp.evaluate(model, plan.mmvp, plan.batch_size)
        mmvp.write_results(scores, out_dir, {"model": path, "benchmark": plan.mmvp, "protocol": "batched"})
        result["mmvp"] = scores.scores
    for name, root in plan.zeroshot.items():
        result["zeroshot"][name] = zeroshot.evaluate(model, root, plan.templates, plan.classnames, plan.batch_size)
    for name, spec in plan.retrieval.items():
        result["retrieval"][name] = retrieval.evaluate(model, spec, plan.image_root, plan.batch_size)
    return result


def _row(cells) -> str:
    return "| " + " | ".join(str(c) for c in cells) + " |"


def _signed(x: float) -> str:
    return f"{x:+.1f}"


def mmvp_table(base: dict, enhanced: dict, labels: tuple[str, str]) -> str:
    """Markdown in the layout of the paper's Table 1; values in %, one decimal."""
    header = ["Method", *SHORT.values(), "Average"]
    lines = [_row(header), _row(["---"] * len(header))]
    lines.append(_row([labels[0], *(f"{base[c]:.1f}" for c in mmvp.CATEGORIES), f"{base['average']:.1f}"]))
    delta = enhanced["average"] - base["average"]
    cells = [f"{enhanced[c]:.1f}" for c in mmvp.CATEGORIES]
    lines.append(_row([labels[1], *cells, f"{enhanced['average']:.1f} ({_signed(delta)})"]))
    lines.append(_row(["Δ", *(_signed(enhanced[c] - base[c]) for c in mmvp.CATEGORIES), _signed(delta)]))
    legend = "; ".join(f"{short}: {full}" for full, short in SHORT.items())
    return "\n".join(lines) + f"\n\n{legend}."


def global_table(base: dict, enhanced: dict, labels: tuple[str, str]) -> str:
    """Markdown in the layout of the paper's Table 3: zero-shot top-1, then Image@5 (text->image) and Text@5."""
    columns = [(f"{name} top-1", ("zeroshot", name, "top1")) for name in base["zeroshot"]]
    columns += [(f"Image@5 {name}", ("retrieval", name, "text_to_image", "R@5")) for name in base["retrieval"]]
    columns += [(f"Text@5 {name}", ("retrieval", name, "image_to_text", "R@5")) for name in base["retrieval"]]

    def value(result: dict, keys: tuple) -> float:
        for key in keys:
            result = result[key]
        return result

    lines = [_row(["Method", *(title for title, _ in columns)]), _row(["---"] * (len(columns) + 1))]
    for label, result in zip(labels, (base, enhanced)):
        lines.append(_row([label, *(f"{value(result, keys):.1f}" for _, keys in columns)]))
    lines.append(_row(["Δ", *(_signed(value(enhanced, k) - value(base, k)) for _, k in columns)]))
    return "\n".join(lines)


def radar_chart(base: dict, enhanced: dict, labels: tuple[str, str], path: Path) -> None:
    """A radar chart of the nine MMVP-VLM category accuracies of both models."""
    angles = np.linspace(0, 2 * np.pi, len(mmvp.CATEGORIES), endpoint=False)
    closed = np.append(angles, angles[0])  # repeat the first point to close each polygon
    fig = Figure(figsize=(6, 6))
    ax = fig.add_subplot(polar=True)
    ax.set_theta_offset(np.pi / 2)  # first category at the top, then clockwise
    ax.set_theta_direction(-1)
    for label, scores in zip(labels, (base, enhanced)):
        values = [scores[c] for c in mmvp.CATEGORIES]
        ax.plot(closed, values + values[:1], label=f"{label} ({scores['average']:.1f})")
        ax.fill(closed, values + values[:1], alpha=0.15)
    ax.set_xticks(angles, list(SHORT.values()))
    ax.set_ylim(0, 100)
    ax.set_title("MMVP-VLM accuracy (%)")
    ax.legend(loc="lower right", bbox_to_anchor=(1.15, -0.1))
    fig.savefig(path, dpi=120, bbox_inches="tight")


def compare(base: str, enhanced: str, plan: Comparison, out_dir: str | Path, labels=("Original", "Ours"),
            device: str = "auto", dtype: str = "fp32") -> dict:  # fmt: skip
    """Evaluate both models (one at a time) and write report.md, report.json and, with MMVP, mmvp_radar.png."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    results = [evaluate_model(path, plan, device, dtype, out_dir / sub)
               for path, sub in ((base, "base"), (enhanced, "enhanced"))]  # fmt: skip
    sections = [f"# {labels[0]} vs {labels[1]}\n\n{labels[0]}: `{base}`  \n{labels[1]}: `{enhanced}`"]
    if plan.mmvp:
        sections.append("## MMVP-VLM (Table 1 layout)\n\n" + mmvp_table(results[0]["mmvp"], results[1]["mmvp"], labels))
        radar_chart(results[0]["mmvp"], results[1]["mmvp"], labels, out_dir / "mmvp_radar.png")
        sections.append("![MMVP-VLM radar](mmvp_radar.png)")
    if plan.zeroshot or plan.retrieval:
        sections.append("## Zero-shot classification and retrieval (Table 3 layout)\n\n"
                        + global_table(results[0], results[1], labels))  # fmt: skip
    (out_dir / "report.md").write_text("\n\n".join(sections) + "\n")
    report = {"labels": list(labels), "base": results[0], "enhanced": results[1]}
    write_json(out_dir / "report.json", report)
    return report
