"""Lazy builds of afgpt's C++ CPU kernels (spline_kernels, mixture_kernels) with torch.utils.cpp_extension, and
the choice between a kernel and its PyTorch fallback (an AFGPT_*_BACKEND environment variable).

Each kernel is compiled on first use, with flags for the CPU's vector unit, into the torch extensions directory
under a name that changes with its source and flags, so an edited kernel is rebuilt and an unchanged one loads
from the cache. A failed build is remembered, so callers fall back to PyTorch once instead of retrying.
"""
import hashlib
import os
import sys
import threading
import warnings
from pathlib import Path
from types import ModuleType

import torch

_ARCH_FLAGS = {
    "AVX512": ["-mavx512f", "-mavx512vl", "-mavx512bw", "-mavx512dq", "-mavx2", "-mfma", "-mf16c"],
    "AVX2": ["-mavx2", "-mfma", "-mf16c"],
}


class NativeKernel:
    """One C++ source built as a torch extension that registers its ops with TORCH_LIBRARY.

    vectorized=True also defines ATen's CPU_CAPABILITY macros, so that at::vec::Vectorized uses the CPU's vector
    unit (as in ATen's own kernels) rather than its portable scalar loops.
    """

    def __init__(self, source: Path, prefix: str, what: str, vectorized: bool = False):
        self.source, self.prefix, self.what, self.vectorized = source, prefix, what, vectorized
        self._lock = threading.Lock()
        self._status: dict = {}  # "ok": bool once a build was tried, "error": the exception if it failed

    def build_flags(self) -> tuple[str, list[str]]:
        """Extension name and compiler flags; the name changes with the source and flags."""
        capability = torch.backends.cpu.get_cpu_capability()
        flags = ["-O3", "-fopenmp", *_ARCH_FLAGS.get(capability, [])]
        if self.vectorized and capability in _ARCH_FLAGS:
            flags += [f"-DCPU_CAPABILITY={capability}", f"-DCPU_CAPABILITY_{capability}"]
        digest = hashlib.sha1(self.source.read_bytes() + " ".join(flags).encode()).hexdigest()[:12]
        return f"{self.prefix}_{capability.lower()}_{digest}", flags

    def load(self) -> bool:
        """Build (once per machine and source version) and load the kernel; False if impossible."""
        with self._lock:
            if "ok" not in self._status:
                try:
                    from torch.utils import cpp_extension  # setuptools and friends: only when a kernel is built

                    name, flags = self.build_flags()
                    build_dir = cpp_extension._get_build_directory(name, verbose=False)
                    if not (Path(build_dir) / f"{name}.so").exists():
                        print(f"afgpt: compiling the {self.what} CPU kernel (once, ~15 s)...", file=sys.stderr)
                    cpp_extension.load(name, [str(self.source)], extra_cflags=flags, extra_ldflags=["-fopenmp"],
                                       is_python_module=False, verbose=False)
                    self._status["ok"] = True
                except Exception as err:  # no compiler, no ninja, build error: caller falls back
                    self._status.update(ok=False, error=err)
            return self._status["ok"]

    def error(self) -> Exception | None:
        """Why the last build failed (None if it did not)."""
        return self._status.get("error")

    def require(self) -> None:
        """Load the kernel or raise: for the custom ops, which have no fallback of their own."""
        if not self.load():
            raise RuntimeError(f"afgpt {self.what} CPU kernel unavailable: {self.error()}")


BACKENDS = ("auto", "cpp", "torch")


def requested_backend(variable: str, choices: tuple[str, ...] = BACKENDS) -> str:
    """The backend an environment variable asks for: auto (default), cpp, torch or another of choices."""
    name = os.environ.get(variable, "auto").lower()
    if name not in choices:
        raise ValueError(f"{variable}={name!r}; expected one of {choices}")
    return name


def use_kernel(variable: str, kernel: ModuleType, what: str, warned: list[bool]) -> bool:
    """Whether to run the C++ kernel of module `kernel` (its load() and load_error()), as `variable` asks:
    never for torch; for auto, if it builds, else fall back with one warning (recorded in `warned`); for cpp,
    if it builds, else raise."""
    name = requested_backend(variable)
    if name == "torch":
        return False
    if kernel.load():
        return True
    if name == "cpp":
        raise RuntimeError(f"{variable}=cpp but the kernel failed to build: {kernel.load_error()}")
    if not warned:
        warned.append(True)
        warnings.warn(f"afgpt: {what} CPU kernel unavailable ({kernel.load_error()}); "
                      "using the slower PyTorch fallback", RuntimeWarning, stacklevel=4)
    return False
