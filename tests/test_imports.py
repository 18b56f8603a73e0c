"""`import afgpt` stays light, and afgpt's modules import one way (ARCHITECTURE.md, "Imports flow one way")."""
import ast
import json
import subprocess
import sys
from pathlib import Path

import afgpt

PACKAGE = Path(afgpt.__file__).parent
WATCHED = ("matplotlib", "huggingface_hub")
# what afgpt's configuration and modeling import from transformers, and the Auto classes `import afgpt` registers with
TRANSFORMERS = """
import torch, transformers
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoModelForSequenceClassification, PreTrainedConfig
import transformers.cache_utils, transformers.generation, transformers.masking_utils, transformers.modeling_layers
import transformers.modeling_outputs, transformers.modeling_utils
"""
# ARCHITECTURE.md's import order, lowest first: a module imports (at module level) only from its own layer or
# lower ones. Modules in no layer are not checked. The names include planned modules, so they are checked once they exist.
LAYERS = [
    {"atomic", "paths", "losses", "native_build", "spline_torch", "spline_kernels", "mixture_kernels", "kan",
     "mixtures"},
    {"activations", "ffn"},
    {"activation_set"},
    {"configuration_afgpt"},
    {"modeling_afgpt", "patching"},
    {"bank", "ensemble"},
    {"data", "training", "evaluation", "hub", "plotting"},
    {"compare"},
    {"cli"},
]
RANK = {name: rank for rank, layer in enumerate(LAYERS) for name in layer}


def loaded_after(code: str) -> dict:
    """The matplotlib / huggingface_hub / afgpt modules loaded by `code` in a fresh interpreter."""
    probe = (f"{code}\nimport json, sys\n"
             f"print(json.dumps(sorted(m for m in sys.modules if m.startswith({WATCHED + ('afgpt',)!r}))))")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    modules = json.loads(out.splitlines()[-1])
    return {top: {m for m in modules if m.split(".")[0] == top} for top in WATCHED + ("afgpt",)}


def test_import_afgpt_loads_neither_matplotlib_nor_more_of_huggingface_hub_than_transformers():
    ours, theirs = loaded_after("import afgpt"), loaded_after(TRANSFORMERS)
    assert ours["matplotlib"] == set()
    assert ours["huggingface_hub"] - theirs["huggingface_hub"] == set()
    assert {"afgpt.plotting", "afgpt.hub"} & ours["afgpt"] == set()  # they load with their first use


def test_public_api_resolves_and_hub_and_plotting_load_on_first_use():
    code = """
import sys, tempfile
from pathlib import Path
import afgpt
assert "afgpt.hub" not in sys.modules and "matplotlib" not in sys.modules
from afgpt import HubError, load_activations, push_run
import afgpt.hub
assert (HubError, load_activations, push_run) == (afgpt.hub.HubError, afgpt.hub.load_activations, afgpt.hub.push_run)
assert afgpt.load_activations is load_activations and issubclass(afgpt.HubError, OSError)
assert {"HubError", "load_activations", "push_run"} <= set(dir(afgpt))
for name in afgpt.__all__:
    getattr(afgpt, name)
try:
    afgpt.no_such_name
except AttributeError as err:
    assert "no_such_name" in str(err)
else:
    raise AssertionError("afgpt.no_such_name resolved")

# the bank imports plotting only when its save draws activations.png
config = afgpt.AfGPTConfig(vocab_size=16, hidden_size=8, num_hidden_layers=2, num_attention_heads=2,
                           af_type="spline;att-none", af_n_anchors=8)
bank = afgpt.ActivationBank.from_model(afgpt.AfGPTForCausalLM(config))
with tempfile.TemporaryDirectory() as tmp:
    png = bank.save(Path(tmp) / "bank") / "activations.png"
    assert png.read_bytes()[:8] == b"\\x89PNG\\r\\n\\x1a\\n"
"""
    subprocess.run([sys.executable, "-c", code], check=True)


def module_level_imports(path: Path) -> set[str]:
    """The afgpt modules (first name under afgpt) that `path` imports at module level, try/if blocks included;
    imports inside functions and classes load on use and are not counted."""
    package = path.relative_to(PACKAGE.parent).with_suffix("").parts[:-1]  # ("afgpt",) or ("afgpt", "sub")
    found, statements = set(), list(ast.parse(path.read_text(encoding="utf-8")).body)
    while statements:
        node = statements.pop()
        if isinstance(node, (ast.If, ast.Try)):
            statements += [*node.body, *node.orelse, *getattr(node, "finalbody", []),
                           *(s for handler in getattr(node, "handlers", []) for s in handler.body)]
        elif isinstance(node, ast.Import):
            names = [alias.name.split(".") for alias in node.names]
            found |= {parts[1] for parts in names if parts[0] == "afgpt" and len(parts) > 1}
        elif isinstance(node, ast.ImportFrom):
            base = list(package[:len(package) - node.level + 1]) if node.level else []
            parts = base + (node.module.split(".") if node.module else [])
            if parts[:1] == ["afgpt"]:
                found |= {parts[1]} if len(parts) > 1 else {alias.name for alias in node.names}
    return found


def test_module_level_imports_flow_one_way():
    upward = []
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE).with_suffix("").parts
        name = parts[0]
        if name == "__init__" or name not in RANK:  # the package's public API sits above everything
            continue
        for imported in sorted(module_level_imports(path) - {name}):
            if RANK.get(imported, -1) > RANK[name]:
                upward.append(f"{'.'.join(parts)} imports {imported}")
    assert upward == []
