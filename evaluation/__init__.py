"""Evaluation harness for TimeViper: multiple-choice video QA and temporal grounding on local benchmark files.

`evaluation.tasks` holds the model-free logic (prompts, answer parsing, metrics, resumable JSONL, sharding);
`python -m evaluation.run_eval` is the command line. See evaluation/README.md for the file formats.
"""
