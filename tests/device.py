"""What the fidelity tests share: the device they run the engine and the circuits on, ``WEIGHTLENS_TEST_DEVICE``
(default ``cpu``; ``benchmarks/gpu_check.sh`` sets ``cuda``; results come back to the CPU, where transformers'
reference values are computed), and the shape of their tiny transformers models."""

import os

DEVICE = os.environ.get("WEIGHTLENS_TEST_DEVICE", "cpu")

# Config fields of the tiny Gemma-2 / Gemma 3 / Llama models the fidelity tests build with transformers: GQA (4 query
# heads on 2 kv heads), head_dim not d_model / heads.
TINY = dict(
    vocab_size=300,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
)
