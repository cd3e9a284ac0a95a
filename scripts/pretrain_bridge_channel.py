#!/usr/bin/env python
"""Per-channel loss in Megatron-Bridge's training loop: a tiny GPT recipe, Bridge's ``pretrain()``,
and the two lines that add the channels (``ChannelForwardStep``, ``ChannelCallback``).

    torchrun --nproc-per-node 2 scripts/pretrain_bridge_channel.py \
        --data-path 0.3 /data/math_text_document 0.7 /data/code_text_document --channels-from-blend \
        [--config-file overrides.yaml] [Bridge overrides: train.train_iters=100 model.tensor_model_parallel_size=2 ...]

As in Bridge's own examples, the recipe below is the base config; ``--config-file`` (YAML) and
Hydra-style ``key=value`` overrides change any field of Bridge's ``ConfigContainer``. The channel
flags are this package's (``--channels``, ``--channels-from-blend``, ``--channel-token-accuracy``,
``--channel-config FILE.yaml``, ...). ``--cpu`` trains on the CPU over gloo (Bridge needs
Transformer Engine to import; ``megatron_channel.cpu.bridge_on_cpu`` stands in for it there).
"""

import argparse
import os
import re
import sys

os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")


# A Hydra-style override: ``train.train_iters=100``, ``+logger.wandb_project=x`` (never a flag's value).
OVERRIDE = re.compile(r"^\+{0,2}[A-Za-z_][\w.]*=")


def parse_args(argv):
    """(our flags, Bridge's overrides); overrides are told apart first, so that a flag taking several
    values (``--data-path``, ``--channels-from-blend``) never swallows them."""
    from megatron_channel.settings import add_channel_args

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], allow_abbrev=False)
    parser.add_argument("--cpu", action="store_true", help="train on the CPU over gloo")
    parser.add_argument("--data-path", nargs="+", metavar="WEIGHT PATH", help="the blend, as Megatron's --data-path")
    parser.add_argument("--sft", action="store_true",
                        help="packed SFT rows from the jsonl files of --data-path (one channel per conversation)")
    parser.add_argument("--tokenizer-model", help="with --sft: the Hugging Face tokenizer directory of "
                                                  "Megatron's SFTTokenizer")
    parser.add_argument("--sft-tokenizer-prompt-format", default="nemotron-h-aligned")
    parser.add_argument("--config-file", help="YAML overrides of the ConfigContainer")
    parser.add_argument("--stock", action="store_true",
                        help="Bridge's own forward step and no channels, to compare a run against")
    add_channel_args(parser)
    overrides = [a for a in argv if OVERRIDE.match(a)]
    return parser.parse_args([a for a in argv if not OVERRIDE.match(a)]), overrides


