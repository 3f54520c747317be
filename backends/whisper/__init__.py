"""The faster-whisper backend: speech to text, and speech to English text."""
