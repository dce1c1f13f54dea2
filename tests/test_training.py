import torch

from common.config import TeacherConfig
from common.data import make_loader, tokenize_dataset
from common.training import make_accelerator, train
from conftest import tiny_bert_config, tiny_data, tiny_model


def cross_entropy(model, batch):
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return torch.nn.functional.cross_entropy(logits, batch["labels"]), {}


def loaders(tokenizer):
    data = tiny_data(["great film", "dull plot", "fun story", "boring actor"] * 8, ["great plot", "dull film"])
    train_set = tokenize_dataset(data.train, tokenizer, 16)
    eval_set = tokenize_dataset(data.validation, tokenizer, 16)
    return make_loader(train_set, tokenizer, 8, shuffle=True, seed=0), make_loader(eval_set, tokenizer, 8, shuffle=False)


def test_resume_continues_after_the_last_finished_epoch(tokenizer, tmp_path):
    resume_dir = tmp_path / ".inprogress-run"
    resume_dir.mkdir()
    first = train(tiny_model(tiny_bert_config()), *loaders(tokenizer), TeacherConfig(num_epochs=1, learning_rate=1e-3),
                  cross_entropy, make_accelerator(TeacherConfig()), resume_dir=resume_dir)
    assert (resume_dir / "trainer_state.json").is_file() and first.steps == 4
    # An "interrupted" run of 2 epochs picks up after epoch 1: one more epoch, the first one's history kept.
    second = train(tiny_model(tiny_bert_config()), *loaders(tokenizer), TeacherConfig(num_epochs=2, learning_rate=1e-3),
                   cross_entropy, make_accelerator(TeacherConfig()), resume_dir=resume_dir)
    assert [entry["epoch"] for entry in second.history] == [1, 2]
    assert second.history[0] == first.history[0]
    assert second.steps == 8


def test_keep_best_returns_the_best_epochs_weights(tokenizer):
    model = tiny_model(tiny_bert_config())
    result = train(model, *loaders(tokenizer), TeacherConfig(num_epochs=3, learning_rate=1e-3), cross_entropy,
                   make_accelerator(TeacherConfig()), keep="best")
    best = max(entry["validation_accuracy"] for entry in result.history)
    assert result.best_metrics["accuracy"] == best
    assert result.history[result.best_epoch - 1]["validation_accuracy"] == best
    assert set(result.best_state) == set(model.state_dict())


class GradientRecorder:
    """Keeps the gradients the optimizer sees at its first step (``after_backward`` runs once they are complete)."""

    def __init__(self, model):
        self.model, self.gradients = model, None

    def after_backward(self, step):
        if self.gradients is None:
            self.gradients = {n: p.grad.detach().clone() for n, p in self.model.named_parameters() if p.grad is not None}

    def after_optimizer_step(self, step):
        pass


def test_accumulating_four_batches_of_eight_matches_one_batch_of_32_on_the_first_update(tokenizer):
    from accelerate.state import AcceleratorState, GradientState

    data = tiny_data(["great film", "dull plot", "fun story", "boring actor"] * 8, ["great plot", "dull film"])
    train_set = tokenize_dataset(data.train, tokenizer, 16)
    eval_loader = make_loader(tokenize_dataset(data.validation, tokenizer, 16), tokenizer, 8, shuffle=False)
    weights, gradients = {}, {}
    for batch_size, accumulation in ((32, 1), (8, 4)):
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()
        config = TeacherConfig(num_epochs=1, learning_rate=1e-2, warmup_ratio=0.0, batch_size=batch_size,
                               gradient_accumulation_steps=accumulation, max_grad_norm=0.0)
        model = tiny_model(tiny_bert_config())
        recorder = GradientRecorder(model)
        result = train(model, make_loader(train_set, tokenizer, batch_size, shuffle=True, seed=0), eval_loader, config,
                       cross_entropy, make_accelerator(config), hooks=recorder)
        assert result.steps == 1  # one optimizer step either way
        weights[accumulation], gradients[accumulation] = result.best_state, recorder.gradients
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    # the summed micro-batch gradients are the batch-32 mean gradient (each micro-batch loss divided by 4)
    assert set(gradients[4]) == set(gradients[1])
    for name, gradient in gradients[1].items():
        torch.testing.assert_close(gradients[4][name], gradient, atol=1e-7, rtol=1e-4)
    initial = tiny_model(tiny_bert_config()).state_dict()
    assert sum(not torch.equal(initial[name], weights[1][name]) for name in initial) > 10  # the step moved weights
    # Adam moves each weight by about the learning rate (1e-2); where a gradient is near Adam's eps the float
    # summation order shows, so the weights agree to 1e-4, a hundredth of one step
    for name in initial:
        torch.testing.assert_close(weights[4][name], weights[1][name], atol=1e-4, rtol=0)


def test_optimizer_steps_count_processes_and_accumulation():
    from common.training import optimizer_steps_per_epoch

    assert optimizer_steps_per_epoch(10, 1, 1) == 10
    assert optimizer_steps_per_epoch(10, 2, 1) == 5
    assert optimizer_steps_per_epoch(10, 1, 4) == 3  # 4 + 4 + the last 2
    assert optimizer_steps_per_epoch(9, 2, 2) == 3  # 5 batches per process -> 2 + 2 + 1
