"""`afgpt compare`: train a grid of activation (x feed-forward) variants over several seeds under identical
conditions, and tell which differences from a baseline are larger than the seed-to-seed noise.

Every variant x seed is one `train()` run in <output_dir>/runs/<variant-slug>/seed<k>; the runs share every
setting but af_type, ffn_type, seed and output_dir, so seed k gives every variant the same initialisation seed
and the same data order (TrainConfig.seed drives both). compare.json records the grid; the table (results.json,
results.md) and val_curves.png are always computed from the run directories (`collect`), whether the runs were
trained here (`run_grid`, which skips finished runs and resumes interrupted ones) or by a SLURM array of the
commands `plan` writes.
"""
import argparse
import contextlib
import json
import logging
import math
import re
import shlex
import statistics
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path

from tqdm.auto import tqdm

from .atomic import write_text_atomically
from .plotting import add_legend, new_figure, read_metrics, save_figure
from .training.config import FAMILIES, SIZES, TrainConfig
from .training.loop import train

logger = logging.getLogger("afgpt.compare")
GRID_FILE, ERROR_FILE = "compare.json", "compare_error.txt"
GRID_MANAGED = ("output_dir", "af_type", "ffn_type", "seed", "run_name", "log_file")  # set per run, never shared
LOG_TIME = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d)  (.*)$")
LOG_PARAMS = re.compile(r"model: ([\d,]+) parameters \(([\d,]+) embedding")


def comma_list(text: str | list[str]) -> list[str]:
    """A comma-separated list (af specs contain ';', never ','), or a list as given."""
    items = text.split(",") if isinstance(text, str) else text
    return [item.strip() for item in items if item.strip()]


@dataclass(frozen=True)
class Variant:
    """One arm of the comparison: an activation spec and a feed-forward type."""

    af_type: str
    ffn_type: str = "mlp"

    @property
    def name(self) -> str:
        return f"{self.af_type} {self.ffn_type}"

    @property
    def slug(self) -> str:
        """A directory name: the spec with anything but letters, digits, '.' and '-' turned into '_'."""
        return re.sub(r"[^A-Za-z0-9.-]+", "_", f"{self.af_type}_{self.ffn_type}")


@dataclass
class CompareGrid:
    """Variants x seeds, the baseline and the settings every run shares (TrainConfig fields)."""

    output_dir: str
    variants: list[Variant]
    seeds: list[int]
    baseline: Variant
    shared: dict = field(default_factory=dict)

    def run_dir(self, variant: Variant, seed: int) -> Path:
        return Path(self.output_dir) / "runs" / variant.slug / f"seed{seed}"

    def config(self, variant: Variant, seed: int) -> TrainConfig:
        """The run's TrainConfig: the shared settings plus the variant, the seed and the run directory."""
        return TrainConfig(**self.shared, af_type=variant.af_type, ffn_type=variant.ffn_type, seed=seed,
                           output_dir=str(self.run_dir(variant, seed)),
                           run_name=f"{variant.name}, seed {seed}")

    def runs(self) -> list[tuple[Variant, int]]:
        return [(variant, seed) for variant in self.variants for seed in self.seeds]

    def save(self) -> None:
        Path(self.output_dir).mkdir(parents=True, exist_ok=True)
        write_text_atomically(Path(self.output_dir) / GRID_FILE, json.dumps(asdict(self), indent=2))

    @classmethod
    def load(cls, output_dir: str | Path) -> "CompareGrid":
        saved = json.loads((Path(output_dir) / GRID_FILE).read_text())
        return cls(output_dir=str(output_dir), variants=[Variant(**v) for v in saved["variants"]],
                   seeds=saved["seeds"], baseline=Variant(**saved["baseline"]), shared=saved["shared"])


