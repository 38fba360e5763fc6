"""Causal language models (Hugging Face Llama / Qwen2 / Mistral) as klas block views: embeddings -> decoder layers ->
final norm + LM head, with costs stated per token at one context length."""
