import json
import math

import pytest
import torch
from transformers import BertConfig

from common.config import PruningConfig
from common.models import layer_views, load_model, save_checkpoint
from common.pruning import StructuralPruner, polynomial_sparsity
from conftest import batch_for, tiny_bert_config, tiny_data, tiny_distilbert_config, tiny_model


def pruning_config(**overrides):
    values = dict(pruning_window_steps=3, min_heads_per_layer=1, head_final_sparsity=0.5, ffn_final_sparsity=0.5)
    values.update(overrides)
    return PruningConfig(**values)


def plant_weak_head(model, layer=0, head=1, scale=1e-3):
    view = layer_views(model)[layer]
    size = view.head_size
    rows = slice(head * size, (head + 1) * size)
    with torch.no_grad():
        for part in ("query", "key", "value"):
            view.get(part).weight[rows] *= scale
            view.get(part).bias[rows] *= scale
        view.get("attn_output").weight[:, rows] *= scale


def backward_once(model, tokenizer):
    batch = batch_for(tokenizer)
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    torch.nn.functional.cross_entropy(logits, torch.tensor([1, 0, 1])).backward()


def test_group_counts_bert_and_distilbert():
    minilm_shape = BertConfig(vocab_size=50, hidden_size=384, num_hidden_layers=6, num_attention_heads=12, intermediate_size=1536)
    pruner = StructuralPruner(tiny_model(minilm_shape), pruning_config())
    assert len(pruner.head_groups) == 72
    assert len(pruner.ffn_groups) == 9216
    distil = StructuralPruner(tiny_model(tiny_distilbert_config(layers=3, heads=4, ffn=48)), pruning_config())
    assert (len(distil.head_groups), len(distil.ffn_groups)) == (12, 144)
    assert {g.layer for g in distil.head_groups} == {0, 1, 2}


def test_unsupported_architecture_is_named():
    from transformers import GPT2Config, GPT2ForSequenceClassification

    model = GPT2ForSequenceClassification(GPT2Config(n_layer=1, n_head=2, n_embd=8, vocab_size=20))
    with pytest.raises(ValueError, match="not supported.*bert, distilbert"):
        StructuralPruner(model, pruning_config())


@pytest.mark.parametrize("mode", ["l2", "kd_grad", "l2+kd_grad"])
def test_each_importance_mode_ranks_planted_weak_head_last(mode, tokenizer):
    model = tiny_model(tiny_bert_config())
    plant_weak_head(model, layer=0, head=1)
    pruner = StructuralPruner(model, pruning_config(importance_mode=mode))
    for _ in range(3):
        model.zero_grad()
        backward_once(model, tokenizer)
        pruner.accumulate_importance_scores()
    heads = pruner.importance()["head"]
    weakest = pruner.head_groups[int(torch.argmin(heads))]
    assert (weakest.layer, weakest.index) == (0, 1)


def test_sliding_window_averages_exactly_last_n_steps():
    model = tiny_model(tiny_bert_config())
    pruner = StructuralPruner(model, pruning_config(importance_mode="kd_grad", pruning_window_steps=3))
    scales = [1.0, 2.0, 4.0, 8.0, 16.0]
    for scale in scales:
        for parameter in model.parameters():
            parameter.grad = torch.full_like(parameter, scale)
        pruner.accumulate_importance_scores()
    for parameter in model.parameters():
        parameter.grad = torch.ones_like(parameter)
    unit = pruner.grad_importance(pruner.views)
    expected = sum(scales[-3:]) / 3
    windowed = pruner.windowed_grad_importance()
    for kind in ("head", "ffn"):
        torch.testing.assert_close(windowed[kind], unit[kind] * expected)


def test_polynomial_schedule_start_middle_end():
    assert polynomial_sparsity(5, 0.0, 0.8, start_step=10, end_step=110) == 0.0
    assert polynomial_sparsity(10, 0.1, 0.8, 10, 110) == pytest.approx(0.1)
    assert polynomial_sparsity(60, 0.0, 0.8, 10, 110) == pytest.approx(0.8 - 0.8 * 0.5**3)
    assert polynomial_sparsity(110, 0.0, 0.8, 10, 110) == pytest.approx(0.8)
    assert polynomial_sparsity(500, 0.0, 0.8, 10, 110) == pytest.approx(0.8)


