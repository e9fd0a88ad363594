"""Causal LMs with a KV cache: intake of the standard layout, the artifact's decoder entry, generation.

The real model is SmolLM2-135M (the GGUF's weights) cut to 2 decoder layers and exported as users export a
decoder with a cache (dynamo, dynamic batch / sequence / past, optimum's names); it is compiled through the
CLI from token windows alone. Its text is not the point (2 layers babble); the cache mechanics are.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import zoo

from qcompile import cli, runtime
from qcompile.calibration import InputSpec
from qcompile.flow import decoder
from qcompile.runtime.generate import GenerationError, Generator

pytestmark = pytest.mark.slow


def test_layout_recognizes_the_exporters_names() -> None:
    inputs = ["input_ids", "attention_mask", "past_key_values.0.key", "past_key_values.0.value"]
    found = decoder.layout(inputs, ["logits", "present.0.key", "present.0.value"])
    assert found is not None
    assert found.cache == [("past_key_values.0.key", "present.0.key"), ("past_key_values.0.value", "present.0.value")]
    assert found.attention_mask == "attention_mask" and found.position_ids is None
    # a past input without its present output, or no cache at all: not a decoder qcompile can drive
    assert decoder.layout(inputs, ["logits", "present.0.key"]) is None
    assert decoder.layout(["input_ids", "attention_mask"], ["logits"]) is None


def test_samples_of_tokens_alone_are_completed_as_a_prefill() -> None:
    found = decoder.layout(
        ["input_ids", "attention_mask", "position_ids", "past_key_values.0.key"], ["logits", "present.0.key"]
    )
    assert found is not None
    specs = [
        InputSpec("input_ids", (-1, -1), np.dtype(np.int64)),
        InputSpec("attention_mask", (-1, -1), np.dtype(np.int64)),
        InputSpec("position_ids", (-1, -1), np.dtype(np.int64)),
        InputSpec("past_key_values.0.key", (-1, 3, -1, 64), np.dtype(np.float32)),
    ]
    (feed,) = decoder.completed([{"input_ids": np.ones((2, 5), dtype=np.int64)}], found, specs)
    assert feed["past_key_values.0.key"].shape == (2, 3, 0, 64)
    assert feed["attention_mask"].shape == (2, 5) and feed["attention_mask"].all()
    np.testing.assert_array_equal(feed["position_ids"], [[0, 1, 2, 3, 4]] * 2)


@pytest.fixture(scope="module")
def decoder_model(models_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The 2-layer SmolLM2 with a KV cache, and 4 windows of 32 tokens (.npz files of input_ids alone)."""
    model = zoo.export_smollm2_with_past(models_dir / "smollm2_past" / "model.onnx", layers=2)
    _, tokenizer = zoo.load_smollm2(layers=1)
    ids = zoo.pydoc_tokens(tokenizer, 4 * 32, offset=4096)
    folder = tmp_path_factory.mktemp("decoder_calibration")
    for index in range(4):
        np.savez(folder / f"{index}.npz", input_ids=ids[index * 32 : (index + 1) * 32][None])
    return model, folder


