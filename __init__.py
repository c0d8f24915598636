"""TimeViper: a hybrid Mamba-Transformer video-language model (Hugging Face remote-code package).

Installed, the three Hub files form the package `timeviper`; in a checkpoint folder transformers loads them as
remote code.
"""

from .configuration_timeviper import TimeViperCompressionStage, TimeViperConfig, parse_compression_string
from .modeling_timeviper import TimeViperForConditionalGeneration, TimeViperHybridCache, TimeViperModel