def test_uniform_reaches_target_in_every_layer():
    model = tiny_model(tiny_bert_config(layers=3, heads=4, ffn=40))
    pruner = StructuralPruner(model, pruning_config(enable_multi_granularity=False, final_sparsity=0.5, importance_mode="l2"))
    pruner.compute_importance_and_prune(0.5)
    assert pruner.kept_per_layer("head") == [2, 2, 2]
    assert pruner.kept_per_layer("ffn") == [20, 20, 20]
    assert pruner.reached_final


def test_multi_granularity_reaches_separate_targets_globally():
    model = tiny_model(tiny_bert_config(layers=3, heads=4, ffn=40))
    plant_weak_head(model, layer=2, head=0)
    plant_weak_head(model, layer=2, head=3)
    config = pruning_config(enable_multi_granularity=True, head_final_sparsity=0.25, ffn_final_sparsity=0.75, importance_mode="l2")
    pruner = StructuralPruner(model, config)
    pruner.compute_importance_and_prune(0.25, 0.75)
    assert sum(pruner.kept_per_layer("head")) == 12 - 3
    assert sum(pruner.kept_per_layer("ffn")) == 120 - 90
    assert not pruner.layer_mask("head", 2)[0] and not pruner.layer_mask("head", 2)[3]
    assert pruner.achieved_sparsity()["head_sparsity"] == pytest.approx(0.25)


def test_masks_are_monotone():
    model = tiny_model(tiny_bert_config(layers=2, heads=4, ffn=40))
    pruner = StructuralPruner(model, pruning_config(importance_mode="l2", head_final_sparsity=0.75, ffn_final_sparsity=0.75))
    pruner.compute_importance_and_prune(0.25, 0.25)
    first = pruner.head_mask.clone(), pruner.ffn_mask.clone()
    with torch.no_grad():  # make the pruned structures look important now; they must stay pruned
        for parameter in model.bert.encoder.parameters():
            parameter.add_(torch.randn_like(parameter))
    pruner.compute_importance_and_prune(0.5, 0.5)
    assert not (pruner.head_mask & ~first[0]).any()
    assert not (pruner.ffn_mask & ~first[1]).any()


def test_min_heads_per_layer_holds():
    model = tiny_model(tiny_bert_config(layers=2, heads=4))
    for head in range(4):
        plant_weak_head(model, layer=0, head=head)
    config = pruning_config(importance_mode="l2", head_final_sparsity=0.5, min_heads_per_layer=1,
                            importance_normalization="global")  # weak heads in one layer: the floor decides
    pruner = StructuralPruner(model, config)
    pruner.compute_importance_and_prune(0.5, 0.0)
    assert pruner.kept_per_layer("head") == [1, 3]


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(enable_multi_granularity=True, head_final_sparsity=0.9, min_heads_per_layer=1), "head_final_sparsity=0.9"),
        (dict(enable_multi_granularity=False, final_sparsity=0.9, min_heads_per_layer=2), "final_sparsity=0.9"),
        (dict(min_heads_per_layer=5), "min_heads_per_layer=5"),
    ],
)
def test_impossible_targets_raise_before_training(overrides, message):
    model = tiny_model(tiny_bert_config(layers=2, heads=4))
    with pytest.raises(ValueError, match=message):
        StructuralPruner(model, pruning_config(**overrides))


@pytest.mark.parametrize("config_fn", [tiny_bert_config, tiny_distilbert_config])
def test_masked_equals_physically_pruned_equals_reloaded(config_fn, tokenizer, results_dir):
    model = tiny_model(config_fn(layers=2, heads=4, ffn=48))
    config = pruning_config(importance_mode="l2", head_final_sparsity=0.5, ffn_final_sparsity=0.6)
    pruner = StructuralPruner(model, config)
    pruner.compute_importance_and_prune(0.5, 0.6)
    batch = batch_for(tokenizer)
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    with torch.no_grad():
        masked = model(**inputs).logits
    parameters_before = sum(p.numel() for p in model.parameters())
    architecture = pruner.prune_physically()
    assert architecture["heads_per_layer"] == [2, 2]
    assert sum(architecture["ffn_width_per_layer"]) == 96 - math.floor(0.6 * 96)
    assert sum(p.numel() for p in model.parameters()) < parameters_before
    with torch.no_grad():
        physical = model(**inputs).logits
    torch.testing.assert_close(physical, masked, atol=1e-5, rtol=0)
    folder = save_checkpoint("pruned", model, tokenizer, {"label_names": ["negative", "positive"]})
    reloaded = load_model(folder)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**inputs).logits, masked, atol=1e-5, rtol=0)


