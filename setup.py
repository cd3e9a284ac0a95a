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
        # 0.17 is the first release whose wheel ships megatron.training. 0.17 to 0.19 are
        # tested (megatron_channel/megatron_internals/releases.py); a newer one, e.g. a
        # Megatron-LM checkout of main, runs once the install-time checks of its loop pass.
        "megatron-core>=0.17",
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
