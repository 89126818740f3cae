"""Tiny random models of the supported architectures, built offline from configs."""
import torch
from transformers import (
    AutoModelForCausalLM,
    Gemma3TextConfig,
    GPT2Config,
    GPTNeoXConfig,
    LlamaConfig,
)


def tiny_config(architecture: str, vocab_size: int = 17, context: int = 128):
    if architecture == "llama":
        return LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=context)
    if architecture == "gemma3":
        # One sliding layer with a window shorter than the prompts, so that the window matters.
        return Gemma3TextConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                num_attention_heads=4, num_key_value_heads=2, head_dim=8, sliding_window=4,
                                layer_types=["sliding_attention", "full_attention"],
                                max_position_embeddings=context)
    if architecture == "gpt2":
        return GPT2Config(vocab_size=vocab_size, n_embd=32, n_layer=2, n_head=4, n_positions=context,
                          bos_token_id=0, eos_token_id=1)
    if architecture == "gpt_neox":
        return GPTNeoXConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                             num_attention_heads=4, max_position_embeddings=context)
    raise ValueError(architecture)


ARCHITECTURES = ["llama", "gemma3", "gpt2", "gpt_neox"]


def tiny_model(architecture: str, vocab_size: int = 17, seed: int = 0, context: int = 128):
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(architecture, vocab_size, context))
    # Random weights give nearly uniform distributions; larger ones give peaked, realistic ones.
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(8.0)
    return model.eval()


def padded_batch(prompts: list[list[int]], side: str = "left") -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask) of token lists padded with 0 on the given side."""
    width = max(map(len, prompts))
    input_ids = torch.zeros(len(prompts), width, dtype=torch.long)
    mask = torch.zeros_like(input_ids)
    for row, prompt in enumerate(prompts):
        columns = slice(width - len(prompt), width) if side == "left" else slice(0, len(prompt))
        input_ids[row, columns] = torch.tensor(prompt)
        mask[row, columns] = 1
    return input_ids, mask
