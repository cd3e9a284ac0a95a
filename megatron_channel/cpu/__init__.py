"""Training through Megatron's ``pretrain()`` on a CPU over gloo (``--cpu``).

* ``cuda_on_cpu``: the torch-level stand-ins for CUDA that Megatron's loop needs.
* ``core_attention``: a core attention for the CPU that takes packed rows (``cu_seqlens``)
  and context parallelism, which Megatron's local attention refuses; selected with
  ``--spec megatron_channel.cpu gpt_layer_spec``.
"""

from .core_attention import CpuCoreAttention, gpt_layer_spec
from .cuda_on_cpu import cuda_on_cpu_installed, install_cuda_on_cpu, uninstall_cuda_on_cpu

__all__ = ["CpuCoreAttention", "cuda_on_cpu_installed", "gpt_layer_spec", "install_cuda_on_cpu", "uninstall_cuda_on_cpu"]
