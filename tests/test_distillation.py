import math
from types import SimpleNamespace

import pytest
import torch

from common.distillation import DistillationLoss, hidden_mse_loss, kd_kl_loss, layer_map
from common.models import build_student_from_teacher, layer_views, teacher_layers_for_student
from conftest import batch_for, tiny_bert_config, tiny_data, tiny_distilbert_config, tiny_model


def hand_kl(student_logits, teacher_logits, temperature):
    total = 0.0
    for s_row, t_row in zip(student_logits.tolist(), teacher_logits.tolist()):
        s_exp = [math.exp(v / temperature) for v in s_row]
        t_exp = [math.exp(v / temperature) for v in t_row]
        s_prob = [v / sum(s_exp) for v in s_exp]
        t_prob = [v / sum(t_exp) for v in t_exp]
        total += sum(t * math.log(t / s) for t, s in zip(t_prob, s_prob))
    return total / len(student_logits) * temperature**2


@pytest.mark.parametrize("temperature", [1.0, 2.0, 4.0])
def test_kd_loss_matches_hand_computation_with_t_squared(temperature):
    student = torch.tensor([[1.0, -0.5, 0.2], [0.3, 0.1, -1.2]])
    teacher = torch.tensor([[2.0, -1.0, 0.0], [-0.5, 0.5, 0.0]])
    expected = hand_kl(student, teacher, temperature)
    assert float(kd_kl_loss(student, teacher, temperature)) == pytest.approx(expected, rel=1e-5)


def test_kd_loss_is_zero_for_identical_logits():
    logits = torch.randn(4, 3)
    assert float(kd_kl_loss(logits, logits.clone(), 2.0)) == pytest.approx(0.0, abs=1e-7)


def test_hidden_mse_ignores_padding_and_follows_layer_map():
    mask = torch.tensor([[1, 1, 0]])
    student = (torch.zeros(1, 3, 2), torch.ones(1, 3, 2))
    teacher = (torch.zeros(1, 3, 2), torch.zeros(1, 3, 2), torch.full((1, 3, 2), 3.0))
    teacher[2][0, 2] = 100.0  # a padding position: must not count
    loss = hidden_mse_loss(student, teacher, mask, [(1, 2)])
    assert float(loss) == pytest.approx(4.0)  # (1 - 3)^2 over the two real tokens


def test_layer_map_maps_last_to_last():
    assert layer_map(3, 6) == [(1, 2), (2, 4), (3, 6)]
    assert layer_map(2, 2) == [(1, 1), (2, 2)]
    assert layer_map(4, 6)[-1] == (4, 6)


def test_combined_loss_weights_each_part():
    labels = torch.tensor([0, 2])
    student = SimpleNamespace(logits=torch.tensor([[1.0, 0.0, -1.0], [0.2, 0.1, 0.3]]), hidden_states=(torch.zeros(2, 2, 2), torch.ones(2, 2, 2)))
    teacher = SimpleNamespace(logits=torch.tensor([[0.5, 0.5, 0.0], [0.0, 0.0, 1.0]]), hidden_states=(torch.zeros(2, 2, 2), torch.zeros(2, 2, 2)))
    mask = torch.ones(2, 2)
    loss = DistillationLoss(0.2, 0.5, 0.3, 2.0, mapping=[(1, 1)])
    total, parts = loss(student, teacher, labels, mask)
    ce = float(torch.nn.functional.cross_entropy(student.logits, labels))
    expected = 0.2 * ce + 0.5 * hand_kl(student.logits, teacher.logits, 2.0) + 0.3 * 1.0
    assert float(total) == pytest.approx(expected, rel=1e-5)
    assert set(parts) == {"ce", "kd", "hidden"}


def test_student_copies_every_other_teacher_layer():
    teacher = tiny_model(tiny_bert_config(layers=4))
    student, copied = build_student_from_teacher(teacher, 2)
    assert copied == [0, 2] == teacher_layers_for_student(4, 2)
    teacher_layers, student_layers = layer_views(teacher), layer_views(student)
    for s_index, t_index in enumerate(copied):
        for (name, s_param), (_, t_param) in zip(student_layers[s_index].module.named_parameters(), teacher_layers[t_index].module.named_parameters()):
            assert torch.equal(s_param, t_param), name
    assert torch.equal(student.bert.embeddings.word_embeddings.weight, teacher.bert.embeddings.word_embeddings.weight)
    assert torch.equal(student.classifier.weight, teacher.classifier.weight)
    assert student.config.num_hidden_layers == 2


