"""Evaluation harness for TimeViper: multiple-choice video QA and temporal grounding (evaluation/README.md)."""
