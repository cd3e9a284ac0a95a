"""A stand-in for ``torchrun`` that runs a launch script's wiring on the CPU (used by test_configs).

``python tests/dry_run_launcher.py scripts/pretrain_gpt_channel.py <flags>`` parses the flags
with the real launch code, stops where ``pretrain()`` would start (it needs CUDA), then
builds the datasets with the real provider and runs one training batch through a real
GPTModel and the channel loss. Prints one JSON line with what it saw.

Two CPU substitutions, both outside what is being checked: Megatron's local attention cannot
take THD metadata, so packed rows get the equivalent block-diagonal mask; and an SFT run's
Hugging Face tokenizer (``--tokenizer-type SFTTokenizer``) is replaced by the byte-level
``ByteChatTokenizer``, since nothing may be downloaded here.
"""

import json
import sys

import torch


def swap_sft_tokenizer(argv):
    if "SFTTokenizer" not in argv:
        return argv, None
    from megatron_channel.tokenizer import VOCAB_SIZE, ByteChatTokenizer

    out, skip = [], 0
    for i, arg in enumerate(argv):
        if skip:
            skip -= 1
        elif arg in ("--tokenizer-type", "--tokenizer-model"):
            skip = 1
        else:
            out.append(arg)
    return out + ["--tokenizer-type", "NullTokenizer", "--vocab-size", str(VOCAB_SIZE)], ByteChatTokenizer()


def main():
    import megatron.training

    from megatron_channel import launch, make_forward_step
    from megatron_channel.channel_logging import installed_channel_logger
    from megatron_channel.testing import block_causal_mask, init_parallel, init_single_process_group, tiny_gpt

    argv, sft_tokenizer = swap_sft_tokenizer(sys.argv[2:])
    init_single_process_group()
    recorded = []
    megatron.training.pretrain = lambda *args, **kwargs: recorded.append(args)
    launch.main(argv)
    if sft_tokenizer is not None:
        megatron.training.get_tokenizer = lambda: sft_tokenizer

    args = megatron.training.get_args()
    _, provider, _, forward_step = recorded[0]
    config = installed_channel_logger().config
    init_parallel(tp=1)
    train, valid, _ = provider([8, 4, 0])
    batch = next(iter(torch.utils.data.DataLoader(train, batch_size=args.micro_batch_size)))
    model = tiny_gpt(vocab_size=args.padded_vocab_size, seq_length=args.seq_length)
    if "cu_seqlens" in batch:
        batch["attention_mask"] = block_causal_mask(batch["cu_seqlens"], args.seq_length)
        forward_step = make_forward_step(config, pass_packed_seq_params=False)
    output, loss_func = forward_step(iter([batch]), model)
    loss, num_tokens, metrics = loss_func(output)
    print(json.dumps({
        "metric_keys": list(metrics),
        "channels_field_shape": list(batch["channels"].shape),
        "packed": "cu_seqlens" in batch,
        "counts": {k: float(v[1]) for k, v in metrics.items()},
        "valid_samples": len(valid),
        "tensorboard_dir": args.tensorboard_dir,
    }))


if __name__ == "__main__":
    main()