def test_schedule_step_prunes_on_frequency_and_finalize_reaches_target(tokenizer):
    model = tiny_model(tiny_bert_config(layers=2, heads=4, ffn=40))
    config = pruning_config(
        importance_mode="l2+kd_grad", head_final_sparsity=0.5, ffn_final_sparsity=0.5,
        pruning_start_fraction=0.0, pruning_end_fraction=0.5, pruning_frequency_steps=2, pruning_window_steps=2,
    )
    pruner = StructuralPruner(model, config)
    pruner.set_schedule(total_steps=12)
    pruned_at = []
    for step in range(1, 13):
        model.zero_grad()
        backward_once(model, tokenizer)
        pruner.accumulate_importance_scores()
        if pruner.step(step):
            pruned_at.append(step)
    assert pruned_at and all(step % 2 == 0 for step in pruned_at)
    assert pruner.reached_final
    pruner.finalize()
    assert pruner.achieved_sparsity() == {"head_sparsity": 0.5, "ffn_sparsity": 0.5}


@pytest.mark.parametrize("multi_granularity", [True, False])
def test_ffn_round_to_keeps_widths_multiples_of_eight(multi_granularity):
    model = tiny_model(tiny_bert_config(layers=3, ffn=100))
    config = pruning_config(importance_mode="l2", ffn_round_to=8, enable_multi_granularity=multi_granularity,
                            ffn_final_sparsity=0.55, final_sparsity=0.55)
    pruner = StructuralPruner(model, config)
    for sparsity in (0.2, 0.4, 0.55):  # every scheduled step keeps the widths aligned, and masks stay monotone
        before = pruner.ffn_mask.clone()
        pruner.compute_importance_and_prune(0.25 if multi_granularity else sparsity, sparsity)
        assert not (pruner.ffn_mask & ~before).any()
        assert all(width % 8 == 0 for width in pruner.kept_per_layer("ffn")), pruner.kept_per_layer("ffn")
    assert pruner.achieved_sparsity()["ffn_sparsity"] >= 0.55
    record = pruner.prune_physically()
    assert all(width % 8 == 0 and width >= 8 for width in record["ffn_width_per_layer"])


def test_ffn_round_to_larger_than_a_layer_is_refused():
    with pytest.raises(ValueError, match="ffn_round_to=128 exceeds the 64 FFN neurons"):
        StructuralPruner(tiny_model(tiny_bert_config()), pruning_config(ffn_round_to=128))