@pytest.fixture(scope="module")
def decoder_artifact(decoder_model: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The decoder compiled for host through the CLI as W4A8: group-wise int4 weights (blocks of 32), with the
    float threshold set between the layers' int4 and int8 errors, so that the layers int4 costs too much are
    retried at int8 weights (one compile serves every test here: each takes about a minute)."""
    model, folder = decoder_model
    output = tmp_path_factory.mktemp("artifacts") / "smollm2_past.host"
    flags = ["--bits", "4", "--weight-block", "32", "--float-threshold", "3e-4"]  # under int4's error, over int8's
    assert cli.main([str(model), "-c", str(folder), "-o", str(output), *flags, "-q"]) == 0
    return output


def test_w4a8_packs_its_weights_and_gives_int8_to_layers_int4_costs_too_much(decoder_artifact: Path) -> None:
    """A layer over the float threshold at int4 is retried at int8 weights before it stays float (SmolLM2's
    49152 x 576 LM head: 28 MB instead of 113 MB); every blocked weight is a MatMulNBits in the file, 4-bit
    ones two codes to a byte."""
    manifest = json.loads((decoder_artifact / "manifest.json").read_text())
    widened = next(entry for entry in manifest["passes"] if entry["name"] == "sensitivity")["int8_instead_of_narrower"]
    formats = {layer["name"]: layer["weight_format"] for layer in manifest["layers"]}
    assert widened and all(error <= 3e-4 for error in widened.values())
    assert all(formats[name] == "int8" for name in widened) and "fp32" not in formats.values()
    packed = next(entry for entry in manifest["passes"] if entry["name"] == "pack_int4")
    assert packed["int8_weights"] == len(widened) and packed["weights"] >= 12
    with open(decoder_artifact / "model.int8.onnx", "rb") as handle:
        graph = onnx.load(handle, load_external_data=False).graph
    assert sum(node.op_type == "MatMulNBits" for node in graph.node) == packed["weights"] + packed["int8_weights"]


def test_a_decoder_artifact_says_how_to_generate(decoder_artifact: Path) -> None:
    manifest = json.loads((decoder_artifact / "manifest.json").read_text())
    entry = manifest["decoder"]
    assert entry["cache"][0] == ["past_key_values.0.key", "present.0.key"] and len(entry["cache"]) == 4
    assert entry["context"] == 8192 and entry["eos_token_ids"] == [2]  # from config.json beside the model
    assert entry["tokenizer"] == "tokenizer.json" and "tokenizer.json" in manifest["files"]  # checksummed
    assert entry["logits_from"] == "qcompile_logits_from"  # a prefill's LM head multiplies the last position alone
    assert entry["executors"][0] == "onnxruntime"  # the quantized graph runs every length
    assert "decoder with a KV cache" in manifest["skipped"]["tvm"]  # a fixed-length library is not built
    # group-wise int4 weights: the decode step's 15 linear layers (7 per layer and the LM head) quantize their input
    # per block at run time, as MatMulNBits does in the onnxruntime file, and run on the blocked int4 kernel; the
    # library matched the numpy oracle and onnxruntime's W4A8 step at compile time, and ships where it was faster
    assert next(entry for entry in manifest["passes"] if entry["name"] == "blocked_step_products")["layers"] == 15
    verdict = manifest["measured"]["accuracy"]["decode_step"]
    assert "numpy oracle" in verdict["oracle"] and verdict["logits_vs"]["onnxruntime"]["mean_cosine"] >= 0.999
    shipped = entry.get("step_executor") == "tvm-decode"
    assert shipped or "no faster" in manifest["skipped"]["tvm-decode"]
    # the embedding table (49152 x 576) takes the int4 weights' format, 4-bit codes per block of 32 (a clipping
    # scale errs by at most half the block's peak), and the file's own error is reported
    (table,) = next(entry for entry in manifest["passes"] if entry["name"] == "embedding_rows")["tables"]
    assert table["shape"] == [49152, 576] and table["format"] == "int4, blocks of 32"
    assert table["max_error_of_peak"] <= 0.5
    # the exporter's transposed copy of the tied table is rebuilt from it in the float file
    reference = sum(path.stat().st_size for path in decoder_artifact.glob("reference.fp32.onnx*"))
    assert reference < 49152 * 576 * 4 * 1.5
    assert manifest["measured"]["accuracy"]["calibration_sample_file"]["mean_cosine"] >= 0.99
    dims = manifest["executors"]["onnxruntime"]["dynamic_dims"]
    assert dims["past_key_values.0.key"]["2"] == "past_length" and dims["input_ids"]["1"] == "sequence_length"


@pytest.mark.parametrize("executor", ["onnxruntime-fp32", "onnxruntime"])
def test_decode_steps_on_the_cache_match_a_prefill_of_the_whole_text(decoder_artifact: Path, executor: str) -> None:
    """Logits of tokens fed one at a time on the cache equal those of one prefill of the same tokens: fp32 to
    float32 rounding (the products summed in another order: 1e-4 of the logits' range); the W4A8 graph within
    cosine 0.999 (its activation codes are static per tensor, or per block of one row in MatMulNBits, so a row
    quantizes alike in both runs, up to a code where that rounding lands on a half step)."""
    generator = Generator(runtime.load(decoder_artifact, executor))
    tokens = [1, 504, 3458, 314, 4649, 281, 253, 6342]
    whole, _ = generator.step(tokens, generator.empty_cache(1), 0)
    logits, cache = generator.step(tokens[:3], generator.empty_cache(1), 0)
    for position in range(3, len(tokens)):
        logits, cache = generator.step(tokens[position : position + 1], cache, position)
    assert cache["past_key_values.0.key"].shape == (1, 3, len(tokens), 64)
    if executor == "onnxruntime-fp32":
        assert np.abs(logits - whole).max() <= 1e-4 * np.ptp(whole)
    else:
        assert float(logits @ whole / np.linalg.norm(logits) / np.linalg.norm(whole)) >= 0.999


def test_generation_is_greedy_by_default_and_seeded_when_sampling(decoder_artifact: Path) -> None:
    # the quantized executor by name: the default is whichever measured fastest at compile time
    session = runtime.load(decoder_artifact, "onnxruntime")
    greedy = session.generate("The Python language", max_new_tokens=12)
    # the prompt on the quantized graph; the steps on the decode-step library where the compile shipped one
    assert greedy.executor.split(", ")[0] == "onnxruntime" and greedy.prompt_tokens == 3 and len(greedy.tokens) <= 12
    assert greedy.text == session.generate("The Python language", max_new_tokens=12).text
    # top-k 1 leaves one token to draw: greedy again, whatever the temperature
    assert session.generate("The Python language", max_new_tokens=12, temperature=5.0, top_k=1).tokens == greedy.tokens
    first = session.generate("The Python language", max_new_tokens=12, temperature=1.5, seed=7)
    assert first.tokens == session.generate("The Python language", max_new_tokens=12, temperature=1.5, seed=7).tokens
    assert greedy.prefill_tokens_per_s > 0 and greedy.decode_tokens_per_s > 0
    with pytest.raises(GenerationError, match="give a prompt or prompt_ids"):
        session.generate()


def test_cli_generate_streams_text_and_reports_speed(decoder_artifact: Path, capsys: pytest.CaptureFixture) -> None:
    assert cli.main(["generate", str(decoder_artifact), "-p", "def main():", "-n", "8"]) == 0
    out, err = capsys.readouterr()
    expected = runtime.load(decoder_artifact).generate("def main():", max_new_tokens=8).text
    assert out == expected + "\n"
    assert "prefill" in err and "decode" in err and "tokens/s" in err
    # whatever the artifact's default executor, a generation decodes on the step library where one ships
    if json.loads((decoder_artifact / "manifest.json").read_text())["decoder"].get("step_executor"):
        assert "[onnxruntime, tvm-decode]" in err


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["-n", "0"], "max_new_tokens 0 is not a positive integer"),
        (["--temperature", "nan"], "temperature nan is not a finite number"),
        (["--top-k", "-2"], "top_k -2 is not an integer >= 0"),
        (["-n", "8190"], "more than the model's context of 8192 positions"),
    ],
)
def test_cli_generate_refuses_bad_requests(
    decoder_artifact: Path, arguments: list[str], message: str, capsys: pytest.CaptureFixture
) -> None:
    assert cli.main(["generate", str(decoder_artifact), "-p", "one two three four", *arguments]) == 2
    assert message in capsys.readouterr().err


def test_an_artifact_that_is_not_a_decoder_cannot_generate(artifact: Path, capsys: pytest.CaptureFixture) -> None:
    assert cli.main(["generate", str(artifact), "-p", "hello"]) == 2
    assert "not a decoder with a KV cache" in capsys.readouterr().err


@pytest.fixture(scope="module")
def step_artifact(decoder_model: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The decoder compiled W8A8 with its decode-step library shipped whatever it measured (``always``: whether
    it is faster is the bench's question; here it must be right)."""
    model, folder = decoder_model
    output = tmp_path_factory.mktemp("artifacts") / "smollm2_step.host"
    assert cli.main([str(model), "-c", str(folder), "-o", str(output), "--decode-step", "always", "-q"]) == 0
    return output


def test_decode_steps_run_on_the_kernels_with_a_cache_of_codes(step_artifact: Path) -> None:
    """The step library takes one token on a cache of 511 positions kept as uint8 codes, and matched the numpy
    oracle of its integer graph at compile time (bit for bit outside the float nodes)."""
    manifest = json.loads((step_artifact / "manifest.json").read_text())
    entry = manifest["decoder"]
    assert entry["step_executor"] == "tvm-decode" and entry["step_capacity"] == 511
    executor = manifest["executors"]["tvm-decode"]
    assert executor["input_shapes"]["past_key_values.1.value"] == [1, 3, 511, 64]
    assert executor["input_shapes"]["attention_mask"] == [1, 512] and executor["input_shapes"]["input_ids"] == [1, 1]
    # the keys are coded per position: beside their codes, a float cache of one scale per position
    scales = entry["step_cache_scales"]
    assert set(scales) == {past for past, _ in entry["cache"] if past.endswith(".key")}
    # the library's order (the JSON objects' keys are sorted: past_key_values.10 would come before .2)
    assert executor["state"] == [[f"{past}.scales", f"{present}.scales"] for past, present in entry["cache"][::2]]
    assert executor["input_dtypes"] == {past: "uint8" for past, _ in entry["cache"]} | {
        scales: "float32" for scales, _ in executor["state"]
    }
    assert executor["input_shapes"]["past_key_values.0.key.scales"] == [1, 3, 511, 1]
    # per key cache: the 1/sqrt(sqrt(64)) multiplier, the levels (127) and the zero point; per value cache one
    # static scale and the zero point
    assert entry["step_cache_codes"]["past_key_values.0.key"][1:] == [127.0, 128.0]
    assert len(entry["step_cache_codes"]["past_key_values.0.value"]) == 2
    # the weights are in a file of their own, read into their tensors at load; the library keeps the small constants
    assert executor["weights"] == "decode_step.weights" and "decode_step.weights" in manifest["files"]
    library, weights = (step_artifact / name for name in ("decode_step.so", "decode_step.weights"))
    assert library.stat().st_size < 4 << 20 and weights.stat().st_size > 8 * library.stat().st_size
    loaded = runtime.load(step_artifact, "tvm-decode")
    assert loaded.library is not None
    verdict = manifest["measured"]["accuracy"]["decode_step"]
    assert "numpy oracle" in verdict["oracle"]
    assert set(verdict["step_ms"]) == {"tvm-decode", "onnxruntime", "onnxruntime-fp32"}
    # the step's logits against the quantized graph's step on the cache of the filled positions alone: the same
    # int8 rows and codes, the integer arithmetic within a quantization step of QDQ's
    assert verdict["logits_vs"]["onnxruntime"]["mean_cosine"] >= 0.999


def test_the_step_cache_layout_equals_the_cache_of_the_filled_positions(step_artifact: Path) -> None:
    """The float model fed the step library's layout (the cache's filled positions first, zeros after them
    masked out, the new token last) gives the logits of the cache of the filled positions alone, to float32
    rounding: the masked positions weigh exactly 0."""
    from qcompile.runtime.generate import StepCache
    from qcompile.runtime.manifest import Decoder

    session = runtime.load(step_artifact, "onnxruntime-fp32")
    generator = Generator(session)
    decoder = session.manifest.decoder
    assert decoder is not None
    capacity = 40
    float_layout = Decoder(
        **{**decoder.to_json(), "step_capacity": capacity, "step_cache_codes": None, "step_cache_scales": None}
    )
    infos = {info.name: info for info in session.inputs}
    buffers = {name: np.zeros((1, 3, capacity, 64), np.float32) for name, _ in float_layout.cache} | {
        "input_ids": np.zeros((1, 1), np.int64),
        "position_ids": np.zeros((1, 1), np.int64),
        "attention_mask": np.zeros((1, capacity + 1), np.int64),
    }
    assert set(buffers) == set(infos)
    steps = StepCache(float_layout, buffers)
    tokens = [1, 504, 3458, 314, 4649, 281, 253]
    _, cache = generator.step(tokens, generator.empty_cache(1), 0)
    steps.start(cache)
    padded = session.run(steps.feeds(6342))[decoder.logits][0, -1]
    alone, _ = generator.step([6342], cache, len(tokens))
    assert np.abs(padded - alone).max() <= 1e-4 * np.ptp(alone)


def test_generation_decodes_on_the_step_library_as_on_the_quantized_graph(step_artifact: Path) -> None:
    """Greedy tokens decoded on the step library, fed again through the quantized onnxruntime graph one at a
    time: each step's logits agree (cosine >= 0.999: integer requantization against QDQ's float rescaling),
    and so do their next tokens but for near ties."""
    session = runtime.load(step_artifact, "onnxruntime")
    generator = Generator(session)
    assert generator.stepper is not None and generator.stepper.executor == "tvm-decode"
    result = generator.generate("The Python language", max_new_tokens=24)
    assert result.executor == "onnxruntime, tvm-decode" and len(result.tokens) == 24
    ids = generator.encode("The Python language")
    _, cache = generator.step(ids, generator.empty_cache(1), 0)
    steps = generator.step_cache
    assert steps is not None
    steps.start(cache)
    same = 0
    for token in result.tokens[:-1]:
        ours = generator.stepper.run(steps.feeds(token))
        steps.append(ours)
        theirs, cache = generator.step([token], cache, len(ids))
        ids.append(token)
        mine = ours[generator.decoder.logits][0, -1]
        assert float(mine @ theirs / np.linalg.norm(mine) / np.linalg.norm(theirs)) >= 0.999
        same += int(mine.argmax() == theirs.argmax())
    assert same >= 0.9 * (len(result.tokens) - 1)
    # a generation past the step cache decodes on the quantized graph alone
    longer = generator.generate(prompt_ids=[1] * 500, max_new_tokens=16)
    assert longer.executor == "onnxruntime" and len(longer.tokens) == 16


def test_the_decode_step_for_a_cortex_a76_runs_under_qemu_like_the_oracle(
    decoder_model: tuple[Path, Path], tmp_path: Path
) -> None:
    """For an Arm board the step library is cross-compiled (sdot kernels), run under qemu as a Cortex-A76 on a
    real step and equal to the numpy oracle of its integer graph (as the host build is, to float32 rounding), and
    its latency on the board estimated (llvm-mca), never timed under emulation."""
    from conftest import emulation_toolchain

    if emulation_toolchain({"kind": "llvm", "mtriple": "aarch64-linux-gnu"}) is None:
        pytest.skip("needs the cross toolchain and qemu: qcompile toolchains --install")
    model, folder = decoder_model
    output = tmp_path / "smollm2_step.cortex-a76"
    flags = ["--target", "cortex-a76", "--decode-step", "always", "-q"]
    assert cli.main([str(model), "-c", str(folder), "-o", str(output), *flags]) == 0
    manifest = json.loads((output / "manifest.json").read_text())
    assert manifest["decoder"]["step_executor"] == "tvm-decode"
    executor = manifest["executors"]["tvm-decode"]
    assert executor["arch"] == "aarch64" and executor["runner"] and "+dotprod" in executor["target"]["mattr"]
    verdict = manifest["measured"]["accuracy"]["decode_step"]
    oracle = verdict["oracle"]
    assert "qemu-aarch64 -cpu cortex-a76" in oracle
    # Bit for bit, but for float32 rounding in the float nodes that the per-row activation scales carry into the
    # outputs (a row's max |x| one ulp apart scales its whole product; a code at a rounding boundary moves by
    # one): no further from the oracle than float32 rounding in those nodes alone moves the oracle itself
    # (its float nodes' outputs scaled by 1 + 2**-20, on the same sample); the compile's own check allows four
    # times that, and at least 1e-3.
    assert oracle.startswith("bit-exact") or oracle.startswith("within"), oracle
    if oracle.startswith("within"):
        error, spread = float(oracle.split()[1]), float(oracle.split("moves the oracle ")[1].split(";")[0])
        assert error <= spread, oracle
    assert "step_ms" not in verdict  # nothing timed under emulation
    assert verdict["board_estimate"]["estimated_ms"] > 0 and "estimate" in verdict["board_estimate"]["source"]


def test_chat_writes_the_message_into_the_models_template(
    decoder_artifact: Path, capsys: pytest.CaptureFixture
) -> None:
    """The chat template beside the model (transformers' chat_template.jinja) travels in the artifact; --chat
    writes the prompt into it as the user's message, after the template's own system message or --system's."""
    import dataclasses

    manifest = json.loads((decoder_artifact / "manifest.json").read_text())
    assert manifest["decoder"]["chat_template"] == "chat_template.jinja" and "chat_template.jinja" in manifest["files"]
    assert manifest["decoder"]["special_tokens"]["eos_token"] == "<|im_end|>"
    generator = Generator(runtime.load(decoder_artifact, "onnxruntime"))
    text = generator.chat("What is Python?")
    assert text.startswith("<|im_start|>system\n") and text.endswith(
        "<|im_start|>user\nWhat is Python?<|im_end|>\n<|im_start|>assistant\n"
    )
    assert generator.chat("Hi", system="Be brief.").startswith("<|im_start|>system\nBe brief.<|im_end|>\n")
    assert generator.encode(text)[0] == 1  # <|im_start|> is one special token, not its characters
    assert cli.main(["generate", str(decoder_artifact), "-p", "What is Python?", "--chat", "-n", "4"]) == 0
    assert "prompt" in capsys.readouterr().err
    assert cli.main(["generate", str(decoder_artifact), "-p", "x", "--system", "Be brief."]) == 2
    generator.decoder = dataclasses.replace(generator.decoder, chat_template=None)
    with pytest.raises(GenerationError, match="no chat template"):
        generator.generate("Hi", chat=True)
