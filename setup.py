from setuptools import find_packages, setup

setup(
    name="afgpt",
    version="0.1.0",
    description="Learnable activation functions for small language models, as a transformers extension",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="MIT",
    python_requires=">=3.10",
    packages=find_packages(include=["afgpt", "afgpt.*"]),
    package_data={"afgpt.spline_kernels": ["*.cpp"], "afgpt.mixture_kernels": ["*.cpp"]},
    install_requires=[
        "torch>=2.4",
        # The range CI tests: the floor (5.24 renamed the cache to `cache=`) in a second environment, and the
        # newest release below the ceiling in the main one. Raise the ceiling after testing the next release.
        "transformers>=5.24,<5.26",
        "accelerate>=1.0",
        "safetensors>=0.4",
        "tokenizers>=0.20",
        "datasets>=3.0",
        "huggingface_hub>=1.0",
        "matplotlib>=3.7",
        "scikit-learn>=1.3",
        "tqdm>=4.60",
        "numpy>=1.24",
        "ninja",  # torch.utils.cpp_extension builds the spline kernel with it
    ],
    extras_require={
        "peft": ["peft>=0.13"],
        # triton: the Triton spline kernel's tests run in its interpreter on CPU (torch's CUDA wheels bring it)
        "test": ["pytest>=8", "pytest-xdist>=3", "peft>=0.13", "triton>=3.2; platform_system == 'Linux'"],
    },
    entry_points={"console_scripts": ["afgpt=afgpt.cli:main"]},
)
