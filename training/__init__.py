"""Fine-tuning of TimeViper with the Hugging Face Trainer (training/README.md)."""
