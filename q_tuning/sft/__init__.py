"""Supervised fine-tuning: data, model, checkpoints and the trainer (being moved here from q_tuning.train)."""