def test_sensitivity_finds_a_planted_weak_layer_and_recommends_pruning_it_most(tokenizer):
    """Layer 1's FFN output is scaled down 1000x, so its neurons barely matter: pruning them must cost (almost)
    nothing while the other layers' neurons cost something, and the recommendation must cut layer 1 the deepest."""
    from common.data import make_loader, tokenize_dataset
    from common.sensitivity import measure_sensitivity, recommend_targets

    data = tiny_data(["great film", "dull plot", "fun story", "boring actor"] * 6, ["great plot", "dull film", "fun actor"])
    train_loader = make_loader(tokenize_dataset(data.train, tokenizer, 16), tokenizer, 8, shuffle=True)
    model = tiny_model(tiny_bert_config(layers=3, heads=4, ffn=64))
    with torch.no_grad():
        for view in layer_views(model):  # a trained model's FFNs matter; the tiny random ones barely do
            view.get("ffn_out").weight.mul_(30.0)
        layer_views(model)[1].get("ffn_out").weight.mul_(1e-3)
    batch = {key: value for key, value in batch_for(tokenizer).items() if key != "token_type_ids"}
    with torch.no_grad():
        reference = model(**batch).logits.clone()

    def fidelity(m):  # a smooth stand-in for accuracy: 1 - mean |logit change| against the unpruned model
        with torch.no_grad():
            return 1.0 - float((m(**batch).logits - reference).abs().mean())

    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    sparsities = [0.25, 0.5, 0.75]
    table = measure_sensitivity(model, pruning_config(), train_loader, fidelity, sparsities, gradient_batches=2)
    assert all(torch.equal(before[name], tensor) for name, tensor in model.state_dict().items()), "weights restored"
    ffn_drops = table["accuracy_drop_points"]["ffn"]
    assert len(ffn_drops) == 3 and all(len(row) == len(sparsities) for row in ffn_drops)
    for column in range(len(sparsities)):
        weak, others = ffn_drops[1][column], [ffn_drops[0][column], ffn_drops[2][column]]
        assert abs(weak) < 0.01 * min(others), (column, ffn_drops)
    assert "per_layer normalization" in table["score"]  # ranked as stage 8 ranks by default
    targets = recommend_targets(table, parameter_budget=0.3)
    assert targets["ffn_width_per_layer"][1] == min(targets["ffn_width_per_layer"]) < 64
    per_group = table["parameters_per_group"]
    removed = (per_group["head"] * (12 - sum(targets["heads_per_layer"])) + per_group["ffn"] * (192 - sum(targets["ffn_width_per_layer"])))
    assert removed >= 0.3 * (per_group["head"] * 12 + per_group["ffn"] * 192)
    assert all(1 <= heads <= 4 for heads in targets["heads_per_layer"]) and all(1 <= w <= 64 for w in targets["ffn_width_per_layer"])
    with pytest.raises(ValueError, match="parameter_budget=0.99 cannot be met"):
        recommend_targets(table, parameter_budget=0.99)


def test_layer_targets_prune_each_layer_to_its_own_count(tmp_path):
    targets = tmp_path / "targets.json"
    targets.write_text(json.dumps({"heads_per_layer": [4, 2, 1], "ffn_width_per_layer": [64, 20, 8]}))
    model = tiny_model(tiny_bert_config(layers=3))
    pruner = StructuralPruner(model, pruning_config(importance_mode="l2", layer_targets=str(targets)))
    assert pruner.final_sparsity("head") == pytest.approx(5 / 12)
    pruner.set_schedule(100)
    halfway = pruner.sparsity_at(40)
    pruner.compute_importance_and_prune(halfway["head"], halfway["ffn"])
    partial = pruner.kept_per_layer("ffn")
    assert partial[0] == 64 and 20 < partial[1] < 64 and 8 < partial[2] < 64  # part of the way, layer 0 untouched
    pruner.finalize()
    assert pruner.kept_per_layer("head") == [4, 2, 1] and pruner.kept_per_layer("ffn") == [64, 20, 8]
    assert pruner.reached_final
    record = pruner.prune_physically()
    assert record["heads_per_layer"] == [4, 2, 1] and record["ffn_width_per_layer"] == [64, 20, 8]


@pytest.mark.parametrize("content, message", [
    ({"heads_per_layer": [4, 2], "ffn_width_per_layer": [64, 20]}, "has 2 entries in heads_per_layer but the model has 3 layers"),
    ({"heads_per_layer": [4, 2, 9], "ffn_width_per_layer": [64, 20, 8]}, r"heads_per_layer\[2\]=9 exceeds the layer's 4"),
    ({"heads_per_layer": [4, 2, 1]}, "needs 'ffn_width_per_layer': a list of positive integers"),
    ({"heads_per_layer": [4, 0, 1], "ffn_width_per_layer": [64, 20, 8]}, "needs 'heads_per_layer': a list of positive integers"),
])
def test_bad_layer_targets_are_named(tmp_path, content, message):
    targets = tmp_path / "targets.json"
    targets.write_text(json.dumps(content))
    with pytest.raises(ValueError, match=message):
        StructuralPruner(tiny_model(tiny_bert_config(layers=3)), pruning_config(layer_targets=str(targets)))


def test_a_schedule_passed_in_decides_when_the_pruner_prunes():
    from common.pruning import PolynomialSchedule

    model = tiny_model(tiny_bert_config())
    every_third = PolynomialSchedule(start_fraction=0.0, end_fraction=0.5, frequency=3, power=1.0)
    pruner = StructuralPruner(model, pruning_config(importance_mode="l2"), schedule=every_third)
    pruner.set_schedule(12)  # sparsity rises linearly over steps 0..6, pruning at 0, 3, 6
    pruned_at = [step for step in range(12) if pruner.step(step)]
    assert pruned_at == [0, 3, 6] and pruner.reached_final
    assert pruner.sparsity_at(3)["head"] == pytest.approx(0.25)


