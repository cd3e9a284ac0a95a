#!/usr/bin/env python
"""Test support: the channel launch with a forward step of Megatron's stock semantics for packed rows.

Run under torchrun exactly like ``scripts/pretrain_gpt_channel.py`` (same flags, ``--cpu``
included): the same arguments, model, datasets and Megatron ``pretrain()``, but the forward
step and loss function below in place of the package's, and no channel logging. It is the
reference the package's packed-row path is compared with, so it uses nothing of
``megatron_channel.step``.

What it does with one microbatch of packed rows (tensor parallelism 1, one pipeline stage,
no context parallelism; it refuses anything else):

* reads the batch from the data iterator on every rank;
* flattens the ``[b, s]`` rows into one THD stream ``[1, b * s]``;
* builds one ``cu_seqlens`` for the stream: each row's boundaries without its padding
  entries (an entry equal to the one before it), offset by the row's start;
* ``max_seqlen`` the batch's largest;
* ``PackedSeqParams(qkv_format="thd", ..., tokens_per_sample=--seq-length)``, as stock
  pretrain_gpt sets it for MoE routing per sample (``--stock-without-tokens-per-sample``
  leaves it unset: the whole stream is then routed as one sequence);
* ``model(tokens, position_ids, None, labels=..., loss_mask=..., packed_seq_params=...)``;
* the loss function of stock pretrain_gpt: ``(sum(loss * mask), mask.sum() as int,
  {"lm loss": [sum, count]})``.
"""

from __future__ import annotations

import sys
from functools import partial

import torch

from megatron.core.packed_seq_params import PackedSeqParams

WITHOUT_TOKENS_PER_SAMPLE = "--stock-without-tokens-per-sample"


def merged_cu_seqlens(cu_seqlens: torch.Tensor, seq_length: int) -> torch.Tensor:
    """``[b, L]`` per-row boundaries (padded with repeats) -> ``[N + 1]`` int32 boundaries of the stream."""
    parts = [torch.zeros(1, dtype=torch.int64)]
    for index, row in enumerate(cu_seqlens.to(torch.int64).cpu()):
        assert int(row[0]) == 0, f"row {index} of cu_seqlens does not start at 0: {row.tolist()}"
        ends = row[1:][row[1:] != row[:-1]]  # padding entries repeat the boundary before them
        assert int(ends[-1]) == seq_length, f"row {index} of cu_seqlens does not end at {seq_length}"
        parts.append(ends + index * seq_length)
    return torch.cat(parts).to(torch.int32)


def loss_func(loss_mask: torch.Tensor, output_tensor: torch.Tensor):
    """Stock pretrain_gpt's loss: summed masked token losses, the token count, ``lm loss``."""
    losses = output_tensor.view(-1).float()
    mask = loss_mask.view(-1).float()
    loss = torch.sum(losses * mask)
    num_tokens = mask.sum().clone().detach().to(torch.int)
    return loss, num_tokens, {"lm loss": torch.cat([loss.clone().detach().view(1), num_tokens.view(1)])}


def make_stock_forward_step(seq_length: int, tokens_per_sample: int | None):
    def forward_step(data_iterator, model, *unused, **unused_kwargs):
        device = next(model.parameters()).device
        batch = next(data_iterator)
        tokens = batch["tokens"]
        rows, length = tokens.shape
        assert length == seq_length, (length, seq_length)
        stream = {key: batch[key].reshape(1, rows * length).to(device)
                  for key in ("tokens", "labels", "loss_mask", "position_ids")}
        cu_seqlens = merged_cu_seqlens(batch["cu_seqlens"].reshape(rows, -1), seq_length).to(device)
        max_seqlen = int(batch["max_seqlen"].max())
        packed_seq_params = PackedSeqParams(
            qkv_format="thd",
            cu_seqlens_q=cu_seqlens,
            cu_seqlens_kv=cu_seqlens,
            max_seqlen_q=max_seqlen,
            max_seqlen_kv=max_seqlen,
            tokens_per_sample=tokens_per_sample,
        )
        output = model(stream["tokens"].long(), stream["position_ids"].long(), None,
                       labels=stream["labels"].long(), loss_mask=stream["loss_mask"].float(),
                       packed_seq_params=packed_seq_params)
        return output, partial(loss_func, stream["loss_mask"].float())

    return forward_step


def add_stock_args(parser):
    from megatron_channel.launch.pretrain_gpt import add_launch_args

    add_launch_args(parser)
    group = parser.add_argument_group(title="stock forward step (test support)")
    group.add_argument(WITHOUT_TOKENS_PER_SAMPLE, action="store_true",
                       help="Leave PackedSeqParams.tokens_per_sample unset: MoE routes the merged stream "
                            "as one sequence.")
    return parser


def main() -> None:
    from megatron.core.enums import ModelType
    from megatron.training import pretrain
    from megatron.training.argument_utils import gpt_config_from_args, pretrain_cfg_container_from_args
    from megatron.training.arguments import parse_and_validate_args

    from megatron_channel.launch.pretrain_gpt import datasets_provider, finish_run
    from megatron_channel.launch.startup import (
        apply_defaults_without_apex, check_cpu_args, cpu_argv, require_cuda_or_cpu, skip_built_dataset_helpers,
    )
    from megatron_channel.settings import channel_settings_from_args

    argv, cpu = cpu_argv(sys.argv[1:])
    require_cuda_or_cpu(cpu)
    if cpu:
        from megatron_channel.cpu import install_cuda_on_cpu

        install_cuda_on_cpu()
    skip_built_dataset_helpers()
    sys.argv = [sys.argv[0], *argv]
    args = parse_and_validate_args(extra_args_provider=add_stock_args)
    apply_defaults_without_apex(args)
    if cpu:
        check_cpu_args(args)
    if not args.sft:
        raise SystemExit("the stock forward step is for packed rows: add --sft")
    for flag, value in (("--tensor-model-parallel-size", args.tensor_model_parallel_size),
                        ("--pipeline-model-parallel-size", args.pipeline_model_parallel_size),
                        ("--context-parallel-size", args.context_parallel_size)):
        if value != 1:
            raise SystemExit(f"the stock forward step reads the batch on every rank: drop {flag}")
    settings = channel_settings_from_args(args)  # the datasets tag samples with channels; unused here
    tokens_per_sample = None if args.stock_without_tokens_per_sample else args.seq_length
    pretrain(  # the config container positionally, as megatron_internals.launch.run_pretrain passes it
        pretrain_cfg_container_from_args(args, gpt_config_from_args(args)),
        train_valid_test_dataset_provider=datasets_provider(settings),
        model_type=ModelType.encoder_or_decoder,
        forward_step_func=make_stock_forward_step(args.seq_length, tokens_per_sample),
    )
    finish_run()


if __name__ == "__main__":
    main()
