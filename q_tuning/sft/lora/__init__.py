"""LoRA for `q-tuning-train`: low-rank adapters on megatron-core's linear layers, tensor-parallel
exact, checkpointed alone, exported merged (HF) or as an HF peft adapter. docs/lora.md.

Modules (imported where used, so that parsing the flags needs no torch):
    config      LoRAConfig and the `--lora-*` flags (`add_lora_args`, `check_lora_args`)
    layers      apply_lora, LoRAAdapter, adapted_layers, merged_weights
    checkpoint  the adapters' sharded state, the base's fingerprint
    export      the peft adapter folder (`save_peft_adapter`)
"""