def tiny_gpt_recipe(args):
    """Bridge's ``ConfigContainer`` for a 2-layer GPT on a blend of indexed datasets (``--sft``: of
    jsonl files, packed one row per microbatch)."""
    import torch
    from megatron.bridge.models.gpt_provider import GPTModelProvider
    from megatron.bridge.training.config import (
        CheckpointConfig, ConfigContainer, DistributedDataParallelConfig, DistributedInitConfig,
        GPTDatasetConfig, LoggerConfig, OptimizerConfig, RNGConfig, SchedulerConfig, TrainingConfig,
    )
    from megatron.bridge.training.tokenizers.config import TokenizerConfig
    from megatron.training.config import ValidationConfig

    model_options = {}
    if args.cpu:  # no fused kernels, float32, the CPU core attention (packed rows and CP included)
        from megatron_channel.cpu import gpt_layer_spec

        model_options = dict(
            transformer_layer_spec=gpt_layer_spec, gradient_accumulation_fusion=False, persist_layer_norm=False,
            masked_softmax_fusion=False, bias_activation_fusion=False, bias_dropout_fusion=False,
            apply_rope_fusion=False, cross_entropy_loss_fusion=False)
    seq_length, micro_batch_size, vocab_size = 128, 4, 64
    if args.sft:
        import transformers

        from megatron_channel.bridge.sft import ChannelSFTDatasetConfig

        if not args.tokenizer_model:
            raise SystemExit("--sft needs --tokenizer-model DIR (the SFTTokenizer's Hugging Face tokenizer)")
        vocab_size = len(transformers.AutoTokenizer.from_pretrained(args.tokenizer_model))
        micro_batch_size = 1  # Bridge's packed rows: one per microbatch
        dataset = ChannelSFTDatasetConfig(
            data_path=args.data_path, seq_length=seq_length, tokenizer_model=args.tokenizer_model,
            prompt_format=args.sft_tokenizer_prompt_format, split="95,5,0", num_workers=0)
    else:
        dataset = GPTDatasetConfig(
            seq_length=seq_length, random_seed=1234, reset_attention_mask=False, reset_position_ids=False,
            eod_mask_loss=False, data_path=args.data_path, split="95,5,0", num_workers=0, dataloader_type="single",
            skip_getting_attention_mask_from_dataset=True)
    return ConfigContainer(
        model=GPTModelProvider(
            num_layers=2, hidden_size=128, num_attention_heads=4, ffn_hidden_size=512, seq_length=seq_length,
            vocab_size=vocab_size, make_vocab_size_divisible_by=1, position_embedding_type="learned_absolute",
            attention_dropout=0.0, hidden_dropout=0.0, share_embeddings_and_output_weights=True,
            bf16=False, fp16=False, params_dtype=torch.float32, pipeline_dtype=torch.float32, **model_options),
        train=TrainingConfig(train_iters=300, global_batch_size=16, micro_batch_size=micro_batch_size),
        validation=ValidationConfig(eval_interval=50, eval_iters=4),
        optimizer=OptimizerConfig(optimizer="adam", lr=3e-3, min_lr=3e-3, bf16=False, fp16=False, clip_grad=1.0,
                                  use_distributed_optimizer=False, params_dtype=torch.float32),
        scheduler=SchedulerConfig(lr_decay_style="constant", start_weight_decay=0.0, end_weight_decay=0.0),
        ddp=DistributedDataParallelConfig(use_distributed_optimizer=False, grad_reduce_in_fp32=True),
        dataset=dataset,
        logger=LoggerConfig(log_interval=10),
        tokenizer=TokenizerConfig(tokenizer_type="NullTokenizer", vocab_size=vocab_size - 1),
        checkpoint=CheckpointConfig(save=None),
        dist=DistributedInitConfig(distributed_backend="gloo" if args.cpu else "nccl"),
        rng=RNGConfig(seed=1234),
    )


def main(argv=None):
    args, overrides = parse_args(sys.argv[1:] if argv is None else argv)
    if args.cpu:
        from megatron_channel.cpu.bridge_on_cpu import install_bridge_on_cpu

        install_bridge_on_cpu()
    from megatron.bridge.training.pretrain import pretrain
    from megatron.bridge.training.utils.omegaconf_utils import process_config_with_overrides

    from megatron_channel.bridge import ChannelCallback, ChannelForwardStep, channel_settings_for_bridge

    cfg = tiny_gpt_recipe(args)
    cfg = process_config_with_overrides(cfg, config_filepath=args.config_file, cli_overrides=overrides)
    if args.stock:
        from megatron.bridge.training.gpt_step import forward_step

        return pretrain(cfg, forward_step)
    settings = channel_settings_for_bridge(cfg, args)
    if hasattr(cfg.dataset, "channel_settings"):  # --sft: the dataset names each conversation's channel
        cfg.dataset.channel_settings = settings

    forward_step = ChannelForwardStep(settings)  # Bridge's gpt_step.forward_step, observed
    pretrain(cfg, forward_step, callbacks=[ChannelCallback(forward_step)])


if __name__ == "__main__":
    main()