def test_distilbert_student_and_bad_layer_count():
    teacher = tiny_model(tiny_distilbert_config(layers=6))
    student, copied = build_student_from_teacher(teacher, 3)
    assert copied == [0, 2, 4] and student.config.n_layers == 3
    with pytest.raises(ValueError, match="student_num_layers=7 must be between 1 and the teacher's 6"):
        build_student_from_teacher(teacher, 7)


def relation_inputs(model, batch):
    from common.distillation import ProjectionCapture

    capture = ProjectionCapture(model)
    output = model(**batch)
    capture.remove()
    return capture.states(), output


def test_attention_relation_loss_is_zero_for_identical_models():
    from common.distillation import attention_relation_loss

    model = tiny_model(tiny_bert_config())
    batch = {"input_ids": torch.randint(5, 30, (2, 7)), "attention_mask": torch.tensor([[1] * 7, [1] * 4 + [0] * 3])}
    with torch.no_grad():
        states, _ = relation_inputs(model, batch)
    assert float(attention_relation_loss(states, [s.clone() for s in states], batch["attention_mask"], 4)) == pytest.approx(0.0, abs=1e-6)


def test_attention_relation_loss_between_a_12_head_teacher_and_a_pruned_4_head_student():
    from common.config import PruningConfig
    from common.distillation import attention_relation_loss, kd_step
    from common.pruning import StructuralPruner

    teacher = tiny_model(tiny_bert_config(heads=12, hidden=48, ffn=64))
    student = tiny_model(tiny_bert_config(heads=12, hidden=48, ffn=64))
    torch.manual_seed(1)
    with torch.no_grad():
        for parameter in student.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    pruner = StructuralPruner(student, PruningConfig(importance_mode="l2", enable_multi_granularity=False, final_sparsity=2 / 3))
    pruner.compute_importance_and_prune(2 / 3)
    pruner.prune_physically()
    assert layer_views(student)[-1].num_heads == 4
    batch = {"input_ids": torch.randint(5, 30, (3, 9)), "attention_mask": torch.tensor([[1] * 9, [1] * 6 + [0] * 3, [1] * 9])}
    with torch.no_grad():
        teacher_states, _ = relation_inputs(teacher, batch)
    student_states, _ = relation_inputs(student, batch)
    assert student_states[0].shape[-1] == 16 and teacher_states[0].shape[-1] == 48  # 4 x 4 vs 12 x 4 dims
    loss = attention_relation_loss(student_states, teacher_states, batch["attention_mask"], relation_heads=12)
    assert torch.isfinite(loss) and float(loss) > 0
    loss.backward()
    assert layer_views(student)[-1].get("query").weight.grad.abs().sum() > 0
    # the same loss through the training path (DistillationLoss via kd_step's hooks)
    student.zero_grad()
    step = kd_step(teacher, DistillationLoss(0.0, 0.0, 0.0, 2.0, weight_attention=1.0, relation_heads=12))
    total, parts = step(student, {**batch, "labels": torch.tensor([0, 1, 0])})
    assert parts["attention"] == pytest.approx(float(loss), rel=1e-5) and float(total) == pytest.approx(float(loss), rel=1e-5)


def test_projector_hidden_loss_trains_between_different_widths(tokenizer):
    from common.config import StudentConfig
    from common.data import make_loader, tokenize_dataset
    from common.distillation import hidden_projector_for, kd_step
    from common.training import make_accelerator, train

    teacher = tiny_model(tiny_bert_config(hidden=48, heads=4))
    student = tiny_model(tiny_bert_config(hidden=32, heads=4))
    assert hidden_projector_for(student, teacher, weight_hidden=0.0) is None
    assert hidden_projector_for(teacher, teacher, weight_hidden=1.0) is None
    projector = hidden_projector_for(student, teacher, weight_hidden=1.0)
    loss = DistillationLoss(0.0, 0.0, 1.0, 2.0, mapping=layer_map(2, 2), projector=projector)
    with pytest.raises(ValueError, match="pass a HiddenProjector"):
        DistillationLoss(0.0, 0.0, 1.0, 2.0, mapping=layer_map(2, 2))(
            student(**batch_for(tokenizer), output_hidden_states=True), teacher(**batch_for(tokenizer), output_hidden_states=True),
            torch.tensor([0, 1, 0]), batch_for(tokenizer)["attention_mask"])
    data = tiny_data(["great film", "dull plot", "fun story", "boring actor"] * 4, ["great plot", "dull film"])
    train_loader = make_loader(tokenize_dataset(data.train, tokenizer, 16), tokenizer, 8, shuffle=True)
    eval_loader = make_loader(tokenize_dataset(data.validation, tokenizer, 16), tokenizer, 8, shuffle=False)
    before = projector.linear.weight.detach().clone()
    config = StudentConfig(num_epochs=1, learning_rate=1e-2)
    result = train(student, train_loader, eval_loader, config, kd_step(teacher, loss), make_accelerator(config), extras=loss.extras)
    assert result.history[0]["train_loss"] > 0
    assert not torch.equal(projector.linear.weight, before), "the projector is trained"
    assert not any(name.startswith("linear") for name in result.best_state), "the projector is not part of the student"


