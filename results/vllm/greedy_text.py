"""The model's own greedy continuations of Austen, as training text for drafting heads: heads
that learn them, teacher-forced, learn what greedy decoding will produce (on real text the
token after next is conditioned on the real next token, which greedy decoding picks only a
third of the time). Runs in .venv-vllm (vLLM decodes them in batches):

    .venv-vllm/bin/python results/vllm/greedy_text.py OUT.jsonl [PROMPTS] [NEW_TOKENS]

writes one {"text": prompt + continuation} line per prompt: 64-token prompts at even strides over
the five Austen novels that train-heads trains on (the sixth, Persuasion, is its held-out text).
"""
import json
import sys

from mtp_ext import data as corpora
from mtp_ext._io import atomic_write_text
from mtp_ext.heads.training import split_documents
from mtp_ext.integrations.vllm import VllmEngine
from mtp_ext.models import model_cache_dir

if __name__ == "__main__":
    from pathlib import Path

    from transformers import AutoTokenizer

    out, count, new_tokens = Path(sys.argv[1]), int(sys.argv[2]) if len(sys.argv) > 2 else 320, \
        int(sys.argv[3]) if len(sys.argv) > 3 else 200
    model_dir = model_cache_dir("smollm2-135m")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    training, _, _ = split_documents(corpora.load_text("austen"))
    prompts = corpora.spread_prompts(tokenizer, "\n".join(training), count, 64)
    with VllmEngine(model_dir, max_batch=32) as engine:
        run = engine.generate(prompts, new_tokens)
    texts = [tokenizer.decode(prompt + continuation) for prompt, continuation in zip(prompts, run.token_ids)]
    atomic_write_text(out, "".join(json.dumps({"text": text}) + "\n" for text in texts))
    print(f"wrote {out}: {len(texts)} texts, {sum(map(len, run.token_ids))} generated tokens in {run.seconds:.0f} s")
