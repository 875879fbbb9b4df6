import json
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from services.common import model_source
from services.common.model_source import (
    DEFAULT_MODEL,
    ModelNotFoundError,
    ModelSource,
    ServingLimits,
    convert_once,
    load_model,
    load_serving_limits,
    load_tokenizer,
    resolve_model,
)
from testing.stack import ROOT


def test_default_name_and_aliases_resolve_to_the_packaged_gguf():
    source = resolve_model(DEFAULT_MODEL)
    assert source.gguf_file and (source.directory / source.gguf_file).is_file()
    assert resolve_model("HuggingFaceTB/SmolLM2-135M-Instruct") == source
    assert source.matches("") and source.matches("smollm2") and not source.matches("other")


def test_a_gguf_path_resolves_to_its_folder_and_file():
    packaged = resolve_model(DEFAULT_MODEL)
    source = resolve_model(str(packaged.directory / packaged.gguf_file))
    assert source.directory == packaged.directory and source.gguf_file == packaged.gguf_file


def test_a_hf_folder_resolves(tiny_model_dir):
    source = resolve_model(str(tiny_model_dir))
    assert source.gguf_file is None and source.name == tiny_model_dir.name


@pytest.mark.parametrize("spec", ["no-such-model", "/nonexistent/model.gguf", "org/remote-model"])
def test_anything_else_is_refused_without_a_download(spec):
    with pytest.raises(ModelNotFoundError, match="model"):
        resolve_model(spec)


def test_dummy_weights_keep_the_config_but_not_the_weights(tiny_model_dir, tiny_hf_model):
    dummy = load_model(resolve_model(str(tiny_model_dir)), dtype=torch.float32, load_format="dummy")
    assert dummy.config.hidden_size == tiny_hf_model.config.hidden_size
    real = tiny_hf_model.model.embed_tokens.weight
    assert dummy.model.embed_tokens.weight.shape == real.shape
    assert not torch.equal(dummy.model.embed_tokens.weight, real)


def test_bfloat16_loading(tiny_model_dir):
    model = load_model(resolve_model(str(tiny_model_dir)), dtype=torch.bfloat16)
    assert next(model.parameters()).dtype == torch.bfloat16


def test_conversion_runs_once_and_later_loads_reuse_the_folder(tmp_path):
    target = tmp_path / "models" / "m-1"
    calls = []

    def convert(folder):
        calls.append(folder)
        (folder / "config.json").write_text("{}")

    convert_once(target, convert)
    convert_once(target, convert)
    assert len(calls) == 1 and (target / "config.json").is_file()
    assert sorted(p.name for p in target.parent.iterdir()) == ["m-1", "m-1.lock"]  # no scratch


def test_processes_starting_together_convert_once(tmp_path):
    target = tmp_path / "m"
    calls = []

    def convert(folder):
        calls.append(folder)
        time.sleep(0.3)  # the other thread reaches the lock meanwhile
        (folder / "config.json").write_text("{}")

    with ThreadPoolExecutor(2) as pool:
        list(pool.map(lambda _: convert_once(target, convert), range(2)))
    assert len(calls) == 1 and (target / "config.json").is_file()


def test_a_failed_conversion_leaves_nothing_and_is_retried(tmp_path):
    target = tmp_path / "m"

    def crash(folder):
        (folder / "half-written").write_text("x")
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError):
        convert_once(target, crash)
    assert not target.exists() and [p.name for p in tmp_path.iterdir()] == ["m.lock"]
    convert_once(target, lambda folder: (folder / "config.json").write_text("{}"))
    assert (target / "config.json").is_file()


def test_an_unwritable_cache_falls_back_to_reading_the_gguf(tmp_path, monkeypatch, caplog):
    """... and a process tries it once: the frontend asks for the tokenizer, then the limits."""
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    monkeypatch.setattr(model_source, "MODEL_CACHE", blocker / "models")
    monkeypatch.setattr(model_source, "_unwritable", set())
    source = resolve_model(DEFAULT_MODEL)
    assert model_source.local_folder(source) == source
    assert model_source.local_folder(source) == source
    warnings = [r for r in caplog.records if "cannot cache" in r.getMessage()]
    assert len(warnings) == 1


