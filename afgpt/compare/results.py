"""The comparison's results, always computed from the run directories (whoever trained them): per run what
metrics.jsonl and train.log hold, per variant the means over seeds, against the baseline the paired difference and
whether it is larger than the seed-to-seed noise; written as results.json, results.md, val_curves.png and, for
two-stage variants, the activations their stage I learned (stage1_<variant>.png).
"""
import json
import math
import re
import statistics
from datetime import datetime
from pathlib import Path

from ..atomic import write_text_atomically
from ..hub import load_activations
from ..plotting import add_legend, new_figure, plot_activations, save_figure
from .grid import ERROR_FILE, EVAL_ERROR_FILE, CompareGrid, Variant, run_status, safe_metrics

EVALUATIONS = {"blimp": "BLiMP", "superglue": "SuperGLUE"}  # the evaluation columns, in order
LOG_TIME = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d)  (.*)$")


def read_run(run_dir: Path, max_steps: int) -> dict:
    """What the table needs from one run directory."""
    records = safe_metrics(run_dir)
    vals = [r for r in records if r["kind"] == "val" and r.get("replica", 0) == 0]
    speeds = [r["tokens_per_second"] for r in records if r["kind"] == "train" and r.get("replica", 0) == 0]
    final_step = vals[-1]["step"] if vals else None
    mlp_act = [r for r in records if r["kind"] == "act" and r["slot"] == "mlp" and r["step"] == final_step]
    model = next((r for r in records if r["kind"] == "model"), {})
    status = run_status(run_dir, max_steps)
    error = (run_dir / ERROR_FILE).read_text() if status != "done" and (run_dir / ERROR_FILE).is_file() else None
    eval_error = (run_dir / EVAL_ERROR_FILE).read_text() if (run_dir / EVAL_ERROR_FILE).is_file() else None
    return {"status": "failed" if error else status, "error": error, "eval_error": eval_error,
            "val_loss": vals[-1]["loss"] if vals else None, "val_accuracy": vals[-1]["accuracy"] if vals else None,
            "val_curve": [[r["step"], r["loss"]] for r in vals],
            "tokens_per_second": mean(speeds), "wall_seconds": log_wall_seconds(run_dir),
            "params_total": model.get("params_total"), "params_non_embedding": model.get("params_non_embedding"),
            "mlp_zero_frac": mean([r["zero_frac"] for r in mlp_act if "zero_frac" in r]),
            "mlp_small_frac": mean([r["small_frac"] for r in mlp_act if "small_frac" in r]),
            "blimp": next((r["overall"] for r in reversed(records) if r["kind"] == "blimp"), None),
            "superglue": superglue_score(records)}


def superglue_score(records: list[dict]) -> float | None:
    """The SuperGLUE convention: each task's metrics averaged (MultiRC: F1a and EM), then the tasks averaged; the
    latest record of each task counts."""
    tasks = {r["task"]: statistics.fmean(r["metrics"].values()) for r in records if r["kind"] == "superglue"}
    return mean(list(tasks.values()))


def log_wall_seconds(run_dir: Path) -> float | None:
    """Wall time of the run (1 s resolution): the span of each session of train.log (a resume starts one),
    summed, so the time between an interruption and its resume is not counted."""
    path = run_dir / "train.log"
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines() if path.is_file() else []
    sessions: list[list[datetime]] = []
    for found in filter(None, map(LOG_TIME.match, lines)):
        if found[2].startswith("afgpt train: ") or not sessions:
            sessions.append([])
        sessions[-1].append(datetime.strptime(found[1], "%Y-%m-%d %H:%M:%S"))
    return float(sum((s[-1] - s[0]).total_seconds() for s in sessions)) if sessions else None


def mean(values: list[float]) -> float | None:
    return statistics.fmean(values) if values else None


def std(values: list[float]) -> float | None:
    """Sample standard deviation (n - 1); None for fewer than two values."""
    return statistics.stdev(values) if len(values) > 1 else None


