"""The llama.cpp backend (llama-cpp-python): GGUF chat, completion, streaming, embeddings."""
