"""Channels from Megatron's real blended GPT datasets.

Real ``.bin/.idx`` files are written with Megatron's ``IndexedDatasetBuilder``: component
``c`` holds only tokens in ``[100 * c, 100 * c + 99)``, so the component of any sample is
read off its token values (the independent reference, never ``dataset_id``). Datasets are
built by the real ``BlendedMegatronDatasetBuilder(GPTDataset, ...)`` over a single-process
gloo group (its barriers run), with Megatron's null tokenizer, index caches in tmp_path.

Checked: every sample of the train and validation splits gets ``channels`` equal to the
channel of the component its tokens came from, for a weighted ``--data-path`` blend, for
per-split blends that differ between train and validation, for one unblended prefix, for
one weighted prefix, for ``--multiple-validation-sets``, and for packed GPT rows
(``inter_document_masking``: one id per sequence, -1 on padding slots); a DataLoader
collates ``channels`` to ``[b]`` int64; the wrapper keeps ``split`` / ``index_split`` for
Megatron's sampler; bad wiring (wrong id count, missing ``dataset_id``) is an error.
"""

from __future__ import annotations

import pickle

import numpy
import pytest
import torch
from torch.utils.data import DataLoader

from megatron.core.datasets.blended_dataset import BlendedDataset
from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig
from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder
from megatron.core.datasets.utils import Split
from megatron.core.tokenizers import MegatronTokenizer

from megatron_channel.data.tagged import ChannelTaggedDataset, blend_component_paths, tag_datasets

pytestmark = pytest.mark.usefixtures("megatron_cpu")

COMPONENTS = 3
RANGE = 100  # component c holds tokens [RANGE * c, RANGE * c + RANGE - 1)
VOCAB = 400  # the null tokenizer's eod is VOCAB - 1, outside every component's range
SEQ = 16


@pytest.fixture(scope="module")
def prefixes(tmp_path_factory) -> list[str]:
    """Three real indexed datasets of distinguishable token ranges."""
    root = tmp_path_factory.mktemp("indexed")
    rng = numpy.random.default_rng(0)
    paths = []
    for c in range(COMPONENTS):
        prefix = str(root / f"component{c}")
        builder = IndexedDatasetBuilder(prefix + ".bin", dtype=numpy.int32)
        for _ in range(40):
            doc = rng.integers(RANGE * c, RANGE * c + RANGE - 1, int(rng.integers(3, 40)))
            builder.add_item(torch.from_numpy(doc.astype(numpy.int32)))
            builder.end_document()
        builder.finalize(prefix + ".idx")
        paths.append(prefix)
    return paths


@pytest.fixture(scope="module")
def tokenizer():
    return MegatronTokenizer.from_pretrained(metadata_path={"library": "null-text"}, vocab_size=VOCAB)


def gpt_config(tmp_path, tokenizer, **kwargs) -> GPTDatasetConfig:
    return GPTDatasetConfig(
        random_seed=1234, sequence_length=SEQ, tokenizer=tokenizer, path_to_cache=str(tmp_path / "cache"),
        reset_position_ids=False, reset_attention_mask=False, eod_mask_loss=False,
        create_attention_mask=False, **kwargs,
    )


def build(config, sizes):
    return BlendedMegatronDatasetBuilder(cls=GPTDataset, sizes=sizes, is_built_on_rank=lambda: True,
                                         config=config).build()