def paired_difference(losses: dict[int, float], baseline: dict[int, float]) -> dict:
    """d_s = loss(variant, s) - loss(baseline, s) over the seeds both finished: the mean, its standard error
    std(d)/sqrt(n), and whether |mean| > 2 SE. Pairing by seed removes what a seed does to both arms (the
    initialisation seed and the data order)."""
    seeds = sorted(set(losses) & set(baseline))
    d = [losses[s] - baseline[s] for s in seeds]
    if not d:
        return {"seeds": [], "d": [], "mean": None, "se": None, "real": None, "verdict": "no paired seeds"}
    if len(d) == 1:
        return {"seeds": seeds, "d": d, "mean": d[0], "se": None, "real": None,
                "verdict": "n=1: no claim possible (one seed gives no noise estimate)"}
    se = statistics.stdev(d) / math.sqrt(len(d))
    real = abs(statistics.fmean(d)) > 2 * se
    verdict = (("real: worse" if statistics.fmean(d) > 0 else "real: better") if real else "within noise")
    return {"seeds": seeds, "d": d, "mean": statistics.fmean(d), "se": se, "real": real,
            "verdict": f"{verdict} (n={len(d)})"}


def parameter_flag(params: int | None, baseline_params: int | None) -> str:
    """"params +3.2%" when the variant's non-embedding parameter count differs from the baseline's (relative to
    the baseline's: the embeddings are the same in every variant and would hide the difference), else ""."""
    if params is None or baseline_params is None or params == baseline_params:
        return ""
    return f"params {100 * (params - baseline_params) / baseline_params:+.1f}% (non-embedding)"


def summarize(variant: Variant, runs: dict[int, dict]) -> dict:
    """A variant's row: the means (and std of the val loss and the evaluations) over its finished seeds."""
    done = {seed: run for seed, run in runs.items() if run["status"] == "done"}

    def over_seeds(key: str, how=mean) -> float | None:
        return how([run[key] for run in done.values() if run[key] is not None])

    first = next(iter(done.values()), {})
    return {"variant": variant.name, "stage2": variant.stage2, "intermediate_size": variant.intermediate_size,
            "seeds_done": sorted(done), "val_loss_mean": over_seeds("val_loss"), "val_loss_std": over_seeds(
                "val_loss", std), "val_accuracy": over_seeds("val_accuracy"),
            "params_total": first.get("params_total"), "params_non_embedding": first.get("params_non_embedding"),
            "tokens_per_second": over_seeds("tokens_per_second"), "wall_seconds": over_seeds("wall_seconds"),
            "mlp_zero_frac": over_seeds("mlp_zero_frac"), "mlp_small_frac": over_seeds("mlp_small_frac"),
            "blimp_mean": over_seeds("blimp"), "blimp_std": over_seeds("blimp", std),
            "superglue_mean": over_seeds("superglue"), "superglue_std": over_seeds("superglue", std),
            "errors": {seed: run["error"] for seed, run in runs.items() if run["error"]},
            "eval_errors": {seed: run["eval_error"] for seed, run in runs.items() if run["eval_error"]},
            "unfinished": sorted(seed for seed, run in runs.items() if run["status"] != "done" and not run["error"]),
            "runs": runs}


def collect(output_dir: str | Path) -> dict:
    """The comparison's results from the run directories: results.json, results.md (printed), val_curves.png and
    the stage I activation plots in output_dir; returns the results."""
    grid = CompareGrid.load(output_dir)
    max_steps = grid.config(grid.baseline, grid.seeds[0]).max_steps
    rows = {variant.name: summarize(variant, {seed: read_run(grid.run_dir(variant, seed), max_steps)
                                              for seed in grid.seeds}) for variant in grid.variants}
    base = rows[grid.baseline.name]
    base_losses = {s: r["val_loss"] for s, r in base["runs"].items() if r["status"] == "done"}
    for name, row in rows.items():
        losses = {s: r["val_loss"] for s, r in row["runs"].items() if r["status"] == "done"}
        row["vs_baseline"] = None if name == grid.baseline.name else paired_difference(losses, base_losses)
        row["params_flag"] = parameter_flag(row["params_non_embedding"], base["params_non_embedding"])
    out = Path(output_dir)
    results = {"baseline": grid.baseline.name, "seeds": grid.seeds, "max_steps": max_steps, "shared": grid.shared,
               "stage1": grid.stage1 if any(v.stage2 for v in grid.variants) else None,
               "evaluations": grid.evaluations, "variants": list(rows.values()),
               "stage1_plots": plot_stage1_activations(grid, out)}
    write_text_atomically(out / "results.json", json.dumps(results, indent=2))
    table = markdown_table(results)
    write_text_atomically(out / "results.md", table)
    plot_val_curves(results, out / "val_curves.png")
    print(table)
    print(f"wrote results.json, results.md and val_curves.png in {out}")
    return results


