"""TimeViper: a hybrid Mamba-Transformer video-language model (Hugging Face remote-code package).

Installed, the Hub files form the package `timeviper`: import from `timeviper.configuration_timeviper`,
`timeviper.modeling_timeviper`, `timeviper.generation_timeviper`, `timeviper.processing_timeviper` and
`timeviper.video_processing_timeviper`. In a checkpoint folder transformers loads the same files as remote code.
This file imports nothing at import time, so that it is harmless wherever a tool imports it on its own.
"""

# The files transformers loads as remote code; every folder that must load with `trust_remote_code` gets a copy.
REMOTE_CODE_FILES = (
    "configuration_timeviper.py",
    "modeling_timeviper.py",
    "generation_timeviper.py",
    "processing_timeviper.py",
    "video_processing_timeviper.py",
)


def copy_remote_code(folder) -> None:
    """Copy the remote-code files into `folder` (created if missing), so that it loads with `trust_remote_code`."""
    import os
    import shutil

    source = os.path.dirname(os.path.abspath(__file__))
    os.makedirs(folder, exist_ok=True)
    for name in REMOTE_CODE_FILES:
        shutil.copyfile(os.path.join(source, name), os.path.join(folder, name))
