"""The forward step: what runs every microbatch, from the data iterator to ``loss_func``.

``layout`` (the batch contract: fields, dtypes, shapes, this rank's place) -> ``batch_forms``
(the other pipelines' forms rewritten into the contract's) -> ``checks``
(values and shapes, on the CPU) -> ``model_inputs`` (broadcast to TP, merge packed rows,
cut for CP) -> ``forward_step`` (``make_forward_step``: the model call) -> ``loss``
(``channel_loss_func``: Megatron's stock loss plus one ``[sum, count]`` per channel);
``token_accuracy``: the correct-token flags, computed inside GPTModel's loss step.
"""