def plot_stage1_activations(grid: CompareGrid, out: Path) -> dict[str, str]:
    """{variant: file name} of each finished stage I's learned activations, plotted into output_dir."""
    plots = {}
    for variant in (v for v in grid.variants if v.stage2):
        stage1 = grid.stage1_dir(variant)
        if run_status(stage1, grid.config(variant, grid.seeds[0]).max_steps) == "done":
            name = f"stage1_{variant.slug}.png"
            plot_activations(load_activations(stage1), out / name,
                             title=f"Stage I activations of {variant.name} ({grid.stage1['n_models']} replicas)")
            plots[variant.name] = name
    return plots


# ----------------------------------------------------------------------------- table and plot

def fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def mean_std(mean_value: float | None, std_value: float | None, spec: str) -> str:
    return f"{fmt(mean_value, spec)} ± {fmt(std_value, spec)}"


def notes(row: dict, stage1: dict | None) -> list[str]:
    """The notes cell: how the variant was built, parameter differences, failures and unfinished seeds."""
    found = []
    if row["stage2"]:
        found.append(f"stage II: activations from a {stage1['n_models']}-replica stage I, frozen")
    if row["intermediate_size"] is not None:
        found.append(f"intermediate_size {row['intermediate_size']} (matched)")
    found += [row["params_flag"]] if row["params_flag"] else []
    found += [f"seed {seed} failed: {message}" for seed, message in row["errors"].items()]
    found += [f"seed {seed} evaluation failed: {message}" for seed, message in row["eval_errors"].items()]
    if row["unfinished"]:
        found.append(f"unfinished seeds: {', '.join(map(str, row['unfinished']))}")
    return found


def markdown_table(results: dict) -> str:
    """One markdown table: a row per variant, the paired differences against the baseline, flags and errors; the
    BLiMP and SuperGLUE columns when the grid evaluated; the stage I plots below."""
    evaluations = [kind for kind in EVALUATIONS if kind in results["evaluations"]]
    header = ["variant", "seeds", "val loss (mean ± std)", "accuracy", "Δ loss vs baseline (mean ± SE)",
              "real? (abs Δ > 2 SE)", *[f"{EVALUATIONS[kind]} (mean ± std)" for kind in evaluations],
              "params (total / non-emb.)", "tokens/s", "wall s", "MLP zero frac", "notes"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in results["variants"]:
        diff = row["vs_baseline"]
        if diff is None:
            delta, verdict = "baseline", "baseline"
        else:
            delta = "-" if diff["mean"] is None else f"{diff['mean']:+.4f} ± {fmt(diff['se'], '.4f')}"
            verdict = diff["verdict"]
        cells = [row["variant"], f"{len(row['seeds_done'])}/{len(results['seeds'])}",
                 mean_std(row["val_loss_mean"], row["val_loss_std"], ".4f"), fmt(row["val_accuracy"], ".4f"), delta,
                 verdict, *[mean_std(row[f"{k}_mean"], row[f"{k}_std"], ".4f") for k in evaluations],
                 f"{fmt(row['params_total'], ',')} / {fmt(row['params_non_embedding'], ',')}",
                 fmt(row["tokens_per_second"], ",.0f"), fmt(row["wall_seconds"], ".0f"),
                 fmt(row["mlp_zero_frac"], ".3f"), "; ".join(notes(row, results["stage1"]))]
        lines.append("| " + " | ".join(cell.replace("|", "\\|").replace("\n", " ") for cell in cells) + " |")
    for name, plot in results["stage1_plots"].items():
        lines += ["", f"Stage I activations of {name}: ![{name}]({plot})"]
    return "\n".join(lines) + "\n"


def plot_val_curves(results: dict, path: Path) -> None:
    """Validation loss vs step per variant: the mean over seeds, with a min-max band."""
    fig, ((ax,),) = new_figure(1, 1, (6.0, 4.0))
    for i, row in enumerate(results["variants"]):
        curves = [dict(map(tuple, run["val_curve"])) for run in row["runs"].values() if run["status"] == "done"]
        steps = sorted(set.intersection(*(set(c) for c in curves))) if curves else []
        if not steps:
            continue
        values = [[c[s] for c in curves] for s in steps]
        color = f"C{i % 10}"
        ax.plot(steps, [statistics.fmean(v) for v in values], color=color, marker="o", ms=3,
                label=f"{row['variant']} (n={len(curves)})")
        ax.fill_between(steps, [min(v) for v in values], [max(v) for v in values], color=color, alpha=0.2, lw=0)
    ax.set(xlabel="step", ylabel="validation loss", title="Validation loss: mean over seeds, band min-max")
    ax.grid(alpha=0.3)
    add_legend(ax, fontsize="small")
    save_figure(fig, path)
