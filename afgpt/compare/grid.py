"""The comparison's grid: variants (activation spec x feed-forward, optionally two-stage) x seeds, the settings
every run shares, and where each run lives. Built and checked once (`build_grid`), saved as compare.json, and read
back by whoever trains, plans or collects.

    runs/<variant>/seed<k>   the run the table reports (for a two-stage variant: its stage II model)
    runs/<variant>/stage1    a two-stage variant's stage I: --n-models replicas sharing the activations, trained
                             once with the first seed; every seed's stage II loads them frozen
"""
import json
import re
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from ..atomic import write_text_atomically
from ..plotting import read_metrics
from ..training.config import TrainConfig
from ..training.families import non_embedding_parameters

GRID_FILE = "compare.json"
ERROR_FILE, EVAL_ERROR_FILE = "compare_error.txt", "compare_eval_error.txt"  # why a run, or its evaluation, failed
STAGE2 = "@stage2"
# set per run (or per stage) by the grid, never shared through --set
GRID_MANAGED = ("output_dir", "af_type", "ffn_type", "seed", "run_name", "log_file", "n_models", "af_file")


def comma_list(text: str | list[str]) -> list[str]:
    """A comma-separated list (af specs contain ';', never ','), or a list as given."""
    items = text.split(",") if isinstance(text, str) else text
    return [item.strip() for item in items if item.strip()]


@dataclass(frozen=True)
class Variant:
    """One arm of the comparison: an activation spec, a feed-forward type, whether its activations are learned in
    a stage I first (stage2), and the MLP width --match-params chose (None: the default)."""

    af_type: str
    ffn_type: str = "mlp"
    stage2: bool = False
    intermediate_size: int | None = None

    @classmethod
    def parse(cls, spec: str, ffn_type: str) -> "Variant":
        """"<af spec>" or "<af spec>@stage2"."""
        af_type, at, suffix = spec.partition("@")
        if at and "@" + suffix != STAGE2:
            raise ValueError(f"{spec!r}: unknown suffix '@{suffix}'; the one suffix is {STAGE2} (learn the "
                             "activations in a stage I, then compare a fresh model with them frozen)")
        return cls(af_type.strip(), ffn_type, stage2=bool(at))

    @property
    def name(self) -> str:
        return f"{self.af_type}{STAGE2 if self.stage2 else ''} {self.ffn_type}"

    @property
    def slug(self) -> str:
        """A directory name: the name with anything but letters, digits, '.' and '-' turned into '_'."""
        return re.sub(r"[^A-Za-z0-9.-]+", "_", self.name)


@dataclass
class CompareGrid:
    """Variants x seeds, the baseline, the settings every run shares (TrainConfig fields), stage I's settings for
    two-stage variants, and the evaluations run on every finished model ({"blimp": {...}, "superglue": {...}})."""

    output_dir: str
    variants: list[Variant]
    seeds: list[int]
    baseline: Variant
    shared: dict = field(default_factory=dict)
    stage1: dict = field(default_factory=lambda: {"n_models": 4, "staggered_starts": 2})
    evaluations: dict = field(default_factory=dict)

    def run_dir(self, variant: Variant, seed: int) -> Path:
        return Path(self.output_dir) / "runs" / variant.slug / f"seed{seed}"

    def stage1_dir(self, variant: Variant) -> Path:
        return Path(self.output_dir) / "runs" / variant.slug / "stage1"

    def run_fields(self, variant: Variant, seed: int) -> dict:
        """The TrainConfig fields of a run the table reports; a two-stage variant's loads its stage I's activations
        frozen."""
        fields = {**self.shared, "af_type": variant.af_type, "ffn_type": variant.ffn_type, "seed": seed,
                  "output_dir": str(self.run_dir(variant, seed)), "run_name": f"{variant.name}, seed {seed}"}
        if variant.intermediate_size is not None:
            fields["intermediate_size"] = variant.intermediate_size
        if variant.stage2:
            fields.update(af_file=str(self.stage1_dir(variant)), af_lr=0.0)
        return fields

    def stage1_fields(self, variant: Variant) -> dict:
        """A two-stage variant's stage I: the shared settings, the first seed, and stage1's replicas."""
        return {**self.run_fields(replace(variant, stage2=False), self.seeds[0]), **self.stage1,
                "output_dir": str(self.stage1_dir(variant)), "run_name": f"{variant.name}, stage I"}

    def config(self, variant: Variant, seed: int) -> TrainConfig:
        return TrainConfig(**self.run_fields(variant, seed))

    def runs(self) -> list[tuple[Variant, int]]:
        return [(variant, seed) for variant in self.variants for seed in self.seeds]

    def save(self) -> None:
        Path(self.output_dir).mkdir(parents=True, exist_ok=True)
        write_text_atomically(Path(self.output_dir) / GRID_FILE, json.dumps(asdict(self), indent=2))

    @classmethod
    def load(cls, output_dir: str | Path) -> "CompareGrid":
        path = Path(output_dir) / GRID_FILE
        if not path.is_file():
            raise FileNotFoundError(f"{path} does not exist: collect reads the grid that `afgpt compare` (or "
                                    "--plan) wrote there; check --output-dir")
        saved = json.loads(path.read_text())
        return cls(**{**saved, "output_dir": str(output_dir), "variants": [Variant(**v) for v in saved["variants"]],
                      "baseline": Variant(**saved["baseline"])})


