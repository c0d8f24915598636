"""Record the language model's intermediate outputs during one forward, and find where two forwards part.

When a reloaded checkpoint's logits differ from the trained model's by a rounding step, the first module whose
output differs names the cause (a block kind, the embedding lookup, the final norm) instead of leaving "rounding"
as a guess. Outputs are kept on the CPU in their own dtype (a text probe of 81 tokens x 4480 x 58 outputs is ~40 MB
in bf16).
"""

import contextlib

import torch


@contextlib.contextmanager
def recording(model):
    """Within the block, every forward of `model` (the unwrapped TimeViperForConditionalGeneration) fills the yielded
    dict: `embeddings`, `block.<i>` for each hybrid/decoder block, `final_norm`. Works through FSDP and DeepSpeed
    wrappers of the blocks (the hooks see the full outputs)."""
    language_model = model.model.language_model
    modules = {"embeddings": language_model.embed}
    modules.update({f"block.{i}": block for i, block in enumerate(language_model.layers)})
    modules["final_norm"] = language_model.final_norm
    outputs = {}
    handles = []
    for name, module in modules.items():
        def keep(module, args, kwargs, output, name=name):
            if kwargs.get("score_query") is None:  # not an attention-guided scoring call of the block
                outputs[name] = output.detach().cpu()
        handles.append(module.register_forward_hook(keep, with_kwargs=True))
    try:
        yield outputs
    finally:
        for handle in handles:
            handle.remove()


def compare(expected: dict, actual: dict) -> dict:
    """Which recorded outputs differ in any bit (in forward order), the first of them, and each one's max |diff|."""
    differing = [name for name in expected if name in actual and not torch.equal(expected[name], actual[name])]
    return {
        "compared": sum(name in actual for name in expected),
        "missing": [name for name in expected if name not in actual],
        "first_differing": differing[0] if differing else None,
        "max_abs_diff": {name: (expected[name].float() - actual[name].float()).abs().max().item() for name in differing},
    }
