"""Record the language model's intermediate outputs during one forward, and find where two forwards part.

When a reloaded checkpoint's logits differ from the trained model's by a rounding step, the first module whose
output differs names the cause (a block kind, the embedding lookup, the final norm) instead of leaving "rounding"
as a guess. Outputs are kept on the CPU in their own dtype (a text probe of 81 tokens x 4480 x 58 outputs is ~40 MB
in bf16). Every parameter, as the forward saw it (unsharded and cast by the engine), is recorded too, as an exact
digest: a differing output whose weights agree is a difference of computation, not of the checkpoint.
"""

import contextlib

import torch

_INT_OF_SIZE = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
# Elements per step: the int64 temporaries stay at ~0.1 GB (lm_head has 587 M elements), and a chunk's weighted sum
# (|bits| < 2^31, weights <= 128) stays below 2^62, so nothing overflows.
_DIGEST_CHUNK = 1 << 24


def weight_digest(tensor: torch.Tensor) -> torch.Tensor:
    """[element size, sum of the bit patterns, position-weighted sum] as int64. Integer sums are exact, so the digest
    depends only on the bits (not on kernel order or memory alignment); a change of any element changes the sum."""
    bits = tensor.detach().reshape(-1).view(_INT_OF_SIZE[tensor.element_size()])
    total = weighted = 0
    for start in range(0, bits.numel(), _DIGEST_CHUNK):
        chunk = bits[start:start + _DIGEST_CHUNK].long()
        positions = torch.arange(start, start + chunk.numel(), device=chunk.device) % 128 + 1
        total += chunk.sum().item()
        weighted += (chunk * positions).sum().item()
    return torch.tensor([tensor.element_size(), total % (1 << 62), weighted % (1 << 62)], dtype=torch.int64)


def _is_fsdp_unit(module) -> bool:
    return type(module).__name__ == "FullyShardedDataParallel"


def _unit_parameter_names(module) -> list[str]:
    """Names (relative to `module`) of its parameters and its descendants', not descending into FSDP units: the
    parameters that are whole whenever `module` runs (FSDP unshards a unit's parameters together)."""
    names = [name for name, _ in module.named_parameters(recurse=False)]
    for child_name, child in module.named_children():
        if not _is_fsdp_unit(child):
            names += [f"{child_name}.{name}" for name in _unit_parameter_names(child)]
    return names


def _tensor_as_held(module, name: str):
    """The parameter `name` (dotted, relative to `module`) as the module holds it at this moment, looked up without
    DeepSpeed ZeRO-3's gather-on-access (its parameter dict gathers a partitioned parameter when indexed, which
    would make the recording change what the engine fetches and break its prefetch trace)."""
    *path, attribute = name.split(".")
    for part in path:
        module = module._modules[part]
    held = module.__dict__.get(attribute)  # FSDP's unsharded views are plain attributes while a unit runs
    return held if held is not None else dict.get(module._parameters, attribute)


def _is_whole(parameter) -> bool:
    """False for a DeepSpeed ZeRO-3 partition not gathered at this moment (its module's forward has not begun)."""
    status = getattr(parameter, "ds_status", None)
    return status is None or status.name == "AVAILABLE"


def _weight_hooks(model, record: dict) -> list:
    """Pre-hooks on every module that put a digest of each parameter into `record` (`weights.<parameter name>`) the
    first time a forward finds it whole: FSDP unshards a unit's parameters when any module of the unit runs; ZeRO-3
    gathers a module's own parameters in its own pre-hook (registered before these, so run first). Parameters of
    modules whose forward is never called (e.g. conv1d, read by the Mamba mixer) are digested through their caller."""
    handles = []
    for path, module in model.named_modules():
        if _is_fsdp_unit(module):
            continue
        prefix = path.replace("._fsdp_wrapped_module", "")
        names = _unit_parameter_names(module)
        if not names:
            continue

        def keep_weights(module, args, prefix=prefix, names=names):
            for name in names:
                key = f"weights.{prefix}.{name}" if prefix else f"weights.{name}"
                if key not in record:
                    parameter = _tensor_as_held(module, name)
                    if _is_whole(parameter):
                        record[key] = weight_digest(parameter)
        handles.append(module.register_forward_pre_hook(keep_weights))
    return handles


@contextlib.contextmanager
def recording(model, block_outputs: bool = True):
    """Within the block, the forward of `model` (the unwrapped TimeViperForConditionalGeneration, its blocks possibly
    wrapped by FSDP or DeepSpeed) fills the yielded dict, in forward order: `weights.<parameter name>` (digests),
    `video_features` (the projector's output, when the batch has a video) and, with `block_outputs`, the outputs of
    `embeddings`, of `block.<i>` for each block and of `final_norm`. One forward per block."""
    language_model = model.model.language_model
    modules = {"video_features": model.model.multi_modal_projector}
    if block_outputs:
        modules["embeddings"] = language_model.embed
        modules.update({f"block.{i}": block for i, block in enumerate(language_model.layers)})
        modules["final_norm"] = language_model.final_norm
    outputs = {}
    handles = _weight_hooks(model, outputs)
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


def probe_forward(model, inner, batch: dict, probe: str):
    """One probe through `model` (an engine's wrapper, or the model itself) without autograd, recorded on `inner` (its
    unwrapped model; block outputs for the text probe only, the video probe's are GBs), then a second forward.
    Returns the output, the recording, and whether the second forward repeated the logits bit for bit."""
    with torch.no_grad():
        with recording(inner, block_outputs=probe == "text") as outputs:
            output = model(**batch)
        repeat = model(**batch).logits
    return output, outputs, torch.equal(output.logits, repeat)


def compare(expected: dict, actual: dict) -> dict:
    """Which recorded outputs and weight digests differ in any bit (in forward order), the first of each, and each
    differing output's max |diff|."""
    compared = [name for name in expected if name in actual]
    differing = [name for name in compared if not torch.equal(expected[name], actual[name])]
    differing_outputs = [name for name in differing if not name.startswith("weights.")]
    differing_weights = [name for name in differing if name.startswith("weights.")]
    return {
        "compared": len(compared), "weights_compared": sum(name.startswith("weights.") for name in compared),
        "missing": [name for name in expected if name not in actual],
        "first_differing": differing_outputs[0] if differing_outputs else None,
        "max_abs_diff": {name: (expected[name].float() - actual[name].float()).abs().max().item()
                         for name in differing_outputs},
        "first_differing_weights": differing_weights[0] if differing_weights else None,
        "differing_weights": differing_weights,
    }
