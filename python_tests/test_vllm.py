"""mtp_ext's heads served by vLLM: run by `make test-vllm` in .venv-vllm (vLLM pins its own
transformers), where mtp_ext is importable from the source tree; skipped where vLLM is not
installed.

The round trip compares vLLM's own Medusa class, loaded from an export, with mtp_ext's heads on
the same hidden states. The real-model test decodes held-out Bible text (the heads were trained
on Austen) with SmolLM2 and the committed export, with and without the heads.
"""
import types
from pathlib import Path

import pytest
import torch

pytest.importorskip("vllm", reason="vLLM is not installed here: make test-vllm runs these tests in .venv-vllm")

from safetensors.torch import load_file  # noqa: E402
from tiny_models import tiny_model  # noqa: E402

from mtp_ext.heads import MTPHeadsModel  # noqa: E402
from mtp_ext.integrations.vllm import (  # noqa: E402
    CONFIG_FILE,
    WEIGHTS_FILE,
    export_medusa,
    greedy_generate,
    llm_arguments,
)

ROOT = Path(__file__).resolve().parents[1]
EXPORT = ROOT / "results" / "vllm" / "medusa-vllm"
PROMPTS, PROMPT_TOKENS, NEW_TOKENS = 8, 64, 64
# Zero-initialised Medusa heads (each a copy of the next-token state) reach 1.03 on this text.
MIN_ACCEPTANCE_LENGTH = 1.25


@pytest.fixture(scope="module")
def vllm_medusa_class():
    """vLLM's Medusa class, with the single-process model-parallel state its layers need."""
    from vllm.config import VllmConfig, set_current_vllm_config
    from vllm.distributed import init_distributed_environment, initialize_model_parallel
    from vllm.model_executor.models.medusa import Medusa
    from vllm.utils.network_utils import get_open_port

    with set_current_vllm_config(VllmConfig()):
        init_distributed_environment(world_size=1, rank=0, local_rank=0, backend="gloo",
                                     distributed_init_method=f"tcp://127.0.0.1:{get_open_port()}")
        initialize_model_parallel(1, 1)
    return Medusa


def load_in_vllm(medusa_class, directory: Path):
    """vLLM's Medusa model from an exported directory, as vLLM's loader builds it."""
    from vllm.config import VllmConfig, set_current_vllm_config
    from vllm.transformers_utils.configs.medusa import MedusaConfig

    config = MedusaConfig.from_pretrained(str(directory))
    holder = types.SimpleNamespace(speculative_config=types.SimpleNamespace(
        draft_model_config=types.SimpleNamespace(hf_config=config)))
    with set_current_vllm_config(VllmConfig()):
        model = medusa_class(vllm_config=holder)
    loaded = model.load_weights(load_file(directory / WEIGHTS_FILE).items())
    for module in model.modules():  # the loader's last step: e.g. the CPU's GEMM binding
        method = getattr(module, "quant_method", None)
        if method is not None:
            method.process_weights_after_loading(module)
    return model, loaded


@pytest.mark.parametrize("draft_vocab", [None, [3, 5, 1, 0, 9, 12, 16]])
def test_export_round_trip_gives_mtp_ext_draft_tokens(tmp_path, vllm_medusa_class, draft_vocab):
    backbone = tiny_model("llama")
    heads = MTPHeadsModel(backbone, num_heads=3, head_type="medusa")
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():  # trained-looking heads: the zero init would copy the backbone's choice
        for parameter in heads.heads.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.5)
    vocab_ids = None if draft_vocab is None else torch.tensor(draft_vocab)
    export_medusa(heads, tmp_path, vocab_ids)
    model, loaded = load_in_vllm(vllm_medusa_class, tmp_path)
    # every parameter came from the file (vLLM sets the token map aside)
    assert {name for name, _ in model.named_parameters()} - {"token_map"} <= loaded
    assert draft_vocab is None or model.token_map.tolist() == draft_vocab
    input_ids = torch.randint(0, 17, (2, 9), generator=generator)
    with torch.no_grad():
        outputs = backbone.base_model(input_ids=input_ids, output_hidden_states=True)
        logits = heads.head_hidden(outputs.hidden_states) @ heads.unembed_weight.T  # [N, B, T, V]
        if vocab_ids is not None:
            logits = torch.full_like(logits, -torch.inf).index_copy(-1, vocab_ids, logits[..., vocab_ids])
        ours = logits.argmax(-1).flatten(1)
        # vLLM's proposer feeds the target model's final (post-norm) hidden state.
        theirs = torch.stack([head_logits.argmax(-1) for head_logits in
                              model.compute_logits(model(outputs.hidden_states[-1].flatten(0, 1)))])
    assert torch.equal(ours, theirs)
    assert len(ours.unique()) > 3  # the heads disagree with each other: a wrong mapping would show


@pytest.mark.slow
def test_smollm2_with_the_committed_heads_is_lossless_and_accepts_drafts():
    from transformers import AutoTokenizer

    from mtp_ext import data as corpora
    from mtp_ext.models import model_cache_dir

    model_dir = model_cache_dir("smollm2-135m")
    if not (model_dir / "config.json").is_file():
        pytest.skip("SmolLM2-135M is not prepared (make prepare)")
    if not (EXPORT / CONFIG_FILE).is_file():
        pytest.skip(f"no exported heads in {EXPORT}")
    try:
        text = " ".join(english for english, _ in corpora.load_pairs("bible-en-es")[:600])
    except corpora.MissingDependencyError as error:
        pytest.skip(f"the Bible is not prepared: {error}")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    prompts = corpora.spread_prompts(tokenizer, text, PROMPTS, PROMPT_TOKENS)
    plain = greedy_generate(model_dir, prompts, NEW_TOKENS)
    medusa = greedy_generate(model_dir, prompts, NEW_TOKENS, engine=llm_arguments(EXPORT))
    assert medusa.token_ids == plain.token_ids
    assert sum(map(len, plain.token_ids)) >= PROMPTS * NEW_TOKENS // 2
    assert medusa.drafts > 0 and plain.drafts == 0
    assert medusa.mean_acceptance_length >= MIN_ACCEPTANCE_LENGTH, medusa
