#!/usr/bin/env python
"""Megatron-LM's pretrain_gpt.py with per-channel loss: the same flags, plus the channel flags.

    torchrun --nproc-per-node 8 scripts/pretrain_gpt_channel.py <Megatron GPT flags> \
        --data-path 0.3 /data/math_text_document 0.7 /data/code_text_document \
        --channels-from-blend math code
"""

from megatron_channel.launch.pretrain_gpt import main

if __name__ == "__main__":
    main()
