"""The supervised fine-tuning stack (the trainer's pieces move here; LoRA lives in `sft.lora`)."""
