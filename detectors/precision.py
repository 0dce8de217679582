"""Mixed precision: the networks run in a 16-bit float type under `torch.autocast`, the losses, the fused ops
and the postprocessing in float32.

    with mixed_precision("cpu", "bf16"):          # train.py, around the forward passes of student and teacher
        losses = ...                              # convolutions and matrix products in bfloat16

    @in_float32                                   # on every loss, fused op and postprocessor
    def sigmoid_focal_loss(logits, targets, ...): # bfloat16 logits arrive as float32, and it computes in float32

Why the losses stay in float32: they sum many small terms (a focal loss of 1e-4 per element over 100k
anchors), compare scores with thresholds (Soft Teacher's 0.9: bfloat16 has about 2 significant digits) and
rank them (Dense Teacher's top 1%); the fused kernels of semi/ops.py take float32 or float64 only. Under
autocast, elementwise ops keep their input's type, so float32 inputs are not enough on their own: inside
`in_float32` autocast is off as well.
"""

import contextlib
import dataclasses
import functools

import torch
from torch import Tensor

AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}  # the values of --amp ("" is off)


def mixed_precision(device_type: str, amp: str) -> contextlib.AbstractContextManager:
    """`torch.autocast` for `--amp` on a device type ("cpu" or "cuda"); a context that does nothing for amp="".

    amp: "" (float32 throughout), "bf16" or "fp16". float16 needs a gradient scaler against underflow
    (torch.amp.GradScaler, train.py); bfloat16 has float32's range and needs none.
    """
    if not amp:
        return contextlib.nullcontext()
    if amp not in AMP_DTYPES:
        raise ValueError(f"detectors/precision.py: amp must be '' or one of {sorted(AMP_DTYPES)}, got {amp!r}")
    return torch.autocast(device_type, dtype=AMP_DTYPES[amp])


def to_float32(value):
    """float16 / bfloat16 tensors -> float32, through lists, tuples, named tuples, dicts and dataclasses
    (e.g. a DenseOutput); everything else (float32, float64, integers, other objects) as it is. A container
    without a 16-bit tensor comes back as the very same object (no copy)."""
    if isinstance(value, Tensor):
        return value.float() if value.dtype in (torch.float16, torch.bfloat16) else value
    if isinstance(value, dict):
        cast = {key: to_float32(v) for key, v in value.items()}
        return value if all(cast[key] is v for key, v in value.items()) else cast
    if isinstance(value, (list, tuple)):
        cast = [to_float32(v) for v in value]
        if all(c is v for c, v in zip(cast, value)):
            return value
        return type(value)(*cast) if hasattr(value, "_fields") else type(value)(cast)  # a NamedTuple, or not
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        fields = {f.name: getattr(value, f.name) for f in dataclasses.fields(value) if f.init}
        cast = {name: to_float32(v) for name, v in fields.items()}
        return value if all(cast[name] is v for name, v in fields.items()) else dataclasses.replace(value, **cast)
    return value


def in_float32(fn):
    """Decorator: `fn` runs with autocast off and its 16-bit floating tensor arguments cast to float32.

    Its results are then float32 (or float64 for float64 inputs). Gradients flow back through the cast into
    the 16-bit tensors. Without autocast and with float32 / float64 arguments it changes nothing.
    """

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        args, kwargs = to_float32(args), to_float32(kwargs)
        with contextlib.ExitStack() as stack:
            for device_type in ("cpu", "cuda"):
                if torch.is_autocast_enabled(device_type):
                    stack.enter_context(torch.autocast(device_type, enabled=False))
            return fn(*args, **kwargs)

    return wrapper