@pytest.mark.parametrize("normalization, emptied", [("global", True), ("per_layer", False)])
def test_per_layer_normalization_keeps_a_small_scaled_layer_from_being_emptied(normalization, emptied):
    model = tiny_model(tiny_bert_config(layers=3, heads=4, ffn=64))
    with torch.no_grad():  # the last layer's weights are 10x smaller: a global ranking sees only its scale
        for parameter in layer_views(model)[2].module.parameters():
            parameter.mul_(0.1)
    config = pruning_config(importance_mode="l2", importance_normalization=normalization, head_final_sparsity=0.25,
                            ffn_final_sparsity=0.25)
    pruner = StructuralPruner(model, config)
    pruner.compute_importance_and_prune(0.25, 0.25)
    heads, widths = pruner.kept_per_layer("head"), pruner.kept_per_layer("ffn")
    assert sum(heads) == 9 and sum(widths) == 144
    if emptied:
        assert heads[2] == 1 and widths[2] <= 16
    else:
        assert heads[2] >= 2 and widths[2] >= 32


def test_unknown_importance_normalization_is_named():
    with pytest.raises(ValueError, match="importance_normalization='layerwise'"):
        pruning_config(importance_normalization="layerwise")


# -- presets -----------------------------------------------------------------------------------------------------

ORIGINAL_FLAGS = ["--importance_mode", "l2", "--enable_multi_granularity", "false", "--importance_normalization", "global",
                  "--alpha_attention", "0"]


def test_original_preset_equals_the_explicit_flags_and_yields_to_flags_the_user_sets(tmp_path):
    import dataclasses

    from common.config import DataConfig, parse_config

    _, preset = parse_config(DataConfig, PruningConfig, args=["--preset", "original"])
    _, explicit = parse_config(DataConfig, PruningConfig, args=ORIGINAL_FLAGS)
    assert {**dataclasses.asdict(preset), "preset": "none"} == dataclasses.asdict(explicit)
    assert dataclasses.asdict(PruningConfig.from_preset("original")) == dataclasses.asdict(preset)
    _, mixed = parse_config(DataConfig, PruningConfig, args=["--preset", "original", "--alpha_attention", "0.5"])
    assert mixed.alpha_attention == 0.5 and mixed.importance_mode == "l2"
    path = tmp_path / "run.json"
    path.write_text(json.dumps({"preset": "original", "importance_mode": "kd_grad"}))
    _, from_file = parse_config(DataConfig, PruningConfig, args=["--config", str(path)])
    assert from_file.importance_mode == "kd_grad" and not from_file.enable_multi_granularity
    with pytest.raises(ValueError, match="preset='orignal' is not supported; allowed values: 'none', 'original'"):
        PruningConfig(preset="orignal")