def component_from_tokens(sample: dict) -> int:
    """Reference: the component whose token range holds all of the sample's tokens."""
    values = torch.cat([sample["tokens"], sample["labels"]])
    values = values[values != VOCAB - 1]  # eod separators (none are written, but be exact)
    components = set((values // RANGE).tolist())
    assert len(components) == 1, f"tokens from several components: {sorted(components)}"
    return components.pop()


def check_split(dataset, ids_by_prefix: dict[str, int], prefixes_of_split: list[str], name: str) -> int:
    """Every sample's channel is its token-range component's; returns the number of samples."""
    assert len(dataset) > 0, f"{name}: empty split"
    seen = set()
    for idx in range(len(dataset)):
        sample = dataset[idx]
        component_prefix = prefixes_of_split_by_range(prefixes_of_split)[component_from_tokens(sample)]
        expected = ids_by_prefix[component_prefix]
        channels = sample["channels"]
        assert channels.dtype == torch.int64 and channels.dim() == 0, f"{name}[{idx}]: {channels!r}"
        assert int(channels) == expected, f"{name}[{idx}]: channels {int(channels)}, tokens say {expected}"
        seen.add(expected)
    return len(seen)


def prefixes_of_split_by_range(prefixes_of_split: list[str]) -> dict[int, str]:
    """Token range index -> prefix, for the prefixes a split uses."""
    return {int(p[-1]): p for p in prefixes_of_split}


@pytest.mark.timeout(60)
def test_weighted_blend_train_and_valid(prefixes, tokenizer, tmp_path):
    ids_by_prefix = {prefixes[0]: 2, prefixes[1]: 0, prefixes[2]: 1}  # not the component order
    config = gpt_config(tmp_path, tokenizer, blend=(prefixes, [0.3, 0.5, 0.2]), split="70,30,0")
    train, valid, test = build(config, [120, 40, 0])
    assert isinstance(train, BlendedDataset) and isinstance(valid, BlendedDataset) and test is None

    paths = blend_component_paths(config)
    assert paths == [prefixes, prefixes, prefixes]
    ids = [[ids_by_prefix[p] for p in split_paths] for split_paths in paths]
    train_t, valid_t, test_t = tag_datasets([train, valid, test], ids)
    assert test_t is None and len(train_t) == len(train) and len(valid_t) == len(valid)

    assert check_split(train_t, ids_by_prefix, prefixes, "train") == 3
    assert check_split(valid_t, ids_by_prefix, prefixes, "valid") == 3
    # Megatron's sampler reads the split off the dataset to pick eval batch sizes.
    assert train_t.split == Split.train and valid_t.split == Split.valid

    batches = list(DataLoader(train_t, batch_size=8))
    for b, batch in enumerate(batches):
        assert batch["channels"].dtype == torch.int64 and batch["channels"].shape == (batch["tokens"].shape[0],)
        for r in range(batch["tokens"].shape[0]):
            sample = train_t[b * 8 + r]
            assert int(batch["channels"][r]) == int(sample["channels"])
            assert torch.equal(batch["tokens"][r], sample["tokens"])


@pytest.mark.timeout(60)
def test_per_split_blends(prefixes, tokenizer, tmp_path):
    ids_by_prefix = {prefixes[0]: 0, prefixes[1]: 1, prefixes[2]: 2}
    train_prefixes, valid_prefixes = [prefixes[2], prefixes[0]], [prefixes[1], prefixes[2]]
    config = gpt_config(tmp_path, tokenizer,
                        blend_per_split=[(train_prefixes, [0.6, 0.4]), (valid_prefixes, [0.5, 0.5]), None])
    datasets = build(config, [80, 30, None])
    paths = blend_component_paths(config)
    assert paths == [train_prefixes, valid_prefixes, None]
    ids = [None if p is None else [ids_by_prefix[x] for x in p] for p in paths]
    train, valid, test = tag_datasets(datasets, ids)
    assert test is None
    assert check_split(train, ids_by_prefix, train_prefixes, "train") == 2
    assert check_split(valid, ids_by_prefix, valid_prefixes, "valid") == 2
    assert {int(valid[i]["channels"]) for i in range(len(valid))} == {1, 2}


@pytest.mark.timeout(60)
def test_single_prefix_unblended_and_weighted(prefixes, tokenizer, tmp_path):
    # One prefix without weights: Megatron returns the GPTDataset itself, samples lack dataset_id.
    config = gpt_config(tmp_path, tokenizer, blend=([prefixes[1]], None), split="80,20,0")
    train, valid, _ = build(config, [30, 10, None])
    assert isinstance(train, GPTDataset) and "dataset_id" not in train[0]
    train_t, valid_t, _ = tag_datasets([train, valid, None], [[7], [7], None])
    assert check_split(train_t, {prefixes[1]: 7}, [prefixes[1]], "train") == 1
    assert check_split(valid_t, {prefixes[1]: 7}, [prefixes[1]], "valid") == 1
    assert valid_t.index_split == Split.valid and not hasattr(valid_t, "split")

    # One prefix with a weight: a one-component BlendedDataset (dataset_id 0).
    config = gpt_config(tmp_path, tokenizer, blend=([prefixes[2]], [1.0]), split="80,20,0")
    train, _, _ = build(config, [30, 10, 0])
    assert isinstance(train, BlendedDataset)
    tagged = ChannelTaggedDataset(train, [-1])
    assert all(int(tagged[i]["channels"]) == -1 for i in range(len(tagged)))


@pytest.mark.timeout(60)
def test_multiple_validation_sets(prefixes, tokenizer, tmp_path):
    config = gpt_config(tmp_path, tokenizer, multiple_validation_sets=True,
                        blend_per_split=[(prefixes, None), (prefixes[:2], None), None])
    train, valid, test = build(config, [60, None, None])
    assert isinstance(valid, list) and len(valid) == 2
    ids = [[0, 1, 2], [4, 3], None]
    train_t, valid_t, _ = tag_datasets([train, valid, test], ids)
    assert check_split(train_t, {p: i for i, p in enumerate(prefixes)}, prefixes, "train") == 3
    for j, dataset in enumerate(valid_t):
        assert check_split(dataset, {prefixes[j]: ids[1][j]}, [prefixes[j]], f"valid[{j}]") == 1


@pytest.mark.timeout(60)
def test_packed_gpt_rows_get_one_id_per_sequence(prefixes, tokenizer, tmp_path):
    config = gpt_config(tmp_path, tokenizer, blend=(prefixes, [0.4, 0.3, 0.3]), split="100,0,0",
                        inter_document_masking=True)
    train, _, _ = build(config, [40, 0, 0])
    ids = [5, 6, 7]
    tagged = ChannelTaggedDataset(train, ids)
    for idx in range(len(tagged)):
        sample = tagged[idx]
        cu = sample["cu_seqlens"].tolist()
        sequences = next(i for i in range(1, len(cu)) if cu[i] == SEQ)  # Megatron pads with SEQ
        expected = [ids[component_from_tokens(sample)]] * sequences + [-1] * (len(cu) - 1 - sequences)
        assert sample["channels"].dtype == torch.int64
        assert sample["channels"].tolist() == expected, f"sample {idx}: cu {cu}"
    batch = next(iter(DataLoader(tagged, batch_size=4)))
    assert batch["channels"].shape == (4, SEQ) and batch["cu_seqlens"].shape == (4, SEQ + 1)


@pytest.fixture(scope="module")
def blend_of_three(megatron_cpu, prefixes, tokenizer, tmp_path_factory):
    """A train split blended from all three components (only read by the tests that use it)."""
    config = gpt_config(tmp_path_factory.mktemp("bad_wiring"), tokenizer, blend=(prefixes, [0.3, 0.3, 0.4]),
                        split="100,0,0")
    train, _, _ = build(config, [30, 0, 0])
    return train


@pytest.mark.timeout(60)
def test_component_id_count_must_match_the_blend_components(blend_of_three):
    with pytest.raises(ValueError, match=r"3 blend component\(s\) but 2 component channel id"):
        ChannelTaggedDataset(blend_of_three, [0, 1])
    single = blend_of_three.datasets[0]  # a GPTDataset is one component
    with pytest.raises(ValueError, match=r"1 blend component\(s\) but 2"):
        ChannelTaggedDataset(single, [0, 1])


@pytest.mark.timeout(60)
def test_a_negative_component_id_is_an_error(blend_of_three):
    with pytest.raises(ValueError, match=r"component_channel_ids\[1\] is -3"):
        ChannelTaggedDataset(blend_of_three, [0, -3, 1])


@pytest.mark.timeout(60)
def test_an_unnamed_component_without_a_channel_id_policy_is_an_error(blend_of_three):
    with pytest.raises(ValueError, match="has no channel.*pass channel_id="):
        ChannelTaggedDataset(blend_of_three, [0, None, 1])


@pytest.mark.timeout(60)
def test_unnamed_components_take_the_untracked_policy(blend_of_three):
    """None entries take the untracked policy, resolved once at construction."""
    tagged = ChannelTaggedDataset(blend_of_three, [None, None, None], channel_id=lambda name: 9 if name is None else 0)
    assert {int(tagged[i]["channels"]) for i in range(len(tagged))} == {9}


@pytest.mark.timeout(60)
def test_a_multi_component_sample_without_a_valid_dataset_id_is_an_error(blend_of_three):
    """A sample lacking dataset_id, or with one past the ids, is an error, never channel 0."""
    single = blend_of_three.datasets[0]
    untagged = [dict(single[0]), dict(single[1])]
    with pytest.raises(ValueError, match="sample 1 has no 'dataset_id' but 2 component channel ids"):
        ChannelTaggedDataset(untagged, [0, 1])[1]
    with pytest.raises(ValueError, match="dataset_id 2 but only 2"):
        ChannelTaggedDataset([{**single[0], "dataset_id": numpy.int16(2)}], [0, 1])[0]


@pytest.mark.timeout(60)
def test_a_split_with_a_dataset_but_no_component_ids_is_an_error(blend_of_three):
    with pytest.raises(ValueError, match="valid split has a dataset but no component channel ids"):
        tag_datasets([blend_of_three, blend_of_three, None], [[0, 1, 2], None, None])


@pytest.mark.timeout(30)
def test_wrapper_pickles():
    """Loader workers started with spawn receive the dataset pickled."""
    tagged = ChannelTaggedDataset([{"tokens": torch.arange(3), "dataset_id": numpy.int16(1)}], [4, 5])
    copy = pickle.loads(pickle.dumps(tagged))
    assert int(copy[0]["channels"]) == 5 and len(copy) == 1
