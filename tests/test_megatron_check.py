"""``megatron_check``: passes on the installed megatron-core; a function with another
signature, one that no longer looks a name up as a global, and another version each fail
with a message naming what changed."""

from __future__ import annotations

import pytest

import megatron.training.training as training

from megatron_channel import MegatronInternalsError
from megatron_channel.channel_logging.megatron_check import (
    EXPECTED_SIGNATURES,
    check_global_lookups,
    check_megatron_internals,
    check_megatron_version,
    check_signature,
)


@pytest.mark.timeout(30)
def test_internals_check_passes_on_installed_megatron():
    check_megatron_internals()


@pytest.mark.timeout(30)
def test_internals_check_names_what_changed():
    def training_log(loss_dict, total_loss_dict, learning_rate, iteration, loss_scale, report_memory_flag,
                     skipped_iter, grad_norm, params_norm, num_zeros_in_grad, max_attention_logit,
                     pg_collection=None, is_first_iteration=False, seqlen_squared_sum_in_batch=None,
                     total_real_tokens_in_batch=None, new_option=None):
        pass

    check_signature(training.training_log, EXPECTED_SIGNATURES["training_log"], "training_log")
    with pytest.raises(MegatronInternalsError, match=r"training_log changed.*added \['new_option'\].*0\.19\.x"):
        check_signature(training_log, EXPECTED_SIGNATURES["training_log"], "training_log")

    def train(*args):
        from megatron.training.training import train_step  # a local import bypasses the module global

        return train_step(*args)

    with pytest.raises(MegatronInternalsError, match=r"train no longer looks up \['train_step', 'training_log'\]"):
        check_global_lookups(train, ["train_step", "training_log"], "train")
    with pytest.raises(MegatronInternalsError, match=r"megatron-core is 0\.20\.0.*0\.19\.x"):
        check_megatron_version((0, 20, 0))
