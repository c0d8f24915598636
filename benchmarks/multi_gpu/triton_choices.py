"""Carry the Triton autotuner's choices from the trained model's process to the reload check's.

mamba-ssm's Mamba-2 kernels are `@triton.autotune`d over block sizes that include the reduction block
(`BLOCK_SIZE_K`), and each process picks the fastest config by timing it: two processes may pick differently and so
sum in a different order, which changes bf16 logits by an ulp with identical weights. train_bench.py records the
configs its rank 0 used (`autotune_choices`) and reload_check.py installs them before its forward
(`pin_autotune_choices`), so the comparison of logits tests the weights, not the timing noise.
"""

import sys

try:
    from triton.runtime.autotuner import Autotuner
except ImportError:  # no Triton (CPU): nothing is autotuned
    Autotuner = None


def autotuners() -> dict:
    """The autotuned kernels of the loaded mamba-ssm modules, by qualified name."""
    if Autotuner is None:
        return {}
    found = {}
    for module_name, module in list(sys.modules.items()):
        if module_name.startswith("mamba_ssm.") and module is not None:
            for name, value in vars(module).items():
                if isinstance(value, Autotuner):
                    found[f"{module_name}.{name}"] = value
    return found


def autotune_choices() -> list[tuple[str, tuple, str]]:
    """(kernel, tuning key, config) for every key tuned so far in this process."""
    return [(name, key, str(config)) for name, tuner in autotuners().items() for key, config in tuner.cache.items()]


def pin_autotune_choices(choices: list[tuple[str, tuple, str]]) -> dict:
    """Make this process use the recorded configs (the mamba-ssm kernels must be imported: the model's modules import
    them). Returns how many were pinned and the ones that could not be (kernel or config unknown here)."""
    tuners = autotuners()
    pinned, unknown = 0, []
    for name, key, config_text in choices:
        configs = {str(config): config for config in getattr(tuners.get(name), "configs", ())}
        if config_text in configs:
            tuners[name].cache[key] = configs[config_text]
            pinned += 1
        else:
            unknown.append(f"{name} {key}: {config_text}")
    return {"pinned": pinned, "unknown": unknown}
