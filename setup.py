from setuptools import find_packages, setup

setup(
    name="megatron_channel",
    version="0.1.0",
    description="Per-channel (per data source) loss curves for Megatron-Core training",
    long_description=open("README.md").read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["megatron_channel", "megatron_channel.*"]),
    python_requires=">=3.12",
    install_requires=[
        "torch",
        # 0.19 is the line whose loss contract, batch broadcast and training loop internals
        # this package is written and tested against; it also ships megatron.training.
        # A new minor release may move those internals, so it must be checked before use.
        "megatron-core>=0.19,<0.20",
        "numpy",
        "pyyaml",
        # Megatron's torch_dist checkpoint writer (--save) imports it; the wheel does not require it.
        "psutil",
    ],
    extras_require={
        # TensorBoard event reading and the PNG of scripts/plot_channels.py (and the demo).
        "plot": ["tensorboard", "matplotlib"],
        # transformers + tokenizers: Megatron's SFTTokenizer over the tiny tokenizer of
        # scripts/make_sft_tokenizer.py, for the packed SFT runs.
        "test": ["pytest", "pytest-timeout", "hypothesis", "tensorboard", "matplotlib", "transformers>=5", "tokenizers>=0.22"],
        # NVIDIA apex is optional and built from source with CUDA; megatron-core falls back
        # to torch without it. Never install the unrelated PyPI package named "apex".
        "gpu": ["transformer-engine[pytorch]"],
    },
)
