"""Import time of `import afgpt` against the transformers it builds on, and the modules each loads.

Every figure is the median over `--runs` fresh interpreters, the statements interleaved run by run so
machine noise hits them alike. "import" is the wall time of the statement inside the process (interpreter
start-up excluded), "cpu" its CPU time (user + system, all threads), which a busy machine disturbs far less;
"process" is the whole `python -c` wall time. The module lists say which
matplotlib and huggingface_hub modules `import afgpt` loads beyond transformers' own imports. With
`--compare DIR`, `import afgpt` from another copy of the package (e.g. the last commit's) is timed in the same
rounds, so a before/after comparison sees the same machine load:

    git archive HEAD afgpt | tar -x -C /tmp/head && python bench/bench_import.py --runs 5 --compare /tmp/head
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time

TRANSFORMERS = "import transformers, torch"
# what afgpt's configuration and modeling import from transformers, and the Auto classes it registers with
TRANSFORMERS_AND_AUTO = "; ".join([
    TRANSFORMERS,
    "from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoModelForSequenceClassification",
    "from transformers import PreTrainedConfig, initialization",
    "from transformers.cache_utils import DynamicCache",
    "from transformers.generation import GenerationMixin",
    "from transformers.masking_utils import create_causal_mask",
    "from transformers.modeling_layers import GradientCheckpointingLayer",
    "from transformers.modeling_outputs import CausalLMOutputWithPast",
    "from transformers.modeling_utils import PreTrainedModel",
])
STATEMENTS = {"transformers, torch": TRANSFORMERS, "+ afgpt's transformers imports": TRANSFORMERS_AND_AUTO,
              "afgpt": "import afgpt"}
WATCHED = ("matplotlib", "huggingface_hub")

PROBE = """
import json, sys, time
t0, c0 = time.perf_counter(), time.process_time()
exec({statement!r})
seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
print(json.dumps({{"seconds": seconds, "cpu": cpu, "modules": sorted(m for m in sys.modules if m.startswith({watched!r}))}}))
"""


def run(statement: str, path: str | None = None) -> dict:
    """Time `statement` in a fresh interpreter, with `path` (a folder holding an afgpt package) first on sys.path."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [path, os.environ.get("PYTHONPATH")])))
    start = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", PROBE.format(statement=statement, watched=WATCHED)],
                         capture_output=True, text=True, check=True, env=env, cwd=path or None).stdout
    result = json.loads(out.splitlines()[-1])
    result["process"] = time.perf_counter() - start
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--compare", metavar="DIR", help="a folder holding another afgpt package to time as well")
    args = parser.parse_args()
    cases = {name: (statement, None) for name, statement in STATEMENTS.items()}
    if args.compare:
        cases[f"afgpt from {args.compare}"] = (STATEMENTS["afgpt"], os.path.abspath(args.compare))
        run(*cases[f"afgpt from {args.compare}"])  # not timed: may build the spline kernel
    results = {name: [] for name in cases}
    for _ in range(args.runs):
        for name, case in cases.items():
            results[name].append(run(*case))
    print(f"median of {args.runs} fresh processes each")
    width = max(map(len, results))
    print(f"{'statement':{width}} {'import s':>9} {'cpu s':>6} {'process s':>10}  matplotlib  huggingface_hub")
    for name, runs in results.items():
        modules = runs[-1]["modules"]
        counts = [sum(m.split(".")[0] == top for m in modules) for top in WATCHED]
        print(f"{name:{width}} {statistics.median(r['seconds'] for r in runs):9.2f} "
              f"{statistics.median(r['cpu'] for r in runs):6.2f} "
              f"{statistics.median(r['process'] for r in runs):10.2f}  {counts[0]:10}  {counts[1]:15}")
    baseline = set(results["+ afgpt's transformers imports"][-1]["modules"])
    for name in list(results)[2:]:
        extra = sorted(set(results[name][-1]["modules"]) - baseline)
        print(f"loaded by `import {name}` beyond afgpt's transformers imports: {len(extra)} modules {extra[:6]}"
              f"{' ...' if len(extra) > 6 else ''}")


if __name__ == "__main__":
    main()