# -- distillation on unlabelled texts (--unlabeled_dataset) ---------------------------------------------------------


def test_cross_entropy_skips_unlabelled_rows_and_a_batch_of_them_learns_from_the_teacher_alone():
    from common.data import UNLABELED

    student = SimpleNamespace(logits=torch.tensor([[1.0, 0.0], [0.2, 0.4], [-0.3, 0.9]]))
    teacher = SimpleNamespace(logits=torch.tensor([[0.5, 0.5], [0.0, 1.0], [1.0, 0.0]]))
    loss = DistillationLoss(0.5, 0.5, 0.0, 2.0)
    mixed = torch.tensor([0, UNLABELED, 1])
    total, parts = loss(student, teacher, mixed, torch.ones(3, 2))
    ce = float(torch.nn.functional.cross_entropy(student.logits[[0, 2]], torch.tensor([0, 1])))
    assert parts["ce"] == pytest.approx(ce, rel=1e-6)
    assert float(total) == pytest.approx(0.5 * ce + 0.5 * hand_kl(student.logits, teacher.logits, 2.0), rel=1e-5)
    total, parts = loss(student, teacher, torch.full((3,), UNLABELED), torch.ones(3, 2))
    assert "ce" not in parts and math.isfinite(float(total))
    assert float(total) == pytest.approx(0.5 * hand_kl(student.logits, teacher.logits, 2.0), rel=1e-5)


def test_unlabelled_rows_come_from_the_training_rest_or_a_file_never_from_validation_or_test(tmp_path):
    import csv
    from dataclasses import replace

    from common.config import DataConfig
    from common.data import UNLABELED, load_splits, load_unlabeled, with_unlabeled
    from conftest import write_reviews_csv

    path = write_reviews_csv(tmp_path / "reviews.csv", rows=200)
    config = DataConfig(dataset=str(path), text_column="review", label_column="sentiment", max_train_samples=50)
    data = load_splits(config)
    rest = load_unlabeled("train_rest", data, config)
    judged = set(data.validation["text"]) | set(data.test["text"])
    assert sorted(rest["text"]) == sorted(t for t in data.train_rest["text"] if t not in judged) and len(rest) > 100
    assert set(rest["label"]) == {UNLABELED} and len(data.train) == 50
    assert len(load_unlabeled("train_rest", data, config, limit=7)) == 7
    combined = with_unlabeled(data, rest)
    assert len(combined.train) == len(data.train) + len(rest) and combined.validation is data.validation

    extra = tmp_path / "unlabelled.csv"  # a file of texts: two of them are validation and test texts
    with open(extra, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["review"])
        for text in ["an unseen review of a film", "another new text", data.validation["text"][0], data.test["text"][0], ""]:
            writer.writerow([text])
    from_file = load_unlabeled(str(extra), data, config)
    assert sorted(from_file["text"]) == ["an unseen review of a film", "another new text"]

    with pytest.raises(ValueError, match="--max_train_samples is not set"):
        load_unlabeled("train_rest", load_splits(replace(config, max_train_samples=None)), config)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_unlabeled(str(tmp_path / "missing.csv"), data, config)
    with open(tmp_path / "judged.csv", "w", newline="") as handle:
        csv.writer(handle).writerows([["review"], [data.validation["text"][1]]])
    with pytest.raises(ValueError, match="no rows left to distil on"):
        load_unlabeled(str(tmp_path / "judged.csv"), data, config)


def test_a_perturbed_copy_is_a_span_a_deletion_or_a_swap_of_its_text_and_the_same_for_the_same_seed():
    import random
    from collections import Counter

    from common.augmentation import perturb_words, perturbed_copies

    texts = [" ".join(f"w{i}_{j}" for j in range(5 + i % 7)) for i in range(300)] + ["too short", "one two three"]
    copies = perturbed_copies(texts, seed=3)
    assert copies == perturbed_copies(texts, seed=3) and copies != perturbed_copies(texts, seed=4)
    assert "too short" not in copies and all(copy not in texts for copy in copies) and len(copies) >= 290
    kinds = Counter()
    for copy in copies:
        words = copy.split()
        source = texts[int(words[0].split("_")[0][1:])].split()  # every word names the text it came from
        assert all(word in source for word in words) and len(words) >= 3
        joined = " ".join(source)
        if copy in joined:
            kinds["span"] += 1
        elif sorted(words) == sorted(source):
            kinds["swap"] += 1
        else:
            assert [word for word in source if word in words] == words  # deletions keep the order of the rest
            kinds["deletion"] += 1
    assert min(kinds.values()) > 30 and len(kinds) == 3, kinds
    assert perturb_words("a b c", random.Random(0)) is None

    pairs = perturbed_copies([("a b c d e f", "g h i j k l"), ("short", "pair")], seed=0)
    assert len(pairs) == 1 and pairs[0] != ("a b c d e f", "g h i j k l")