def build_grid(af_types: str | list[str], output_dir: str, seeds: str | list[int] = "0,1,2",
               ffn_types: str | list[str] = "mlp", model: str = "afgpt", preset: str | None = None,
               data: str | None = None, baseline: str | None = None, max_steps: int | None = None,
               overrides: dict | None = None) -> CompareGrid:
    """The grid af_types x ffn_types x seeds, every run checked (TrainConfig) before any is trained.

    `preset` is a TrainConfig size (tiny, small); `overrides` are further TrainConfig fields shared by all runs.
    `baseline` names a variant by its af spec or "<af spec> <ffn>" (default: the first variant).
    """
    overrides = dict(overrides or {})
    clash = sorted(set(overrides) & set(GRID_MANAGED))
    if clash:
        raise ValueError(f"{', '.join(clash)}: the comparison sets these per run; drop them from the overrides")
    shared = {"model": model, **({"size": preset} if preset else {}), **({"data": data} if data else {}),
              **({"max_steps": max_steps} if max_steps else {}), **overrides}
    variants = [Variant(af, ffn) for af in comma_list(af_types) for ffn in comma_list(ffn_types)]
    seed_list = [int(s) for s in comma_list(seeds)] if isinstance(seeds, str) else list(seeds)
    if not variants or not seed_list:
        raise ValueError("the comparison needs at least one af spec and one seed")
    if len(set(variants)) < len(variants) or len(set(seed_list)) < len(seed_list):
        raise ValueError("the af specs, feed-forward types and seeds must each be listed once")
    grid = CompareGrid(str(output_dir), variants, seed_list, pick_baseline(variants, baseline), shared)
    for variant in variants:
        grid.config(variant, seed_list[0])  # raises on a bad spec or setting, naming it
    return grid


def pick_baseline(variants: list[Variant], baseline: str | None) -> Variant:
    if baseline is None:
        return variants[0]
    for variant in variants:
        if baseline.strip() in (variant.name, variant.af_type, variant.slug):
            return variant
    raise ValueError(f"baseline={baseline!r} is none of the variants: {', '.join(v.name for v in variants)}")


# ----------------------------------------------------------------------------- running

def run_status(run_dir: Path, max_steps: int) -> str:
    """"done" (final validation at max_steps and the final model saved), "partial" (a checkpoint to resume) or
    "new" (nothing usable: train from scratch)."""
    vals = [r for r in safe_metrics(run_dir) if r["kind"] == "val"]
    if vals and vals[-1]["step"] == max_steps and any(run_dir.glob("model*.safetensors*")):
        return "done"
    if (run_dir / "checkpoint").is_dir() or (run_dir / "checkpoint.old").is_dir():
        return "partial"
    return "new"


