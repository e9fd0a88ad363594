"""An intake corpus: real Hugging Face architectures, tiny and seeded, exported the ways users export them.

Every model is built from a hand-written small config (hidden 32-64, 1-2 layers, 32x32 or 64x64 images, 16-token
sequences) with ``torch.manual_seed(0)`` weights: nothing downloads weights, configs or tokenizers. Each can be
exported three ways:

- ``torchscript``: ``torch.onnx.export(..., dynamo=False, opset_version=17)`` (18 where an operator needs it)
  with ``dynamic_axes=``;
- ``dynamo``: ``torch.onnx.export(..., dynamo=True)`` at torch's default opset (20) with ``dynamic_shapes=``
  naming the same axes by strings (torch makes each a ``Dim.DYNAMIC``) and torch's default
  ``external_data=True`` (weights in ``model.onnx.data``);
- ``optimum``: ``optimum.exporters.onnx.main_export`` on a folder written by ``save_pretrained`` (with a tiny
  local WordLevel tokenizer for text models). optimum-onnx 0.1 needs transformers < 4.58, so it usually lives in
  its own virtual environment (``python -m venv --system-site-packages``); name that environment's python in
  ``INTAKE_OPTIMUM_PYTHON`` and the export runs there.

Batch and sequence (or audio length) axes are dynamic in every export; calibration feeds are batch 1 with a
fixed sequence length per model, so a compiler has to take its shapes from the data.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

EXPORTERS = ("torchscript", "dynamo", "optimum")
TORCHSCRIPT_OPSET = 17
VOCAB = 128
SEQUENCE = 16
POSITIONS = 64
HIDDEN = 32
LABELS = 10
# Dynamo specializes an axis whose example size is 0 or 1: export with batch 2, calibrate with batch 1.
EXPORT_BATCH = 2
# Hugging Face initializes transformer weights with std 0.02, tuned for hidden sizes near 1024: at hidden 32 the
# blocks would add ~1 % to the residual stream and every output would look alike whatever the blocks compute.
# 1 / sqrt(hidden) keeps the blocks' contributions on the residual's scale, so the outputs depend on the weights.
INITIALIZER_RANGE = float(os.environ.get("INTAKE_INITIALIZER_RANGE", 1 / HIDDEN**0.5))
OPTIMUM_PYTHON_VARIABLE = "INTAKE_OPTIMUM_PYTHON"


@dataclass(frozen=True)
class InputSpec:
    """One model input: how its values are drawn, its shape at batch 1, and which axes are dynamic.

    ``kind`` is ``ids`` (token ids below :data:`VOCAB`), ``mask`` (ones with a few trailing zeros), ``zeros``
    (token type ids), ``positions`` (0, 1, 2, ...) or ``float`` (standard normal, scaled by ``scale``).
    """

    name: str
    kind: str
    shape: tuple[int, ...]
    dynamic: dict[int, str]
    scale: float = 1.0

    def __post_init__(self) -> None:
        if self.kind not in {"ids", "mask", "zeros", "positions", "float"}:
            raise ValueError(f"input {self.name}: unknown kind {self.kind!r}")
        if self.shape[0] != 1:
            raise ValueError(f"input {self.name}: shapes are given at batch 1, not {self.shape}")


@dataclass(frozen=True)
class Architecture:
    """A tiny Hugging Face model and how to feed and export it.

    ``outputs`` are attribute names of the model's output (``logits``, ``last_hidden_state``, ...), which
    are also the ONNX output names; ``optimum_task`` is the optimum task, or None where optimum has no export
    that matches (an encoder cut out of an encoder-decoder, say).
    """

    family: str
    model: Callable[[], Any]
    inputs: tuple[InputSpec, ...]
    outputs: tuple[str, ...]
    optimum_task: str | None = None
    torchscript_opset: int = TORCHSCRIPT_OPSET


@dataclass(frozen=True)
class Built:
    """A model ready for ``torch.onnx.export``: a module taking the inputs positionally and returning a tuple."""

    module: Any
    example: dict[str, Any]
    input_names: list[str]
    output_names: list[str]
    dynamic_axes: dict[str, dict[int, str]]


def _text(*names: str) -> tuple[InputSpec, ...]:
    kinds = {"input_ids": "ids", "attention_mask": "mask", "token_type_ids": "zeros", "position_ids": "positions"}
    return tuple(InputSpec(name, kinds[name], (1, SEQUENCE), {0: "batch", 1: "sequence"}) for name in names)


def _image(size: int, channels: int = 3) -> tuple[InputSpec, ...]:
    return (InputSpec("pixel_values", "float", (1, channels, size, size), {0: "batch"}),)


def _audio(samples: int) -> tuple[InputSpec, ...]:
    return (InputSpec("input_values", "float", (1, samples), {0: "batch", 1: "samples"}, scale=0.1),)


def _seeded(make: Callable[[], Any]) -> Callable[[], Any]:
    def build() -> Any:
        import torch

        torch.manual_seed(0)
        return make().eval()

    return build


def _transformers(model_class: str, **config: Any) -> Callable[[], Any]:
    """A builder of ``transformers.<model_class>`` on its own config class made from ``config``, seeded."""

    def make() -> Any:
        import transformers

        model = getattr(transformers, model_class)
        config_object = model.config_class(**config)
        if hasattr(config_object, "initializer_range") and "initializer_range" not in config:
            config_object.initializer_range = INITIALIZER_RANGE
        return model(config_object)

    return _seeded(make)


# Sizes shared by the BERT-like encoders, the decoder LMs, the ViT-likes and the wav2vec2-likes.
ENCODER = {
    "vocab_size": VOCAB,
    "hidden_size": HIDDEN,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "intermediate_size": 64,
    "max_position_embeddings": POSITIONS,
}
TOKENS = {"pad_token_id": 0, "bos_token_id": 2, "eos_token_id": 3}
DECODER = {**ENCODER, **TOKENS, "num_key_value_heads": 2, "use_cache": False}
VIT = {**ENCODER, "image_size": 32, "patch_size": 8}
SWIN = {"image_size": 32, "patch_size": 2, "embed_dim": 16, "depths": [1, 1], "num_heads": [2, 2], "window_size": 4}
WAV2VEC2 = {
    **ENCODER,
    "vocab_size": 32,
    "conv_dim": (16, 16, 16),
    "conv_stride": (5, 2, 2),
    "conv_kernel": (10, 3, 3),
    "num_conv_pos_embeddings": 16,
    "num_conv_pos_embedding_groups": 2,
}
AUDIO_SAMPLES = 800
BERT_INPUTS = ("input_ids", "attention_mask", "token_type_ids")


def _vision(
    model_class: str,
    size: int = 32,
    outputs: tuple[str, ...] = ("logits",),
    task: str | None = "image-classification",
    **config: Any,
) -> Architecture:
    return Architecture("vision", _transformers(model_class, num_labels=LABELS, **config), _image(size), outputs, task)


def _encoder(
    model_class: str,
    inputs: tuple[str, ...] = ("input_ids", "attention_mask"),
    outputs: tuple[str, ...] = ("last_hidden_state",),
    task: str | None = "feature-extraction",
    **config: Any,
) -> Architecture:
    return Architecture("text", _transformers(model_class, **{**ENCODER, **config}), _text(*inputs), outputs, task)


def _decoder(model_class: str, base: dict[str, Any] = DECODER, **config: Any) -> Architecture:
    """A causal LM without a KV cache: input_ids and attention_mask in, logits out."""
    return Architecture(
        "decoder",
        _transformers(model_class, **{**base, **config}),
        _text("input_ids", "attention_mask"),
        ("logits",),
        "text-generation",
    )


def _speech(
    model_class: str, outputs: tuple[str, ...] = ("last_hidden_state",), task: str = "feature-extraction", **config: Any
) -> Architecture:
    return Architecture(
        "audio", _transformers(model_class, **{**WAV2VEC2, **config}), _audio(AUDIO_SAMPLES), outputs, task
    )


def _whisper_encoder() -> Any:
    import transformers

    config = transformers.WhisperConfig(
        vocab_size=VOCAB,
        **TOKENS,
        decoder_start_token_id=2,
        num_mel_bins=16,
        d_model=HIDDEN,
        encoder_layers=2,
        encoder_attention_heads=2,
        encoder_ffn_dim=64,
        decoder_layers=1,
        decoder_attention_heads=2,
        decoder_ffn_dim=64,
        max_source_positions=16,
        max_target_positions=POSITIONS,
    )
    return transformers.WhisperModel(config).get_encoder()


def _t5_encoder() -> Any:
    import transformers

    config = transformers.T5Config(
        vocab_size=VOCAB, d_model=HIDDEN, d_kv=16, d_ff=64, num_layers=2, num_heads=2, use_cache=False
    )
    return transformers.T5EncoderModel(config)


POOLED = ("last_hidden_state", "pooler_output")
# Two-stage hierarchies for the CNNs and hierarchical transformers.
STAGES = {"hidden_sizes": [16, 32], "depths": [1, 1]}

ARCHITECTURES: dict[str, Architecture] = {
    # Vision: convolutional networks.
    "resnet": _vision("ResNetForImageClassification", embedding_size=16, layer_type="basic", **STAGES),
    "mobilenet_v1": _vision("MobileNetV1ForImageClassification", image_size=32, depth_multiplier=0.25),
    "mobilenet_v2": _vision("MobileNetV2ForImageClassification", image_size=32, depth_multiplier=0.25),
    "convnext": _vision("ConvNextForImageClassification", num_stages=2, **STAGES),
    "convnextv2": _vision("ConvNextV2ForImageClassification", num_stages=2, **STAGES),
    # hidden_dim must be the top convolution's width: round_filters(1280) at width 0.25.
    "efficientnet": _vision(
        "EfficientNetForImageClassification",
        image_size=32,
        width_coefficient=0.25,
        depth_coefficient=0.25,
        hidden_dim=320,
    ),
    "regnet": _vision("RegNetForImageClassification", embedding_size=16, groups_width=8, **STAGES),
    "bit": _vision(
        "BitForImageClassification", embedding_size=16, hidden_sizes=[16, 32, 32, 32], depths=[1] * 4, num_groups=4
    ),
    "poolformer": _vision(
        "PoolFormerForImageClassification",
        num_encoder_blocks=2,
        patch_sizes=[7, 3],
        strides=[4, 2],
        padding=[2, 1],
        **STAGES,
    ),
    # Vision: transformers and hybrids.
    "vit": _vision("ViTForImageClassification", **VIT),
    "deit": _vision("DeiTForImageClassification", **VIT),
    "beit": _vision("BeitForImageClassification", use_relative_position_bias=True, **VIT),
    "dinov2": _vision("Dinov2Model", outputs=POOLED, task="feature-extraction", **VIT),
    "clip_vision": _vision("CLIPVisionModel", outputs=POOLED, task=None, **VIT),
    "siglip_vision": _vision("SiglipVisionModel", outputs=POOLED, task=None, **VIT),
    "swin": _vision("SwinForImageClassification", **SWIN),
    "swinv2": _vision("Swinv2ForImageClassification", **SWIN),
    "mobilevit": _vision(
        "MobileViTForImageClassification",
        size=64,
        image_size=64,
        hidden_sizes=[16, 24, 32],
        neck_hidden_sizes=[8, 8, 16, 16, 24, 32, 64],
        num_attention_heads=2,
    ),
    # Its unfold/fold (aten::col2im) exports from opset 18 on.
    "mobilevitv2": Architecture(
        "vision",
        _transformers("MobileViTV2ForImageClassification", image_size=64, width_multiplier=0.25, num_labels=LABELS),
        _image(64),
        ("logits",),
        "image-classification",
        torchscript_opset=18,
    ),
    "levit": _vision(
        "LevitForImageClassification",
        size=64,
        image_size=64,
        hidden_sizes=[32, 48, 64],
        num_attention_heads=[2, 2, 2],
        depths=[1, 1, 1],
        key_dim=[8, 8, 8],
    ),
    "segformer": _vision(
        "SegformerForSemanticSegmentation",
        task="semantic-segmentation",
        num_encoder_blocks=2,
        sr_ratios=[2, 1],
        num_attention_heads=[1, 2],
        decoder_hidden_size=32,
        **STAGES,
    ),
    # Cvt sizes its stochastic depth per stage by indexing the stage's own depth: depth[i] must exceed i.
    "cvt": _vision(
        "CvtForImageClassification",
        task=None,
        embed_dim=[16, 24, 32],
        num_heads=[1, 1, 2],
        depth=[1, 2, 3],
    ),
    "focalnet": _vision(
        "FocalNetForImageClassification", task=None, image_size=32, patch_size=4, embed_dim=16, depths=[1, 1]
    ),
    "yolos": _vision(
        "YolosForObjectDetection",
        outputs=("logits", "pred_boxes"),
        task="object-detection",
        **{**VIT, "image_size": [32, 32]},
        num_detection_tokens=4,
    ),
    # Text encoders.
    "bert": _encoder("BertModel", inputs=BERT_INPUTS, outputs=POOLED),
    "distilbert": _encoder("DistilBertModel", dim=HIDDEN, n_layers=2, n_heads=2, hidden_dim=64),
    "roberta": _encoder("RobertaModel", outputs=POOLED, pad_token_id=1),
    "xlm_roberta": _encoder(
        "XLMRobertaForSequenceClassification", outputs=("logits",), task="text-classification", num_labels=3
    ),
    "albert": _encoder("AlbertModel", inputs=BERT_INPUTS, outputs=POOLED, embedding_size=16),
    "electra": _encoder(
        "ElectraForSequenceClassification",
        inputs=BERT_INPUTS,
        outputs=("logits",),
        task="text-classification",
        embedding_size=16,
        num_labels=3,
    ),
    "deberta": _encoder("DebertaModel", inputs=BERT_INPUTS),
    "deberta_v2": _encoder("DebertaV2Model", inputs=BERT_INPUTS),
    "mpnet": _encoder("MPNetModel", outputs=POOLED),
    "mobilebert": _encoder(
        "MobileBertModel",
        inputs=BERT_INPUTS,
        outputs=POOLED,
        embedding_size=16,
        intra_bottleneck_size=16,
        true_hidden_size=16,
        num_feedforward_networks=1,
    ),
    "convbert": _encoder("ConvBertModel", inputs=BERT_INPUTS, embedding_size=HIDDEN),
    "roformer": _encoder("RoFormerModel", inputs=BERT_INPUTS, embedding_size=HIDDEN),
    "modernbert": _encoder(
        "ModernBertModel", global_attn_every_n_layers=2, local_attention=8, cls_token_id=2, sep_token_id=3, **TOKENS
    ),
    # optimum exports T5 as encoder and decoder: no task for the encoder alone.
    "t5_encoder": Architecture(
        "text", _seeded(_t5_encoder), _text("input_ids", "attention_mask"), ("last_hidden_state",)
    ),
    # Decoder LMs.
    "gpt2": _decoder(
        "GPT2LMHeadModel",
        {**TOKENS, "use_cache": False},
        vocab_size=VOCAB,
        n_embd=HIDDEN,
        n_layer=2,
        n_head=2,
        n_positions=POSITIONS,
    ),
    "llama": _decoder("LlamaForCausalLM"),
    "qwen2": _decoder("Qwen2ForCausalLM"),
    "qwen3": _decoder("Qwen3ForCausalLM", head_dim=16),
    "mistral": _decoder("MistralForCausalLM"),
    "gemma": _decoder("GemmaForCausalLM", head_dim=16),
    "phi": _decoder("PhiForCausalLM"),
    "phi3": _decoder("Phi3ForCausalLM"),
    "stablelm": _decoder("StableLmForCausalLM"),
    "olmo2": _decoder("Olmo2ForCausalLM"),
    "granite": _decoder("GraniteForCausalLM"),
    "gpt_neox": _decoder("GPTNeoXForCausalLM"),
    "opt": _decoder("OPTForCausalLM", ffn_dim=64, word_embed_proj_dim=HIDDEN),
    "bloom": _decoder(
        "BloomForCausalLM", {**TOKENS, "use_cache": False}, vocab_size=VOCAB, hidden_size=HIDDEN, n_layer=2, n_head=2
    ),
    "falcon": _decoder("FalconForCausalLM", new_decoder_architecture=False),
    # Audio.
    "wav2vec2": _speech("Wav2Vec2ForCTC", outputs=("logits",), task="automatic-speech-recognition"),
    "hubert": _speech("HubertModel"),
    "wavlm": _speech("WavLMModel", num_buckets=32, max_bucket_distance=64),
    "data2vec_audio": _speech("Data2VecAudioModel", num_conv_pos_embeddings=5, conv_pos_kernel_size=5),
    # Whisper's encoder insists on exactly 2 * max_source_positions frames: only the batch is dynamic. optimum
    # exports Whisper as encoder and decoder: no task for the encoder alone.
    "whisper_encoder": Architecture(
        "audio",
        _seeded(_whisper_encoder),
        (InputSpec("input_features", "float", (1, 16, 32), {0: "batch"}),),
        ("last_hidden_state",),
    ),
    "audio_spectrogram_transformer": Architecture(
        "audio",
        _transformers(
            "ASTForAudioClassification",
            **ENCODER,
            patch_size=8,
            frequency_stride=8,
            time_stride=8,
            max_length=32,
            num_mel_bins=16,
            num_labels=LABELS,
        ),
        (InputSpec("input_values", "float", (1, 32, 16), {0: "batch"}),),
        ("logits",),
        "audio-classification",
    ),
}


def calibration_feeds(
    name: str, count: int, seed: int, batch: int = 1, input_names: list[str] | None = None
) -> list[dict[str, np.ndarray]]:
    """``count`` feeds for architecture ``name``: int64 ids below :data:`VOCAB`, attention masks of ones with
    0-3 trailing zeros, zero token types, standard normal pixels / features (audio scaled by 0.1).

    ``input_names`` picks the inputs (an optimum export adds ``position_ids`` or drops ``token_type_ids``); by
    default they are the architecture's own.
    """
    specs = {spec.name: spec for spec in ARCHITECTURES[name].inputs}
    sequence = next(iter(specs.values())).shape
    if input_names is not None:
        for missing in set(input_names) - set(specs):
            kind = "positions" if missing == "position_ids" else "zeros"
            specs[missing] = InputSpec(missing, kind, sequence, {0: "batch", 1: "sequence"})
        specs = {input_name: specs[input_name] for input_name in input_names}
    rng = np.random.default_rng(seed)
    feeds = []
    for _ in range(count):
        feed = {}
        for spec in specs.values():
            shape = (batch, *spec.shape[1:])
            if spec.kind == "ids":
                feed[spec.name] = rng.integers(3, VOCAB, size=shape, dtype=np.int64)
            elif spec.kind == "mask":
                mask = np.ones(shape, dtype=np.int64)
                for row in range(batch):
                    padding = int(rng.integers(1, 4)) if row == 0 else int(rng.integers(0, 4))
                    mask[row, shape[1] - padding :] = 0
                feed[spec.name] = mask
            elif spec.kind == "zeros":
                feed[spec.name] = np.zeros(shape, dtype=np.int64)
            elif spec.kind == "positions":
                feed[spec.name] = np.broadcast_to(np.arange(shape[1], dtype=np.int64), shape).copy()
            else:
                feed[spec.name] = (rng.standard_normal(shape) * spec.scale).astype(np.float32)
        feeds.append(feed)
    return feeds


def _wrap(model: Any, input_names: list[str], output_names: list[str]) -> Any:
    """The Hugging Face ``model`` behind positional inputs, returning a tuple of the named outputs."""
    import torch

    class Wrapped(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
            result = self.model(**dict(zip(input_names, inputs, strict=True)))
            return tuple(result[output] for output in output_names)

    return Wrapped().eval()


def instantiate(name: str) -> Any:
    """The seeded model of architecture ``name``, in eval mode, its BatchNorm statistics measured on random data.

    A freshly initialized BatchNorm holds mean 0 and variance 1 whatever its input: through a dozen random
    convolutions the signal then shrinks or grows geometrically (EfficientNet's logits come out near 1e-26).
    Measuring the statistics on 32 random inputs, as trained networks have them measured on data, keeps every
    activation near unit scale. ``INTAKE_BATCHNORM_STATISTICS=0`` leaves the fresh statistics (degenerate ranges).
    """
    import torch

    architecture = ARCHITECTURES[name]
    model = architecture.model()
    norms = [module for module in model.modules() if isinstance(module, torch.nn.modules.batchnorm._BatchNorm)]
    if norms and os.environ.get("INTAKE_BATCHNORM_STATISTICS", "1") != "0":
        for norm in norms:
            norm.reset_running_stats()
            norm.momentum = None  # a cumulative average over every batch seen
            norm.train()
        input_names = [spec.name for spec in architecture.inputs]
        with torch.no_grad():
            for feed in calibration_feeds(name, 4, seed=999, batch=8):
                model(**{input_name: torch.from_numpy(feed[input_name]) for input_name in input_names})
        model.eval()
    return model


def build(name: str) -> Built:
    """The wrapped model of architecture ``name`` with a batch-2 example and its dynamic axes."""
    import torch

    architecture = ARCHITECTURES[name]
    model = instantiate(name)
    input_names = [spec.name for spec in architecture.inputs]
    example = {
        key: torch.from_numpy(value)
        for key, value in calibration_feeds(name, 1, seed=12345, batch=EXPORT_BATCH)[0].items()
    }
    return Built(
        _wrap(model, input_names, list(architecture.outputs)),
        example,
        input_names,
        list(architecture.outputs),
        {spec.name: dict(spec.dynamic) for spec in architecture.inputs},
    )


def export(name: str, exporter: str, folder: str | os.PathLike[str]) -> Path:
    """Export architecture ``name`` with ``exporter`` into ``folder``; returns the ONNX file's path.

    Writes ``export.json`` beside it: the exporter's arguments that matter (opset, how the axes were made
    dynamic).
    """
    if exporter not in EXPORTERS:
        raise ValueError(f"unknown exporter {exporter!r}; one of {EXPORTERS}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if exporter == "optimum":
        return _export_optimum(name, folder)
    import torch

    built = build(name)
    path = folder / "model.onnx"
    args = tuple(built.example[input_name] for input_name in built.input_names)
    if exporter == "torchscript":
        settings: dict[str, Any] = {
            "dynamo": False,
            "opset_version": ARCHITECTURES[name].torchscript_opset,
            "dynamic_axes": built.dynamic_axes,
        }
        recorded = {**settings}
    else:
        # Axis names as strings: torch.onnx makes each a Dim.DYNAMIC and names the ONNX dimension after it. The
        # wrapper takes *inputs, so the shapes are one tuple (for that one variadic argument) of per-input dicts.
        dynamic_shapes = tuple(built.dynamic_axes[input_name] for input_name in built.input_names)
        settings = {"dynamo": True, "dynamic_shapes": (dynamic_shapes,)}
        recorded = {**settings, "opset_version": "default", "external_data": "default (True)"}
    with torch.no_grad():
        torch.onnx.export(
            built.module,
            args,
            str(path),
            input_names=built.input_names,
            output_names=built.output_names,
            **settings,
        )
    (folder / "export.json").write_text(json.dumps({"exporter": exporter, **recorded}, indent=1, default=str))
    return path


def _tokenizer(folder: Path) -> None:
    """A WordLevel tokenizer of :data:`VOCAB` made-up words, saved into ``folder`` (optimum reads one)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[PAD]": 0, "[UNK]": 1, "[CLS]": 2, "[SEP]": 3, "[MASK]": 4}
    vocab.update({f"w{index}": index for index in range(len(vocab), VOCAB)})
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        unk_token="[UNK]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
    )
    tokenizer.save_pretrained(folder)