def test_the_frontend_loads_without_torch_what_auto_classes_load(tiny_model_dir):
    """The tokenizer fast path and the serving limits read from JSON agree with transformers'
    Auto classes, and a fresh interpreter loading them never imports torch."""
    from transformers import AutoConfig, AutoTokenizer

    source = resolve_model(str(tiny_model_dir))
    fast, auto = load_tokenizer(source), AutoTokenizer.from_pretrained(tiny_model_dir)
    text = "Hello wörld, <|im_start|> 日本"
    assert fast(text)["input_ids"] == auto(text)["input_ids"]
    assert fast.chat_template == auto.chat_template and fast.eos_token_id == auto.eos_token_id
    limits = load_serving_limits(source)
    config = AutoConfig.from_pretrained(tiny_model_dir)
    assert limits == ServingLimits(config.max_position_embeddings, frozenset({config.eos_token_id}))
    probe = (
        "import sys; from services.frontend.tokenizer import ModelTokenizer; "
        "from services.common.model_source import resolve_model; "
        f"ModelTokenizer.load(resolve_model({str(tiny_model_dir)!r})); "
        "assert 'torch' not in sys.modules, 'torch was imported'"
    )
    subprocess.run([sys.executable, "-c", probe], check=True, cwd=ROOT)


def test_serving_limits_read_nested_configs_and_eos_lists(tmp_path):
    (tmp_path / "config.json").write_text(
        json.dumps({"text_config": {"max_position_embeddings": 4096}, "eos_token_id": [5, 6]})
    )
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": 7}))
    limits = load_serving_limits(ModelSource(name="m", directory=tmp_path))
    assert limits == ServingLimits(4096, frozenset({5, 6, 7}))


@pytest.mark.slow
def test_a_frontend_converts_only_the_tokenizer_and_config(tmp_path, monkeypatch):
    """What needs no weights converts no weights: the frontend's tokenizer and limits from the
    packaged GGUF come from a small folder that tokenizes exactly as the GGUF does."""
    from transformers import AutoTokenizer

    monkeypatch.setattr(model_source, "MODEL_CACHE", tmp_path)
    source = resolve_model(DEFAULT_MODEL)
    tokenizer = load_tokenizer(source)
    assert load_serving_limits(source) == ServingLimits(8192, frozenset({2}))
    (folder,) = [path for path in tmp_path.iterdir() if path.is_dir()]
    assert folder.name.endswith("-tokenizer") and not (folder / "model.safetensors").exists()
    reference = AutoTokenizer.from_pretrained(source.directory, **source.hf_kwargs())
    text = "The capital of France is Paris. ünïcode 日本語 <|im_start|>"
    assert tokenizer(text)["input_ids"] == reference(text)["input_ids"]
    assert tokenizer.chat_template == reference.chat_template


def test_a_complete_conversion_is_used_without_writing_to_the_cache(tmp_path):
    """What lets an image carry the conversion under a read-only root filesystem: a complete
    folder is used as is, with no lock file or scratch folder made beside it."""
    target = tmp_path / "m"
    convert_once(target, lambda folder: (folder / "config.json").write_text("{}"))
    (tmp_path / "m.lock").unlink()
    convert_once(target, lambda folder: pytest.fail("converted again"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]


def run_prepare_model(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "services.cli", "prepare-model", *args],
        cwd=ROOT, capture_output=True, text=True, timeout=240,
    )  # fmt: skip


def test_prepare_model_refuses_unknown_models_and_leaves_folders_alone(tiny_model_dir):
    missing = run_prepare_model("--model", "no-such-model")
    assert missing.returncode == 2 and "no-such-model" in missing.stderr
    folder = run_prepare_model("--model", str(tiny_model_dir))
    assert folder.returncode == 0 and "nothing to convert" in folder.stdout


