"""Fine-tuning of TimeViper with the Hugging Face Trainer.

`training.data` holds the JSONL sample format, its validation, the dataset and the collator; `training.train` is the
command line (`python -m training.train --help`). See training/README.md.
"""
