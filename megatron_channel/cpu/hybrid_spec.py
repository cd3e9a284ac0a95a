"""A ``HybridModel`` stack spec for the CPU: attention (``*``) and MLP (``-``) layers only.

Megatron's hybrid stack spec is Transformer Engine throughout (fused layer-norm linears,
``TEDotProductAttention``, a ``TENorm`` final norm), which does not build without a GPU. This
one has Megatron's local layers with ``CpuCoreAttention`` (packed rows and context
parallelism on the CPU) and a torch final norm. Mamba (``M``), GDN (``G``), MoE (``E``) and
the latent-attention symbols need CUDA kernels or other specs, so ``--cpu`` refuses patterns
with them (``launch.startup.check_cpu_hybrid_args``).

Selected with Megatron's own flag ``--spec megatron_channel.cpu.hybrid_spec hybrid_stack_spec``
(``--cpu`` sets it for ``--hybrid-layer-pattern``): Megatron's hybrid builder imports the
``ModuleSpec`` object by name.
"""

from __future__ import annotations

from functools import partial

from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
from megatron.core.models.gpt.gpt_layer_specs import LNImpl
from megatron.core.models.hybrid.hybrid_block import HybridStack, HybridStackSubmodules
from megatron.core.ssm.mlp_layer import MLPLayer
from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.attention import SelfAttention, SelfAttentionSubmodules
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.mlp import MLP, MLPSubmodules
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_layer import TransformerLayer, TransformerLayerSubmodules

from .core_attention import CpuCoreAttention

class CpuHybridStack(HybridStack):
    """``HybridStack`` whose final norm is Megatron's local norm instead of ``TENorm``."""

    def __init__(self, config, submodules, *args, post_layer_norm: bool = True, **kwargs):
        super().__init__(config, submodules, *args, post_layer_norm=False, **kwargs)
        self.post_layer_norm = post_layer_norm
        if self.post_process and post_layer_norm:
            self.final_norm = LNImpl(config=self.config, hidden_size=self.config.hidden_size,
                                     eps=self.config.layernorm_epsilon)


hybrid_stack_spec = ModuleSpec(
    module=CpuHybridStack,
    submodules=HybridStackSubmodules(
        attention_layer=ModuleSpec(
            module=TransformerLayer,
            submodules=TransformerLayerSubmodules(
                input_layernorm=LNImpl,
                self_attention=ModuleSpec(
                    module=SelfAttention,
                    params={"attn_mask_type": AttnMaskType.causal},
                    submodules=SelfAttentionSubmodules(linear_qkv=ColumnParallelLinear,
                                                       core_attention=CpuCoreAttention,
                                                       linear_proj=RowParallelLinear),
                ),
                self_attn_bda=get_bias_dropout_add,
            ),
        ),
        mlp_layer=ModuleSpec(
            module=MLPLayer,
            submodules=TransformerLayerSubmodules(
                pre_mlp_layernorm=LNImpl,
                mlp=partial(MLP.as_mlp_submodule,
                            submodules=MLPSubmodules(linear_fc1=ColumnParallelLinear, linear_fc2=RowParallelLinear)),
                mlp_bda=get_bias_dropout_add,
            ),
        ),
    ),
)