def safe_metrics(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    return read_metrics(path) if path.is_file() else []


def execute_run(grid: CompareGrid, variant: Variant, seed: int) -> str:
    """Train one run unless it is finished (resume it if interrupted); a failure is written to the run directory
    and logged, not raised, so the other runs go on. Returns what happened: skipped, trained, resumed, failed."""
    cfg = grid.config(variant, seed)
    run_dir = Path(cfg.output_dir)
    status = run_status(run_dir, cfg.max_steps)
    if status == "done":
        logger.info(f"{variant.name} seed {seed}: finished before, skipped")
        return "skipped"
    logger.info(f"{variant.name} seed {seed}: {'resuming' if status == 'partial' else 'training'} in {run_dir}")
    try:
        train(cfg, resume=status == "partial", overwrite=status == "new")
    except Exception as error:  # a diverged or broken run must not stop the grid
        run_dir.mkdir(parents=True, exist_ok=True)
        message = f"{type(error).__name__}: {error}"
        write_text_atomically(run_dir / ERROR_FILE, message)
        logger.exception(f"{variant.name} seed {seed} failed: {message}")
        return "failed"
    (run_dir / ERROR_FILE).unlink(missing_ok=True)
    return "resumed" if status == "partial" else "trained"


def run_grid(grid: CompareGrid) -> dict:
    """Train every run of the grid (skipping finished ones), then collect the table from the run directories."""
    grid.save()
    outcomes = {}
    with compare_logging(Path(grid.output_dir) / "compare.log"):
        bar = tqdm(grid.runs(), desc="compare", unit="run")
        for variant, seed in bar:
            bar.set_postfix_str(f"{variant.slug}/seed{seed}")
            outcomes[f"{variant.slug}/seed{seed}"] = execute_run(grid, variant, seed)
        logger.info(f"runs: {json.dumps(outcomes)}")
    return collect(grid.output_dir)


@contextlib.contextmanager
def compare_logging(path: Path) -> Iterator[None]:
    """compare.log in the output directory for the runner's own lines (each run keeps its train.log)."""
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s  %(message)s", "%Y-%m-%d %H:%M:%S"))
    level = logger.level
    logger.setLevel(logging.INFO)
    logger.addHandler(handler)
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
        handler.close()


# ----------------------------------------------------------------------------- planning (SLURM arrays)

def train_command(cfg_fields: dict) -> str:
    """`afgpt train` with one flag per given TrainConfig field."""
    parts = ["afgpt", "train"]
    for name, value in cfg_fields.items():
        flag = "--" + name.replace("_", "-")
        if isinstance(value, bool):
            parts.append(flag if value else "--no-" + flag[2:])
        elif isinstance(value, (list, tuple)):
            parts += [flag, *map(str, value)]
        elif value is not None:
            parts += [flag, str(value)]
    return shlex.join(parts)


def plan(grid: CompareGrid) -> list[str]:
    """One `afgpt train` command per run (a SLURM array's lines, also written to commands.txt); afterwards
    `collect(output_dir)` builds the table from the run directories."""
    grid.save()
    commands = []
    for variant, seed in grid.runs():
        commands.append(train_command({**grid.shared, "af_type": variant.af_type, "ffn_type": variant.ffn_type,
                                       "seed": seed, "output_dir": str(grid.run_dir(variant, seed)),
                                       "run_name": f"{variant.name}, seed {seed}"}))
    write_text_atomically(Path(grid.output_dir) / "commands.txt", "\n".join(commands) + "\n")
    print("\n".join(commands))
    return commands


# ----------------------------------------------------------------------------- reading runs and statistics

def read_run(run_dir: Path, max_steps: int) -> dict:
    """What the table needs from one run directory."""
    records = safe_metrics(run_dir)
    vals = [r for r in records if r["kind"] == "val" and r.get("replica", 0) == 0]
    speeds = [r["tokens_per_second"] for r in records if r["kind"] == "train" and r.get("replica", 0) == 0]
    final_step = vals[-1]["step"] if vals else None
    mlp_act = [r for r in records if r["kind"] == "act" and r["slot"] == "mlp" and r["step"] == final_step]
    status = run_status(run_dir, max_steps)
    error = (run_dir / ERROR_FILE).read_text() if status != "done" and (run_dir / ERROR_FILE).is_file() else None
    total, embedding = log_parameters(run_dir)
    return {"status": "failed" if error else status, "error": error,
            "val_loss": vals[-1]["loss"] if vals else None, "val_accuracy": vals[-1]["accuracy"] if vals else None,
            "val_curve": [[r["step"], r["loss"]] for r in vals],
            "tokens_per_second": mean(speeds), "wall_seconds": log_wall_seconds(run_dir),
            "params_total": total, "params_non_embedding": None if total is None else total - embedding,
            "mlp_zero_frac": mean([r["zero_frac"] for r in mlp_act if "zero_frac" in r]),
            "mlp_small_frac": mean([r["small_frac"] for r in mlp_act if "small_frac" in r])}


def log_lines(run_dir: Path) -> list[tuple[datetime, str]]:
    path = run_dir / "train.log"
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines() if path.is_file() else []
    return [(datetime.strptime(m[1], "%Y-%m-%d %H:%M:%S"), m[2]) for m in map(LOG_TIME.match, lines) if m]


def log_parameters(run_dir: Path) -> tuple[int | None, int | None]:
    """(all, embedding) parameters from the run log's model line (families.parameter_counts wrote them)."""
    for _, text in log_lines(run_dir):
        if found := LOG_PARAMS.search(text):
            return int(found[1].replace(",", "")), int(found[2].replace(",", ""))
    return None, None


def log_wall_seconds(run_dir: Path) -> float | None:
    """Wall time of the run (1 s resolution): the span of each session of train.log (a resume starts one),
    summed, so the time between an interruption and its resume is not counted."""
    sessions: list[list[datetime]] = []
    for time, text in log_lines(run_dir):
        if text.startswith("afgpt train: ") or not sessions:
            sessions.append([])
        sessions[-1].append(time)
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


def summarize(name: str, runs: dict[int, dict]) -> dict:
    """A variant's row: the means (and std of the val loss) over its finished seeds."""
    done = {seed: run for seed, run in runs.items() if run["status"] == "done"}

    def over_seeds(key: str) -> float | None:
        return mean([run[key] for run in done.values() if run[key] is not None])

    losses = [run["val_loss"] for run in done.values()]
    first = next(iter(done.values()), {})
    return {"variant": name, "seeds_done": sorted(done), "val_loss_mean": mean(losses), "val_loss_std": std(losses),
            "val_accuracy": over_seeds("val_accuracy"), "params_total": first.get("params_total"),
            "params_non_embedding": first.get("params_non_embedding"),
            "tokens_per_second": over_seeds("tokens_per_second"), "wall_seconds": over_seeds("wall_seconds"),
            "mlp_zero_frac": over_seeds("mlp_zero_frac"), "mlp_small_frac": over_seeds("mlp_small_frac"),
            "errors": {seed: run["error"] for seed, run in runs.items() if run["error"]},
            "unfinished": sorted(seed for seed, run in runs.items() if run["status"] != "done" and not run["error"]),
            "runs": runs}


def collect(output_dir: str | Path) -> dict:
    """The comparison's results from the run directories (whoever trained them): results.json, results.md
    (printed) and val_curves.png in output_dir; returns the results."""
    grid = CompareGrid.load(output_dir)
    max_steps = grid.config(grid.baseline, grid.seeds[0]).max_steps
    rows = {}
    for variant in grid.variants:
        rows[variant.name] = summarize(variant.name, {seed: read_run(grid.run_dir(variant, seed), max_steps)
                                                      for seed in grid.seeds})
    base = rows[grid.baseline.name]
    base_losses = {s: r["val_loss"] for s, r in base["runs"].items() if r["status"] == "done"}
    for name, row in rows.items():
        losses = {s: r["val_loss"] for s, r in row["runs"].items() if r["status"] == "done"}
        row["vs_baseline"] = None if name == grid.baseline.name else paired_difference(losses, base_losses)
        row["params_flag"] = parameter_flag(row["params_non_embedding"], base["params_non_embedding"])
    results = {"baseline": grid.baseline.name, "seeds": grid.seeds, "max_steps": max_steps, "shared": grid.shared,
               "variants": list(rows.values())}
    out = Path(output_dir)
    write_text_atomically(out / "results.json", json.dumps(results, indent=2))
    table = markdown_table(results)
    write_text_atomically(out / "results.md", table)
    plot_val_curves(results, out / "val_curves.png")
    print(table)
    print(f"wrote results.json, results.md and val_curves.png in {out}")
    return results


# ----------------------------------------------------------------------------- table and plot

def fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def markdown_table(results: dict) -> str:
    """One markdown table: a row per variant, the paired differences against the baseline, flags and errors."""
    header = ["variant", "seeds", "val loss (mean ± std)", "accuracy", "Δ loss vs baseline (mean ± SE)",
              "real? (abs Δ > 2 SE)", "params (total / non-emb.)", "tokens/s", "wall s", "MLP zero frac", "notes"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in results["variants"]:
        diff = row["vs_baseline"]
        if diff is None:
            delta, verdict = "baseline", "baseline"
        else:
            delta = "-" if diff["mean"] is None else f"{diff['mean']:+.4f} ± {fmt(diff['se'], '.4f')}"
            verdict = diff["verdict"]
        loss = f"{fmt(row['val_loss_mean'], '.4f')} ± {fmt(row['val_loss_std'], '.4f')}"
        params = f"{fmt(row['params_total'], ',')} / {fmt(row['params_non_embedding'], ',')}"
        notes = [row["params_flag"]] if row["params_flag"] else []
        notes += [f"seed {seed} failed: {message}" for seed, message in row["errors"].items()]
        if row["unfinished"]:
            notes.append(f"unfinished seeds: {', '.join(map(str, row['unfinished']))}")
        cells = [row["variant"], f"{len(row['seeds_done'])}/{len(results['seeds'])}", loss,
                 fmt(row["val_accuracy"], ".4f"), delta, verdict, params, fmt(row["tokens_per_second"], ",.0f"),
                 fmt(row["wall_seconds"], ".0f"), fmt(row["mlp_zero_frac"], ".3f"), "; ".join(notes)]
        lines.append("| " + " | ".join(cell.replace("|", "\\|").replace("\n", " ") for cell in cells) + " |")
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


# ----------------------------------------------------------------------------- command line

def parse_overrides(items: list[str]) -> dict:
    """--set NAME=VALUE pairs; VALUE is read as JSON when it parses (numbers, true/false, [low, high]), else text."""
    overrides = {}
    for item in items:
        name, sep, text = item.partition("=")
        if not sep:
            raise ValueError(f"--set {item!r}: expected NAME=VALUE, e.g. learning_rate=1e-3")
        try:
            overrides[name.strip().replace("-", "_")] = json.loads(text)
        except ValueError:
            overrides[name.strip().replace("-", "_")] = text
    return overrides


def add_compare_arguments(parser: argparse.ArgumentParser) -> None:
    """`afgpt compare` flags."""
    parser.add_argument("--af", dest="af_types", required=True,
                        help="comma-separated activation specs, e.g. "
                             "'relu;att-linear,gelu;att-linear,spline;att-spline'")
    parser.add_argument("--ffn", dest="ffn_types", default="mlp",
                        help="comma-separated feed-forwards (mlp,kan): the grid is --af x --ffn")
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated seeds; seed k gives every variant the same "
                                                         "data order and initialisation seed")
    parser.add_argument("--output-dir", required=True, help="runs/<variant>/seed<k>, results.json/.md, "
                                                            "val_curves.png")
    parser.add_argument("--model", default="afgpt", choices=FAMILIES, help="model family")
    parser.add_argument("--preset", default=None, choices=tuple(SIZES), help="model size preset (TrainConfig --size)")
    parser.add_argument("--data", default=None, help="training data (default: TrainConfig's)")
    parser.add_argument("--baseline", default=None, help="the variant differences are measured against (its af spec; "
                                                         "default: the first)")
    parser.add_argument("--max-steps", type=int, default=None, help="optimizer steps of every run")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="NAME=VALUE",
                        help="any other TrainConfig field for every run, e.g. --set learning_rate=1e-3 (repeatable)")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--plan", action="store_true", help="print one `afgpt train` command per run (commands.txt) "
                                                          "instead of training")
    mode.add_argument("--collect", action="store_true", help="only build the table from the finished run directories")


def run_compare(args: argparse.Namespace) -> None:
    """`afgpt compare`: train (or plan, or collect) the grid."""
    if args.collect:
        collect(args.output_dir)
        return
    grid = build_grid(args.af_types, args.output_dir, seeds=args.seeds, ffn_types=args.ffn_types, model=args.model,
                      preset=args.preset, data=args.data, baseline=args.baseline, max_steps=args.max_steps,
                      overrides=parse_overrides(args.overrides))
    if args.plan:
        plan(grid)
    else:
        run_grid(grid)


def build_compare_parser(subparsers) -> argparse.ArgumentParser:
    """Adds `compare` to afgpt's subcommands (cli.build_parser's `commands`)."""
    parser = subparsers.add_parser("compare", help="train activation variants x seeds under identical conditions "
                                                   "and report which differences from the baseline are real")
    add_compare_arguments(parser)
    parser.set_defaults(run=run_compare)
    return parser
