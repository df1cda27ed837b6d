import re
from pathlib import Path

from setuptools import find_packages, setup

# the version lives in kernels/_version.py (kernels.__version__); read, not imported (importing needs torch)
VERSION = re.search(r'__version__ = "([^"]+)"', Path(__file__).with_name("kernels").joinpath("_version.py")
                    .read_text(encoding="utf-8")).group(1)

setup(
    name="carn-camhg-kernels",
    version=VERSION,
    description="Fused Triton kernels (entmax-1.5 attention, block-causal attention, top-2 MoE) and the "
    "CARN and CaM-HG models of multimodal emotion recognition with missing modalities",
    long_description=Path(__file__).with_name("README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["kernels", "kernels.*", "mer", "mer.*", "carn", "carn.*", "camhg", "camhg.*"]),
    # torch is left unpinned so that an installed build (CUDA or CPU) is kept; on a CPU-only machine install a
    # CPU build first (README), or pip resolves a multi-GB CUDA one.
    install_requires=[
        "torch>=2.4",
        "triton>=3.2",
        "einops>=0.7",
        "numpy>=1.24",
        "scikit-learn>=1.3",
        "tqdm>=4.60",
        "matplotlib>=3.7",
        "scipy>=1.10",  # Welch tests of the ablation tables (mer.metrics); scikit-learn installs it anyway
    ],
    # the same commands as python -m carn.train etc. (README)
    entry_points={
        "console_scripts": [
            f"{model}-{command}={model}.{command}:cli"
            for model in ("carn", "camhg") for command in ("train", "evaluate", "ablations", "predict")
        ],
    },
    extras_require={
        # entmax: the package the tests and benchmarks cross-check our own entmax-1.5 against (the code does not use it)
        "test": ["pytest>=7", "pytest-benchmark>=4", "pytest-xdist>=3", "hypothesis>=6.100", "entmax>=1.3"],
    },
)
