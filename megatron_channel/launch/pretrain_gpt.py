"""What ``scripts/pretrain_gpt_channel.py`` runs: Megatron-LM's pretrain_gpt (or, with
``--hybrid-layer-pattern``, pretrain_hybrid), with channels.

Those scripts live at the Megatron-LM repository root and ship in no wheel, so their pieces
are rebuilt here: Megatron's arguments plus the channel flags, the model (``models``), a
datasets provider whose samples carry ``channels`` (blend components or SFT jsonl fields),
our ``forward_step``, and the NaN-free channel logging, all handed to
``megatron.training.pretrain`` in the installed release's convention
(``megatron_internals.launch``).
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from functools import partial

import torch

from megatron.core import parallel_state
from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig, MockGPTDataset

from ..channel_logging.install import install_channel_logging
from ..data.sft import sft_dataset_class
from ..data.tagged import blend_component_paths, component_channel_ids, tag_datasets
from ..megatron_internals.launch import model_config, parse_megatron_args, run_pretrain
from ..megatron_internals.patches import log_patches_to_stderr
from ..megatron_internals.releases import release_for
from ..mixture.runtime import MixtureRuntime, install_mixture_runtime
from ..mixture.settings import add_mixture_args, check_blend_for_mixture, mixture_settings_from_args
from ..settings import ChannelSettings, add_channel_args, channel_settings_from_args, training_blend
from ..step.forward_step import make_forward_step
from ..step.layout import rows_are_packed
from ..step.loss import stock_loss_func
from .models import is_hybrid, model_provider
from .startup import (
    apply_defaults_without_apex,
    check_cpu_args,
    cpu_argv,
    require_cuda_or_cpu,
    skip_built_dataset_helpers,
)


def gpt_dataset_config(args, tokenizer) -> GPTDatasetConfig:
    """The ``GPTDatasetConfig`` Megatron's pretrain_gpt builds from ``args``."""
    from megatron.training.utils import get_blend_and_blend_per_split

    if getattr(args, "fim_data", False):
        raise ValueError("--fim-data is not supported by the channel launch script; drop it or use your own provider")
    blend, blend_per_split = get_blend_and_blend_per_split(args)
    sequences_per_dataset = None
    if args.per_dataset_sequences_path is not None:
        with open(args.per_dataset_sequences_path) as f:
            sequences_per_dataset = json.load(f)
    if any(f.name == "inter_document_masking" for f in dataclasses.fields(GPTDatasetConfig)):  # 0.19 on
        more = dict(inter_document_masking=bool(getattr(args, "dataloader_inter_document_masking", False)))
    else:
        more = {}
    return GPTDatasetConfig(
        **more,
        random_seed=args.seed,
        sequence_length=args.seq_length,
        blend=blend,
        blend_per_split=blend_per_split,
        split=args.split,
        multiple_validation_sets=args.multiple_validation_sets,
        full_validation=args.full_validation,
        num_dataset_builder_threads=args.num_dataset_builder_threads,
        path_to_cache=args.data_cache_path,
        mmap_bin_files=args.mmap_bin_files,
        tokenizer=tokenizer,
        reset_position_ids=args.reset_position_ids,
        reset_attention_mask=args.reset_attention_mask,
        eod_mask_loss=args.eod_mask_loss,
        # Packed SFT rows attend through cu_seqlens; Megatron's SFT dataset refuses a dense mask.
        create_attention_mask=args.create_attention_mask_in_dataloader and not args.sft,
        context_parallel_size=args.context_parallel_size,
        object_storage_cache_path=args.object_storage_cache_path,
        mid_level_dataset_surplus=args.mid_level_dataset_surplus,
        allow_ambiguous_pad_tokens=args.allow_ambiguous_pad_tokens,
        fast_cache_load=args.dataloader_fast_cache_load,
        defer_npy_index_mmap=args.dataloader_defer_npy_index_mmap,
        sequences_per_dataset=sequences_per_dataset,
    )


def is_dataset_built_on_rank(vp_stage=None, every_stage: bool = False) -> bool:
    """Data is read on tensor-parallel rank 0 of the first and last pipeline stages, and of
    every stage when rows are packed (each stage's attention needs ``cu_seqlens``)."""
    if parallel_state.get_tensor_model_parallel_rank() != 0:
        return False
    if every_stage:
        return True
    ignore_virtual = vp_stage is None
    return parallel_state.is_pipeline_first_stage(
        ignore_virtual=ignore_virtual, vp_stage=vp_stage
    ) or parallel_state.is_pipeline_last_stage(ignore_virtual=ignore_virtual, vp_stage=vp_stage)