@pytest.mark.slow
def test_prepare_model_converts_the_default_gguf_into_the_cache():
    """`fastserve prepare-model` (what the Docker image runs at build time) leaves the complete
    conversion the services load: the folder it prints is the one a worker resolves to. It
    shares the default cache with the default-model e2e test, so CI converts once."""
    prepared = run_prepare_model()
    assert prepared.returncode == 0, prepared.stderr
    folder = Path(prepared.stdout.strip())
    assert (folder / "model.safetensors").is_file() and (folder / "tokenizer.json").is_file()
    from safetensors import safe_open

    with safe_open(str(folder / "model.safetensors"), framework="pt") as handle:
        names = set(handle.keys())
    # SmolLM2 ties its head: the embedding under its own name, once (vLLM reads this folder).
    assert json.loads((folder / "config.json").read_text())["tie_word_embeddings"] is True
    assert "model.embed_tokens.weight" in names and "lm_head.weight" not in names
    assert model_source.local_folder(resolve_model(DEFAULT_MODEL)).directory == folder
    assert (
        model_source.local_folder(resolve_model(DEFAULT_MODEL), weights=False).directory == folder
    )


LLAMA_TENSORS = (
    "model.embed_tokens.weight",
    "model.norm.weight",
    *(
        f"model.layers.{layer}.{name}.weight"
        for layer in range(4)
        for name in (
            "input_layernorm", "post_attention_layernorm", "self_attn.q_proj",
            "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
            "mlp.up_proj", "mlp.down_proj",
        )
    ),
)  # fmt: skip


@pytest.mark.parametrize("tied", [True, False])
def test_a_converted_checkpoint_is_a_standard_llama_folder_that_transformers_and_we_agree_on(
    tmp_path, tiny_model_dir, tied
):
    """What `prepare-model` writes: Hugging Face's names (a tied embedding as
    model.embed_tokens.weight only, as HF's own checkpoints; vLLM reads no lm_head.weight as the
    embedding), loaded by transformers, whose greedy output equals FastServe's."""
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    from services.worker.model_runner import ModelRunner
    from services.worker.models.loader import load_serving_model
    from testing.oracle import assert_greedy_matches, hf_greedy
    from testing.tiny_model import tiny_llama_config
    from tests.worker.test_model_runner import drive, make_prompts

    vocab = json.loads((tiny_model_dir / "config.json").read_text())["vocab_size"]
    torch.manual_seed(3)
    original = AutoModelForCausalLM.from_config(
        tiny_llama_config(vocab, tie_word_embeddings=tied)
    ).eval()
    with torch.no_grad():
        for param in original.parameters():
            if param.dim() > 1:
                param.normal_(0.0, 0.2)
    folder = tmp_path / "converted"
    folder.mkdir()
    original.config.save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (folder / name).write_bytes((tiny_model_dir / name).read_bytes())
    model_source.save_checkpoint(original, folder)

    with safe_open(str(folder / "model.safetensors"), framework="pt") as handle:
        names = set(handle.keys())
    assert names == set(LLAMA_TENSORS) | ({"lm_head.weight"} if not tied else set())
    assert json.loads((folder / "config.json").read_text())["tie_word_embeddings"] is tied

    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    for name, tensor in original.state_dict().items():
        torch.testing.assert_close(hf.state_dict()[name], tensor, rtol=0, atol=0)
    ours = load_serving_model(
        resolve_model(str(folder)), layers=None, dtype=torch.float32, device="cpu"
    )
    prompts = make_prompts(vocab, lens=(5, 17))
    outputs = drive(ModelRunner(ours, num_blocks=16, block_size=16), prompts).outputs
    for prompt, output in zip(prompts, outputs, strict=True):
        assert_greedy_matches(hf, prompt, output, hf_greedy(hf, prompt, len(output)))
