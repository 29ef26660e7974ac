"""LoRA fine-tuning of Llama 3 8B (Hu et al. 2021): rank-16 adapters on the attention projections, the base
frozen. autoplan plans it as what it is: the base's bf16 weights, and gradients and optimizer states for the
adapters only (42M parameters). `autoplan search examples/lora_llama3_8b.py --gpus 1`."""

import autoplan as ap
from autoplan.models.finetune import add_lora

CONFIG = {"seq_len": 8192, "vocab": 128256}


def build_model():
    model = ap.models.llama(layers=32, hidden=4096, heads=32, kv_heads=8, ffn_hidden=14336, vocab=CONFIG["vocab"],
                            seq_len=CONFIG["seq_len"])
    return add_lora(model, rank=16, alpha=32, targets=("wq", "wk", "wv", "wo"))