def build_grid(af_types: str | list[str], output_dir: str, seeds: str | list[int] = "0,1,2",
               ffn_types: str | list[str] = "mlp", model: str = "afgpt", preset: str | None = None,
               data: str | None = None, baseline: str | None = None, max_steps: int | None = None,
               overrides: dict | None = None, n_models: int = 4, staggered_starts: int = 2,
               match_params: bool = False, evaluations: dict | None = None) -> CompareGrid:
    """The grid af_types x ffn_types x seeds, every run checked (TrainConfig) before any is trained.

    `preset` is a TrainConfig size (tiny, small); `overrides` are further TrainConfig fields shared by all runs.
    An af spec ending in "@stage2" is a two-stage variant (stage I with `n_models` replicas and `staggered_starts`).
    `baseline` names a variant by its af spec or "<af spec> <ffn>" (default: the first variant). `match_params`
    gives every other variant the MLP width whose non-embedding parameter count is closest to the baseline's.
    """
    overrides = dict(overrides or {})
    clash = sorted(set(overrides) & set(GRID_MANAGED))
    if clash:
        raise ValueError(f"{', '.join(clash)}: the comparison sets these per run; drop them from the overrides "
                         "(stage I's replicas: --n-models with an '@stage2' variant)")
    shared = {"model": model, **({"size": preset} if preset else {}), **({"data": data} if data else {}),
              **({"max_steps": max_steps} if max_steps else {}), **overrides}
    variants = [Variant.parse(af, ffn) for af in comma_list(af_types) for ffn in comma_list(ffn_types)]
    seed_list = [int(s) for s in comma_list(seeds)] if isinstance(seeds, str) else list(seeds)
    if not variants or not seed_list:
        raise ValueError("the comparison needs at least one af spec and one seed")
    if len(set(variants)) < len(variants) or len(set(seed_list)) < len(seed_list):
        raise ValueError("the af specs, feed-forward types and seeds must each be listed once")
    stage1 = {"n_models": n_models, "staggered_starts": staggered_starts}
    grid = CompareGrid(str(output_dir), variants, seed_list, pick_baseline(variants, baseline), shared, stage1,
                       evaluations or {})
    for variant in variants:  # raises on a bad spec or setting, naming it
        grid.config(variant, seed_list[0])
        if variant.stage2:
            TrainConfig(**grid.stage1_fields(variant))
    if match_params:
        grid.variants = matched_variants(grid)
        grid.baseline = pick_baseline(grid.variants, grid.baseline.name)
    return grid


def pick_baseline(variants: list[Variant], baseline: str | None) -> Variant:
    if baseline is None:
        return variants[0]
    for variant in variants:
        if baseline.strip() in (variant.name, variant.af_type, variant.slug):
            return variant
    raise ValueError(f"baseline={baseline!r} is none of the variants: {', '.join(v.name for v in variants)}")


def matched_variants(grid: CompareGrid) -> list[Variant]:
    """Each variant with the MLP width (intermediate_size) whose non-embedding parameter count is closest to the
    baseline's; variants that already match keep the default width. A GLU or KAN derives its own width from
    intermediate_size (the 2/3 rule, kan_width), so it is matched through it."""
    def count(variant: Variant, width: int | None) -> int:
        return non_embedding_parameters(grid.config(replace(variant, intermediate_size=width), grid.seeds[0]))

    target = count(grid.baseline, grid.baseline.intermediate_size)
    matched = []
    for variant in grid.variants:
        error = abs(count(variant, variant.intermediate_size) - target)
        if variant == grid.baseline or error == 0:
            matched.append(variant)
            continue
        cfg = grid.config(variant, grid.seeds[0])
        low, high = 1, 2 * (cfg.intermediate_size or 4 * cfg.hidden_size)
        while count(variant, high) < target:
            high *= 2
        while high - low > 1:  # the count grows with the width: the last width below the target and the next one
            middle = (low + high) // 2
            low, high = (middle, high) if count(variant, middle) < target else (low, middle)
        best = min((low, high), key=lambda width: abs(count(variant, width) - target))
        better = abs(count(variant, best) - target) < error  # else the default width is as close as any
        matched.append(replace(variant, intermediate_size=best) if better else variant)
    return matched


def safe_metrics(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    return read_metrics(path) if path.is_file() else []


def run_status(run_dir: Path, max_steps: int) -> str:
    """"done" (final validation at max_steps and the final model saved), "partial" (a checkpoint to resume) or
    "new" (nothing usable: train from scratch)."""
    vals = [r for r in safe_metrics(run_dir) if r["kind"] == "val"]
    if vals and vals[-1]["step"] == max_steps and any(run_dir.glob("model*.safetensors*")):
        return "done"
    if (run_dir / "checkpoint").is_dir() or (run_dir / "checkpoint.old").is_dir():
        return "partial"
    return "new"
