"""The teacher as an exponential moving average (EMA) of the student.

    ema = EMATeacher(student.model)                 # a frozen copy: eval mode, no gradients
    ...                                             # optimizer.step()
    ema.update(student.model, momentum=m)           # theta_t <- m * theta_t + (1 - m) * theta_s

Each method's momentum schedule lives in its own file, as a pure function of the iteration
(docs/METHODS.md, "The teacher"):

    Soft Teacher   m = min(0.999, 1 - 1 / (t + 1)), parameters only          semi/soft_teacher.py
    Dense Teacher  no update before the copy at `start_iter`, then 0.9996    semi/dense_teacher.py
    SED            0.99, then 0.9 from the first LR milestone, or cosine     semi/sed.py
"""

import copy

import torch
from torch import nn


class EMATeacher:
    """A teacher model that follows the student by EMA and never trains itself.

    `model` is a deep copy of the student taken at construction, switched to eval mode (BatchNorm uses its
    running statistics, dropout is off) with `requires_grad=False` on every parameter. Callers run the
    teacher under `torch.no_grad()`; `update` and `copy_from` do so themselves.
    """

    def __init__(self, student_model: nn.Module):
        self.model = copy.deepcopy(student_model)
        self.model.eval()
        self.model.requires_grad_(False)

    @torch.no_grad()
    def update(self, student_model: nn.Module, *, momentum: float, include_buffers: bool = True) -> None:
        """theta_t <- momentum * theta_t + (1 - momentum) * theta_s for every parameter.

        include_buffers=True averages the floating-point buffers (BatchNorm running mean / var) the same
        way, as Dense Teacher does over the whole state. include_buffers=False (Soft Teacher: "over the
        parameters") copies the student's buffers instead, so that a teacher whose BatchNorm trains from
        scratch still normalises with current statistics. Integer buffers (`num_batches_tracked`) are
        always copied. momentum = 0 makes the teacher a copy of the student; 1 leaves it unchanged.
        """
        if not 0.0 <= momentum <= 1.0:
            raise ValueError(f"semi/ema.py: EMA momentum must be in [0, 1], got {momentum}")
        teacher_params = dict(self.model.named_parameters())
        student_params = dict(student_model.named_parameters())
        _check_same_names(teacher_params, student_params, what="parameters")
        for name, student_value in student_params.items():
            teacher_params[name].lerp_(student_value.detach(), 1.0 - momentum)  # m * t + (1 - m) * s

        teacher_buffers = dict(self.model.named_buffers())
        student_buffers = dict(student_model.named_buffers())
        _check_same_names(teacher_buffers, student_buffers, what="buffers")
        for name, student_value in student_buffers.items():
            if include_buffers and student_value.is_floating_point():
                teacher_buffers[name].lerp_(student_value, 1.0 - momentum)
            else:
                teacher_buffers[name].copy_(student_value)

    @torch.no_grad()
    def copy_from(self, student_model: nn.Module) -> None:
        """Make the teacher an exact copy of the student (parameters and buffers); it stays in eval mode."""
        self.model.load_state_dict(student_model.state_dict())
        self.model.eval()

    def state_dict(self) -> dict:
        """The teacher model's state dict, for checkpoints."""
        return self.model.state_dict()

    def load_state_dict(self, state_dict: dict) -> None:
        self.model.load_state_dict(state_dict)
        self.model.eval()


def _check_same_names(teacher: dict, student: dict, *, what: str) -> None:
    if teacher.keys() != student.keys():
        missing = sorted(set(student) ^ set(teacher))[:5]
        raise ValueError(f"semi/ema.py: teacher and student {what} differ (e.g. {missing}); "
                         "the teacher must be a copy of the student's architecture")
