"""A tiny random Llama and a byte-level BPE tokenizer trained in the test: the models unit tests run on.

`tiny_model_folder(tmp)` writes a transformers folder (safetensors, ChatML chat template) that
`resolve_model(str(folder), ...)`, `load_tokenizer` and `load_causal_lm` accept.
"""

from __future__ import annotations

from pathlib import Path

import torch

CHATML = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CORPUS = [
    "hello there how are you today",
    "i am fine thank you and you",
    "what is your name my name is bot",
    "tell me a joke about cats and dogs",
    "the quick brown fox jumps over the lazy dog",
    "do you like music i like jazz and rock",
    "where do you live i live in the computer",
    "numbers one two three four five six seven eight nine ten",
]


def train_tokenizer(folder: Path, *, chat_template: bool = True, pad_token: bool = True) -> None:
    """Byte-level BPE with a few hundred tokens, saved as a transformers tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=SPECIAL, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    core.train_from_iterator(CORPUS * 4, trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core,
        eos_token="<|im_end|>" if chat_template else "<|endoftext|>",
        pad_token="<|endoftext|>" if pad_token else None,
        bos_token=None if chat_template else "<|endoftext|>",
    )
    if chat_template:
        tokenizer.chat_template = CHATML
    tokenizer.save_pretrained(folder)


def tiny_model_folder(folder: Path, *, chat_template: bool = True, pad_token: bool = True, seed: int = 0) -> Path:
    """A random LlamaForCausalLM (about 100k parameters, hidden size 64) plus tokenizer in `folder`."""
    from transformers import LlamaConfig, LlamaForCausalLM

    folder.mkdir(parents=True, exist_ok=True)
    train_tokenizer(folder, chat_template=chat_template, pad_token=pad_token)
    from transformers import AutoTokenizer

    vocab = len(AutoTokenizer.from_pretrained(folder))
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=False,
        eos_token_id=2,
        pad_token_id=0 if pad_token else None,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    # Larger than the default init so that the random model's distributions are far from uniform.
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() > 1:
                param.normal_(0.0, 0.2)
    model.save_pretrained(folder)
    return folder