def test_original_preset_trains_identically_to_the_explicit_flags(tokenizer):
    """Stage 8's loop (distillation, pruner hooks) on a tiny model: the preset and the flags give the same masks,
    the same history and the same weights."""
    from common.config import DataConfig, parse_config
    from common.data import make_loader, tokenize_dataset
    from common.distillation import distillation_for
    from common.training import make_accelerator, optimizer_steps_per_epoch, train

    data = tiny_data(["great film", "dull plot", "fun story", "boring actor"] * 8, ["great plot", "dull film"])
    settings = ["--num_epochs", "2", "--learning_rate", "1e-3", "--pruning_window_steps", "2", "--pruning_frequency_steps", "2",
                "--pruning_start_fraction", "0", "--batch_size", "8"]

    class Hooks:
        def __init__(self, pruner):
            self.pruner = pruner

        def after_backward(self, step):
            self.pruner.accumulate_importance_scores()

        def after_optimizer_step(self, step):
            self.pruner.step(step)

    def run(args):
        _, config = parse_config(DataConfig, PruningConfig, args=args + settings)
        torch.manual_seed(0)
        teacher, student = tiny_model(tiny_bert_config(layers=2)), tiny_model(tiny_bert_config(layers=2))
        train_loader = make_loader(tokenize_dataset(data.train, tokenizer, 16), tokenizer, 8, shuffle=True, seed=0)
        eval_loader = make_loader(tokenize_dataset(data.validation, tokenizer, 16), tokenizer, 8, shuffle=False)
        pruner = StructuralPruner(student, config)
        pruner.set_schedule(optimizer_steps_per_epoch(len(train_loader), 1, 1) * config.num_epochs)
        loss, compute_loss = distillation_for(config, student, teacher)
        result = train(student, train_loader, eval_loader, config, compute_loss, make_accelerator(config),
                       hooks=Hooks(pruner), keep="last", extras=loss.extras)
        return pruner, result

    (pruner_a, result_a), (pruner_b, result_b) = run(["--preset", "original"]), run(ORIGINAL_FLAGS)
    assert pruner_a.history == pruner_b.history and pruner_a.history, "it pruned, the same way"
    assert torch.equal(pruner_a.head_mask, pruner_b.head_mask) and torch.equal(pruner_a.ffn_mask, pruner_b.ffn_mask)
    assert pruner_a.kept_per_layer("head") == [2, 2]  # uniform: every layer loses the same share
    assert result_a.history == result_b.history
    assert all(torch.equal(result_a.best_state[name], result_b.best_state[name]) for name in result_a.best_state)


def test_a_new_importance_criterion_is_one_class_and_one_table_entry(monkeypatch):
    """A criterion added to the table (a test double that declares head 3 of layer 1 and the last neuron of layer 0
    the least important) is scored, normalized and ranked by the pruner with no change to it."""
    from common.pruning import CRITERIA, Importance, KGSPScorer

    class Planted(Importance):
        def __call__(self, views):
            heads = torch.ones(sum(view.num_heads for view in views))
            heads[views[0].num_heads + 3] = 0.0
            neurons = torch.ones(sum(view.ffn_width for view in views))
            neurons[views[0].ffn_width - 1] = 0.0
            return {"head": heads, "ffn": neurons}

    monkeypatch.setitem(CRITERIA, "planted", Planted)
    model = tiny_model(tiny_bert_config())
    pruner = StructuralPruner(model, pruning_config(head_final_sparsity=0.125, ffn_final_sparsity=1 / 128),
                              scorer=KGSPScorer({"planted": 1.0}, "per_layer"))
    assert not pruner.scorer.needs_gradients
    pruner.compute_importance_and_prune(0.125, 1 / 128)
    assert pruner.layer_mask("head", 1).tolist() == [True, True, True, False]
    assert pruner.kept_per_layer("ffn") == [63, 64] and not bool(pruner.layer_mask("ffn", 0)[-1])


def test_layers_to_drop_takes_the_lowest_scored_and_refuses_dropping_every_layer():
    from common.pruning import drop_layers, layers_to_drop

    assert layers_to_drop([0.5, 0.01, 0.3, 0.02], 2) == [1, 3]
    assert layers_to_drop([0.5, 0.01, 0.3, 0.02], 0) == []
    assert layers_to_drop([0.2, 0.2, 0.2], 1) == [2]  # ties: the later layer goes first
    with pytest.raises(ValueError, match="drop_layers=3 must leave at least one of the model's 3 encoder layers: give 0 to 2"):
        layers_to_drop([0.1, 0.2, 0.3], 3)
    model = tiny_model(tiny_bert_config(layers=2))
    with pytest.raises(ValueError, match="Cannot drop layers \\[2\\] of a 2-layer encoder"):
        drop_layers(model, [2])
    with pytest.raises(ValueError, match="keep at least one layer"):
        drop_layers(model, [0, 1])
    assert model.config.num_hidden_layers == 2 and len(model.bert.encoder.layer) == 2  # refusals changed nothing
    assert drop_layers(model, [0]) == [1] and model.config.num_hidden_layers == 1


def test_drop_layers_config_is_checked():
    with pytest.raises(ValueError, match="drop_layers=-1 is out of range"):
        pruning_config(drop_layers=-1)
    with pytest.raises(ValueError, match="layer_importance_batches"):
        pruning_config(drop_layers=1, layer_importance_batches=0)
