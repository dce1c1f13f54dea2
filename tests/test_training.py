import torch

from common.config import TeacherConfig
from common.data import make_loader, tokenize_dataset
from common.training import make_accelerator, train
from conftest import tiny_bert_config, tiny_model
from test_vocabulary_and_report import tiny_data


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
