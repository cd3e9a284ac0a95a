"""Pipeline parallelism: each stage gets what it needs from the batch, over real PP=2 gloo ranks.

The first stage needs the model inputs, the last stage the loss inputs (labels, loss_mask,
channels); a packed batch gives every stage the THD metadata. This checks ``forward_step``'s
batch path per stage with the real ``parallel_state``; whole pipelined training steps run in
test_pretrain_e2e.py (PP=2 through ``pretrain()``).
"""

import pytest
import torch

from megatron_testing import run_distributed

S = 16
# What attention gets for the packed row [0, 5, S, S]: its two sequences, then zero-length ones
# up to the default bound of 256 sequences per row.
PACKED_CU = [0, 5, S] + [S] * 254
PACKED_CHANNELS = [1, 0] + [-1] * 254


def _stage_worker(rank, world_size, packed, pp=2, middle_has_data=True):
    from megatron_channel.step.layout import Topology
    from megatron_channel.step.model_inputs import get_model_inputs
    from megatron_testing import block_causal_mask, init_parallel

    init_parallel(tp=1, pp=pp)
    topo = Topology.current()
    tokens = torch.arange(2 * S).view(2, S) % 7
    batch = dict(tokens=tokens, labels=tokens.roll(-1, 1), loss_mask=torch.ones(2, S),
                 position_ids=torch.arange(S).expand(2, S), channels=torch.tensor([1, 0]),
                 attention_mask=torch.triu(torch.ones(S, S, dtype=torch.bool), 1).expand(2, 1, S, S))
    if packed:
        batch = {k: v[:1] for k, v in batch.items()}
        batch["cu_seqlens"] = torch.tensor([[0, 5, S, S]], dtype=torch.int32)
        batch["channels"] = torch.tensor([[1, 0, -1]])
        batch["attention_mask"] = block_causal_mask(batch["cu_seqlens"], S)
    middle = not (topo.first_stage or topo.last_stage)
    data = None if middle and not middle_has_data else iter([batch])
    inputs = get_model_inputs(data, 2, None, topo, torch.device("cpu"))
    present = {name for name in ("tokens", "position_ids", "attention_mask", "labels", "loss_mask", "channels")
               if getattr(inputs, name) is not None}
    cu = None if inputs.packed_seq_params is None else inputs.packed_seq_params.cu_seqlens_q.tolist()
    return dict(first=topo.first_stage, last=topo.last_stage, present=sorted(present), cu=cu,
                channels=None if inputs.channels is None else inputs.channels.tolist())


@pytest.mark.timeout(90)
@pytest.mark.parametrize("packed", [False, True], ids=["unpacked", "packed"])
def test_each_pipeline_stage_gets_what_it_needs(packed):
    first, last = run_distributed(_stage_worker, 2, packed, timeout=80)
    assert (first["first"], first["last"], last["first"], last["last"]) == (True, False, False, True)
    assert first["present"] == ["attention_mask", "position_ids", "tokens"]
    assert last["present"] == ["attention_mask", "channels", "labels", "loss_mask"]
    if packed:
        assert first["cu"] == last["cu"] == PACKED_CU
        assert last["channels"] == PACKED_CHANNELS
    else:
        assert first["cu"] is None and last["channels"] == [1, 0]


@pytest.mark.timeout(90)
@pytest.mark.parametrize("packed", [False, True], ids=["unpacked", "packed"])
def test_middle_stage_gets_packed_metadata_only(packed):
    """PP=3: the middle stage needs nothing for unpacked rows (no data iterator there, as
    Megatron builds none) and only the THD metadata for packed rows."""
    results = run_distributed(_stage_worker, 3, packed, 3, packed, timeout=80)
    middle = results[1]
    assert (middle["first"], middle["last"]) == (False, False)
    assert middle["present"] == []
    assert middle["cu"] == (PACKED_CU if packed else None)
    assert results[2]["channels"] == (PACKED_CHANNELS if packed else [1, 0])