OPTIMUM_SCRIPT = """
import sys
from optimum.exporters.onnx import main_export
main_export(sys.argv[1], output=sys.argv[2], task=sys.argv[3], do_validation=False, no_post_process=False)
"""


def _export_optimum(name: str, folder: Path) -> Path:
    architecture = ARCHITECTURES[name]
    if architecture.optimum_task is None:
        raise NotImplementedError(f"{name}: no optimum task matches this model")
    checkpoint = folder / "checkpoint"
    instantiate(name).save_pretrained(checkpoint)
    if architecture.family in {"text", "decoder"}:
        _tokenizer(checkpoint)
    output = folder / "optimum"
    python = os.environ.get(OPTIMUM_PYTHON_VARIABLE, sys.executable)
    command = [python, "-c", OPTIMUM_SCRIPT, str(checkpoint), str(output), architecture.optimum_task]
    completed = subprocess.run(command, capture_output=True, text=True, check=False)
    if completed.returncode != 0:
        lines = [line for line in completed.stderr.splitlines() if line.strip()]
        raise RuntimeError(f"optimum export failed: {lines[-1] if lines else completed.returncode}")
    path = output / "model.onnx"
    (folder / "export.json").write_text(
        json.dumps({"exporter": "optimum", "python": python, "task": architecture.optimum_task}, indent=1)
    )
    return path
