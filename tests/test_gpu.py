"""The CUDA paths, checked where a GPU is present (``make gpu-check`` runs this file there); skipped on a CPU-only
machine. Each kind of model runs on the GPU and gives the CPU's logits within its precision."""

import numpy as np
import pytest
import torch

from common.config import PTQConfig
from common.models import save_checkpoint
from common.quantization import quantize_model_4bit
from common.runtime import ModelRuntime
from conftest import batch_for, make_tokenizer, tiny_bert_config, tiny_model, write_onnx_checkpoint

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (make gpu-check runs it on one)")


@pytest.fixture
def batch(tokenizer):
    return dict(batch_for(tokenizer))


def logits_on(folder, batch, device, onnx_file=None, half=False):
    return ModelRuntime(folder, onnx_file, device=device, half=half).logits_for(batch)


def test_full_precision_checkpoint_on_the_gpu_in_fp32_and_fp16(tokenizer, results_dir, batch):
    folder = save_checkpoint("pruned", tiny_model(tiny_bert_config()), tokenizer, {"label_names": ["negative", "positive"]})
    cpu = logits_on(folder, batch, "cpu")
    np.testing.assert_allclose(logits_on(folder, batch, "cuda"), cpu, atol=1e-4)
    np.testing.assert_allclose(logits_on(folder, batch, "cuda", half=True), cpu, atol=2e-2)


def test_bitsandbytes_4bit_checkpoint_on_the_gpu(tokenizer, results_dir, batch):
    model = tiny_model(tiny_bert_config())
    record = quantize_model_4bit(model, PTQConfig(embedding_quantization="none"))
    folder = save_checkpoint("ptq_4bit", model, tokenizer, {"quantization": record, "label_names": ["negative", "positive"]})
    cuda = ModelRuntime(folder, device="cuda")
    import bitsandbytes as bnb

    layer = cuda.torch_model.bert.encoder.layer[0].attention.self.query
    assert isinstance(layer, bnb.nn.Linear4bit) and layer.weight.device.type == "cuda"
    np.testing.assert_allclose(cuda.logits_for(batch), logits_on(folder, batch, "cpu"), atol=5e-2)  # CPU computes in bf16


def test_onnx_file_on_onnx_runtimes_cuda_provider(tmp_path, results_dir, batch):
    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip("onnxruntime without the CUDA provider (install onnxruntime-gpu)")
    folder = write_onnx_checkpoint(make_tokenizer(tmp_path / "tokenizer"))
    cuda = ModelRuntime(folder, "model.onnx", device="cuda")
    assert "CUDAExecutionProvider" in cuda.onnx.session.get_providers()
    np.testing.assert_allclose(cuda.logits_for(batch), logits_on(folder, batch, "cpu", "model.onnx"), atol=1e-4)
