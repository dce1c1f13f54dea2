"""Stage 8's --hidden_sparsity: the residual width pruned everywhere it is read or written (tiny models of each
supported architecture), scored by the Fisher information of a mask, and reloaded by the project and stock
transformers unchanged; unsupported models are refused with the fix."""

import pytest
import torch
from common.architecture import layer_views
from common.config import PruningConfig
from common.models import load_model, save_checkpoint
from common.pruning import StructuralPruner
from common.pruning.hidden import dimensions_to_keep, hidden_importance, hidden_width_to_keep, prune_hidden
from conftest import tiny_config, tiny_model

SUPPORTED = ("bert", "roberta", "xlm-roberta", "camembert", "electra")


def hidden_config(model_type):
    config = tiny_config(model_type, hidden=64, heads=4)  # head size 16: 64 -> 32 keeps two heads' worth
    if model_type == "electra":  # electra-base: embeddings as wide as the hidden states
        config.embedding_size = 64
    return config


def batches(config, count=3, seed=0):
    generator = torch.Generator().manual_seed(seed)
    for _ in range(count):
        input_ids = torch.randint(5, config.vocab_size, (4, 10), generator=generator)
        mask = torch.ones_like(input_ids)
        mask[3, 6:] = 0
        yield {"input_ids": input_ids, "attention_mask": mask, "labels": torch.tensor([0, 1, -100, 1])}


def logits(model, batch):
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


def silence_dimensions(model, dimensions):
    """Zero these residual dimensions' LayerNorm weights and biases everywhere: their mask changes nothing."""
    from common.pruning.hidden import _residual_norms

    with torch.no_grad():
        for norm in _residual_norms(model):
            norm.weight[dimensions] = 0.0
            norm.bias[dimensions] = 0.0


@pytest.mark.parametrize("model_type", SUPPORTED)
def test_hidden_pruning_drops_the_unused_dimensions_and_reloads_unchanged(model_type, results_dir):
    from transformers import AutoModelForSequenceClassification

    config = hidden_config(model_type)
    model = tiny_model(config)
    silent = list(range(1, 64, 2))  # every odd dimension
    silence_dimensions(model, silent)
    scores = hidden_importance(model, list(batches(config)), batches=3)
    assert scores.shape == (64,) and torch.all(scores[silent] == 0) and torch.all(scores[0::2] > 0)
    assert hidden_width_to_keep(model, 0.5) == 32
    kept = dimensions_to_keep(scores, 32)
    assert kept == list(range(0, 64, 2))
    batch = next(batches(config, seed=1))
    prune_hidden(model, kept)
    assert model.config.hidden_size == 32 and model.config.num_attention_heads == 2
    assert all(view.head_size == 16 and view.num_heads == 4 for view in layer_views(model))
    pruned = logits(model, batch)
    assert torch.isfinite(pruned).all()
    # heads and neurons still prune afterwards, and the result reloads exactly
    pruner = StructuralPruner(model, PruningConfig(importance_mode="l2", head_final_sparsity=0.5, ffn_final_sparsity=0.5))
    pruner.compute_importance_and_prune(0.5, 0.5)
    pruner.prune_physically()
    pruned = logits(model, batch)
    folder = save_checkpoint("pruned", model, None, {"label_names": ["a", "b"]})
    torch.testing.assert_close(logits(load_model(folder), batch), pruned, atol=0, rtol=0)
    stock = AutoModelForSequenceClassification.from_pretrained(folder, trust_remote_code=True).eval()
    torch.testing.assert_close(logits(stock, batch), pruned, atol=0, rtol=0)


def test_hidden_pruning_removes_exactly_the_dimensions_the_model_does_not_use():
    """Dimensions whose LayerNorm outputs are zero and whose pooler units the classifier ignores carry nothing; the
    only change pruning them makes is which values each LayerNorm averages over. With every norm replaced by its
    affine part (no statistics), the logits must be the same before and after: every read and write of the residual
    stream was sliced consistently."""
    config = hidden_config("bert")
    model = tiny_model(config)
    silent = list(range(32, 64))
    silence_dimensions(model, silent)
    with torch.no_grad():
        model.classifier.weight[:, silent] = 0.0

    class Affine(torch.nn.Module):  # LayerNorm's scale and shift without the normalization
        def __init__(self, norm):
            super().__init__()
            self.weight, self.bias, self.eps = norm.weight, norm.bias, norm.eps
            self.elementwise_affine = True

        def forward(self, x):
            return x * self.weight + self.bias

    from common.architecture import set_module
    from common.pruning.hidden import HIDDEN_LAYOUTS

    layout = HIDDEN_LAYOUTS["bert"]
    norm_paths = [layout.embedding_norm] + [f"bert.encoder.layer.{i}.{name}" for i in range(2) for name in layout.layer_norms]
    for path in norm_paths:
        set_module(model, path, Affine(model.get_submodule(path)))
    batch = next(batches(config))
    before = logits(model, batch)
    prune_hidden(model, list(range(32)))
    for path in norm_paths:  # prune_hidden rebuilt them as LayerNorms; give them the affine behaviour back
        set_module(model, path, Affine(model.get_submodule(path)))
    torch.testing.assert_close(logits(model, batch), before, atol=1e-5, rtol=0)


@pytest.mark.parametrize("model_type", ["distilbert", "mpnet", "deberta-v2", "electra-narrow-embeddings"])
def test_hidden_pruning_refuses_models_it_cannot_prune(model_type):
    config = tiny_config(model_type.removesuffix("-narrow-embeddings"))
    model = tiny_model(config)
    with pytest.raises(ValueError, match="Use --hidden_sparsity 0 for this model"):
        hidden_width_to_keep(model, 0.25)


def test_hidden_width_is_a_multiple_of_the_head_size_and_never_nothing():
    model = tiny_model(hidden_config("bert"))
    assert [hidden_width_to_keep(model, s) for s in (0.0, 0.2, 0.25, 0.5, 0.7)] == [64, 48, 48, 32, 16]
    with pytest.raises(ValueError, match="hidden_sparsity=0.9 leaves no multiple of the head size"):
        hidden_width_to_keep(model, 0.9)
    with pytest.raises(ValueError, match="a multiple of the head size 16"):
        prune_hidden(model, list(range(20)))


@pytest.mark.parametrize("value", [-0.1, 1.0, 1.5])
def test_hidden_sparsity_outside_0_1_is_refused_by_stage_8_and_compress(value):
    from common.config import CompressConfig

    with pytest.raises(ValueError, match=rf"hidden_sparsity={value} is out of range; it must lie in \[0.0, 1.0\)"):
        PruningConfig(hidden_sparsity=value)
    with pytest.raises(ValueError, match=rf"hidden_sparsity={value} is out of range"):
        CompressConfig(hidden_sparsity=value)
