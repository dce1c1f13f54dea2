"""Knowledge-distillation losses shared by stages 2, 8 and 10.

    loss = w_ce * CE(student, labels)          (labelled rows; unlabelled ones, --unlabeled_dataset, learn from the rest)
         + w_kd * KL(softmax(teacher / T) || softmax(student / T)) * T^2
         + w_hidden * MSE(student hidden states, teacher hidden states through a layer map)

The T^2 factor keeps the soft-target gradients on the same scale as the hard-label ones when T changes
(Hinton et al., 2015).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from .data import UNLABELED, model_inputs


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


class HiddenProjector(torch.nn.Module):
    """TinyBERT's learned map W_h from the student's hidden width to the teacher's, so hidden-state distillation
    works between different widths (a 384-wide student of a 768-wide bert-base teacher). Trained with the student,
    never saved with it."""

    def __init__(self, student_width: int, teacher_width: int) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(student_width, teacher_width, bias=False)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.linear(hidden)


def hidden_projector_for(student: torch.nn.Module, teacher: torch.nn.Module, weight_hidden: float):
    """A ``HiddenProjector`` when hidden-state distillation is on and the widths differ, else None."""
    from .architecture import spec_for

    widths = [getattr(model.config, spec_for(model).config_hidden) for model in (student, teacher)]
    if weight_hidden <= 0 or widths[0] == widths[1]:
        return None
    return HiddenProjector(*widths)


def hidden_mse_loss(
    student_hidden: tuple[torch.Tensor, ...],
    teacher_hidden: tuple[torch.Tensor, ...],
    attention_mask: torch.Tensor,
    mapping: list[tuple[int, int]],
    projector: torch.nn.Module | None = None,
) -> torch.Tensor:
    """Mean squared error over real (non-padding) tokens, averaged over the mapped layer pairs; ``projector`` maps
    student states to the teacher's width first."""
    mask = attention_mask.unsqueeze(-1).to(student_hidden[0].dtype)
    denominator = mask.sum() * teacher_hidden[0].shape[-1]
    losses = []
    for s_index, t_index in mapping:
        student, teacher = student_hidden[s_index], teacher_hidden[t_index]
        if projector is not None:
            student = projector(student)
        if student.shape != teacher.shape:
            raise ValueError(
                f"Hidden state shapes differ: student layer {s_index} {tuple(student.shape)} vs teacher layer "
                f"{t_index} {tuple(teacher.shape)}; pass a HiddenProjector (the stages do when widths differ) or set alpha_hidden=0."
            )
        losses.append((((student - teacher) ** 2) * mask).sum() / denominator)
    return torch.stack(losses).mean()


def relation_log_probs(states: torch.Tensor, relation_heads: int, attention_mask: torch.Tensor) -> torch.Tensor:
    """MiniLM-v2 self-attention relations of one projection's output (batch, length, width): split the width into
    ``relation_heads`` equal parts, take scaled dot products between positions and log-softmax over the keys, with
    padding keys excluded. Shape (batch, relation_heads, length, length), whatever the model's head count."""
    batch, length, width = states.shape
    size = width // relation_heads
    parts = states.reshape(batch, length, relation_heads, size).transpose(1, 2).float()
    scores = parts @ parts.transpose(-1, -2) / math.sqrt(size)
    scores = scores.masked_fill(attention_mask[:, None, None, :] == 0, float("-inf"))
    return F.log_softmax(scores, dim=-1)


def attention_relation_loss(student_states: list[torch.Tensor], teacher_states: list[torch.Tensor],
                            attention_mask: torch.Tensor, relation_heads: int) -> torch.Tensor:
    """KL(teacher relation || student relation), averaged over query-query, key-key and value-value relations, relation
    heads and real query positions (MiniLM-v2). Independent of head counts and widths: the number of relation heads is
    the largest divisor of ``relation_heads`` that divides every width, so a pruned student with 2 heads learns from a
    12-head teacher."""
    widths = [states.shape[-1] for states in (*student_states, *teacher_states)]
    heads = math.gcd(relation_heads, *widths)
    keys = attention_mask[:, None, None, :].bool()
    queries = attention_mask.to(torch.float32)
    losses = []
    for student, teacher in zip(student_states, teacher_states):
        student_log, teacher_log = relation_log_probs(student, heads, attention_mask), relation_log_probs(teacher, heads, attention_mask)
        pointwise = torch.where(keys, teacher_log.exp() * (teacher_log - student_log), torch.zeros_like(student_log))
        per_query = pointwise.sum(-1).mean(1)  # sum over keys, mean over relation heads: (batch, length)
        losses.append((per_query * queries).sum() / queries.sum())
    return torch.stack(losses).mean()


class ProjectionCapture:
    """Forward hooks keeping the query, key and value projection outputs of one encoder layer (the inputs of
    ``attention_relation_loss``), found through the architecture spec, so every supported model works."""

    def __init__(self, model: torch.nn.Module, layer: int = -1) -> None:
        from .architecture import layer_views

        view = layer_views(getattr(model, "module", model))[layer]
        self.outputs: dict[str, torch.Tensor] = {}
        self.handles = [view.get(part).register_forward_hook(self._keeper(part)) for part in ("query", "key", "value")]

    def _keeper(self, part: str):
        def keep(module, inputs, output):
            self.outputs[part] = output

        return keep

    def states(self) -> list[torch.Tensor]:
        return [self.outputs[part] for part in ("query", "key", "value")]

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


