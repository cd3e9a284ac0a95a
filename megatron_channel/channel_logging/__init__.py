"""Per-channel losses and token counts in Megatron's console line, TensorBoard, W&B and a jsonl.

Call ``install_channel_logging(config)`` in the launch script before ``pretrain()``. It
replaces four functions of ``megatron.training.training`` (the module globals that
``train()`` and ``pretrain()`` look up at call time), and its ``print_rank_last``, with thin
wrappers around the originals, after checking that the installed megatron-core's loop has
what they read (``megatron_internals.loop``; 0.17 on). ``uninstall_channel_logging()`` puts
the originals back.

Why: stock ``train_step`` turns a channel key whose global token count is 0 into NaN
(0 / 0) for that iteration; ``training_log`` averages per-iteration values over the log
interval without token weights and hides the key for the whole interval after one NaN;
TensorBoard and W&B get the raw per-iteration value, NaN included; ``evaluate`` divides
``sum / count`` at the end (NaN when a channel never had validation tokens).

Mechanism: inside ``forward_step`` / ``loss_func`` it adds one small ``torch.stack`` per
microbatch and no host sync or collective; per iteration, one float64 all-reduce of
``K + 1`` pairs; the window sums stay on the device until a log point reads them.
The parts, one module each, in the order a value passes them:

* ``metric_capture``: takes the channel keys out of ``loss_func``'s metrics; one
  all-reduce per iteration.
* ``windows``: exact token-weighted windows (console interval, TensorBoard interval,
  whole run).
* ``log_fields``: the console fields and the TensorBoard / W&B scalars.
* ``jsonl_schema``: the jsonl records, written here and read by the plotter and the tests.
* ``wrappers``: the four wrappers (and ``print_rank_last``'s) and the state they share.
* ``install``: ``install_channel_logging`` / ``uninstall_channel_logging``.

What they assume about Megatron's loop, the install-time checks and the patch helper they
are installed with live in ``megatron_channel.megatron_internals``. The public names are
exported by ``megatron_channel`` itself.

Not supported (refused with an error naming it): ``--cuda-graph-impl full_iteration``
(replayed graphs never call ``loss_func`` in Python, so nothing could be captured).
"""
