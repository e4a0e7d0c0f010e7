"""CPU-only kernels and memory tricks; each does nothing on other devices.

- ``nf4_layouts``: correct nf4 gradients next to bitsandbytes' packed inference layout.
- ``bf16_head``: a bf16 copy of the output projection while sampling.
- ``gqa_attention``: masked grouped-query attention without copying the KV cache per query head.
- ``memory``: drop checkpoint file mappings, hand freed heap back to the OS.
"""
