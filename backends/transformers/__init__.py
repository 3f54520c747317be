"""The Hugging Face Transformers backend: causal-LM chat and sentence embeddings."""
