"""The policy model shared by the reference, train and evaluate stages.

- `store`: model resolution (the SmolLM2 GGUF is converted once into a plain transformers folder in
  the cache), loading the tokenizer and the causal LM.
- `tokenize`: the chat template, left-truncated prompts, right-truncated responses + EOS.
- `logprobs`: length-grouped batching and batched per-token log-probs of responses (with the
  prompt states of the same forward).
- `generate`: batched generation.

Notation (../shared/method.md): a row is a prompt x and a response y_1..y_T (T counts the EOS
appended to every response); l_t = log pi(y_t | x, y_<t).
"""