def test_perturbed_training_texts_distil_without_labels_and_never_as_a_judged_text(tmp_path):
    from common.config import DataConfig, StudentConfig
    from common.data import UNLABELED, load_splits, load_unlabeled, with_unlabeled
    from conftest import write_reviews_csv

    config = DataConfig(dataset=str(write_reviews_csv(tmp_path / "reviews.csv", rows=200)), text_column="review",
                        label_column="sentiment")
    data = load_splits(config)
    perturbed = load_unlabeled("train_perturbed", data, config)
    assert set(perturbed["label"]) == {UNLABELED} and len(data.train) * 0.8 < len(perturbed) <= len(data.train)
    judged = set(data.validation["text"]) | set(data.test["text"])
    assert not set(perturbed["text"]) & (judged | set(data.train["text"]))
    assert perturbed["text"] == load_unlabeled("train_perturbed", data, config)["text"]
    assert len(with_unlabeled(data, perturbed).train) == len(data.train) + len(perturbed)
    assert StudentConfig(unlabeled_dataset="train_perturbed").unlabeled_dataset == "train_perturbed"

    short = tmp_path / "short.csv"  # no text of four words or more: nothing to perturb, refused with the way out
    short.write_text("text,label\n" + "".join(f"good film {i},1\nbad plot {i},0\n" for i in range(100)))
    short_config = DataConfig(dataset=str(short))
    with pytest.raises(ValueError, match=r"none of the \d+ training texts .* has 4 words or more.*file of unlabelled"):
        load_unlabeled("train_perturbed", load_splits(short_config), short_config)


@pytest.mark.parametrize("fields, message", [
    ({"unlabeled_dataset": " "}, "unlabeled_dataset is empty"),
    ({"unlabeled_dataset": "train_rest", "alpha_kd": 0.0, "alpha_hidden": 0.0, "alpha_attention": 0.0, "alpha_ce": 1.0},
     "teaches only through distillation"),
    ({"max_unlabeled_samples": 0}, "max_unlabeled_samples"),
])
def test_unlabelled_settings_that_cannot_work_are_refused(fields, message):
    from common.config import PruningConfig, QATKDConfig, StudentConfig

    for config_type in (StudentConfig, PruningConfig, QATKDConfig):
        with pytest.raises(ValueError, match=message):
            config_type(**fields)


def test_importance_keeps_the_teacher_layers_that_matter_and_drops_one_that_does_nothing(tokenizer):
    from common.pruning import layer_skip_importance, most_important_layers

    teacher = tiny_model(tiny_bert_config(layers=4, hidden=32, heads=4, ffn=64))
    with torch.no_grad():  # layer 2 adds nothing to the residual stream: LayerNorm of a normalized input is itself
        for part in (teacher.bert.encoder.layer[2].attention.output.dense, teacher.bert.encoder.layer[2].output.dense):
            part.weight.zero_()
            part.bias.zero_()
        teacher.classifier.weight.mul_(300.0)  # confident predictions, so the layers' effects show in the KL
    batch = dict(batch_for(tokenizer, ("great film and fun story", "dull boring plot", "the actor was charming")))
    batch["labels"] = torch.tensor([1, 0, 1])
    scores = layer_skip_importance(teacher, [batch, batch], batches=2)
    assert len(scores) == 4 and abs(scores[2]) < 0.01 * min(scores[i] for i in (0, 1, 3))
    chosen = most_important_layers(scores, 3)
    assert chosen == [0, 1, 3]
    student, copied = build_student_from_teacher(teacher, 3, chosen)
    assert copied == [0, 1, 3]
    assert torch.equal(student.bert.encoder.layer[2].output.dense.weight, teacher.bert.encoder.layer[3].output.dense.weight)
    with pytest.raises(ValueError, match="between 1 and the teacher's 4 layers"):
        most_important_layers(scores, 5)
    with pytest.raises(ValueError, match="distinct layers in increasing order"):
        build_student_from_teacher(teacher, 3, [3, 1, 0])
