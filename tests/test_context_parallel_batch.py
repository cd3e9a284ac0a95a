"""forward_step's batch path under context parallelism, over real CP=2 gloo ranks.

Unpacked rows are cut with Megatron's own zigzag (rank r keeps chunks r and 2cp-1-r), packed
rows with Transformer Engine's per-sequence rule; ``channels`` is never cut. Each rank's
channel metrics, summed over the CP ranks, equal the global per-channel sums computed by hand
(per-token "losses" here are known values, so every token's place is checked).
"""

import pytest
import torch

from megatron_testing import run_distributed

S, CP = 16, 2


def _cp_worker(rank, world_size, packed):
    from megatron_channel import ChannelConfig, channel_loss_func
    from megatron_channel.step.layout import Topology
    from megatron_channel.step.model_inputs import get_model_inputs
    from megatron_testing import init_parallel

    init_parallel(tp=1, cp=CP)
    topo = Topology.current()
    rows = 1 if packed else 2
    tokens = torch.arange(rows * S).view(rows, S)
    batch = dict(tokens=tokens, labels=tokens + 1000, loss_mask=(tokens % 3 != 0).float(),
                 position_ids=torch.arange(S).expand(rows, S))
    if packed:
        batch["cu_seqlens"] = torch.tensor([[0, 4, 12, S, S]], dtype=torch.int32)
        batch["channels"] = torch.tensor([[1, 0, 1, -1]])
    else:
        batch["channels"] = torch.tensor([1, 0])
    config = ChannelConfig(["a", "b"])
    inputs = get_model_inputs(iter([batch]), config.num_channels, None, topo, torch.device("cpu"))
    losses = inputs.labels.float() - 1000  # stands for per-token loss: the token's global index
    _, _, metrics = channel_loss_func(losses, loss_mask=inputs.loss_mask, channels=inputs.channels, config=config,
                                      packed_seq_params=inputs.packed_seq_params)
    return dict(cp_rank=topo.cp_rank, tokens=inputs.tokens.tolist(), channels=inputs.channels.tolist(),
                metrics={k: v.tolist() for k, v in metrics.items()})


def expected_tokens(packed, cp_rank):
    if not packed:  # Megatron's zigzag over each row: chunks r and 3 - r of 4
        h = S // (2 * CP)
        return [[t for c in (cp_rank, 2 * CP - 1 - cp_rank) for t in range(row * S + c * h, row * S + (c + 1) * h)]
                for row in range(2)]
    out = []
    for a, b in ((0, 4), (4, 12), (12, S)):  # TE: per sequence, chunks r and 2cp-1-r of length L/2cp
        h = (b - a) // (2 * CP)
        for c in (cp_rank, 2 * CP - 1 - cp_rank):
            out += list(range(a + c * h, a + (c + 1) * h))
    return [out]


def global_sums(packed):
    rows = 1 if packed else 2
    tokens = torch.arange(rows * S).view(rows, S)
    mask = tokens % 3 != 0
    if packed:
        segments, channel_of = [(0, 4), (4, 12), (12, S)], [1, 0, 1]
    else:
        segments, channel_of = [(0, S), (S, 2 * S)], [1, 0]
    sums = {"loss_a": [0.0, 0.0], "loss_b": [0.0, 0.0]}
    for (a, b), ch in zip(segments, channel_of):
        key = ("loss_a", "loss_b")[ch]
        for t in range(a, b):
            if mask.view(-1)[t]:
                sums[key][0] += t
                sums[key][1] += 1
    return sums


@pytest.mark.timeout(90)
@pytest.mark.parametrize("packed", [False, True], ids=["unpacked", "packed"])
def test_context_parallel_cut_keeps_channels_and_sums_exact(packed):
    results = run_distributed(_cp_worker, CP, packed, timeout=80)
    for r in results:
        assert r["tokens"] == expected_tokens(packed, r["cp_rank"])
        # Packed: the three sequences, then -1 for the empty slots up to 256 (the default bound).
        assert r["channels"] == ([1, 0, 1] + [-1] * 253 if packed else [1, 0])
    expected = global_sums(packed)
    for key, (total, count) in expected.items():
        assert sum(r["metrics"][key][0] for r in results) == total
        assert sum(r["metrics"][key][1] for r in results) == count
