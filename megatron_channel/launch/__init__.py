"""The launch of ``scripts/pretrain_gpt_channel.py``.

``pretrain_gpt``: Megatron-LM's pretrain_gpt / pretrain_hybrid rebuilt with channels
(arguments, datasets provider, forward step, logging, ``pretrain()``). ``models``: GPTModel
and HybridModel providers for releases without Megatron's builders. ``startup``: the launch
fixes of the megatron-core wheels and the ``--cpu`` flags and checks.
"""

from .._moved_modules import moved_names

# This package was one module, launch.py.
__getattr__ = moved_names(__name__, ("pretrain_gpt", "startup"))
