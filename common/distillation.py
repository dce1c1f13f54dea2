"""Knowledge-distillation losses shared by stages 2, 8 and 10.

    loss = w_ce * CE(student, labels)
         + w_kd * KL(softmax(teacher / T) || softmax(student / T)) * T^2
         + w_hidden * MSE(student hidden states, teacher hidden states through a layer map)

The T^2 factor keeps the soft-target gradients on the same scale as the hard-label ones when T changes
(Hinton et al., 2015).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .data import model_inputs


def kd_kl_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """KL(teacher || student) on temperature-softened distributions, times T^2, averaged over the batch."""
    student_log_probs = F.log_softmax(student_logits / temperature, dim=-1)
    teacher_log_probs = F.log_softmax(teacher_logits / temperature, dim=-1)
    kl = F.kl_div(student_log_probs, teacher_log_probs, reduction="batchmean", log_target=True)
    return kl * temperature**2


def layer_map(num_student_layers: int, num_teacher_layers: int) -> list[tuple[int, int]]:
    """(student, teacher) hidden-state indices: student layer k ↔ teacher layer round(k * L_t / L_s).

    Index 0 is the embedding output, index k the output of layer k, as in ``output_hidden_states``. The last
    student layer always maps to the last teacher layer.
    """
    if num_student_layers <= 0 or num_teacher_layers <= 0:
        raise ValueError(f"layer counts must be positive, got student={num_student_layers}, teacher={num_teacher_layers}.")
    return [(k, round(k * num_teacher_layers / num_student_layers)) for k in range(1, num_student_layers + 1)]


def hidden_mse_loss(
    student_hidden: tuple[torch.Tensor, ...],
    teacher_hidden: tuple[torch.Tensor, ...],
    attention_mask: torch.Tensor,
    mapping: list[tuple[int, int]],
) -> torch.Tensor:
    """Mean squared error over real (non-padding) tokens, averaged over the mapped layer pairs."""
    mask = attention_mask.unsqueeze(-1).to(student_hidden[0].dtype)
    denominator = mask.sum() * student_hidden[0].shape[-1]
    losses = []
    for s_index, t_index in mapping:
        student, teacher = student_hidden[s_index], teacher_hidden[t_index]
        if student.shape != teacher.shape:
            raise ValueError(
                f"Hidden state shapes differ: student layer {s_index} {tuple(student.shape)} vs teacher layer "
                f"{t_index} {tuple(teacher.shape)}; hidden-state distillation needs equal widths (set alpha_hidden=0)."
            )
        losses.append((((student - teacher) ** 2) * mask).sum() / denominator)
    return torch.stack(losses).mean()


@dataclass
class DistillationLoss:
    """Callable combining the three losses; returns the total and its parts (as floats) for logging."""

    weight_ce: float
    weight_kd: float
    weight_hidden: float
    temperature: float
    mapping: list[tuple[int, int]] | None = None

    @property
    def needs_hidden_states(self) -> bool:
        return self.weight_hidden > 0

    def __call__(self, student_output, teacher_output, labels: torch.Tensor, attention_mask: torch.Tensor):
        parts = {}
        total = student_output.logits.new_zeros(())
        if self.weight_ce > 0:
            parts["ce"] = F.cross_entropy(student_output.logits, labels)
            total = total + self.weight_ce * parts["ce"]
        if self.weight_kd > 0:
            parts["kd"] = kd_kl_loss(student_output.logits, teacher_output.logits, self.temperature)
            total = total + self.weight_kd * parts["kd"]
        if self.weight_hidden > 0:
            if self.mapping is None:
                raise ValueError("weight_hidden > 0 needs a student→teacher layer mapping.")
            parts["hidden"] = hidden_mse_loss(
                student_output.hidden_states, teacher_output.hidden_states, attention_mask, self.mapping
            )
            total = total + self.weight_hidden * parts["hidden"]
        return total, {name: float(value.detach()) for name, value in parts.items()}


def kd_step(teacher: torch.nn.Module, loss: DistillationLoss, teacher_token_ids: torch.Tensor | None = None):
    """``compute_loss(model, batch)`` for ``training.train``: teacher forward without gradients, then ``loss``.

    ``teacher_token_ids[i]`` is the teacher's id of the student's token ``i``, for a student whose vocabulary
    was pruned (its ids are renumbered); None when both share one vocabulary.
    """
    teacher.eval()

    def compute_loss(model, batch):
        inputs = model_inputs(batch)
        teacher_inputs = inputs
        if teacher_token_ids is not None:
            mapping = teacher_token_ids.to(batch["input_ids"].device)
            teacher_inputs = {**inputs, "input_ids": mapping[batch["input_ids"]]}
        with torch.no_grad():
            teacher_output = teacher(**teacher_inputs, output_hidden_states=loss.needs_hidden_states)
        student_output = model(**inputs, output_hidden_states=loss.needs_hidden_states)
        return loss(student_output, teacher_output, batch["labels"], batch["attention_mask"])

    return compute_loss


def num_layers(model: torch.nn.Module) -> int:
    from .architecture import num_layers as layers_of

    return layers_of(model)
