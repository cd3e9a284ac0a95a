"""The launch of ``scripts/pretrain_gpt_channel.py``.

``pretrain_gpt``: Megatron-LM's pretrain_gpt rebuilt with channels (arguments, datasets
provider, forward step, logging, ``pretrain()``). ``startup``: the launch fixes of the
megatron-core 0.19 wheel and the ``--cpu`` flags and checks.
"""

from .._moved_modules import moved_names

# This package was one module, launch.py.
__getattr__ = moved_names(__name__, ("pretrain_gpt", "startup"))