@dataclass
class DistillationLoss:
    """Callable combining the three losses; returns the total and its parts (as floats) for logging."""

    weight_ce: float
    weight_kd: float
    weight_hidden: float
    temperature: float
    mapping: list[tuple[int, int]] | None = None
    weight_attention: float = 0.0  # MiniLM-v2 attention-relation KD on the last layers (query, key, value relations)
    relation_heads: int = 12
    projector: torch.nn.Module | None = None  # HiddenProjector when student and teacher widths differ

    @property
    def needs_hidden_states(self) -> bool:
        return self.weight_hidden > 0

    @property
    def extras(self) -> tuple:
        """Modules the loss trains alongside the student (``training.train(..., extras=...)``)."""
        return () if self.projector is None else (self.projector,)

    @property
    def needs_relations(self) -> bool:
        return self.weight_attention > 0

    def __call__(self, student_output, teacher_output, labels: torch.Tensor, attention_mask: torch.Tensor,
                 student_relations: list | None = None, teacher_relations: list | None = None):
        parts = {}
        total = student_output.logits.new_zeros(())
        labelled = labels != UNLABELED  # rows of --unlabeled_dataset learn from the teacher alone
        if self.weight_ce > 0 and bool(labelled.any()):
            parts["ce"] = F.cross_entropy(student_output.logits[labelled], labels[labelled])
            total = total + self.weight_ce * parts["ce"]
        if self.weight_kd > 0:
            parts["kd"] = kd_kl_loss(student_output.logits, teacher_output.logits, self.temperature)
            total = total + self.weight_kd * parts["kd"]
        if self.weight_hidden > 0:
            if self.mapping is None:
                raise ValueError("weight_hidden > 0 needs a student→teacher layer mapping.")
            parts["hidden"] = hidden_mse_loss(
                student_output.hidden_states, teacher_output.hidden_states, attention_mask, self.mapping, self.projector
            )
            total = total + self.weight_hidden * parts["hidden"]
        if self.weight_attention > 0:
            if student_relations is None or teacher_relations is None:
                raise ValueError("weight_attention > 0 needs the query/key/value outputs of both models (ProjectionCapture).")
            parts["attention"] = attention_relation_loss(student_relations, teacher_relations, attention_mask, self.relation_heads)
            total = total + self.weight_attention * parts["attention"]
        return total, {name: float(value.detach()) for name, value in parts.items()}


def kd_step(teacher: torch.nn.Module, loss: DistillationLoss, teacher_token_ids: torch.Tensor | None = None):
    """``compute_loss(model, batch)`` for ``training.train``: teacher forward without gradients, then ``loss``.

    ``teacher_token_ids[i]`` is the teacher's id of the student's token ``i``, for a student whose vocabulary
    was pruned (its ids are renumbered); None when both share one vocabulary.
    """
    teacher.eval()
    captures = {}

    def compute_loss(model, batch):
        if loss.needs_relations and not captures:  # hooks on the last layer of each, registered once
            captures["student"], captures["teacher"] = ProjectionCapture(model), ProjectionCapture(teacher)
        inputs = model_inputs(batch)
        if next(teacher.parameters()).device != batch["input_ids"].device:  # accelerate placed only the student
            teacher.to(batch["input_ids"].device)
        teacher_inputs = inputs
        if teacher_token_ids is not None:
            mapping = teacher_token_ids.to(batch["input_ids"].device)
            teacher_inputs = {**inputs, "input_ids": mapping[batch["input_ids"]]}
        with torch.no_grad():
            teacher_output = teacher(**teacher_inputs, output_hidden_states=loss.needs_hidden_states)
        student_output = model(**inputs, output_hidden_states=loss.needs_hidden_states)
        relations = (captures["student"].states(), captures["teacher"].states()) if captures else (None, None)
        return loss(student_output, teacher_output, batch["labels"], batch["attention_mask"], *relations)

    return compute_loss


def distillation_for(weights, student: torch.nn.Module, teacher: torch.nn.Module,
                     teacher_token_ids: torch.Tensor | None = None) -> tuple[DistillationLoss, Callable]:
    """The one distillation setup of stages 2, 8 and 10: the loss built from a ``DistillationWeights`` config (layer map
    from the two depths; a learned hidden-state projector when the widths differ, announced) and its
    ``compute_loss`` for ``training.train``."""
    loss = DistillationLoss(
        weights.alpha_ce, weights.alpha_kd, weights.alpha_hidden, weights.temperature,
        mapping=layer_map(num_layers(student), num_layers(teacher)),
        weight_attention=weights.alpha_attention, relation_heads=weights.attention_relation_heads,
        projector=hidden_projector_for(student, teacher, weights.alpha_hidden),
    )
    if loss.projector is not None:
        print(f"Hidden-state distillation through a learned {loss.projector.linear.in_features} -> "
              f"{loss.projector.linear.out_features} projector (student and teacher widths differ)")
    return loss, kd_step(teacher, loss, teacher_token_ids)


def num_layers(model: torch.nn.Module) -> int:
    from .architecture import num_layers as layers_of

    return layers_of(model)