def dataset_class(args, settings: ChannelSettings):
    if args.sft:
        return sft_dataset_class(settings.channel_id, channel_field=settings.field)
    return MockGPTDataset if args.mock_data else GPTDataset


def build_datasets(args, settings: ChannelSettings, tokenizer, train_val_test_num_samples, vp_stage=None,
                   mixture: MixtureRuntime | None = None) -> list:
    """Train, valid and test datasets whose samples carry ``channels`` (the training blend under
    ``mixture``'s schedule when it steers the blend)."""
    if mixture is not None:
        mixture.prepare(args.load, args.iteration)
    config = gpt_dataset_config(args, tokenizer)
    datasets = BlendedMegatronDatasetBuilder(
        dataset_class(args, settings),
        train_val_test_num_samples,
        partial(is_dataset_built_on_rank, vp_stage=vp_stage, every_stage=rows_are_packed(args)),
        config,
    ).build()
    if mixture is not None and mixture.settings.apply and datasets[0] is not None:
        datasets[0] = mixture.train_dataset(datasets[0], consumed_samples=args.consumed_train_samples,
                                            capacity=args.train_iters // mixture.settings.interval + 2)
    component_ids = component_channel_ids(blend_component_paths(config),
                                          settings.blend_channel_ids if settings.from_blend else None)
    if args.mock_data:  # one mock dataset per split, without a blend
        component_ids = [[None] if ids is None else ids for ids in component_ids]
    return tag_datasets(datasets, component_ids, channel_id=settings.channel_id)


def datasets_provider(settings: ChannelSettings, mixture: MixtureRuntime | None = None):
    """A Megatron ``train_valid_test_datasets_provider`` for these channel settings."""

    def provider(train_val_test_num_samples, vp_stage=None):
        from megatron.training import get_args, get_tokenizer, print_rank_0

        args = get_args()
        print_rank_0("> building train, validation, and test datasets with channels ...")
        return build_datasets(args, settings, get_tokenizer(), train_val_test_num_samples, vp_stage, mixture)

    provider.is_distributed = True
    return provider


def check_channel_source(args, settings: ChannelSettings) -> None:
    """Stop at start-up when GPT samples could get no channel (the data would stop the run later).

    Only ``--sft`` jsonl lines name their channel; a GPT sample (indexed or mock data) has
    just its blend component.
    """
    if args.sft or settings.from_blend is not None or settings.untracked != "error":
        return
    data = "--mock-data samples" if args.mock_data else "GPT samples of indexed datasets"
    raise ValueError(
        f"{data} carry no channel field, so with --untracked-channels error no sample has a channel: "
        "take the channels from the --data-path blend with --channels-from-blend [NAME ...], or count "
        "every sample as untracked with --untracked-channels ignore (or as 'other' with other)"
    )


def add_launch_args(parser):
    """Megatron's ``extra_args_provider``: the channel flags plus this script's own."""
    add_channel_args(parser)
    add_mixture_args(parser)
    group = parser.add_argument_group(title="channel loss launch")
    group.add_argument("--cpu", action="store_true",
                       help="Train on this machine's CPU over gloo through the same pretrain() (a dry run of "
                            "the same flags without a GPU); sets --distributed-backend gloo --transformer-impl "
                            "local --num-workers 0.")
    group.add_argument("--disable-channel-loss", action="store_true",
                       help="Train with Megatron's stock loss_func and logging, same data and batch path "
                            "(for A/B timing of the channel accounting).")
    return parser


def stock_forward_step(forward_step):
    """The same forward_step with Megatron's stock loss_func in place of the channel one."""

    def forward_step_stock(data_iterator, model, *args, **kwargs):
        output, channel_loss = forward_step(data_iterator, model, *args, **kwargs)
        return output, partial(stock_loss_func, channel_loss.keywords["loss_mask"])

    return forward_step_stock


SPIKY_LOSS_FACTOR = 10  # pretrain_gpt's: a loss 10x the largest seen so far is "spiky"


def checked_loss_func(loss_func, args):
    """``loss_func`` plus the checks stock pretrain_gpt makes through Megatron's rerun state
    machine: NaN/inf loss (``--check-for-nan-in-loss-and-grad``) and spiky loss
    (``--check-for-spiky-loss``). Like stock, these read the loss on the host."""
    from megatron.core.rerun_state_machine import get_rerun_state_machine

    def loss_func_checked(output_tensor, *more, **kwargs):
        loss, num_tokens, metrics = loss_func(output_tensor, *more, **kwargs)
        machine = get_rerun_state_machine()
        if args.check_for_nan_in_loss_and_grad:
            for reject, what in ((torch.isnan, "NaN"), (torch.isinf, "Inf")):
                machine.validate_result(result=loss, rejection_func=reject, tolerance=0.0, fatal=True,
                                        message=f"found {what} in local forward loss calculation")
        if args.check_for_spiky_loss:
            is_spiky = partial(machine.is_unexpectedly_large, threshold=SPIKY_LOSS_FACTOR, context="loss")
            machine.validate_result(result=loss, rejection_func=is_spiky, message="Spiky loss", tolerance=0.0,
                                    fatal=False)
        return loss, num_tokens, metrics

    return loss_func_checked


def with_loss_checks(forward_step, args):
    def forward_step_checked(data_iterator, model, *more, **kwargs):
        output, loss_func = forward_step(data_iterator, model, *more, **kwargs)
        return output, checked_loss_func(loss_func, args)

    return forward_step_checked


def main(argv: list[str] | None = None) -> None:
    """Parse Megatron + channel arguments, install channel logging, run ``pretrain``."""
    log_patches_to_stderr()
    release = release_for()  # megatron-core older than the oldest supported stops here
    argv, cpu = cpu_argv(sys.argv[1:] if argv is None else argv)
    require_cuda_or_cpu(cpu)
    if cpu:
        from ..cpu import install_cuda_on_cpu

        install_cuda_on_cpu()
    skip_built_dataset_helpers()
    sys.argv = [sys.argv[0], *argv]
    args = parse_megatron_args(release, add_launch_args)
    args.cpu = cpu
    apply_defaults_without_apex(args)
    if cpu:
        check_cpu_args(args)
    settings = channel_settings_from_args(args)  # every channel mistake stops here, before training
    check_channel_source(args, settings)
    config = settings.channel_config()
    provider = model_provider(args, release)  # a model flag this release cannot build stops here
    # A --yaml-cfg namespace holds only the YAML's keys.
    channel_loss = not getattr(args, "disable_channel_loss", False)
    if channel_loss:
        forward_step = make_forward_step(config)
    else:  # the stock arm computes nothing of ours, token accuracy included
        forward_step = stock_forward_step(make_forward_step(dataclasses.replace(config, token_accuracy=False)))
    forward_step = with_loss_checks(forward_step, args)
    mixture = mixture_runtime(args, settings)
    jsonl = os.path.join(args.tensorboard_dir, "channels.jsonl") if args.tensorboard_dir else None
    if channel_loss:
        install_channel_logging(config, jsonl_path=jsonl)
    if mixture is not None:
        mixture.jsonl_path = jsonl
        install_mixture_runtime(mixture, args.save)
    run_pretrain(release, args, datasets_provider(settings, mixture), forward_step, provider,
                 model_config(release, args, hybrid=is_hybrid(args)))
    finish_run()


def mixture_runtime(args, settings: ChannelSettings) -> MixtureRuntime | None:
    """The channel mixture of ``--channel-mixture`` / ``--channel-mixture-advice``, checked at start-up."""
    mixture = mixture_settings_from_args(args, settings.names)
    if mixture is None:
        return None
    if getattr(args, "disable_channel_loss", False):
        raise ValueError("--channel-mixture needs the channel losses: drop --disable-channel-loss")
    blend = training_blend(args)
    component_channels = check_blend_for_mixture(args, settings, None if blend is None else blend[0])
    if blend[1] is None:
        raise ValueError("--channel-mixture starts from the blend's weights: give them in --data-path "
                         "(W1 P1 W2 P2 ...); without weights Megatron weighs components by their size")
    return MixtureRuntime(mixture, settings.names, component_channels, blend[1], args.global_batch_size)


def finish_run() -> None:
    """Close Megatron's TensorBoard writer and the process group once pretrain() returns.

    pretrain() flushes the writer before its final evaluation and closes nothing: the final
    points could be lost, and a writer thread still running while the interpreter exits
    (seen with gloo) can abort the process after a run that succeeded.
    """
    from megatron.training.global_vars import get_tensorboard_writer

    writer = get_tensorboard_writer()
    if writer:
        writer.close()
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
