"""The launch of ``scripts/pretrain_gpt_channel.py``.

``pretrain_gpt``: Megatron-LM's pretrain_gpt / pretrain_hybrid rebuilt with channels
(arguments, datasets provider, forward step, logging, ``pretrain()``). ``models``: GPTModel
and HybridModel providers for releases without Megatron's builders. ``startup``: the launch
fixes of the megatron-core wheels and the ``--cpu`` flags and checks.
"""
