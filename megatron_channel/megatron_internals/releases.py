"""What differs between the megatron-core releases this package runs on, as data.

Supporting a new release is a new row of ``RELEASES`` (and, where its loop or an API moved,
an edit of ``loop``, ``launch`` or ``core_api`` beside it): code elsewhere reads the row
(``installed_release()``), never the version. A release newer than every row runs as the
newest row: ``loop.check_megatron_internals`` checks its loop when the logging is installed
and warns once, naming the tested range; older releases are refused.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass


class MegatronInternalsError(RuntimeError):
    """The installed Megatron differs from what this package relies on; the message says what."""


class UntestedMegatronWarning(UserWarning):
    """The installed megatron-core is newer than every release this package was tested with."""


@dataclass(frozen=True)
class MegatronRelease:
    """One megatron-core minor release line, as this package meets it.

    Attributes:
        line: ``(major, minor)``, e.g. ``(0, 19)``.
        config_container: ``pretrain()`` takes a ``PretrainConfigContainer`` first (0.18 on);
            before, it parsed the arguments itself (``extra_args_provider``).
        model_provider_optional: ``pretrain()`` builds the model from the container's model
            config when no ``model_provider`` is given (0.19 on).
        gpt_config_builder: ``argument_utils.gpt_config_from_args`` exists (0.19 on).
        hybrid_model: ``megatron.core.models.hybrid.HybridModel`` and
            ``argument_utils.hybrid_config_from_args`` exist (0.18 on).
        output_processor: ``GPTModel.forward`` takes ``output_processor`` (0.18 on); token
            accuracy uses it where the model's forward has it, else hooks the output layer.
        seqlen_stats: ``training.update_seqlen_stats_from_cu_seqlens`` exists, which
            stock pretrain_gpt feeds with packed rows' ``cu_seqlens`` (0.18 on).
        packed_tokens_per_sample: ``PackedSeqParams`` has ``tokens_per_sample``, with which MoE
            routes each packed row on its own (0.19 on); before, the router sees the merged
            stream as one sequence, as stock training of that release does.
        cp_batch_hybrid_flag: ``core.utils.get_batch_on_this_cp_rank`` takes ``is_hybrid_cp``
            (0.18 on).
        tested: the release of this line the test command runs (``scripts/test.sh``).
        test_requirements: what that release's own code needs beside it, pinned where the main
            environment's newer packages break it (0.17's ``SFTTokenizer`` reads transformers 4's
            ``apply_chat_template`` result).
    """

    line: tuple[int, int]
    config_container: bool
    model_provider_optional: bool
    gpt_config_builder: bool
    hybrid_model: bool
    output_processor: bool
    seqlen_stats: bool
    packed_tokens_per_sample: bool
    cp_batch_hybrid_flag: bool
    tested: str
    test_requirements: tuple[str, ...] = ()

    @property
    def name(self) -> str:
        return f"{self.line[0]}.{self.line[1]}"


RELEASES: tuple[MegatronRelease, ...] = (
    MegatronRelease((0, 17), config_container=False, model_provider_optional=False, gpt_config_builder=False,
                    hybrid_model=False, output_processor=False, seqlen_stats=False,
                    packed_tokens_per_sample=False, cp_batch_hybrid_flag=False, tested="0.17.1",
                    test_requirements=("transformers<5",)),
    MegatronRelease((0, 18), config_container=True, model_provider_optional=False, gpt_config_builder=False,
                    hybrid_model=True, output_processor=True, seqlen_stats=True,
                    packed_tokens_per_sample=False, cp_batch_hybrid_flag=True, tested="0.18.2"),
    MegatronRelease((0, 19), config_container=True, model_provider_optional=True, gpt_config_builder=True,
                    hybrid_model=True, output_processor=True, seqlen_stats=True,
                    packed_tokens_per_sample=True, cp_batch_hybrid_flag=True, tested="0.19.2"),
)

TESTED_RANGE = f"{RELEASES[0].name} to {RELEASES[-1].name}"


def installed_version() -> tuple[int, int, int]:
    from megatron.core import package_info

    return int(package_info.MAJOR), int(package_info.MINOR), int(package_info.PATCH)


def is_tested(version: tuple[int, ...]) -> bool:
    """Whether ``version``'s line is a row of ``RELEASES``."""
    return any(release.line == tuple(version[:2]) for release in RELEASES)


@functools.lru_cache(maxsize=1)
def installed_release() -> MegatronRelease:
    """``release_for()`` of the installed megatron-core, looked up once."""
    return release_for()


def release_for(version: tuple[int, ...] | None = None) -> MegatronRelease:
    """The row for ``version`` (default: the installed megatron-core); the newest row for a newer
    release (whose loop ``loop.check_megatron_internals`` checks, and warns about);
    ``MegatronInternalsError`` for an older one."""
    version = installed_version() if version is None else tuple(version)
    for release in RELEASES:
        if release.line == tuple(version[:2]):
            return release
    if tuple(version[:2]) < RELEASES[0].line:
        raise MegatronInternalsError(
            f"megatron-core {'.'.join(map(str, version))} is older than {RELEASES[0].name}, the oldest release "
            f"megatron_channel supports (the first whose wheel ships megatron.training); install "
            f"megatron-core>={RELEASES[0].name}"
        )
    return RELEASES[-1]


def main(argv: list[str] | None = None) -> None:
    """``python -m megatron_channel.megatron_internals.releases others``: the tested releases
    other than the installed line's, one per line; ``requirements VERSION``: the pip
    requirements of that release's test environment, one per line."""
    import sys

    argv = sys.argv[1:] if argv is None else argv
    if argv == ["others"]:
        line = installed_version()[:2]
        print("\n".join(r.tested for r in RELEASES if r.line != line))
    elif len(argv) == 2 and argv[0] == "requirements":
        release = release_for(tuple(int(x) for x in argv[1].split(".")[:3]))
        print("\n".join([f"megatron-core=={argv[1]}", *release.test_requirements]))
    else:
        raise SystemExit("usage: python -m megatron_channel.megatron_internals.releases others | requirements VERSION")


if __name__ == "__main__":
    main()
